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
    _image(plots.sky_plot(model, tmp_path / "sky.png"))
    nosky = XDModel(model.params, ["a", "b", "c"])
    with pytest.raises(ValueError, match="no RA and Dec features"):
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
    five = XDModel(
        Params([1.0], [np.arange(5.0)], [np.eye(5)]), ["RA_ICRS", "a", "DE_ICRS", "b", "c"]
    )
    assert plots.default_features(five) == ["a", "b", "c"]
    # one feature besides ra, dec: a corner plot of all three (one panel could not be drawn)
    assert plots.default_features(model) == ["ra", "dec", "parallax"]


# ----------------------------------------------------------------------------- issue 11.7
GAIA = str(GAIA_DIR)


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save (still written to disk)."""
    from xd_dask.jobs import canvas

    saved = []
    real = canvas.save

    def save(fig, path, dpi):
        saved.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(canvas, "save", save)
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
    _image(plots.sky_plot(model, tmp_path / "sky.png", data=data))
    ax = figures[-1].axes[0]
    assert ax.name != "mollweide"
    x0, x1 = ax.get_xlim()
    assert x0 > x1 and 0.9 < x0 - x1 < 1.5  # ra increases to the left, ~1.1 deg shown
    cells = ax.collections[0].get_array()
    assert (~cells.mask).mean() > 0.5  # the density fills the map
    # on the all-sky map's 2 x 2 deg cells samples of it would cover a few cells
    v = model.sample(40000, random_state=0)
    h, _, _ = np.histogram2d(v[:, 0], v[:, 1], bins=(180, 90), range=((0, 360), (-90, 90)))
    assert (h > 0).sum() <= 6
    # a wide footprint keeps the all-sky projection
    wide = XDModel(Params([1.0], [[180.0, 0.0]], [np.diag([80.0**2, 30.0**2])]), ["ra", "dec"])
    plots.sky_plot(wide, tmp_path / "wide.png")
    assert figures[-1].axes[0].name == "mollweide"


# ----------------------------------------------------------------------------- issue 21.4
def test_corner_plot_says_what_it_draws(tmp_path, fitted, figures):
    """The model's samples are noise-free, the rows carry their noise: the title and the legend
    name both; without rows, only the model; a projected fit says why there are none."""
    model, X, _ = fitted
    kw = {"features": ["ra", "dec", "parallax"], "n_samples": 3000}
    plots.corner_plot(model, tmp_path / "a.png", data=X, **kw)
    title = figures[-1]._suptitle.get_text()
    assert "Deconvolved model (K=2; 3,000 noise-free samples" in title
    assert "3,000 observed rows (with their noise" in title and "vs data" not in title
    legend = [t.get_text() for t in figures[-1].legends[0].get_texts()]
    assert legend == [plots.MODEL_LABEL, plots.ROWS_LABEL]
    plots.corner_plot(model, tmp_path / "b.png", note=plots.PROJECTED_NOTE, **kw)
    title = figures[-1]._suptitle.get_text()
    assert "observed rows (with" not in title and plots.PROJECTED_NOTE in title


def _radian_model() -> XDModel:
    """Hipparcos-like features: positions in radians (RArad, DErad), a parallax in mas."""
    m = [[1.0, 0.3, 5.0], [4.0, -0.9, 2.0]]
    V = [np.diag([0.05**2, 0.04**2, 1.0]), np.diag([0.2**2, 0.1**2, 0.5])]
    return XDModel(Params([0.7, 0.3], m, V), ["RArad", "DErad", "Plx"])


def test_sky_plot_of_positions_in_radians(tmp_path, figures):
    """RArad/DErad in rad: the map is in degrees, says so, labels RA and Dec, and its peak is
    where the heavier component is (1 rad, 0.3 rad = 57.3 deg, 17.2 deg)."""
    model = _radian_model()
    _image(plots.sky_plot(model, tmp_path / "sky.png", units=["rad", "rad", "mas"]))
    fig = figures[-1]
    ax = fig.axes[0]
    assert ax.name == "mollweide"
    assert ax.get_xlabel().startswith("RA [deg]") and ax.get_ylabel() == "Dec [deg]"
    assert "RArad, DErad in rad converted to degrees" in ax.get_title()
    cells = ax.collections[0].get_array()  # (180 dec, 360 lon) cells of 1 deg
    i_dec, i_lon = np.unravel_index(np.argmax(cells.filled(-np.inf)), cells.shape)
    ra = np.mod(-(i_lon + 0.5 - 180.0), 360.0)
    assert abs(ra - np.degrees(1.0)) < 1.5 and abs(i_dec + 0.5 - 90 - np.degrees(0.3)) < 1.5
    bar = fig.axes[-1]
    assert "per sr" in bar.get_xlabel()  # the colour bar's unit
    # without units, the names say radians
    plots.sky_plot(model, tmp_path / "sky2.png")
    assert "converted to degrees" in figures[-1].axes[0].get_title()


def test_sky_density_is_a_density_on_the_sphere():
    """Integrated over the sky the map's density is 1, also for a component across RA = 0
    (wrapped), in degrees or radians alike."""
    from xd_dask.jobs.sky import sky_axes, sky_density

    ra, dec = np.meshgrid(np.arange(0.25, 360, 0.5), np.arange(-89.75, 90, 0.5))
    cell = 0.5 * 0.5 * np.cos(np.radians(dec))  # solid angle of a cell, deg^2
    for mean in ([2.0, 10.0], [180.0, -20.0]):
        model = XDModel(Params([1.0], [mean], [np.diag([6.0**2, 4.0**2])]), ["ra", "dec"])
        dens = sky_density(model, sky_axes(model.feature_names), ra.ravel(), dec.ravel())
        assert (dens * cell.ravel()).sum() == pytest.approx(1.0, abs=1e-4)
        rad = XDModel(Params([1.0], [np.radians(mean)], [np.diag(np.radians([6.0, 4.0]) ** 2)]),
                      ["RArad", "DErad"])  # fmt: skip
        dens_rad = sky_density(rad, sky_axes(rad.feature_names), ra.ravel(), dec.ravel())
        np.testing.assert_allclose(dens_rad, dens, rtol=1e-9, atol=1e-300)


def test_density_colour_bars_carry_units(tmp_path, figures):
    model = XDModel(Params([0.5, 0.5], [[0.0, 0.0, 0.0], [20.0, -10.0, 5.0]],
                           [np.eye(3) * 100.0, np.eye(3) * 50.0]), ["U", "V", "W"])  # fmt: skip
    plots.density_planes(model, tmp_path / "planes.png", units=["km / s"] * 3)
    bars = [ax.get_ylabel() for ax in figures[-1].axes if ax.get_label() == "<colorbar>"]
    assert bars == ["log10 density [per (km / s)²]"] * 3


class _Cfg:
    """The [plots] and [fit] keys write_figures reads."""

    def __init__(self, sky: bool = True) -> None:
        from types import SimpleNamespace

        self.plots = SimpleNamespace(features=[], n_samples=2000, dpi=60, sky=sky)
        self.fit = SimpleNamespace(seed=0)


def test_write_figures_names_what_it_did_not_draw(tmp_path, fitted):
    model, X, history = fitted
    uvw = XDModel(model.params, ["U", "V", "W"])
    figs = plots.write_figures(uvw, [], tmp_path, _Cfg(), None)
    assert set(figs) == {"corner"}
    assert set(figs.skipped) == {"training_curve.png", "sky.png"}
    assert "no RA and Dec features" in figs.skipped["sky.png"]
    figs = plots.write_figures(_radian_model(), history, tmp_path, _Cfg(), None,
                               units=["rad", "rad", "mas"])  # fmt: skip
    assert set(figs) == {"corner", "sky", "training_curve"} and figs.skipped == {}
    assert plots.write_figures(model, history, tmp_path, _Cfg(sky=False), X).skipped == {
        "sky.png": "plots.sky = false"
    }


@pytest.mark.cluster
def test_a_fits_summary_names_the_figures_not_drawn(tmp_path, cluster):
    """A fit of features without RA and Dec: sky.png is not drawn, and its summary and
    report.json say so."""
    import json

    from click.testing import CliRunner

    from tests.distributed_data import make_rows, write_catalog
    from xd_dask.cli import main

    X, S = make_rows(1, 900)
    write_catalog(tmp_path / "cat", X, S, 1)
    schema = tmp_path / "s.toml"
    assert CliRunner().invoke(main, ["schema", "init", str(tmp_path / "cat"), "-o", str(schema)])
    res = CliRunner().invoke(
        main,
        ["fit", "--catalog", str(tmp_path / "cat"), "--schema", str(schema), "-k", "2",
         "--max-iter", "3", "--tol", "0", "--out", str(tmp_path / "out"),
         "--scheduler-address", cluster.scheduler_address],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("not drawn: sky.png"))
    assert "no RA and Dec features" in line
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "sky.png" in report["figures_skipped"] and (tmp_path / "out" / "corner.png").is_file()
