"""Plots of a fit (matplotlib Agg) from a small in-memory XDGMM fit."""

from __future__ import annotations

import warnings

import matplotlib.image as mpimg
import numpy as np
import pytest

from tests.mixtures import draw_noisy
from xd_dask.estimator import XDGMM
from xd_dask.jobs import plots


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
            "mean_loglike": -5.0 + 0.1 * w,
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
