"""The k-means start of a fit, the same in memory and on a cluster.

1. A sample pass: per-column moments of the observed values and a seeded Bernoulli sample of
   about ``sample_size`` rows (default :func:`default_sample_size`; the sample of a unit depends
   on the seed and the unit's id only, :func:`sample_moments`).
2. On the client: a ROBUST centre and scale per column from the sample (median and 1.4826 x MAD;
   the interquartile range, then 1, where the MAD is 0), so that one absurd row (a parallax of
   1e30 mas) neither sets the scale nor loses the other rows to rounding; sample rows far outside
   the bulk (:func:`trim_radius2`) are left out; k-means on the sample (:func:`sample_kmeans`:
   the best of :data:`~xd_dask.optim.kmeans_sample.N_INIT` seeded k-means++ starts, compared on a
   subset of the sample, then Lloyd steps on the whole sample).
3. ``max_iter`` Lloyd passes over every row (default ``fit.kmeans_iter``): per-cluster counts, sums
   and scatter matrices centred on the current centres (:func:`cluster_sums`, O(K D^2) per unit),
   leaving out rows farther from every centre than the trim radius (counted). When the sample is
   every row (a table of up to ``sample_size`` rows) the client already holds them: the passes run
   there, and the start reads the rows once.
4. Weights, means and covariances from the last pass's clusters.

With a background component (DESIGN.md 4d) the start must not spend components on the outliers
the background is for: k-means is then TRIMMED (Cuesta-Albertos et al. 1997; the tclust of
Garcia-Escudero et al. 2008): each Lloyd step leaves out the fraction ``trim`` of rows farthest
from their centres, on the sample and in the passes over every row, so that a uniform spread of
outliers (measured: 10 % over a 60-unit cube around three clusters 5 units apart) takes no
centre; EM then gives the background its share.

k-means runs in standardised coordinates ((x - centre) / scale), with missing fields imputed by the
centre; this imputation is used for the initialisation only, never in EM. The passes are given
as functions (:func:`kmeans_start`): arrays in memory compute them directly
(:func:`array_passes`), a catalogue on a cluster maps them over its partitions
(:mod:`xd_dask.distributed.kmeans`), so the same rows give the same start.

Cost (``benchmarks/bench_start.py``): the start must cost no more than two EM iterations at any
size. Large catalogues: two reads of the rows (the sample pass, one Lloyd pass) and per-row work
well below the EM kernel's (vectorised sums, no per-row Python). Small tables: one read, and
k-means on the client in tens of milliseconds (NumPy only: scikit-learn takes seconds to import).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xd_dask.config import key
from xd_dask.kernels._common import array_namespace, to_numpy
from xd_dask.optim.kmeans_sample import nearest, sample_kmeans
from xd_dask.params import Params
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "KMeansSums",
    "SampleMoments",
    "array_passes",
    "assign",
    "cluster_sums",
    "default_sample_size",
    "kmeans_start",
    "robust_scale",
    "sample_moments",
    "standardise",
    "trim_radius2",
]

#: Rows whose squared standardised distance exceeds TRIM x the sample's 99th percentile (or D)
#: are left out of the k-means sums (absurd rows; EM still sees them).
TRIM = 100.0
#: Trimmed k-means with a background component: the fraction of rows farthest from their
#: centres left out of every step (module docstring).
BACKGROUND_TRIM = 0.2


def default_sample_size(n_components: int) -> int:
    """Rows sampled for k-means: max(200 K, 20 000), at most 200 000."""
    return int(min(max(200 * int(n_components), 20_000), 200_000))


# ----------------------------------------------------------------------------- sums
@dataclass
class SampleMoments:
    """Per-column moments of the observed values (Chan's parallel merge) and a row sample."""

    count: np.ndarray  # (D,) observed values per column
    mean: np.ndarray  # (D,)
    m2: np.ndarray  # (D,) sum of squared deviations from the mean
    sample: np.ndarray  # (m, D) sampled rows, NaN = missing

    def __add__(self, other: SampleMoments) -> SampleMoments:
        n = self.count + other.count
        n_safe = np.where(n > 0, n, 1.0)
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n_safe
        m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / n_safe
        return SampleMoments(n, mean, m2, np.concatenate([self.sample, other.sample]))


def sample_moments(X: Any, seed: int, fraction: float, unit: int) -> SampleMoments:
    """Column moments of the rows X (n, D; NaN = missing) of unit ``unit`` and a seeded
    Bernoulli(``fraction``) sample of them."""
    X = to_numpy(X).astype(np.float64, copy=False)
    n, D = X.shape
    if not n:
        count = mean = m2 = np.zeros(D)
    else:  # column sums as products with a vector of ones (BLAS): a few ns per value
        ones = np.ones(n)
        missing = np.isnan(X)
        if missing.any():
            count = n - ones @ missing.astype(np.float64)
            mean = np.where(count > 0, ones @ np.where(missing, 0.0, X) / np.maximum(count, 1), 0.0)
            dev = X - mean
            dev[missing] = 0.0
        else:
            count = np.full(D, float(n))
            mean = ones @ X / n
            dev = X - mean
        m2 = np.einsum("ij,ij->j", dev, dev)
    rng = np.random.default_rng([int(seed), 13, int(unit)])
    return SampleMoments(count, mean, m2, X[rng.random(n) < fraction])


@dataclass
class KMeansSums:
    """Lloyd partial sums in standardised units, centred on each row's assigned centre."""

    count: np.ndarray  # (K,)
    delta: np.ndarray  # (K, D)  sum of (z_i - c_k)
    scatter: np.ndarray  # (K, D, D)  sum of (z_i - c_k)(z_i - c_k)^T
    inertia: float
    trimmed: int = 0  # rows left out: farther than the trim radius from every centre

    def __add__(self, other: KMeansSums) -> KMeansSums:
        return KMeansSums(
            self.count + other.count,
            self.delta + other.delta,
            self.scatter + other.scatter,
            self.inertia + other.inertia,
            self.trimmed + other.trimmed,
        )


def standardise(X: Any, col_mean: np.ndarray, col_scale: np.ndarray) -> Any:
    """(X - mean) / scale with missing fields imputed by the column mean (i.e. 0); k-means only."""
    xp = array_namespace(X)
    Z = xp.asarray(X, dtype=xp.float64) - xp.asarray(col_mean)  # a new array: edited in place
    Z /= xp.asarray(col_scale)
    nan = xp.isnan(Z)
    if bool(xp.any(nan)):
        Z[nan] = 0.0
    return Z


def assign(Z: Any, centres: Any, chunk_elems: int | None = None) -> Any:
    """(n,) index of the nearest centre for each row of Z (n, D), as int64, in chunks of
    ``chunk_elems`` distances (default: a block that stays in a CPU's cache, 2^16; 2^22 on a
    GPU)."""
    xp = array_namespace(Z)
    c = xp.asarray(centres, dtype=xp.float64)
    K = c.shape[0]
    c2 = xp.sum(c * c, axis=1)
    cT = -2.0 * c.T  # (D, K)
    if chunk_elems is None:
        chunk_elems = 1 << 16 if xp is np else 1 << 22
    step = max(1, chunk_elems // max(K, 1))
    out = xp.empty(Z.shape[0], dtype=xp.int64)
    for s in range(0, Z.shape[0], step):
        d2 = Z[s : s + step] @ cT  # (m, K): |c|^2 - 2 z.c, |z|^2 dropped (same for every centre)
        d2 += c2
        out[s : s + step] = xp.argmin(d2, axis=1)
    return out


def cluster_sums(Z: Any, centres: np.ndarray, d2_max: float = math.inf) -> KMeansSums:
    """Lloyd sums of rows Z (n, D; standardised) about their nearest centres (K, D): per-cluster
    counts, offsets and scatter; rows farther than sqrt(``d2_max``) from every centre are left out
    and counted as trimmed. The offsets are grouped by cluster with a radix sort of the labels,
    so that each cluster is one contiguous block: a few array operations per cluster, none per
    row."""
    xp = array_namespace(Z)
    K, D = centres.shape
    c = xp.asarray(centres, dtype=xp.float64)
    labels = assign(Z, c)
    diff = Z - xp.take(c, labels, axis=0)  # (n, D)
    d2 = xp.einsum("ij,ij->i", diff, diff)  # (n,) squared distance to the nearest centre
    far = d2 > d2_max
    n_far = int(xp.count_nonzero(far))
    if n_far:
        keep = ~far
        labels, diff, d2 = labels[keep], diff[keep], d2[keep]
    small = labels.astype(xp.int16 if K < 2**15 else xp.int32)  # radix-sortable
    diff = xp.take(diff, xp.argsort(small, kind="stable"), axis=0)  # grouped by cluster
    count = to_numpy(xp.bincount(labels, minlength=K)).astype(np.float64)
    bounds = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    delta, scatter = np.zeros((K, D)), np.zeros((K, D, D))
    for k in range(K):
        if bounds[k + 1] > bounds[k]:
            dk = diff[int(bounds[k]) : int(bounds[k + 1])]  # (n_k, D)
            delta[k] = to_numpy(xp.sum(dk, axis=0))
            scatter[k] = to_numpy(dk.T @ dk)
    return KMeansSums(count, delta, scatter, float(xp.sum(d2)), n_far)


# ----------------------------------------------------------------------------- the start
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
        if np.isfinite(mad) and mad > 0:
            scale[j] = mad
            continue
        q1, q3 = np.quantile(col, [0.25, 0.75])  # only where the MAD is 0 (or not finite)
        iqr = (q3 - q1) / 1.349
        if np.isfinite(iqr) and iqr > 0:
            scale[j] = iqr
    return centre, scale


def trim_radius2(d2: np.ndarray, n_features: int) -> float:
    """Squared standardised distance beyond which a row is left out of the k-means sums:
    TRIM x max(99th percentile of ``d2``, D)."""
    q = float(np.quantile(d2, 0.99)) if d2.size else 0.0
    return TRIM * max(q, float(n_features))


#: ``sample_pass(fraction) -> (SampleMoments, valid rows)``; ``lloyd_pass(index, centres,
#: col_mean, col_scale, d2_max) -> (KMeansSums, rows)``.
SamplePass = Callable[[float], tuple[SampleMoments, int]]
LloydPass = Callable[[int, np.ndarray, np.ndarray, np.ndarray, float], tuple[KMeansSums, int]]


def kmeans_start(
    sample_pass: SamplePass,
    lloyd_pass: LloydPass,
    n_rows: int,
    n_components: int,
    seed: int,
    *,
    max_iter: int = key("fit.kmeans_iter").default,
    tol: float = key("fit.kmeans_tol").default,
    sample_size: int | None = None,
    reg_covar: float = key("fit.reg_covar").default,
    trim: float = 0.0,
) -> tuple[Params, dict]:
    """Initial parameters by k-means (module docstring) and how they were found (``info``).

    Parameters
    ----------
    sample_pass, lloyd_pass : the passes over the rows (:data:`SamplePass`, :data:`LloydPass`).
    n_rows : rows in all (sets the sampling fraction).  n_components : K.
    seed : all randomness derives from it (and the units' ids).
    max_iter : Lloyd passes over every row (0: the sample's clusters give the start).
    tol : stop when no centre moves more than ``tol`` (robust standardised units).
    sample_size : rows sampled for k-means (default :func:`default_sample_size`).
    reg_covar : added to the diagonal of the covariances (data units).
    trim : trimmed k-means (module docstring): the fraction of rows left out of every step
        (0: plain k-means; :data:`BACKGROUND_TRIM` with a background component).
    """
    K = int(n_components)
    size = sample_size or default_sample_size(K)
    fraction = min(1.0, size / max(int(n_rows), 1))
    t0 = time.perf_counter()
    mom, n_valid = sample_pass(fraction)
    seconds = {"sample_pass": time.perf_counter() - t0}
    t0 = time.perf_counter()
    col_mean, col_scale, Zs, n_trimmed = _kmeans_sample(mom, n_valid, K)
    D = Zs.shape[1]
    centres = sample_kmeans(Zs, K, seed, trim)
    d2 = nearest(Zs, centres[None])[1][:, 0]
    d2_max = float(np.quantile(d2, 1.0 - trim)) if trim > 0 else trim_radius2(d2, D)
    seconds["sample_kmeans"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # the sample is every valid row: the passes over every row need not read them again
    every_row = fraction >= 1.0 and mom.sample.shape[0] == n_valid
    Z_all = standardise(mom.sample, col_mean, col_scale) if every_row else None
    passes = _LloydPasses(lloyd_pass, Z_all, n_valid, col_mean, col_scale, d2_max)
    centres, sums, converged, n_pass = passes.run(Zs, centres, int(max_iter), tol)
    seconds["lloyd_passes"] = time.perf_counter() - t0
    params = _params_from_sums(sums, centres, col_mean, col_scale, reg_covar)
    info = {
        "method": "kmeans",
        "passes": n_pass,
        "passes_on_sample": bool(every_row and n_pass),
        "converged": converged,
        "inertia_per_row": float(sums.inertia / max(float(sums.count.sum()), 1.0)),
        "sample_rows": int(Zs.shape[0]),
        "sample_rows_trimmed": n_trimmed,
        "trim": float(trim),
        "rows_trimmed": int(sums.trimmed),
        "empty_clusters": [int(j) for j in np.flatnonzero(sums.count == 0)],
        "seconds_by_step": seconds,
        "column_centre": [float(x) for x in col_mean],
        "column_scale": [float(x) for x in col_scale],
    }
    if not math.isfinite(info["inertia_per_row"]):
        raise FloatingPointError("k-means produced a non-finite inertia; check the catalogue")
    return params, info


def _kmeans_sample(
    mom: SampleMoments, n_valid: int, K: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(column centre, column scale, the standardised sample rows within the bulk, rows
    trimmed): the rows k-means runs on (module docstring, step 2)."""
    D = mom.mean.shape[0]
    if np.any(mom.count == 0):
        j = int(np.flatnonzero(mom.count == 0)[0])
        raise ValueError(f"feature {j} has no observed value in the whole catalogue")
    col_mean, col_scale = robust_scale(mom.sample, mom.mean)
    Z_sample = standardise(mom.sample, col_mean, col_scale)
    d2 = np.einsum("ij,ij->i", Z_sample, Z_sample)
    keep = d2 <= trim_radius2(d2, D)
    if int(keep.sum()) < K:
        raise ValueError(
            f"only {int(keep.sum())} rows sampled for k-means ({n_valid} valid rows in the "
            f"catalogue) but n_components = {K}; use fewer components or a larger "
            "fit.kmeans_sample"
        )
    Zs = Z_sample[keep]
    if not _distinct_rows_at_least(Zs, K):
        raise ValueError(
            f"the k-means sample holds fewer distinct rows than n_components = {K}; use fewer "
            "components"
        )
    return col_mean, col_scale, Zs, int((~keep).sum())


def _distinct_rows_at_least(Z: np.ndarray, K: int) -> bool:
    """Whether Z (n, D) holds at least K distinct rows: decided on its first 64 K rows when they
    suffice (the usual case, microseconds), else on all of them (a sort of every row: ~9 ms
    for 20,000 rows, a quarter of a small table's start)."""
    head = Z[: 64 * K]
    if np.unique(head, axis=0).shape[0] >= K:
        return True
    return head.shape[0] < Z.shape[0] and np.unique(Z, axis=0).shape[0] >= K


@dataclass
class _LloydPasses:
    """Lloyd passes over every row (module docstring, step 3): on the sample itself when it is
    every valid row (``Z_all``), else through ``lloyd_pass``."""

    lloyd_pass: LloydPass
    Z_all: np.ndarray | None
    n_valid: int
    col_mean: np.ndarray
    col_scale: np.ndarray
    d2_max: float

    def sums(self, n_pass: int, centres: np.ndarray) -> tuple[KMeansSums, int]:
        if self.Z_all is not None:
            return cluster_sums(self.Z_all, centres, self.d2_max), self.n_valid
        return self.lloyd_pass(n_pass, centres, self.col_mean, self.col_scale, self.d2_max)

    def run(
        self, Zs: np.ndarray, centres: np.ndarray, max_iter: int, tol: float
    ) -> tuple[np.ndarray, KMeansSums, bool, int]:
        """(centres, their last sums, converged, passes made)."""
        if max_iter < 1:  # the sample's clusters give the start
            return centres, cluster_sums(Zs, centres, self.d2_max), False, 0
        converged = False
        for n_pass in range(1, max_iter + 1):
            sums, rows = self.sums(n_pass, centres)
            d = sums.delta / np.maximum(sums.count, 1.0)[:, None]  # (K, D) mean offset per cluster
            new = np.where(sums.count[:, None] > 0, centres + d, centres)
            shift = float(np.max(np.abs(new - centres)))
            inertia = sums.inertia / max(rows, 1)
            log.info(
                "k-means pass %d: inertia per row %.6g, max centre shift %.3g",
                n_pass,
                inertia,
                shift,
            )
            if shift <= tol:
                converged = True
                break
            if n_pass < max_iter:
                centres = new
        return centres, sums, converged, n_pass


def _params_from_sums(
    sums: KMeansSums,
    centres: np.ndarray,
    col_mean: np.ndarray,
    col_scale: np.ndarray,
    reg_covar: float,
) -> Params:
    """Weights, means and covariances (data units) of the clusters of the last Lloyd sums."""
    K, D = centres.shape
    count = sums.count
    d = sums.delta / np.maximum(count, 1.0)[:, None]
    means_z = centres + d
    cov_z = sums.scatter / np.maximum(count, 1.0)[:, None, None] - d[:, :, None] * d[:, None, :]
    few = count <= D  # too few rows for a covariance: use the unit sphere (standardised units)
    cov_z[few] = np.eye(D)
    cov_z = 0.5 * (cov_z + np.swapaxes(cov_z, 1, 2)) + 1e-6 * np.eye(D)[None]
    weights = np.maximum(count, 1.0)
    means = col_mean[None, :] + means_z * col_scale[None, :]
    covs = cov_z * (col_scale[:, None] * col_scale[None, :])[None] + reg_covar * np.eye(D)[None]
    return Params(weights / weights.sum(), means, covs)


def array_passes(X: Any, seed: int) -> tuple[SamplePass, LloydPass]:
    """The k-means passes over rows X (n, D) held in memory, as one unit of id 0: the start a
    one-partition catalogue of the same rows gets on a cluster."""

    def sample_pass(fraction: float) -> tuple[SampleMoments, int]:
        return sample_moments(X, seed, fraction, 0), int(np.shape(X)[0])

    def lloyd_pass(i: int, centres, col_mean, col_scale, d2_max) -> tuple[KMeansSums, int]:
        return cluster_sums(standardise(X, col_mean, col_scale), centres, d2_max), int(
            np.shape(X)[0]
        )

    return sample_pass, lloyd_pass
