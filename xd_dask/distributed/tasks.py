"""Worker-side task functions: read a partition, run a kernel on it, return small sums.

Every function here runs inside a Dask worker on ONE partition (or combines the small results of
several) and returns a :class:`Partial` whose size depends on K and D only, never on the number
of rows. They are plain functions, testable without a cluster.

A task's ``source`` is either a :class:`~xd_dask.distributed.manifest.Partition` (the task reads
the file itself) or a :class:`Block` already held in worker memory (``persist=True``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dask.sizeof import sizeof

from xd_dask.config import row_dtype
from xd_dask.distributed.manifest import Partition
from xd_dask.distributed.rowstatus import with_status
from xd_dask.distributed.split import row_keys, side_mask, stratum_of
from xd_dask.kernels import (
    Background,
    NotPositiveDefiniteError,
    SuffStats,
    compute_stats,
    posterior,
    row_log_likelihood,
)
from xd_dask.kernels._common import array_namespace, to_numpy
from xd_dask.utils import atomic_path

__all__ = [
    "Block",
    "KMeansSums",
    "LogLikeSum",
    "Params",
    "Partial",
    "PartitionError",
    "SampleMoments",
    "TaskOptions",
    "WorstRows",
    "combine",
    "estep",
    "kmeans_lloyd",
    "kmeans_sample",
    "loglike",
    "moments",
    "posterior_write",
    "read_block",
]


class PartitionError(ValueError):
    """A partition's rows could not be processed; the message names the file and the source_id."""


@dataclass(frozen=True)
class TaskOptions:
    """How workers read and process partitions (the same for every task of a fit).

    split : None (every row) or (fraction, side): keep only the "train" or the "holdout" side of
        the row-level split by source-id hash (:mod:`xd_dask.distributed.split`), applied right
        after reading, so persisted blocks and every pass see that side only.
    """

    schema: Any  # xd_dask.io.CatalogSchema
    on_bad: str = "error"
    dtype: str = "float64"
    backend: str = "auto"
    gpu: bool = False
    numba_threads: int = 1
    split: tuple[float, str] | None = None


@dataclass(frozen=True)
class Params:
    """Mixture parameters broadcast to the workers once per iteration / wave."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, D)
    covariances: np.ndarray  # (K, D, D)

    @property
    def nbytes(self) -> int:
        return int(self.weights.nbytes + self.means.nbytes + self.covariances.nbytes)


@dataclass
class Block:
    """A partition's validated arrays in worker memory (NumPy, or CuPy on GPU workers).

    ``n_read`` counts the rows read from the file (both sides of a split); ``dropped`` counts the
    bad rows dropped by the reader (``on_bad="drop"``, both sides); the arrays hold the valid rows
    on the split's side. Rows of the other side are neither used nor dropped. With a schema
    projection X holds the d observed values, X_cov their (d, d) noise and ``R`` (n, d, D) the
    projections from the model's D features (None without); every row selection slices R with
    X and X_cov.
    """

    pid: int
    path: str
    X: Any  # (n, D), NaN = missing
    X_cov: Any  # (n, D, D)
    ids: np.ndarray  # (n,) int64 source ids (host)
    n_read: int
    dropped: dict[str, int]
    R: Any = None  # (n, d, D) projections, or None

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])


@sizeof.register(Block)
def _sizeof_block(blk: Block) -> int:
    """Bytes a persisted block holds, so the worker's memory manager can account for it."""
    R_bytes = 0 if blk.R is None else int(blk.R.nbytes)
    return int(blk.X.nbytes + blk.X_cov.nbytes + blk.ids.nbytes) + R_bytes + 256


@dataclass
class Partial:
    """What a task returns: a payload that adds up, plus bookkeeping (all O(K D^2) or smaller)."""

    payload: Any
    n_partitions: int = 1
    n_read: int = 0
    n_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __add__(self, other: Partial) -> Partial:
        dropped = dict(self.dropped)
        for k, v in other.dropped.items():
            dropped[k] = dropped.get(k, 0) + int(v)
        return Partial(
            self.payload + other.payload,
            self.n_partitions + other.n_partitions,
            self.n_read + other.n_read,
            self.n_used + other.n_used,
            dropped,
            self.seconds + other.seconds,
        )


def combine(*parts: Partial) -> Partial:
    """Sum partial results left to right (a fixed order, so reductions are reproducible)."""
    return functools.reduce(lambda a, b: a + b, parts)


# ----------------------------------------------------------------------------- worker set-up
@functools.lru_cache(maxsize=8)
def _resolved_backend(backend: str, gpu: bool) -> str:
    if gpu:
        if backend == "numba":
            raise ValueError("backend='numba' cannot run on GPU workers; use 'auto' or 'reference'")
        return backend  # "auto": the cuda kernels on the device-resident CuPy rows
    if backend != "auto":
        return backend
    try:
        from xd_dask.kernels._numba import pattern_stats_numba  # noqa: F401, PLC0415
    except ImportError:
        return "reference"
    return "auto"


#: glibc ``M_MMAP_THRESHOLD`` set once in each worker process (bytes; None leaves it alone).
#: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins the mmap
#: threshold at 128 KiB: every partition-sized temporary array is then a fresh ``mmap`` whose
#: pages fault in again on every task. On a 2-core VM two workers doing that at once ran the
#: statistics pass 2x slower than one (page-fault contention); with 64 MiB they run at full
#: speed, reusing heap memory for arrays below that size. Larger arrays are still mmapped.
MMAP_THRESHOLD: int | None = 64 << 20
_allocator_tuned = False


def _tune_allocator() -> None:
    global _allocator_tuned
    if _allocator_tuned or MMAP_THRESHOLD is None:
        return
    _allocator_tuned = True
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def _backend(opts: TaskOptions) -> str:
    """Prepare the calling task thread; return the kernel backend for this worker.

    Caps Numba's threads for this thread (a thread-local setting, so it holds for the reader's
    and the kernel's compiled code in this task): with ``numba_threads=1`` the parallelism comes
    from the worker threads and (worker threads x Numba threads) never oversubscribes the cores.
    Tunes the process's allocator once (:data:`MMAP_THRESHOLD`).
    """
    import numba  # noqa: PLC0415

    _tune_allocator()
    numba.set_num_threads(max(1, min(int(opts.numba_threads), numba.config.NUMBA_NUM_THREADS)))
    return _resolved_backend(opts.backend, opts.gpu)


def read_block(part: Partition, opts: TaskOptions) -> Block:
    """Read, validate and convert one partition (``xd-read`` tasks and fused passes)."""
    _backend(opts)
    from xd_dask.io import read_partition  # noqa: PLC0415 - layering: distributed -> io

    dtype = np.float32 if row_dtype(opts.dtype, opts.gpu) == "float32" else np.float64
    path, fs = part.path, None
    if "://" in path:  # fsspec URL (s3://, gs://, https://, memory://, ...)
        import fsspec  # noqa: PLC0415

        fs, path = fsspec.core.url_to_fs(part.path)
    blk = read_partition(
        path,
        opts.schema,
        on_bad=opts.on_bad,
        dtype=dtype,
        filesystem=fs,
        row_groups=part.row_groups,
    )
    X, X_cov, ids, R = blk.X, blk.X_cov, np.asarray(blk.ids), blk.R
    if opts.split is not None:
        keep = side_mask(ids, *opts.split)
        X, X_cov, ids = X[keep], X_cov[keep], ids[keep]
        R = None if R is None else R[keep]
    if opts.gpu:  # device-resident rows: X, packed lower-triangle X_cov (xd_dask.distributed.gpu)
        from xd_dask.distributed.gpu import to_device  # noqa: PLC0415

        X, X_cov, R = to_device(X, X_cov, R)
    return Block(
        part.pid,
        part.path,
        X,
        X_cov,
        ids,
        int(blk.n_read),
        {str(k): int(v) for k, v in blk.dropped.items()},
        R,
    )


def _block(source: Partition | Block, opts: TaskOptions) -> Block:
    return source if isinstance(source, Block) else read_block(source, opts)


def _kernel_error(blk: Block, rows: np.ndarray | None, err: NotPositiveDefiniteError) -> Exception:
    row = int(err.row) if rows is None else int(rows[err.row])
    sid = int(blk.ids[row]) if 0 <= row < blk.ids.shape[0] else row
    return PartitionError(f"{blk.path}: source_id {sid} (row {row} of the partition): {err}")


def _subsample_rows(blk: Block, fraction: float | None, seed: int, epoch: int) -> np.ndarray | None:
    """Seeded row subset of a partition (depends on seed, epoch and partition id only)."""
    if fraction is None or fraction >= 1.0:
        return None
    rng = np.random.default_rng([int(seed), 11, int(epoch), int(blk.pid)])
    return np.flatnonzero(rng.random(blk.n_rows) < fraction)


def _stratum_rows(
    blk: Block, opts: TaskOptions, stratum: tuple[int, int, int, int] | None
) -> np.ndarray | None:
    """Rows of hash stratum s of S of a partition, ``stratum = (s, S, seed, epoch)``: by the id
    column's hash, or without one by the row's position in its file (and the partition)."""
    if stratum is None:
        return None
    s, n_strata, seed, epoch = (int(x) for x in stratum)
    unit = None if getattr(opts.schema, "id_column", None) else blk.pid
    return np.flatnonzero(stratum_of(row_keys(blk.ids, unit), n_strata, seed, epoch) == s)


def _select_rows(*subsets: np.ndarray | None) -> np.ndarray | None:
    """The rows in every given subset (None = all rows)."""
    out = None
    for rows in subsets:
        if rows is not None:
            out = rows if out is None else np.intersect1d(out, rows, assume_unique=True)
    return out


def _partial(blk: Block, payload: Any, n_used: int, t0: float) -> Partial:
    return Partial(payload, 1, blk.n_read, int(n_used), dict(blk.dropped), time.perf_counter() - t0)


# ----------------------------------------------------------------------------- E-step
@dataclass
class WorstRows:
    """The (at most) ``m`` rows whose log-likelihood fell most between two parameter sets, as
    dicts (file, row, source_id, ll_before, ll_after, component); adds up by keeping the top m
    (largest drop first; ties by file and row, so the result does not depend on the tree)."""

    rows: list[dict]
    m: int

    def __add__(self, other: WorstRows) -> WorstRows:
        def key(r: dict) -> tuple:
            after = r["ll_after"]
            drop = -r["ll_before"] if after is None else r["ll_before"] - after
            return (-np.inf if np.isnan(drop) else -drop, r["file"], r["row"])

        rows = sorted(self.rows + other.rows, key=key)
        return WorstRows(rows[: max(self.m, other.m)], max(self.m, other.m))


def _row_drops(
    blk: Block, rows: tuple[Any, Any, Any], before: tuple, after: tuple | None, m: int
) -> WorstRows:
    """Top-m rows of a partition by the fall of their log-likelihood from ``before`` to
    ``after`` (each ``(Params, background or None)``; ``after`` None: the least likely rows at
    ``before``); component = most probable before. ``rows`` = (X, S, R or None)."""
    from xd_dask.kernels import log_component_densities  # noqa: PLC0415
    from xd_dask.optim.arrays import rank_row_drops  # noqa: PLC0415

    X, S, R = rows

    def row_ll(p: Params, bg: Any) -> np.ndarray:
        return to_numpy(
            row_log_likelihood(
                X, S, p.weights, p.means, p.covariances, R=R, check=False, background=bg
            )
        )

    p = before[0]
    with np.errstate(all="ignore"):  # diagnosing rows that overflow is the point here
        lb = row_ll(*before)
        la = None if after is None else row_ll(*after)
        logp = log_component_densities(X, S, p.weights, p.means, p.covariances, R=R, check=False)
    comp = np.argmax(to_numpy(logp), axis=1)
    rows = [
        {
            "file": blk.path,
            "row": i,
            "source_id": int(blk.ids[i]),
            "ll_before": float(lb[i]),
            "ll_after": None if la is None else float(la[i]),
            "component": int(comp[i]),
        }
        for i in rank_row_drops(lb, la, m)
    ]
    return WorstRows(rows, m)


def estep(
    source: Partition | Block,
    params: Params,
    opts: TaskOptions,
    subsample: tuple[float, int, int] | None = None,
    background: Any = None,
    compare: tuple[Params, Any, int] | None = None,
    stratum: tuple[int, int, int, int] | None = None,
) -> Partial:
    """Sufficient statistics of one partition at ``params`` (``xd-estep``).

    subsample : (fraction, seed, epoch) keeps a seeded random subset of the rows.
    stratum : (s, S, seed, epoch) keeps the rows of hash stratum s of S
        (:func:`xd_dask.distributed.split.stratum_of`); with ``subsample`` the rows in both.
    background : optional :class:`xd_dask.kernels.Background` (uniform outlier component).
    compare : (after, after_background, m): instead of statistics, return the payload
        :class:`WorstRows`, the m rows whose log-likelihood fell most from ``params`` to
        ``after`` (``after`` None: the m least likely rows at ``params``); the diagnosis of a
        diverged fit, full partitions only.
    """
    t0 = time.perf_counter()
    backend = _backend(opts)
    blk = _block(source, opts)
    K, D = params.means.shape
    rows = _select_rows(
        None if subsample is None else _subsample_rows(blk, *subsample),
        _stratum_rows(blk, opts, stratum),
    )
    X, S, R = blk.X, blk.X_cov, blk.R
    if rows is not None:
        xp = array_namespace(X)
        idx = xp.asarray(rows)
        X, S = X[idx], S[idx]
        R = None if R is None else R[idx]
    if compare is not None:
        after, after_bg, m = compare
        other = None if after is None else (after, after_bg)
        worst = _row_drops(blk, (X, S, R), (params, background), other, int(m))
        return _partial(blk, worst, X.shape[0], t0)
    if X.shape[0] == 0:
        stats = SuffStats.zeros(K, D)
    else:
        try:
            stats = compute_stats(
                X,
                S,
                params.weights,
                params.means,
                params.covariances,
                R=R,
                backend=backend,
                check=False,  # the reader has validated the rows
                background=background,
            ).to_numpy()
        except NotPositiveDefiniteError as err:
            raise _kernel_error(blk, rows, err) from None
    return _partial(blk, stats, stats.n_rows, t0)


# ----------------------------------------------------------------------------- k-means
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


def kmeans_sample(
    source: Partition | Block, opts: TaskOptions, seed: int, fraction: float
) -> Partial:
    """Column moments of a partition and a seeded Bernoulli(fraction) sample of its rows."""
    t0 = time.perf_counter()
    _backend(opts)
    blk = _block(source, opts)
    X = to_numpy(blk.X).astype(np.float64, copy=False)
    obs = ~np.isnan(X)
    count = obs.sum(axis=0).astype(np.float64)
    mean = np.where(count > 0, np.nansum(X, axis=0) / np.maximum(count, 1), 0.0)
    m2 = np.nansum((X - mean) ** 2, axis=0) if X.shape[0] else np.zeros(X.shape[1])
    rng = np.random.default_rng([int(seed), 13, int(blk.pid)])
    sample = X[rng.random(X.shape[0]) < fraction]
    return _partial(blk, SampleMoments(count, mean, m2, sample), X.shape[0], t0)


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
    Z = (xp.asarray(X, dtype=xp.float64) - xp.asarray(col_mean)) / xp.asarray(col_scale)
    return xp.where(xp.isnan(Z), 0.0, Z)


def assign(Z: Any, centres: Any, chunk_elems: int = 1 << 22) -> Any:
    """(n,) index of the nearest centre for each row of Z (n, D); bounded working memory."""
    xp = array_namespace(Z)
    c = xp.asarray(centres)
    K = c.shape[0]
    c2 = xp.sum(c * c, axis=1)
    step = max(1, chunk_elems // max(K, 1))
    out = xp.empty(Z.shape[0], dtype=xp.int64)
    for s in range(0, Z.shape[0], step):
        z = Z[s : s + step]
        d2 = c2[None, :] - 2.0 * (z @ c.T)  # (m, K), |z|^2 dropped (same for every centre)
        out[s : s + step] = xp.argmin(d2, axis=1)
    return out


def cluster_sums(Z: Any, centres: np.ndarray, d2_max: float = math.inf) -> KMeansSums:
    """Lloyd sums of rows Z (n, D; standardised) about their nearest centres (K, D): per-cluster
    counts, offsets and scatter (one matmul per cluster, rows grouped by sorting); rows farther
    than sqrt(``d2_max``) from every centre are left out and counted as trimmed."""
    xp = array_namespace(Z)
    K, D = centres.shape
    labels = assign(Z, centres)
    diff = Z - xp.asarray(centres)[labels]  # (n, D)
    far = xp.sum(diff * diff, axis=1) > d2_max
    n_far = int(xp.sum(far))
    if n_far:
        labels, diff = labels[~far], diff[~far]
    order = xp.argsort(labels, kind="stable")  # rows grouped by cluster
    diff, bounds = diff[order], to_numpy(xp.searchsorted(labels[order], xp.arange(K + 1)))
    delta, scatter = np.zeros((K, D)), np.zeros((K, D, D))
    for k in range(K):
        dk = diff[int(bounds[k]) : int(bounds[k + 1])]  # (n_k, D)
        delta[k] = to_numpy(xp.sum(dk, axis=0))
        scatter[k] = to_numpy(dk.T @ dk)
    count = np.diff(bounds).astype(np.float64)
    return KMeansSums(count, delta, scatter, float(xp.sum(diff * diff)), n_far)


def kmeans_lloyd(
    source: Partition | Block,
    centres: np.ndarray,
    col_mean: np.ndarray,
    col_scale: np.ndarray,
    opts: TaskOptions,
    d2_max: float = math.inf,
) -> Partial:
    """One Lloyd pass over a partition: :func:`cluster_sums` of its standardised rows
    (``xd-kmeans``)."""
    t0 = time.perf_counter()
    _backend(opts)
    blk = _block(source, opts)
    sums = cluster_sums(standardise(blk.X, col_mean, col_scale), centres, d2_max)
    return _partial(blk, sums, blk.n_rows, t0)


def moments(
    source: Partition | Block, opts: TaskOptions, mean: np.ndarray | None = None
) -> Partial:
    """Method-of-moments sums of a partition's projected rows (``xd-moments``; the start of a
    projected fit, :mod:`xd_dask.optim.init`): sum R^T R and R^T x, and with ``mean`` the
    normal equations of the dispersion tensor about it."""
    from xd_dask.optim.init import MomentSums, moment_sums  # noqa: PLC0415

    t0 = time.perf_counter()
    _backend(opts)
    blk = _block(source, opts)
    if blk.R is None:
        raise ValueError(f"{blk.path}: the method of moments needs a schema with a projection")
    if blk.n_rows == 0:
        sums = MomentSums.zeros(int(blk.R.shape[2]))
    else:
        sums = moment_sums(blk.X, blk.X_cov, blk.R, mean)
    return _partial(blk, sums, blk.n_rows, t0)


# ----------------------------------------------------------------------------- scoring
@dataclass
class LogLikeSum:
    """Sum of per-row log-likelihoods and the number of rows."""

    ll: float
    n: int

    def __add__(self, other: LogLikeSum) -> LogLikeSum:
        return LogLikeSum(self.ll + other.ll, self.n + other.n)


def _write_parquet(table: Any, out_path: str) -> None:
    import pyarrow.parquet as pq  # noqa: PLC0415

    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)


def loglike(
    source: Partition | Block, params: Params, opts: TaskOptions, out_path: str | None = None
) -> Partial:
    """Total log-likelihood of a partition; with ``out_path`` also write per-row values."""
    import pyarrow as pa  # noqa: PLC0415

    t0 = time.perf_counter()
    backend = _backend(opts)
    blk = _block(source, opts)
    try:
        ll = to_numpy(
            row_log_likelihood(
                blk.X,
                blk.X_cov,
                params.weights,
                params.means,
                params.covariances,
                R=blk.R,
                backend=backend,
                check=False,
            )
        )
    except NotPositiveDefiniteError as err:
        raise _kernel_error(blk, None, err) from None
    if out_path is not None:
        id_name = opts.schema.id_column or "row"  # the id column under its own name
        _write_parquet(
            pa.table({id_name: pa.array(blk.ids, pa.int64()), "log_likelihood": ll}), out_path
        )
    return _partial(blk, LogLikeSum(float(np.sum(ll)), int(ll.shape[0])), ll.shape[0], t0)


def posterior_write(
    source: Partition | Block,
    params: Params,
    opts: TaskOptions,
    out_path: str,
    feature_names: list[str],
    columns: tuple[str, ...] = ("mean", "cov", "map"),
    top_k: int = 0,
    background: Background | None = None,
) -> Partial:
    """Write a partition's deconvolved posteriors to Parquet, atomically (``xd-posterior``).

    The posterior of a row's true value is a mixture over the components; the columns, float64
    whatever the reading dtype, are the schema's id column under its own name (``row``, the row
    number in the file, without one), ``status`` ("ok", or the reason a row was dropped under
    ``on_bad="drop"``: every input row is written, a dropped one with null values;
    :mod:`.rowstatus`) and, per group in ``columns``:

    - ``"mean"``: ``mean_<f>`` per feature, the mixture's mean;
    - ``"cov"``: ``cov_<f>_<g>`` for the lower triangle (f at or after g in feature order), the
      mixture's (moment-matched) covariance;
    - ``"map"``: ``component`` (the most probable component, int32) and ``component_prob`` (its
      responsibility);
    - ``"resp"``: ``resp_<j>``, every component's responsibility;

    with ``top_k`` > 0, for the k most probable components (t = 0 the most probable):
    ``top<t>_component`` (int32), ``top<t>_resp``, ``top<t>_mean_<f>``, ``top<t>_cov_<f>_<g>``,
    their own Gaussian posteriors; with a ``background`` component, ``background_resp`` (the mean
    and covariance are then those of the Gaussian part, the responsibilities the full ones).
    """
    import pyarrow as pa  # noqa: PLC0415

    unknown = set(columns) - {"mean", "cov", "map", "resp"}
    if unknown:
        raise ValueError(f"unknown posterior column group(s) {sorted(unknown)}")
    t0 = time.perf_counter()
    backend = _backend(opts)
    blk = _block(source, opts)
    try:
        post = posterior(
            blk.X,
            blk.X_cov,
            params.weights,
            params.means,
            params.covariances,
            R=blk.R,
            background=background,
            top_k=top_k,
            summary=True,
            return_resp="resp" in columns,
            backend=backend,
            check=False,
        ).to_numpy()
    except NotPositiveDefiniteError as err:
        raise _kernel_error(blk, None, err) from None
    names = list(feature_names)
    id_name = opts.schema.id_column or "row"
    cols: dict[str, Any] = {id_name: pa.array(blk.ids, pa.int64())}

    def add_gaussian(prefix: str, mean: np.ndarray, cov: np.ndarray, groups) -> None:
        if "mean" in groups:
            for i, f in enumerate(names):
                cols[f"{prefix}mean_{f}"] = mean[:, i]
        if "cov" in groups:
            for i, f in enumerate(names):
                for j in range(i + 1):
                    cols[f"{prefix}cov_{f}_{names[j]}"] = cov[:, i, j]

    add_gaussian("", post.mean, post.cov, columns)
    if "map" in columns:
        cols["component"] = post.map_component.astype(np.int32)
        cols["component_prob"] = post.map_resp
    if "resp" in columns:
        for j in range(post.resp.shape[1]):
            cols[f"resp_{j}"] = post.resp[:, j]
    if post.background_resp is not None:
        cols["background_resp"] = post.background_resp
    for t in range(post.top_component.shape[1] if post.top_component is not None else 0):
        cols[f"top{t}_component"] = post.top_component[:, t].astype(np.int32)
        cols[f"top{t}_resp"] = post.top_resp[:, t]
        add_gaussian(f"top{t}_", post.top_mean[:, t], post.top_cov[:, t], ("mean", "cov"))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    table = with_status(cols, source, opts, sum(blk.dropped.values()), id_name)
    _write_parquet(table, out_path)
    return _partial(blk, LogLikeSum(0.0, int(post.mean.shape[0])), post.mean.shape[0], t0)
