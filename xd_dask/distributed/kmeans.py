"""Distributed k-means initialisation: k-means on a bounded sample, then a pass over the catalogue.

1. One pass (``xd-kmeans-sample``): per-column moments of the observed values and a seeded
   Bernoulli sample of about ``sample_size`` rows (default :func:`default_sample_size`; the sample
   depends on the seed and the partition id only).
2. On the client: a ROBUST centre and scale per column from the sample (median and 1.4826 x MAD;
   the interquartile range, then 1, where the MAD is 0), so that one absurd row (a parallax of
   1e30 mas) neither sets the scale nor loses the other rows to rounding; sample rows far outside
   the bulk (:func:`trim_radius2`) are left out; scikit-learn's k-means (k-means++ seeding, the
   best of :data:`N_INIT` seeded starts) on the sample.
3. ``kmeans_iter`` Lloyd passes over the whole catalogue (``xd-kmeans``, default 1): each partition
   returns per-cluster counts, sums and scatter matrices centred on the current centres (O(K D^2)),
   leaving out rows farther from every centre than the trim radius (counted).
4. Weights, means and covariances from the last pass's clusters.

Cost: the sample pass and one Lloyd pass read the catalogue twice and run no EM kernel, under two
batch-EM iterations' worth (``benchmarks/bench_fit.py`` prints the ratio; ten Lloyd passes over the
catalogue cost about 7 iterations).

k-means runs in standardised coordinates ((x - centre) / scale), with missing fields imputed by the
centre; this imputation is used for the initialisation only, never in EM. The result is
deterministic for a fixed seed and partitioning.

PROJECTED catalogues (a schema with a projection: 2-d views of 3-d vectors, where k-means cannot
run) start by the method of moments instead (:func:`moment_init`, the mathematics in
:mod:`xd_dask.optim.init`): two ``xd-moments`` passes of small sums (the mean, then the dispersion
tensor's normal equations about it), the same start as an in-memory fit of the same rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from xd_dask.distributed.passes import PassRunner
from xd_dask.distributed.tasks import (
    KMeansSums,
    Params,
    assign,
    cluster_sums,
    kmeans_lloyd,
    kmeans_sample,
    moments,
)
from xd_dask.optim.init import moment_solution, moment_start
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "KMeansInit",
    "default_sample_size",
    "kmeans_init",
    "moment_init",
    "robust_scale",
    "trim_radius2",
]

#: Seeded k-means++ starts on the sample (scikit-learn's KMeans); the lowest inertia is kept.
N_INIT = 10
#: Lloyd iterations on the sample (at most).
SAMPLE_LLOYD_ITER = 100
#: Rows whose squared standardised distance exceeds TRIM x the sample's 99th percentile (or D)
#: are left out of the k-means sums (absurd rows; EM still sees them).
TRIM = 100.0


def default_sample_size(n_components: int) -> int:
    """Rows sampled for k-means: max(200 K, 20 000), at most 200 000."""
    return int(min(max(200 * int(n_components), 20_000), 200_000))


@dataclass
class KMeansInit:
    """Initial mixture parameters and how they were found (``info`` goes into the metadata)."""

    params: Params
    info: dict


def _nearest_d2(Z: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = assign(Z, centres)
    return labels, np.sum((Z - centres[labels]) ** 2, axis=1)


def robust_scale(sample: np.ndarray, fallback_centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, scale), each (D,), of the columns of ``sample`` (m, D; NaN = missing): median and
    1.4826 x MAD, else the interquartile range / 1.349, else 1; a column without an observed
    value in the sample takes ``fallback_centre`` and scale 1."""
    D = sample.shape[1]
    centre, scale = np.array(fallback_centre, dtype=np.float64), np.ones(D)
    for j in range(D):
        col = sample[:, j]
        col = col[~np.isnan(col)]
        if col.size == 0:
            continue
        centre[j] = np.median(col)
        mad = 1.4826 * np.median(np.abs(col - centre[j]))
        iqr = (np.quantile(col, 0.75) - np.quantile(col, 0.25)) / 1.349
        for s in (mad, iqr):
            if np.isfinite(s) and s > 0:
                scale[j] = s
                break
    return centre, scale


def trim_radius2(d2: np.ndarray, n_features: int) -> float:
    """Squared standardised distance beyond which a row is left out of the k-means sums:
    TRIM x max(99th percentile of ``d2``, D)."""
    q = float(np.quantile(d2, 0.99)) if d2.size else 0.0
    return TRIM * max(q, float(n_features))


def _sample_kmeans(Zs: np.ndarray, K: int, seed: int) -> np.ndarray:
    """Centres (K, D) of scikit-learn's k-means (k-means++ seeding, Lloyd) on the sample: the
    best of :data:`N_INIT` seeded starts, on one thread (the client shares the machine with
    workers; OpenMP threads spinning against them made it 20x slower on 2 busy cores)."""
    from sklearn.cluster import KMeans  # noqa: PLC0415 - only needed for the initialisation
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - a scikit-learn dependency

    rng = np.random.default_rng([int(seed), 17])
    km = KMeans(
        K,
        init="k-means++",
        n_init=N_INIT,
        max_iter=SAMPLE_LLOYD_ITER,
        random_state=int(rng.integers(2**31 - 1)),
    )
    with threadpool_limits(1):
        return km.fit(Zs).cluster_centers_.astype(np.float64)


def kmeans_init(
    runner: PassRunner,
    n_components: int,
    seed: int,
    *,
    max_iter: int = 1,
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
    max_iter : Lloyd passes over the catalogue (0: the sample's clusters give the start).
    tol : stop when no centre moves more than ``tol`` (robust standardised units).
    sample_size : rows sampled for k-means (default :func:`default_sample_size`).
    reg_covar : added to the diagonal of the covariances (data units).
    on_pass : optional callable(pass_index, inertia_per_row, shift) for logging.
    """
    K = int(n_components)
    N = runner.manifest.n_rows
    size = sample_size or default_sample_size(K)
    fraction = min(1.0, size / max(N, 1))
    t0 = time.perf_counter()
    res = runner.run_shared(
        "kmeans-sample", (0,), kmeans_sample, extra=(runner.opts, seed, fraction)
    )
    seconds = {"sample_pass": time.perf_counter() - t0}
    t0 = time.perf_counter()
    mom = res.payload
    D = mom.mean.shape[0]
    if np.any(mom.count == 0):
        j = int(np.flatnonzero(mom.count == 0)[0])
        raise ValueError(f"feature {j} has no observed value in the whole catalogue")
    col_mean, col_scale = robust_scale(mom.sample, mom.mean)
    Zs = (mom.sample - col_mean) / col_scale
    Zs = np.where(np.isnan(Zs), 0.0, Zs)
    r2 = trim_radius2(np.sum(Zs * Zs, axis=1), D)
    keep = np.sum(Zs * Zs, axis=1) <= r2
    if int(keep.sum()) < K:
        raise ValueError(
            f"only {int(keep.sum())} rows sampled for k-means ({res.n_used} valid rows in the "
            f"catalogue) but n_components = {K}; use fewer components or a larger sample_size"
        )
    Zs = Zs[keep]
    centres = _sample_kmeans(Zs, K, seed)
    d2_max = trim_radius2(_nearest_d2(Zs, centres)[1], D)
    seconds["sample_kmeans"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    sums: KMeansSums | None = None
    converged = False
    n_pass = 0
    if int(max_iter) == 0:  # the clusters of the sample give the start (no pass)
        sums = cluster_sums(Zs, centres, d2_max)
    for n_pass in range(1, int(max_iter) + 1):
        part = runner.run(
            "kmeans",
            (n_pass,),
            kmeans_lloyd,
            extra=(centres, col_mean, col_scale, runner.opts, d2_max),
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
        if n_pass < int(max_iter):
            centres = new
    assert sums is not None
    seconds["lloyd_passes"] = time.perf_counter() - t0
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
        "inertia_per_row": float(sums.inertia / max(float(sums.count.sum()), 1.0)),
        "sample_rows": int(Zs.shape[0]),
        "sample_rows_trimmed": int((~keep).sum()),
        "rows_trimmed": int(sums.trimmed),
        "empty_clusters": [int(j) for j in np.flatnonzero(count == 0)],
        "seconds_by_step": seconds,
        "column_centre": [float(x) for x in col_mean],
        "column_scale": [float(x) for x in col_scale],
    }
    if not math.isfinite(info["inertia_per_row"]):
        raise FloatingPointError("k-means produced a non-finite inertia; check the catalogue")
    return KMeansInit(Params(weights, means, covs), info)


def moment_init(runner: PassRunner, n_components: int, seed: int, reg_covar: float) -> KMeansInit:
    """Initial parameters of a projected catalogue by the method of moments (module docstring):
    pass 1 sums R^T R and R^T x (the mean), pass 2 the dispersion's normal equations about it;
    :func:`xd_dask.optim.init.moment_start` draws the K components with ``seed``."""
    t0 = time.perf_counter()
    first = runner.run("moments", (0,), moments, extra=(runner.opts, None)).payload
    mean, _ = moment_solution(first)
    second = runner.run("moments", (1,), moments, extra=(runner.opts, mean)).payload
    mean, Sigma = moment_solution(first, second)
    w, m, V = moment_start(mean, Sigma, n_components, int(seed), reg_covar)
    info = {
        "method": "moments",
        "rows": int(first.n),
        "mean": mean.tolist(),
        "dispersion": Sigma.tolist(),
        "seconds": time.perf_counter() - t0,
    }
    log.info("moment init: mean %s over %d rows", np.array2string(mean, precision=4), first.n)
    return KMeansInit(Params(w, m, V), info)
