"""The k-means start made cheap (issue 20) without making it worse: Lloyd steps against a naive
loop, several starts at once equal to each alone, k-means++ seeds, the optimum scikit-learn's
k-means finds, the passes over every row done on the client (the same start) when the sample is
every row, components in an order a row more does not change, the per-row sums against direct
ones; a local cluster's workers forked from a fork server that loaded what they need."""

from __future__ import annotations

import numpy as np
import pytest

from xd_dask.optim.kmeans import array_passes, cluster_sums, kmeans_start, sample_moments
from xd_dask.optim.kmeans_sample import LOOP_KD, kmeans_plusplus, lloyd, nearest, sample_kmeans

CENTRES = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 1.0], [0.0, 6.0, -1.0], [5.0, 5.0, 5.0]])


def _blobs(n: int, seed: int = 0, sd: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return CENTRES[rng.integers(0, len(CENTRES), n)] + sd * rng.normal(size=(n, 3))


def _naive_lloyd(Z: np.ndarray, centres: np.ndarray, steps: int) -> np.ndarray:
    """Lloyd steps row by row (no empty clusters in these tests)."""
    c = centres.copy()
    for _ in range(steps):
        sums, counts = np.zeros_like(c), np.zeros(len(c))
        for z in Z:
            k = int(np.argmin([np.sum((z - ck) ** 2) for ck in c]))
            sums[k] += z
            counts[k] += 1
        c = sums / counts[:, None]
    return c


def test_lloyd_steps_equal_a_naive_loop():
    Z = _blobs(400, sd=1.5)
    start = Z[[0, 1, 2, 3]][None]  # (1, K, D)
    for steps in (1, 2, 5):
        got, cost = lloyd(Z, start, tol=-1.0, max_iter=steps)
        ref = _naive_lloyd(Z, start[0], steps)
        np.testing.assert_allclose(got[0], ref, rtol=1e-12, atol=1e-12)
        d2 = np.min(np.sum((Z[:, None, :] - ref[None]) ** 2, axis=2), axis=1)
        assert cost[0] == pytest.approx(d2.sum(), rel=1e-12)


@pytest.mark.parametrize(("K", "D"), [(3, 3), (8, 8), (16, 7), (40, 5), (64, 20)])
def test_nearest_equals_a_direct_computation_on_both_paths(K, D):
    """Compiled loops (K D <= LOOP_KD) and blocked BLAS products (above): the same labels and
    squared distances as every distance taken directly, at Gaia-like offsets (degrees around
    a large mean, where |z|^2 - 2 z.c + |c|^2 cancels)."""
    rng = np.random.default_rng(K * D)
    S, n = 3, 3000
    Z = 200.0 + rng.normal(size=(n, D))
    C = 200.0 + rng.normal(size=(S, K, D))
    labels, d2 = nearest(Z, C)
    ref = np.sum((Z[:, None, None, :] - C[None]) ** 2, axis=3)  # (n, S, K)
    np.testing.assert_array_equal(labels, np.argmin(ref, axis=2))
    tol = 1e-12 if K * D <= LOOP_KD else 1e-9  # the expansion loses ~|z|^2 eps
    np.testing.assert_allclose(d2, np.min(ref, axis=2), rtol=tol, atol=tol * 200.0**2)


@pytest.mark.parametrize("trim", [0.0, 0.2])
def test_starts_run_together_equal_each_run_alone(trim):
    Z = _blobs(1500, seed=1, sd=1.2)
    rng = np.random.default_rng(3)
    starts = kmeans_plusplus(Z, 4, 6, rng)  # (6, 4, 3)
    together, cost = lloyd(Z, starts, tol=1e-10, trim=trim)
    for s in range(len(starts)):
        alone, cost_s = lloyd(Z, starts[s : s + 1], tol=1e-10, trim=trim)
        np.testing.assert_allclose(together[s], alone[0], rtol=1e-12, atol=1e-12)
        assert cost[s] == pytest.approx(cost_s[0], rel=1e-12)


def test_kmeans_plusplus_seeds_are_rows_one_per_separated_cluster():
    Z = _blobs(2000, seed=2, sd=0.3)
    seeds = kmeans_plusplus(Z, 4, 10, np.random.default_rng(5))
    assert seeds.shape == (10, 4, 3)
    rows = {tuple(r) for r in Z}
    for start in seeds:
        assert all(tuple(s) in rows for s in start)
        nearest = np.argmin(np.sum((start[:, None] - CENTRES[None]) ** 2, axis=2), axis=1)
        assert sorted(nearest) == [0, 1, 2, 3]  # far-apart clusters: one seed each
    again = kmeans_plusplus(Z, 4, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(seeds, again)


@pytest.mark.parametrize("n", [3000, 30_000])  # the subset is the sample / a part of it
def test_sample_kmeans_finds_scikit_learns_optimum(n):
    from sklearn.cluster import KMeans

    Z = _blobs(n, seed=4, sd=1.3)
    ours = sample_kmeans(Z, 4, seed=7)
    km = KMeans(4, n_init=10, random_state=0).fit(Z)
    ref = km.cluster_centers_
    order = np.argmin(np.sum((ours[:, None] - ref[None]) ** 2, axis=2), axis=1)
    assert sorted(order) == [0, 1, 2, 3]
    # the same optimum, each stopped at scikit-learn's tolerance (centre shifts <= 0.01 here)
    np.testing.assert_allclose(ours, ref[order], atol=0.02)
    inertia = np.sum(np.min(np.sum((Z[:, None] - ours[None]) ** 2, axis=2), axis=1))
    assert inertia <= km.inertia_ * (1 + 1e-4)
    np.testing.assert_array_equal(ours, ours[np.lexsort(ours.T[::-1])])  # sorted by coordinate


def test_the_start_reads_the_rows_once_when_the_sample_is_every_row():
    """A table of up to ``sample_size`` rows: the sample pass brings every row to the client,
    which runs the Lloyd passes itself; the start equals the one whose pass reads them again."""
    X = _blobs(5000, seed=5)
    X[::97, 1] = np.nan  # missing fields: imputed by the centre in k-means
    sample, lloyd_pass = array_passes(X, 3)
    calls = []

    def counted(*a):
        calls.append(a[0])
        return lloyd_pass(*a)

    local, info = kmeans_start(sample, counted, len(X), 4, 3, max_iter=3, tol=0.0)
    assert calls == [] and info["passes"] == 3 and info["passes_on_sample"]

    def not_every_row(fraction):  # the same sample, claimed to be part of the rows
        mom, n = sample(fraction)
        return mom, n + 1

    passes, info2 = kmeans_start(not_every_row, counted, len(X), 4, 3, max_iter=3, tol=0.0)
    assert calls == [1, 2, 3] and not info2["passes_on_sample"]
    np.testing.assert_allclose(local.means, passes.means, rtol=1e-12)
    np.testing.assert_allclose(local.covariances, passes.covariances, rtol=1e-12)
    np.testing.assert_allclose(local.weights, passes.weights, rtol=1e-12)


def test_a_row_more_changes_neither_the_clusters_nor_their_order():
    X = _blobs(6000, seed=6, sd=1.5)
    a, _ = kmeans_start(*array_passes(X, 2), len(X), 4, 2, sample_size=4000)
    b, _ = kmeans_start(*array_passes(X[:-1], 2), len(X) - 1, 4, 2, sample_size=4000)
    np.testing.assert_allclose(a.means, b.means, atol=0.1)


def test_sample_moments_with_missing_values_equal_nan_moments():
    X = _blobs(3000, seed=8)
    X[np.random.default_rng(0).random(X.shape) < 0.2] = np.nan
    mom = sample_moments(X, 1, 0.5, 0)
    np.testing.assert_allclose(mom.count, np.sum(~np.isnan(X), axis=0))
    np.testing.assert_allclose(mom.mean, np.nanmean(X, axis=0), rtol=1e-12)
    np.testing.assert_allclose(mom.m2 / mom.count, np.nanvar(X, axis=0), rtol=1e-10)
    assert not np.isnan(mom.m2).any()


def test_lloyd_sums_of_many_clusters_and_one():
    Z = _blobs(2000, seed=9)
    for K in (1, 40):
        c = Z[:K]
        got = cluster_sums(Z, c)
        labels = np.argmin(np.sum((Z[:, None] - c[None]) ** 2, axis=2), axis=1)
        for k in range(K):
            dz = Z[labels == k] - c[k]
            assert got.count[k] == len(dz)
            np.testing.assert_allclose(got.scatter[k], dz.T @ dz, atol=1e-9)


@pytest.mark.cluster
def test_local_workers_are_forked_with_the_worker_modules_loaded():
    """connect()'s local cluster: every worker has xd-dask's worker modules and Numba's CPU
    target loaded before its first task, and Dask's environment for a new worker."""
    from xd_dask.distributed import connect
    from xd_dask.distributed.cluster import fork_server_method

    if fork_server_method() is None:
        pytest.skip("no fork server on this platform")

    def state():
        import os
        import sys

        return (
            "xd_dask.distributed.tasks" in sys.modules,
            "xd_dask.distributed.worker_preload" in sys.modules,
            os.environ.get("OMP_NUM_THREADS"),
            os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        )

    client, cluster = connect(n_workers=2, dashboard_address=None)
    try:
        seen = client.run(state)
        assert len(seen) == 2
        assert all(s == (True, True, "1", "65536") for s in seen.values()), seen
        X = _blobs(2000, seed=10)
        futures = client.map(sample_moments, [X[:1000], X[1000:]], seed=1, fraction=1.0, unit=0)
        assert sum(f.result().sample.shape[0] for f in futures) == 2000
    finally:
        client.close()
        cluster.close()
