"""XDModel: validation, atomic save/load, corrupt files, sampling."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mixtures import known_mixture_3d
from xd_dask.model import ModelFileError, XDModel
from xd_dask.params import Params


def _model():
    w, m, V = known_mixture_3d()
    return XDModel(
        Params(w, m, V), ["a", "b", "c"], {"units": ["mag", "deg", "mas"], "history": [1.5]}
    )


def test_round_trip(tmp_path):
    mod = _model()
    path = mod.save(tmp_path / "m.npz")
    back = XDModel.load(path)
    np.testing.assert_array_equal(back.covariances, mod.covariances)
    assert back.feature_names == ["a", "b", "c"] and back.metadata == mod.metadata
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temp file left


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"weights": [0.5, 0.6, -0.1]}, "weight of component 2"),
        ({"weights": [0.5, 0.3, 0.3]}, "sum to 1"),
        ({"covariances": -np.stack([np.eye(3)] * 3)}, "component 0 is not positive definite"),
        ({"means": np.zeros((2, 3))}, "shapes disagree"),
    ],
)
def test_validation(kw, match):
    w, m, V = known_mixture_3d()
    args = {"weights": w, "means": m, "covariances": V} | kw
    with pytest.raises(ValueError, match=match):
        XDModel(Params(**args))


def test_nonsymmetric_covariance_named():
    w, m, V = known_mixture_3d()
    V = V.copy()
    V[1, 0, 2] += 0.1
    with pytest.raises(ValueError, match="component 1 is not symmetric"):
        XDModel(Params(w, m, V))


def test_corrupt_truncated_and_foreign_files(tmp_path):
    good = _model().save(tmp_path / "good.npz")
    data = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="trunc.npz: corrupt or truncated"):
        XDModel.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "foreign.npz", x=np.arange(3))
    with pytest.raises(ModelFileError, match="not an xd-dask model"):
        XDModel.load(tmp_path / "foreign.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ModelFileError, match="text.npz"):
        XDModel.load(tmp_path / "text.npz")
    with pytest.raises(ModelFileError, match="no such model file"):
        XDModel.load(tmp_path / "missing.npz")


def test_failed_save_leaves_old_file(tmp_path, monkeypatch):
    path = _model().save(tmp_path / "m.npz")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        _model().save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_sample_moments():
    mod = _model()
    v, labels = mod.sample(200_000, random_state=0, return_labels=True)
    for j in range(3):
        vj = v[labels == j]
        assert len(vj) / len(v) == pytest.approx(mod.weights[j], abs=0.005)
        np.testing.assert_allclose(vj.mean(0), mod.means[j], atol=0.02)
        np.testing.assert_allclose(np.cov(vj.T), mod.covariances[j], atol=0.05)
    S = np.broadcast_to(np.diag([4.0, 0.0, 1.0]), (200_000, 3, 3))
    noisy = mod.sample(200_000, random_state=0, X_cov=S)
    total = np.cov(v.T)
    np.testing.assert_allclose(np.cov(noisy.T) - total, np.diag([4.0, 0.0, 1.0]), atol=0.1)


def test_saved_file_has_ordinary_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = _model().save(tmp_path / "m.npz")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_background_component_round_trip_and_density(tmp_path):
    """A model with a uniform background saves, loads and scores with it: the density is the
    Gaussians' plus weight / box volume (over each row's observed fields)."""
    from xd_dask.kernels import Background, row_log_likelihood

    bg = Background(0.2, [-10.0, -20.0], [10.0, 20.0])
    w = np.array([0.5, 0.3])
    m = np.array([[0.0, 0.0], [3.0, 1.0]])
    V = np.array([np.eye(2), 2 * np.eye(2)])
    model = XDModel(Params(w, m, V, bg))
    with pytest.raises(ValueError, match="sum to 0.8"):
        XDModel(Params(w / w.sum(), m, V, bg))
    back = XDModel.load(model.save(tmp_path / "bg.npz"))
    assert back.background == bg
    X = np.array([[0.5, -0.2], [9.0, 19.0], [np.nan, 3.0]])
    S = np.array([0.1 * np.eye(2)] * 3)
    plain = row_log_likelihood(X, S, Params(w, m, V))
    want = np.logaddexp(plain, np.log(0.2) - np.log([800.0, 800.0, 40.0]))
    np.testing.assert_allclose(back.log_density(X, S), want, rtol=1e-12)
    v, lab = back.sample(20000, random_state=1, return_labels=True)
    assert abs((lab == 2).mean() - 0.2) < 0.02
    assert np.all(v[lab == 2] >= bg.lo) and np.all(v[lab == 2] <= bg.hi)
