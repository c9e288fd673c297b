"""Plots of a fit (matplotlib Agg) from a small in-memory XDGMM fit."""

from __future__ import annotations

import warnings

import matplotlib.image as mpimg
import numpy as np
import pytest

from tests.mixtures import draw_noisy
from tests.shared_data import GAIA_DIR
from xd_dask.estimator import XDGMM
from xd_dask.jobs import plots
from xd_dask.model import XDModel
from xd_dask.params import Params


@pytest.fixture(scope="module")
def fitted():
    """A K=2 XD fit of a sky-like mixture in (ra, dec, parallax)."""
    rng = np.random.default_rng(3)
    w = np.array([0.6, 0.4])
    m = np.array([[60.0, 20.0, 1.0], [250.0, -30.0, 3.0]])
    V = np.array([np.diag([400.0, 100.0, 0.2]), np.diag([200.0, 300.0, 0.5])])
    X, S, _, _ = draw_noisy(rng, w, m, V, 3000, noise_scale=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence within the few iterations is fine here
        xd = XDGMM(2, max_iter=15, random_state=0).fit(X, S)
    model = xd.model_
    model.feature_names = ["ra", "dec", "parallax"]
    return model, X, xd.history_


def _image(path):
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    rgb = img[..., :3].reshape(-1, 3)
    # a real picture: many distinct colours, not a blank canvas
    assert np.unique(np.round(rgb, 2), axis=0).shape[0] > 20
    assert rgb.std() > 0.05
    return img


def test_corner_plot_draws_model_against_data(tmp_path, fitted):
    model, X, _ = fitted
    X = X.copy()
    X[:50, 2] = np.nan  # missing fields are left out per panel
    out = plots.corner_plot(
        model, tmp_path / "corner.png", features=["ra", "dec", "parallax"], data=X, n_samples=5000
    )
    a = _image(out)
    # without data the picture differs (the data contours and histograms are drawn)
    b = _image(
        plots.corner_plot(
            model, tmp_path / "c2.png", features=["ra", "dec", "parallax"], n_samples=5000
        )
    )
    assert a.shape == b.shape and np.abs(a - b).mean() > 1e-3
    with pytest.raises(ValueError, match="feature 'bp_rp' is not in the model"):
        plots.corner_plot(model, tmp_path / "x.png", features=["ra", "bp_rp"])


def test_sky_plot_puts_density_where_the_components_are(tmp_path, fitted):
    model, _, _ = fitted
    _image(plots.sky_plot(model, tmp_path / "sky.png", n_samples=20000))
    nosky = type(model)(model.weights, model.means, model.covariances, ["a", "b", "c"])
    with pytest.raises(ValueError, match="needs features 'ra' and 'dec'"):
        plots.sky_plot(nosky, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_training_curve_from_history(tmp_path, fitted):
    _, _, history = fitted
    assert len(history) >= 3
    _image(plots.training_curve(history, tmp_path / "curve.png"))
    online = [
        {
            "epoch": e,
            "wave": w,
            "iteration": 3 * e + w,
            "wave_mean_loglike": -5.0 + 0.1 * w,
            "seconds": 0.2,
        }
        for e in range(2)
        for w in range(3)
    ]
    _image(plots.training_curve(online, tmp_path / "online.png"))
    with pytest.raises(ValueError, match="no training history"):
        plots.training_curve([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_default_features_skip_sky_positions(fitted):
    model, _, _ = fitted
    assert plots.default_features(model) == ["parallax"]


# ----------------------------------------------------------------------------- issue 11.7
GAIA = str(GAIA_DIR)


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save (still written to disk)."""
    saved = []
    real = plots._save

    def save(fig, path, dpi):
        saved.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "_save", save)
    return saved


def test_corner_axes_carry_the_schema_units(tmp_path, fitted, figures):
    model, X, _ = fitted
    features, units = ["ra", "dec", "parallax"], ["deg", "deg", "mas"]
    plots.corner_plot(
        model, tmp_path / "c.png", features=features, data=X, n_samples=3000, units=units
    )
    fig = figures[-1]
    labels = {ax.get_xlabel() for ax in fig.axes} | {ax.get_ylabel() for ax in fig.axes}
    assert {"ra [deg]", "dec [deg]", "parallax [mas]"} <= labels
    # empty cells are masked (drawn white), never the colour of the lowest density
    mesh = next(c for ax in fig.axes for c in ax.collections if hasattr(c, "get_cmap"))
    arr = mesh.get_array()
    assert np.ma.isMaskedArray(arr) and arr.mask.any() and (~arr.mask).any()
    cmap = mesh.get_cmap()
    assert cmap(np.ma.masked) == (1.0, 1.0, 1.0, 1.0) and cmap(0.0) != cmap(np.ma.masked)


def test_batch_em_curve_counts_iterations_and_online_counts_waves(tmp_path, fitted, figures):
    _, _, history = fitted  # batch-EM history entries also carry epoch = iteration, wave = 1
    n = len(history)
    assert n >= 3 and all(h["wave"] == 1 for h in history)
    plots.training_curve(history, tmp_path / "em.png", method="em")
    plots.training_curve(history, tmp_path / "em2.png")  # inferred: no wave entries
    online = [
        {"iteration": 3 * e + w + 1, "epoch": e + 1, "wave": w + 1, "partitions": [w],
         "wave_mean_loglike": -5.0 + 0.1 * w, "seconds": 0.2}
        for e in range(2)
        for w in range(3)
    ]  # fmt: skip
    plots.training_curve(online, tmp_path / "on.png")
    (em, em2, on) = figures[-3:]
    for fig in (em, em2):
        assert fig.axes[0].get_xlabel() == "iteration"
        assert "batch EM" in fig._suptitle.get_text() and "wave" not in fig._suptitle.get_text()
        np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), np.arange(1, n + 1))
    assert on.axes[0].get_xlabel().startswith("wave") and "online EM" in on._suptitle.get_text()
    np.testing.assert_array_equal(on.axes[0].lines[0].get_xdata(), np.arange(1, 7))


def test_sky_footprint_of_real_gaia_files():
    import pyarrow.parquet as pq

    cone = pq.read_table(f"{GAIA}/dr3_cone_ra45_dec0_r0.5.parquet", columns=["ra", "dec"])
    ra, dec = cone["ra"].to_numpy(), cone["dec"].to_numpy()
    lo, hi, dlo, dhi = plots.sky_extent(ra, dec)
    assert 44.3 < lo < 44.6 and 45.4 < hi < 45.7 and -0.7 < dlo < -0.4 and 0.4 < dhi < 0.7
    # the same cone moved across ra = 0: one box across it, not the whole circle
    lo, hi, _, _ = plots.sky_extent(np.mod(ra - 45.0, 360.0), dec)
    assert -0.7 < lo < -0.4 and 0.4 < hi < 0.7
    allsky = pq.read_table(f"{GAIA}/dr3_allsky_1000.parquet", columns=["ra", "dec"])
    assert plots.sky_extent(allsky["ra"].to_numpy(), allsky["dec"].to_numpy()) is None


def test_sky_plot_of_a_half_degree_cone_is_not_a_blob(tmp_path, figures):
    import pyarrow.parquet as pq

    cone = pq.read_table(f"{GAIA}/dr3_cone_ra45_dec0_r0.5.parquet", columns=["ra", "dec"])
    data = np.stack([cone["ra"].to_numpy(), cone["dec"].to_numpy()], axis=1)
    model = XDModel(Params([1.0], [[45.0, 0.0]], [np.diag([0.25**2, 0.25**2])]), ["ra", "dec"])
    _image(plots.sky_plot(model, tmp_path / "sky.png", n_samples=40000, data=data))
    ax = figures[-1].axes[0]
    assert ax.name != "mollweide"
    x0, x1 = ax.get_xlim()
    assert x0 > x1 and 0.9 < x0 - x1 < 1.5  # ra increases to the left, ~1.1 deg shown
    cells = ax.collections[0].get_array()
    assert (~cells.mask).mean() > 0.5  # the samples fill the map
    # on the all-sky map's 2 x 2 deg cells the same samples covered a few cells
    v = model.sample(40000, random_state=0)
    h, _, _ = np.histogram2d(v[:, 0], v[:, 1], bins=(180, 90), range=((0, 360), (-90, 90)))
    assert (h > 0).sum() <= 6
    # a wide footprint keeps the all-sky projection
    wide = XDModel(Params([1.0], [[180.0, 0.0]], [np.diag([80.0**2, 30.0**2])]), ["ra", "dec"])
    plots.sky_plot(wide, tmp_path / "wide.png", n_samples=20000)
    assert figures[-1].axes[0].name == "mollweide"
