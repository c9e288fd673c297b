"""Partition manifest, task functions and checkpoints of xd_dask.distributed, without a cluster."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.distributed_data import make_rows, write_catalog
from tests.mixtures import known_mixture_3d
from xd_dask.distributed import FitConfig, Manifest, ManifestError, build_manifest
from xd_dask.distributed.checkpoint import load_checkpoint, save_checkpoint
from xd_dask.distributed.passes import tree_reduce
from xd_dask.distributed.start_tasks import LloydRequest, SampleRequest, kmeans_lloyd, kmeans_sample
from xd_dask.distributed.tasks import Block, Partial, Rows, TaskOptions, combine, estep
from xd_dask.kernels import compute_stats
from xd_dask.optim import LoopState
from xd_dask.optim.kmeans import KMeansSums, SampleMoments
from xd_dask.optim.online import OnlineState
from xd_dask.optim.schedule import StepSchedule
from xd_dask.params import Params


@pytest.fixture(scope="module")
def rows():
    return make_rows(seed=5, n=600, missing=0.1)


def test_manifest_lists_files_in_path_order_with_row_counts(tmp_path, rows):
    X, S = rows
    write_catalog(tmp_path / "cat", X, S, 4)
    (tmp_path / "cat" / "_SUCCESS").write_text("")  # hidden / marker files are ignored
    m = build_manifest(tmp_path / "cat")
    assert [p.pid for p in m] == [0, 1, 2, 3]
    assert [p.name for p in m] == [f"part-{i:04d}.parquet" for i in range(4)]
    assert [p.n_rows for p in m] == [150, 150, 150, 150]
    assert m.n_rows == 600
    # the same catalogue listed by glob, or as a list in another order: same manifest
    g = build_manifest(str(tmp_path / "cat" / "part-*.parquet"))
    lst = build_manifest([str(p.path) for p in reversed(m.partitions)])
    assert g.fingerprint == m.fingerprint == lst.fingerprint


def test_manifest_splits_by_row_groups_and_round_trips(tmp_path, rows):
    X, S = rows
    write_catalog(tmp_path / "cat", X, S, 2, row_group_size=100)  # 300 rows: groups 100,100,100
    m = build_manifest(tmp_path / "cat", max_rows_per_partition=150)
    assert [
        (p.path.endswith(f"part-{i // 2:04d}.parquet"), p.row_groups, p.n_rows)
        for i, p in enumerate(m)
    ] == [(True, (0, 1), 200), (True, (2,), 100), (True, (0, 1), 200), (True, (2,), 100)]
    assert m[0].name == "part-0000.parquet[rg 0-1]"
    m.save(tmp_path / "manifest.json")
    assert Manifest.load(tmp_path / "manifest.json") == m


def test_manifest_fingerprint_changes_with_the_catalogue(tmp_path, rows):
    X, S = rows
    write_catalog(tmp_path / "cat", X, S, 3)
    before = build_manifest(tmp_path / "cat")
    write_catalog(tmp_path / "cat", X[:-5], S[:-5], 3)
    assert build_manifest(tmp_path / "cat").fingerprint != before.fingerprint


def test_manifest_errors_name_the_input(tmp_path):
    with pytest.raises(ManifestError, match="no such file"):
        build_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no Parquet files"):
        build_manifest(tmp_path / "empty")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="bad.parquet"):
        build_manifest(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"x0": np.zeros(0)}), tmp_path / "zero.parquet")
    with pytest.raises(ManifestError, match="hold no rows"):
        build_manifest(tmp_path / "zero.parquet")


def _block(X, S, pid=0):
    return Block(pid, f"p{pid}.parquet", X, S, np.arange(len(X), dtype=np.int64) + 7, len(X), {})


def test_estep_task_sums_equal_one_kernel_call(rows):
    X, S = rows
    w, m, V = known_mixture_3d()
    opts = TaskOptions(schema=None)
    parts = [estep(_block(X[i::3], S[i::3], i), opts, Params(w, m, V), Rows()) for i in range(3)]
    total = combine(*parts)
    ref = compute_stats(X, S, Params(w, m, V))
    assert total.n_partitions == 3 and total.n_used == len(X)
    np.testing.assert_allclose(total.payload.C, ref.C, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(total.payload.a, ref.a, rtol=1e-10, atol=1e-10)
    assert total.payload.ll == pytest.approx(ref.ll, rel=1e-12)
    # persisted blocks report their real size to the workers' memory manager
    from dask.sizeof import sizeof

    assert sizeof(_block(X, S)) >= X.nbytes + S.nbytes


def test_estep_subsample_is_seeded_per_epoch_and_partition(rows):
    X, S = rows
    w, m, V = known_mixture_3d()
    blk, opts, p = _block(X, S, 4), TaskOptions(schema=None), Params(w, m, V)
    a = estep(blk, opts, p, Rows(subsample=(0.5, 1, 0)))
    assert estep(blk, opts, p, Rows(subsample=(0.5, 1, 0))).payload.ll == a.payload.ll
    assert estep(blk, opts, p, Rows(subsample=(0.5, 1, 1))).payload.ll != a.payload.ll
    assert 0.4 * len(X) < a.n_used < 0.6 * len(X)


def test_a_blocks_strata_follow_the_epoch_seed_and_count(rows):
    """A persisted block keeps one epoch's strata (the waves of an epoch reuse them): each wave
    uses exactly the rows of its stratum, recomputed when the epoch, seed or count changes;
    the strata of an epoch partition the rows."""
    from xd_dask.distributed.split import row_keys, stratum_of

    X, S = rows
    w, m, V = known_mixture_3d()
    blk, opts, p = _block(X, S, 4), TaskOptions(schema=None), Params(w, m, V)
    for n_strata, seed, epoch in [(5, 1, 0), (5, 1, 1), (5, 2, 1), (3, 2, 1), (5, 1, 0)]:
        want = stratum_of(row_keys(blk.ids, 4), n_strata, seed, epoch)
        used = [estep(blk, opts, p, Rows(stratum=(s, n_strata, seed, epoch))) for s in range(5)]
        counts = [u.n_used for u in used[:n_strata]]
        assert counts == [int(np.sum(want == s)) for s in range(n_strata)], (n_strata, epoch)
        assert sum(counts) == len(X)
        s = int(np.argmax(counts))
        ref = compute_stats(X[want == s], S[want == s], p)
        assert used[s].payload.ll == pytest.approx(ref.ll, rel=1e-12)
    np.testing.assert_array_equal(blk.strata(4, 5, 1, 0), want)


def test_a_wave_over_a_group_of_blocks_is_one_kernel_call_with_the_same_sums(rows):
    """estep over a group (map_combine: estep_stacked) stacks a wave's rows of every block:
    the sums and the bookkeeping equal those of the blocks one by one, a full pass goes block
    by block, and a pair that is not positive definite is named by ITS file, id and row."""
    from xd_dask.distributed.passes import map_combine
    from xd_dask.distributed.tasks import PartitionError

    X, S = rows
    w, m, V = known_mixture_3d()
    opts, p = TaskOptions(schema=None), Params(w, m, V)
    blocks = [_block(X[i::3], S[i::3], i) for i in range(3)]
    blocks[1].dropped = {"nan": 2}
    for req in (Rows(stratum=(1, 4, 3, 0)), Rows(subsample=(0.3, 1, 2)), Rows()):
        got = map_combine(estep, blocks, opts, p, req)
        want = combine(*(estep(b, opts, p, req) for b in blocks))
        assert (got.n_partitions, got.n_read, got.n_used) == (3, len(X), want.n_used)
        assert got.dropped == {"nan": 2} and 0 < got.n_used
        assert got.payload.ll == pytest.approx(want.payload.ll, rel=1e-13)
        np.testing.assert_allclose(got.payload.C, want.payload.C, rtol=1e-12, atol=1e-12)
    req = Rows(stratum=(1, 4, 3, 0))
    bad = int(blocks[2].strata(2, 4, 3, 0).tolist().index(1))  # a row of block 2 in the wave
    blocks[2].X_cov = blocks[2].X_cov.copy()
    blocks[2].X_cov[bad] = -np.eye(3)
    with pytest.raises(PartitionError, match=rf"p2\.parquet: row {bad + 7} \(row {bad} of"):
        map_combine(estep, blocks, opts, p, req)


def test_sample_moments_merge_equals_global_moments(rows):
    X, _ = rows
    opts = TaskOptions(schema=None)
    req = SampleRequest(3, 0.25)
    parts = [kmeans_sample(_block(X[i::4], None, i), opts, None, req) for i in range(4)]
    mom = combine(*parts).payload
    np.testing.assert_allclose(mom.count, np.sum(~np.isnan(X), axis=0))
    np.testing.assert_allclose(mom.mean, np.nanmean(X, axis=0), rtol=1e-12)
    np.testing.assert_allclose(mom.m2 / mom.count, np.nanvar(X, axis=0), rtol=1e-10)
    assert 0.15 * len(X) < mom.sample.shape[0] < 0.35 * len(X)


def test_lloyd_sums_equal_direct_cluster_sums(rows):
    X, _ = rows
    rng = np.random.default_rng(0)
    mean, scale = np.nanmean(X, axis=0), np.nanstd(X, axis=0)
    Z = np.where(np.isnan(X), 0.0, (X - mean) / scale)
    centres = Z[rng.choice(len(Z), 4, replace=False)]
    labels = np.argmin(((Z[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    d2 = ((Z - centres[labels]) ** 2).sum(-1)
    d2_max = float(np.quantile(d2, 0.9))  # leave out the farthest 10 %
    opts = TaskOptions(schema=None)
    for limit, kept in ((np.inf, d2 >= 0), (d2_max, d2 <= d2_max)):
        req = LloydRequest(centres, mean, scale, limit)
        got = kmeans_lloyd(_block(X, None), opts, None, req).payload
        assert got.trimmed == int((~kept).sum())
        for k in range(4):
            dz = Z[(labels == k) & kept] - centres[k]
            assert got.count[k] == len(dz)
            np.testing.assert_allclose(got.delta[k], dz.sum(0), atol=1e-10)
            np.testing.assert_allclose(got.scatter[k], dz.T @ dz, atol=1e-10)
        assert got.inertia == pytest.approx(((Z - centres[labels])[kept] ** 2).sum(), rel=1e-12)


def test_partial_addition_counts_dropped_rows():
    a = Partial(
        KMeansSums(np.ones(2), np.zeros((2, 1)), np.zeros((2, 1, 1)), 1.0),
        1,
        10,
        8,
        {"bad_error": 2},
        0.5,
    )
    b = Partial(
        KMeansSums(np.ones(2), np.zeros((2, 1)), np.zeros((2, 1, 1)), 2.0),
        1,
        5,
        4,
        {"bad_error": 1, "nan_value": 3},
        0.25,
    )
    c = a + b
    assert (c.n_partitions, c.n_read, c.n_used, c.seconds) == (2, 15, 12, 0.75)
    assert c.dropped == {"bad_error": 3, "nan_value": 3}
    assert c.payload.inertia == 3.0
    moments = SampleMoments(np.ones(1), np.zeros(1), np.zeros(1), np.zeros((0, 1)))
    assert (moments + moments).count[0] == 2


class _FakeClient:
    """Records the reduction tree that tree_reduce submits (graph shape only)."""

    def __init__(self):
        self.calls = []

    def submit(self, fn, *args, key):
        self.calls.append((key, args))
        return key


def test_tree_reduce_has_logarithmic_depth_and_bounded_fan_in():
    client = _FakeClient()
    root = tree_reduce(client, [("leaf", i) for i in range(20)], 3, "xd-reduce-x")
    assert all(len(args) <= 3 for _, args in client.calls)
    depth = max(key[1] for key, _ in client.calls) + 1
    assert depth == 3  # ceil(log3(20)) levels: 20 -> 7 -> 3 -> 1
    assert root == client.calls[-1][0]
    with pytest.raises(ValueError, match="fan_in"):
        tree_reduce(client, [1, 2], 1, "x")


def test_checkpoint_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    w, m, V = known_mixture_3d()
    state = LoopState(
        params=Params(w, m + rng.normal(size=m.shape) * 1e-3, V),
        rule="online-em",
        rule_state=OnlineState.from_params(Params(w, m, V)).to_arrays(),
        iteration=5,
        epoch=1,
        wave=2,
        order=[2, 0, 1],
        history=[{"iteration": 1, "mean_loglike": -1.2345678901234567}],
        counts={"read": 10, "used": 9, "dropped": {"x": 1}},
    )
    cfg = FitConfig(
        catalog="c", n_components=3, method="online", step=StepSchedule(kind="halving")
    ).to_dict()
    save_checkpoint(tmp_path, state, cfg, {"partitions": []})
    got, cfg2, _ = load_checkpoint(tmp_path)
    assert FitConfig.from_dict(cfg2) == FitConfig.from_dict(cfg)
    np.testing.assert_array_equal(got.params.means, state.params.means)
    np.testing.assert_array_equal(got.rule_state["sigma"], state.rule_state["sigma"])
    assert (got.iteration, got.epoch, got.wave, got.order) == (5, 1, 2, [2, 0, 1])
    assert got.history == state.history and got.counts == state.counts


def test_fit_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="method"):
        FitConfig(catalog="c", n_components=2, method="sgd")
    with pytest.raises(ValueError, match="subsample"):
        FitConfig(catalog="c", n_components=2, subsample=0.5)  # batch EM: no subsampling
    with pytest.raises(ValueError, match="fan_in"):
        FitConfig(catalog="c", n_components=2, fan_in=1)
    with pytest.raises(ValueError, match="unknown fields"):
        FitConfig.from_dict({"catalog": "c", "n_components": 2, "bogus": 1})


def test_fsspec_urls_are_listed_and_read(tmp_path, rows):
    import fsspec

    from tests.distributed_data import rows_as_written, schema
    from xd_dask.distributed.tasks import read_block

    X, S = rows
    paths = write_catalog(tmp_path / "cat", X, S, 2)
    fs = fsspec.filesystem("memory")
    for p in paths:
        fs.pipe(f"/xd-test-cat/{p.name}", p.read_bytes())
    try:
        m = build_manifest("memory://xd-test-cat")
        assert [p.path for p in m] == [f"memory:///xd-test-cat/{p.name}" for p in paths]
        blk = read_block(m[1], TaskOptions(schema()))
        Xw, Sw = rows_as_written(X[300:], S[300:])
        np.testing.assert_array_equal(blk.X, Xw)
        np.testing.assert_allclose(blk.X_cov, Sw, rtol=1e-12, atol=1e-15)
        assert build_manifest(f"file://{tmp_path / 'cat'}").n_rows == 600
    finally:
        fs.rm("/xd-test-cat", recursive=True)
