"""Right by default (issue 18): waves that converge and say so, waves and held-out rows that are
samples (or a refusal before any row is read), a background that takes the outliers, sanity
before success. Real 2-process clusters where a cluster is involved."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from tests.distributed_data import make_rows, rows_as_written, schema, write_catalog
from xd_dask.cli import main
from xd_dask.distributed import FitConfig, fit_catalog, score_catalog
from xd_dask.estimator import XDGMM, OverparametrisedWarning
from xd_dask.io import make_catalog

CENTRES = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])


def _trap(n: int, seed: int = 0):
    """Three clusters (sd 0.8, 5 apart) and 10 % of the rows uniform over a 60-unit cube; noise
    0.1 per axis."""
    rng = np.random.default_rng(seed)
    n_out = n // 10
    lab = rng.integers(0, 3, n - n_out)
    V = np.vstack(
        [rng.normal(size=(n - n_out, 3)) * 0.8 + CENTRES[lab], rng.uniform(-30, 30, (n_out, 3))]
    )
    S = np.broadcast_to(0.01 * np.eye(3), (n, 3, 3)).copy()
    return V + rng.normal(size=V.shape) * 0.1, S


def _recovered(weights, means, bg_weight) -> None:
    assert 0.08 <= bg_weight <= 0.12, bg_weight
    err = [np.min(np.linalg.norm(means - c, axis=1)) for c in CENTRES]
    assert max(err) < 0.2, (means, err)
    np.testing.assert_allclose(np.sort(weights), 0.3, atol=0.03)


def test_the_background_takes_the_outliers_in_memory():
    """`background=True` and nothing else: the box follows the rows (+-30, not +-54), the start
    spends no component on the outliers (trimmed k-means), EM gives the background its 10 %."""
    X, S = _trap(6000)
    xd = XDGMM(3, background=True).fit(X, S)
    assert np.all(np.abs(np.array(xd.background_.lo) + 30) < 1.0)
    assert np.all(np.abs(np.array(xd.background_.hi) - 30) < 1.0)
    _recovered(xd.weights_, xd.means_, xd.background_.weight)


@pytest.mark.cluster
def test_the_background_takes_the_outliers_on_the_cluster(client, tmp_path):
    X, S = _trap(6000, seed=1)
    write_catalog(tmp_path / "cat", X, S, 4)
    cfg = FitConfig(catalog=str(tmp_path / "cat"), schema=schema(), n_components=3, background=True)
    model = fit_catalog(cfg, client)
    _recovered(model.weights, model.means, model.background.weight)
    # every score counts the background: the cluster's equals log_density on the same rows
    res = score_catalog(model, str(tmp_path / "cat"), schema(), client)
    Xw, Sw = rows_as_written(X, S)
    assert res.mean_loglike == pytest.approx(float(np.mean(model.log_density(Xw, Sw))), rel=1e-9)


@pytest.mark.cluster
@pytest.mark.parametrize("method", ["online", "adam"])
def test_wave_methods_converge_by_default_and_report_the_final_parameters(client, tmp_path, method):
    """Defaults only: the fit stops when its epoch mean log-likelihood settles (no warning,
    converged), and 'mean log-likelihood' is the final parameters' over every training row,
    not the last wave's."""
    X, S = make_rows(seed=8, n=6000)
    write_catalog(tmp_path / "cat", X, S, 6)
    cfg = FitConfig(catalog=str(tmp_path / "cat"), schema=schema(), n_components=3, method=method)
    model = fit_catalog(cfg, client)  # filterwarnings = error: no ConvergenceWarning
    md = model.metadata
    assert md["converged"] and md["history"][-1]["final"]
    epochs = [h["epoch_mean_loglike"] for h in md["history"] if "epoch_mean_loglike" in h]
    assert 2 <= len(epochs) < FitConfig(catalog="c").epochs and abs(epochs[-1] - epochs[-2]) < 1e-4
    scored = score_catalog(model, str(tmp_path / "cat"), schema(), client).mean_loglike
    assert md["final_mean_loglike"] == pytest.approx(scored, rel=1e-10)
    batch = XDGMM(3, tol=1e-7, max_iter=1000, random_state=0).fit(*rows_as_written(X, S))
    assert abs(batch.score(*rows_as_written(X, S)) - scored) < 2e-3


def _fit(*args):
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["fit", *map(str, args), "--set", "cluster.n_workers=2"])
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def sky_ordered(tmp_path_factory):
    """make-catalog's files are HEALPix ranges: sky regions."""
    out = tmp_path_factory.mktemp("sky") / "cat"
    make_catalog(out, n_rows=240_000, n_partitions=24, seed=3)
    return out


def test_holding_out_whole_sky_ordered_files_is_refused_before_a_cluster_starts(
    sky_ordered, tmp_path
):
    res, seconds = _fit(
        "--catalog", sky_ordered, "-k", 8, "--set", "catalog.holdout_fraction=0.15",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "catalog.holdout_rows = 0.15" in res.output and "sky-ordered" in res.output
    assert seconds < 15 and not (tmp_path / "out").exists()  # no cluster, nothing written


def test_online_em_out_of_memory_on_sky_ordered_files_is_refused_before_reading(
    sky_ordered, tmp_path
):
    """240,000 rows x 7 features (107 MB of arrays) against two 120 MiB workers: waves of whole
    files would be sky regions; refused (exit 2) naming `xd-dask shuffle`, no row read."""
    res, _ = _fit(
        "--catalog", sky_ordered, "-k", 8, "--method", "online", "--set",
        "cluster.memory_limit=120MiB", "--out", tmp_path / "out", "--log-format", "json",
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    err = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert "xd-dask shuffle" in res.output and "sky-ordered" in res.output, res.output
    assert not any(e.get("event") == "progress" for e in err)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_model_bigger_than_its_rows_is_refused_before_a_cluster_starts(tmp_path):
    """5 rows, K = 4, D = 7 (143 free parameters): exit 2 naming the count, in seconds, and in
    memory the same refusal."""
    make_catalog(tmp_path / "cat", n_rows=5, n_partitions=1, seed=1)
    res, seconds = _fit("--catalog", tmp_path / "cat", "-k", 4, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert "143 free parameters" in res.output and "5 training rows" in res.output
    assert seconds < 15 and not (tmp_path / "out").exists()
    X, S = make_rows(seed=1, n=5)
    with pytest.warns(OverparametrisedWarning, match="39 free parameters"):
        XDGMM(4, max_iter=3, tol=0.0).fit(*rows_as_written(X, S))
