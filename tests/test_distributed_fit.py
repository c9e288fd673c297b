"""Distributed fitting on a real 2-process cluster on 127.0.0.1 against in-memory references."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from distributed import Client

from tests.distributed_data import FEATURES, make_rows, rows_as_written, schema, write_catalog
from tests.mixtures import known_mixture_3d
from xd_dask.distributed import (
    FitConfig,
    GPUUnavailableError,
    build_manifest,
    connect,
    fit_catalog,
    load_checkpoint,
    posterior_catalog,
    score_catalog,
)
from xd_dask.distributed.kmeans import kmeans_init
from xd_dask.distributed.passes import CLIENT_SEND_INTERVAL, PassRunner
from xd_dask.distributed.tasks import TaskOptions
from xd_dask.estimator import XDGMM
from xd_dask.kernels import responsibilities
from xd_dask.model import XDModel
from xd_dask.optim import method
from xd_dask.params import Params

pytestmark = pytest.mark.cluster
K = 3


@pytest.fixture(scope="module")
def rows():
    return make_rows(seed=11, n=3000, missing=0.05)


@pytest.fixture(scope="module")
def cats(tmp_path_factory, rows):
    """The same rows as 7 files (row groups of 150) and as 1 file."""
    X, S = rows
    root = tmp_path_factory.mktemp("cats")
    write_catalog(root / "seven", X, S, 7, row_group_size=150)
    write_catalog(root / "one", X, S, 1)
    return {"seven": str(root / "seven"), "one": str(root / "one")}


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    """A warm start some way from the generating mixture."""
    w, m, V = known_mixture_3d()
    shift = np.array([[0.8, -0.5, 0.3], [-0.6, 0.4, 0.9], [0.5, 0.7, -0.8]])
    path = tmp_path_factory.mktemp("init") / "init.npz"
    XDModel(Params([0.4, 0.35, 0.25], m + shift, 1.5 * V), FEATURES).save(path)
    return path


def _config(catalog, **kw) -> FitConfig:
    base = dict(catalog=catalog, n_components=K, schema=schema(), tol=0.0)
    if method(kw.get("method", "em")).full_batch:  # iterations are batch EM's
        base |= dict(max_iter=10)
    return FitConfig(**(base | kw))


def test_batch_em_equals_in_memory_xdgmm(client, cats, rows, init_model, tmp_path):
    events = []
    report = tmp_path / "report.html"
    cfg = _config(
        cats["seven"],
        init=str(init_model),
        checkpoint_dir=str(tmp_path / "ck"),
        performance_report=str(report),
    )
    model = fit_catalog(cfg, client, events.append)

    Xw, Sw = rows_as_written(*rows)
    ref = XDGMM(K, max_iter=10, tol=0.0, init=XDModel.load(init_model)).fit(Xw, Sw)
    np.testing.assert_allclose(model.weights, ref.weights_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.means, ref.means_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.covariances, ref.covariances_, rtol=0, atol=1e-8)
    assert np.abs(model.means - XDModel.load(init_model).means).max() > 0.1  # it did move
    lls = [h["mean_loglike"] for h in model.metadata["history"]]
    np.testing.assert_allclose(lls, [h["mean_loglike"] for h in ref.history_], rtol=1e-10)

    # progress events, metadata, checkpoint, performance report
    assert [e["iteration"] for e in events] == list(range(1, 11))
    assert {"iteration", "epoch", "wave", "mean_loglike", "step", "rows", "seconds"} <= set(
        events[0]
    )
    assert all(e["rows"] == 3000 and e["total"] == 10 for e in events)
    md = model.metadata
    assert md["n_iter"] == 10 and md["rows_used"] == 3000
    assert not any(md["dropped"].values())
    assert md["config"]["n_components"] == K and "dask" in md["versions"]
    assert md["manifest"]["n_partitions"] == 7 and model.feature_names == FEATURES
    state, _, _ = load_checkpoint(tmp_path / "ck")
    assert state.finished and state.iteration == 10
    np.testing.assert_array_equal(state.params.means, model.means)
    assert report.stat().st_size > 1000 and "<html" in report.read_text()[:2000].lower()


def test_xdgmm_and_distributed_fit_share_one_loop_and_agree(
    client, cats, rows, init_model, tmp_path, monkeypatch
):
    """Both front ends run optim's FitLoop (each step counted through it), neither calls an
    M-step itself, and with a background component their results are equal to 1e-8."""
    import inspect

    import xd_dask.distributed.fit as dfit
    import xd_dask.estimator as est
    from xd_dask.kernels import Background
    from xd_dask.optim import FitLoop

    for module in (est, dfit):
        src = inspect.getsource(module)
        assert "batch_update" not in src and "online_update" not in src
    steps = []
    original = FitLoop.step

    def counting(self, state):
        steps.append(type(self.source).__name__)
        return original(self, state)

    monkeypatch.setattr(FitLoop, "step", counting)
    m0 = XDModel.load(init_model)
    Xw, Sw = rows_as_written(*rows)
    lo, hi = np.nanmin(Xw, axis=0) - 1.0, np.nanmax(Xw, axis=0) + 1.0
    start = XDModel(
        Params(0.98 * m0.weights, m0.means, m0.covariances, Background(0.02, lo, hi)), FEATURES
    )
    start.save(tmp_path / "start.npz")
    model = fit_catalog(
        _config(cats["seven"], init=str(tmp_path / "start.npz"), background=True), client
    )
    ref = XDGMM(K, max_iter=10, tol=0.0, init=XDModel.load(tmp_path / "start.npz"), background=True)
    ref.fit(Xw, Sw)
    assert steps == ["PassStatistics"] * 10 + ["ArrayStatistics"] * 10
    np.testing.assert_allclose(model.weights, ref.weights_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.means, ref.means_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.covariances, ref.covariances_, rtol=0, atol=1e-8)
    assert model.background.weight == pytest.approx(ref.background_.weight, rel=1e-8)
    assert model.background.weight < 0.005  # fitted: these rows have no outliers
    assert model.background.lo == start.background.lo  # the box stays fixed
    lls = [h["mean_loglike"] for h in model.metadata["history"]]
    np.testing.assert_allclose(lls, [h["mean_loglike"] for h in ref.history_], rtol=1e-10)


def test_one_partition_equals_seven(client, cats, init_model):
    one = fit_catalog(_config(cats["one"], init=str(init_model)), client)
    seven = fit_catalog(
        _config(cats["seven"], init=str(init_model), persist=True, fan_in=2), client
    )
    np.testing.assert_allclose(seven.weights, one.weights, rtol=0, atol=1e-9)
    np.testing.assert_allclose(seven.means, one.means, rtol=0, atol=1e-9)
    np.testing.assert_allclose(seven.covariances, one.covariances, rtol=0, atol=1e-9)
    assert one.metadata["manifest"]["n_partitions"] == 1


def test_online_em_reaches_batch_loglike_in_three_epochs(client, tmp_path):
    X, S = make_rows(seed=21, n=8000, missing=0.05)
    write_catalog(tmp_path / "cat", X, S, 8)
    cat = str(tmp_path / "cat")
    batch = fit_catalog(_config(cat, max_iter=300, tol=1e-7, seed=2), client)
    assert batch.metadata["converged"]
    online = fit_catalog(_config(cat, method="online", epochs=3, wave_size=2, seed=2), client)
    assert online.metadata["n_iter"] == 12 and online.metadata["wave_size"] == 2
    ll_batch = score_catalog(batch, cat, schema(), client).mean_loglike
    ll_online = score_catalog(online, cat, schema(), client).mean_loglike
    ll_init = batch.metadata["history"][0]["mean_loglike"]  # same k-means start for both
    assert abs(ll_online - ll_batch) <= 0.005 * abs(ll_batch)
    assert ll_batch - ll_init > 0.05  # the start is clearly worse than the optimum ...
    assert ll_online - ll_init > 0.9 * (ll_batch - ll_init)  # ... and online EM closes the gap


def test_gathered_objects_do_not_grow_with_rows(client, tmp_path, monkeypatch):
    sizes: list[int] = []
    original = Client._gather

    async def recording_gather(self, futures, *args, **kwargs):
        result = await original(self, futures, *args, **kwargs)
        sizes.append(len(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)))
        return result

    monkeypatch.setattr(Client, "_gather", recording_gather)
    largest = {}
    for n in (1200, 4800):
        X, S = make_rows(seed=n, n=n)
        write_catalog(tmp_path / str(n), X, S, 6)
        sizes.clear()
        model = fit_catalog(
            _config(str(tmp_path / str(n)), max_iter=3, kmeans_sample=60, seed=1), client
        )
        assert sizes, "nothing was gathered?"
        largest[n] = max(sizes)
        assert model.metadata["max_gathered_bytes"] <= largest[n]
    D = len(FEATURES)
    stats_bytes = 8 * K * (1 + D + D * D)
    sample_bytes = 8 * 2 * 60 * D  # k-means seeding sample (about kmeans_sample rows)
    assert largest[4800] <= stats_bytes + sample_bytes + 4096
    assert abs(largest[4800] - largest[1200]) <= 0.5 * sample_bytes


def _catalog_with_bad_rows(root: Path) -> tuple[str, int]:
    X, S = make_rows(seed=3, n=900)
    paths = write_catalog(root, X, S, 3)
    t = pq.read_table(paths[1])
    err = t["x1_error"].to_numpy().copy()
    err[17] = -0.5  # a negative error
    err[40] = np.nan  # a missing error on an observed field
    pq.write_table(t.set_column(t.schema.get_field_index("x1_error"), "x1_error", [err]), paths[1])
    return str(root), int(t["source_id"][17].as_py())


def test_bad_partition_stops_the_fit_naming_file_and_row(client, tmp_path):
    cat, sid = _catalog_with_bad_rows(tmp_path / "bad")
    with pytest.raises(ValueError) as info:
        fit_catalog(_config(cat, max_iter=2, on_bad="error"), client)
    msg = str(info.value)
    assert "part-0001.parquet" in msg
    assert str(sid) in msg or "row 17" in msg


def test_dropped_rows_are_counted_in_the_model(client, tmp_path):
    cat, _ = _catalog_with_bad_rows(tmp_path / "bad")
    model = fit_catalog(_config(cat, max_iter=2, on_bad="drop"), client)
    md = model.metadata
    dropped = {reason: n for reason, n in md["dropped"].items() if n}
    assert sum(dropped.values()) == 2 and len(dropped) == 2, dropped
    assert md["rows_used"] == 898 and md["rows_read"] == 900


def test_a_pass_runner_shortens_its_clients_batching_of_messages(cluster, cats):
    """Dask's client batches its messages to the scheduler for 10 ms; a fit's passes send a few
    tasks and wait (passes.low_latency: online EM's waves 25-30 -> 21-24 ms). Fails if Dask
    renames the batched stream or its interval (then the tuning silently stops)."""
    with Client(cluster) as c:
        assert c.scheduler_comm.interval == pytest.approx(0.010)  # Dask's default
        PassRunner(c, build_manifest(cats["seven"]), TaskOptions(schema()))
        assert c.scheduler_comm.interval == CLIENT_SEND_INTERVAL == 0.002
        assert sum(c.submit(pow, 2, i, pure=False).result() for i in range(4)) == 15


def test_kmeans_init_is_deterministic_and_equals_serial_kmeans(client, cats, rows):
    from sklearn.cluster import KMeans

    manifest = build_manifest(cats["seven"])
    runs = []
    for fan_in in (3, 3, 8):
        runner = PassRunner(client, manifest, TaskOptions(schema()), fan_in=fan_in)
        runs.append(kmeans_init(runner, K, seed=4, max_iter=30, tol=0.0, reg_covar=0.0)[0])
    a, b, c = runs
    # bit-for-bit for a fixed seed, partitioning and reduction tree; to rounding otherwise
    np.testing.assert_array_equal(a.params.means, b.params.means)
    np.testing.assert_array_equal(a.params.covariances, b.params.covariances)
    np.testing.assert_allclose(a.params.covariances, c.params.covariances, rtol=1e-12)
    assert a.info["converged"]

    # Serial reference: scikit-learn's k-means on the whole table, standardised by the robust
    # centre and scale of the k-means sample (median, MAD) and centre-imputed.
    X, _ = rows
    mu, sd = np.array(a.info["column_centre"]), np.array(a.info["column_scale"])
    sample = X[np.random.default_rng(0).choice(len(X), 900, replace=False)]
    assert np.all(np.abs(mu - np.nanmedian(sample, axis=0)) < 0.2 * sd)  # a median, not a mean
    Z = np.where(np.isnan(X), 0.0, (X - mu) / sd)
    km = KMeans(K, n_init=5, random_state=0, tol=0.0).fit(Z)
    order = [
        int(np.argmin(np.linalg.norm(a.params.means - c, axis=1)))
        for c in mu + km.cluster_centers_ * sd
    ]
    assert sorted(order) == [0, 1, 2]
    for k in range(K):
        Xk = mu + Z[km.labels_ == k] * sd
        j = order[k]
        assert a.params.weights[j] == pytest.approx(len(Xk) / len(X), abs=1e-12)
        np.testing.assert_allclose(a.params.means[j], Xk.mean(axis=0), rtol=1e-9)
        cov = np.cov(Xk, rowvar=False, bias=True) + 1e-6 * np.outer(sd, sd) * np.eye(3)
        np.testing.assert_allclose(a.params.covariances[j], cov, rtol=1e-8, atol=1e-10)


def test_score_and_posterior_match_in_memory(client, cats, rows, tmp_path):
    w, m, V = known_mixture_3d()
    model = XDModel(Params(w, m, V), FEATURES)
    Xw, Sw = rows_as_written(*rows)
    res = score_catalog(model, cats["seven"], schema(), client, out_dir=tmp_path / "score")
    ll = model.log_density(Xw, Sw)
    assert res.mean_loglike == pytest.approx(ll.mean(), rel=1e-12)
    assert res.n_rows == 3000 and len(res.files) == 7
    got = np.concatenate([pq.read_table(f)["log_likelihood"].to_numpy() for f in res.files])
    np.testing.assert_allclose(got, ll, rtol=1e-10)

    files = posterior_catalog(model, cats["seven"], schema(), client, tmp_path / "post")
    tab = [pq.read_table(f) for f in files]
    ids = np.concatenate([t["source_id"].to_numpy() for t in tab])
    np.testing.assert_array_equal(ids, np.arange(1000, 4000))
    mean, cov = model.posterior(Xw, Sw)
    got_mean = np.stack(
        [np.concatenate([t[f"mean_{f}"].to_numpy() for t in tab]) for f in FEATURES], 1
    )
    np.testing.assert_allclose(got_mean, mean, rtol=1e-10, atol=1e-12)
    got_cov = np.concatenate([t["cov_x2_x0"].to_numpy() for t in tab])
    np.testing.assert_allclose(got_cov, cov[:, 2, 0], rtol=1e-10, atol=1e-12)
    comp = np.concatenate([t["component"].to_numpy() for t in tab])
    np.testing.assert_array_equal(
        comp, np.argmax(responsibilities(Xw, Sw, Params(w, m, V)), axis=1)
    )
    summary = json.loads((tmp_path / "post" / "_SUCCESS.json").read_text())
    assert summary["rows"] == 3000 and len(summary["files"]) == 7


def test_task_keys_and_spans_read_like_the_algorithm(client):
    # Runs after the fits above in this module (same scheduler).
    def info(dask_scheduler):
        spans = dask_scheduler.extensions["spans"].spans.values()
        return sorted(dask_scheduler.task_prefixes), sorted({s.name[-1] for s in spans})

    prefixes, spans = client.run_on_scheduler(info)
    for p in (
        "xd-estep",
        "xd-reduce",
        "xd-kmeans",
        "xd-kmeans-sample",
        "xd-read",
        "xd-score",
        "xd-posterior",
    ):
        assert p in prefixes
    # Spans are named by the pass and its iteration (wave: epoch-wave). Dask files a task under
    # the span of its TaskGroup (one per key prefix) when the group already exists: a pass whose
    # tasks arrive before the last pass's are released shares the last one's span, so which
    # iterations get a span of their own depends on timing (CI once lacked xd-estep-10).
    xd = [s for s in spans if s.startswith("xd-")]
    assert {"xd-estep-1", "xd-kmeans-1"} <= set(spans)
    assert len([s for s in xd if s.startswith("xd-estep-")]) >= 3, xd


def test_connect_to_given_scheduler_env_and_gpu_check(cluster, cats, monkeypatch):
    c, started = connect(scheduler_address=cluster.scheduler_address)
    with c:
        assert started is None and len(c.nthreads()) == 2
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
    c, started = connect()
    with c:
        assert started is None and c.scheduler.address == cluster.scheduler_address
    try:
        import cupy

        has_gpu = cupy.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        with pytest.raises(GPUUnavailableError):
            connect(scheduler_address=cluster.scheduler_address, gpu=True)
        with Client(cluster) as c, pytest.raises(GPUUnavailableError, match="no usable GPU"):
            fit_catalog(_config(cats["seven"], gpu=True), c)


def test_kmeans_is_robust_to_one_absurd_row(client, rows, tmp_path):
    """One row at 1e12 neither sets the standardisation (median / MAD of the sample) nor joins a
    cluster (trimmed, counted): the start equals that of the catalogue without it."""
    X, S = rows
    write_catalog(tmp_path / "clean", X, S, 6)
    Xa, Sa = np.vstack([X, [[1e12, 0.0, 0.0]]]), np.vstack([S, S[:1]])
    write_catalog(tmp_path / "absurd", Xa, Sa, 6)  # the absurd row ends the last file
    runs = {}
    for name in ("clean", "absurd"):
        runner = PassRunner(client, build_manifest(str(tmp_path / name)), TaskOptions(schema()))
        runs[name] = kmeans_init(runner, K, seed=4, sample_size=len(X), reg_covar=0.0)[0]
    clean, absurd = runs["clean"], runs["absurd"]
    assert absurd.info["rows_trimmed"] == 1 and clean.info["rows_trimmed"] == 0
    assert absurd.info["sample_rows_trimmed"] == 1  # the sample is every row here
    scale = np.array(clean.info["column_scale"])
    np.testing.assert_allclose(absurd.info["column_scale"], scale, rtol=1e-3)
    # the same clusters (the median of one row more moves the centres a little)
    np.testing.assert_allclose(absurd.params.means, clean.params.means, atol=1e-3 * scale.max())
    np.testing.assert_allclose(absurd.params.covariances, clean.params.covariances, rtol=1e-2)
    np.testing.assert_allclose(absurd.params.weights, clean.params.weights, atol=1e-3)


@pytest.mark.parametrize("method", ["online", "adam"])
def test_stratified_waves_on_the_cluster_equal_the_same_waves_in_memory(
    client, cats, rows, init_model, method
):
    """The one loop with the same rule, strata (hash of source_id, seed) and start: the cluster's
    persisted partitions and the rows in memory give the same fit (to summation rounding)."""
    from xd_dask.optim import ArrayStatistics, FitLoop, LoopSettings, OnlineEM
    from xd_dask.optim.adam import Adam, adam_schedule

    model = fit_catalog(
        _config(
            cats["seven"],
            method=method,
            epochs=2,
            waves="strata",
            waves_per_epoch=4,
            init=str(init_model),
            seed=3,
        ),
        client,
    )
    waves = model.metadata["waves"]
    assert waves["mode"] == "strata" and waves["persist"] and waves["group_size"] >= 2
    Xw, Sw = rows_as_written(*rows)
    rule = OnlineEM() if method == "online" else Adam(0.05, adam_schedule(8))
    start = XDModel.load(init_model)
    loop = FitLoop(
        rule,
        ArrayStatistics(Xw, Sw, ids=np.arange(1000, 1000 + len(Xw)), seed=3),
        LoopSettings(epochs=2, strata=4, seed=3, tol=0.0),
    )
    ref = loop.run(loop.start(Params(start.weights, start.means, start.covariances))).params
    assert model.metadata["n_iter"] == 8
    np.testing.assert_allclose(model.weights, ref.weights, rtol=0, atol=1e-9)
    np.testing.assert_allclose(model.means, ref.means, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.covariances, ref.covariances, rtol=1e-8, atol=1e-9)
    rows_per_wave = [h["rows"] for h in model.metadata["history"][:4]]
    assert sum(rows_per_wave) == len(Xw)  # an epoch's strata hold every row once
