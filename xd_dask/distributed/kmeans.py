"""Distributed k-means initialisation: the same map / tree-reduce shape as an EM pass.

1. One pass (``xd-kmeans-sample``): per-column moments of the observed values and a seeded
   Bernoulli sample of about ``sample_size`` rows (the sample depends on the seed and the
   partition id only).
2. On the client: k-means++ seeding and Lloyd iterations on the sample (small: O(K) rows).
3. Lloyd passes over the whole catalogue (``xd-kmeans``): each partition returns per-cluster
   counts, sums and scatter matrices centred on the current centres (O(K D^2)).
4. Weights, means and covariances from the last pass's clusters.

k-means runs in standardised coordinates (column mean and standard deviation of the observed
values), with missing fields imputed by the column mean; this imputation is used for the
initialisation only, never in EM. The result is deterministic for a fixed seed and partitioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xd_dask.distributed.passes import PassRunner
from xd_dask.distributed.tasks import KMeansSums, Params, assign, kmeans_lloyd, kmeans_sample
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["KMeansInit", "kmeans_init", "kmeans_plusplus"]


@dataclass
class KMeansInit:
    """Initial mixture parameters and how they were found (``info`` goes into the metadata)."""

    params: Params
    info: dict


def kmeans_plusplus(Z: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``n_clusters`` centres from Z (m, D)."""
    m = Z.shape[0]
    centres = np.empty((n_clusters, Z.shape[1]))
    centres[0] = Z[rng.integers(m)]
    d2 = np.sum((Z - centres[0]) ** 2, axis=1)
    for k in range(1, n_clusters):
        total = d2.sum()
        if total <= 0:  # fewer distinct rows than clusters: duplicate (Lloyd leaves them empty)
            centres[k] = Z[rng.integers(m)]
            continue
        i = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
        centres[k] = Z[min(i, m - 1)]
        d2 = np.minimum(d2, np.sum((Z - centres[k]) ** 2, axis=1))
    return centres


def _lloyd_sample(Z: np.ndarray, centres: np.ndarray, n_iter: int) -> np.ndarray:
    for _ in range(n_iter):
        labels = assign(Z, centres)
        count = np.bincount(labels, minlength=centres.shape[0])
        sums = np.stack(
            [
                np.bincount(labels, weights=Z[:, i], minlength=centres.shape[0])
                for i in range(Z.shape[1])
            ],
            axis=1,
        )
        new = np.where(count[:, None] > 0, sums / np.maximum(count, 1)[:, None], centres)
        if np.array_equal(new, centres):
            break
        centres = new
    return centres


def kmeans_init(
    runner: PassRunner,
    n_components: int,
    seed: int,
    *,
    max_iter: int = 10,
    tol: float = 1e-4,
    sample_size: int | None = None,
    reg_covar: float = 1e-6,
    on_pass=None,
) -> KMeansInit:
    """Initial weights, means and covariances by distributed k-means.

    Parameters
    ----------
    runner : the fit's pass runner (cluster, partitions, task options).
    n_components : K.
    seed : all randomness derives from it (and the partition ids).
    max_iter : Lloyd passes over the catalogue (at least 1: it gives the covariances).
    tol : stop when no centre moves more than ``tol`` (standardised units).
    sample_size : rows sampled for the seeding (default max(50 K, 2000)).
    reg_covar : added to the diagonal of the covariances (data units).
    on_pass : optional callable(pass_index, inertia_per_row, shift) for logging.
    """
    K = int(n_components)
    N = runner.manifest.n_rows
    size = sample_size or max(50 * K, 2000)
    fraction = min(1.0, size / max(N, 1))
    res = runner.run("kmeans-sample", (0,), kmeans_sample, extra=(runner.opts, seed, fraction))
    mom = res.payload
    D = mom.mean.shape[0]
    if np.any(mom.count == 0):
        j = int(np.flatnonzero(mom.count == 0)[0])
        raise ValueError(f"feature {j} has no observed value in the whole catalogue")
    col_mean = mom.mean
    col_scale = np.sqrt(mom.m2 / mom.count)
    col_scale = np.where(np.isfinite(col_scale) & (col_scale > 0), col_scale, 1.0)
    Zs = (mom.sample - col_mean) / col_scale
    Zs = np.where(np.isnan(Zs), 0.0, Zs)
    if Zs.shape[0] < K:
        raise ValueError(
            f"only {Zs.shape[0]} rows sampled for k-means ({res.n_used} valid rows in the "
            f"catalogue) but n_components = {K}; use fewer components or a larger sample_size"
        )
    rng = np.random.default_rng([int(seed), 17])
    centres = _lloyd_sample(Zs, kmeans_plusplus(Zs, K, rng), n_iter=20)

    sums: KMeansSums | None = None
    converged = False
    n_pass = 0
    for n_pass in range(1, max(1, int(max_iter)) + 1):
        part = runner.run(
            "kmeans", (n_pass,), kmeans_lloyd, extra=(centres, col_mean, col_scale, runner.opts)
        )
        sums = part.payload
        d = sums.delta / np.maximum(sums.count, 1.0)[:, None]  # (K, D) mean offset per cluster
        new = np.where(sums.count[:, None] > 0, centres + d, centres)
        shift = float(np.max(np.abs(new - centres)))
        inertia = sums.inertia / max(part.n_used, 1)
        log.info(
            "k-means pass %d: inertia per row %.6g, max centre shift %.3g", n_pass, inertia, shift
        )
        if on_pass is not None:
            on_pass(n_pass, inertia, shift)
        if shift <= tol:
            converged = True
            break
        if n_pass < max(1, int(max_iter)):
            centres = new
    assert sums is not None
    count = sums.count
    d = sums.delta / np.maximum(count, 1.0)[:, None]
    means_z = centres + d
    cov_z = sums.scatter / np.maximum(count, 1.0)[:, None, None] - d[:, :, None] * d[:, None, :]
    few = count <= D  # too few rows for a covariance: use the unit sphere (standardised units)
    cov_z[few] = np.eye(D)
    cov_z = 0.5 * (cov_z + np.swapaxes(cov_z, 1, 2)) + 1e-6 * np.eye(D)[None]
    weights = np.maximum(count, 1.0)
    weights = weights / weights.sum()
    means = col_mean[None, :] + means_z * col_scale[None, :]
    covs = cov_z * (col_scale[:, None] * col_scale[None, :])[None] + reg_covar * np.eye(D)[None]
    info = {
        "method": "kmeans",
        "passes": n_pass,
        "converged": converged,
        "inertia_per_row": float(sums.inertia / max(res.n_used, 1)),
        "sample_rows": int(Zs.shape[0]),
        "empty_clusters": [int(j) for j in np.flatnonzero(count == 0)],
        "column_mean": [float(x) for x in col_mean],
        "column_scale": [float(x) for x in col_scale],
    }
    if not math.isfinite(info["inertia_per_row"]):
        raise FloatingPointError("k-means produced a non-finite inertia; check the catalogue")
    return KMeansInit(Params(weights, means, covs), info)
