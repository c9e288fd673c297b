"""Worker-side task functions: read a partition, run a kernel on it, return small sums.

Every task here runs inside a Dask worker on ONE partition (or combines the small results of
several) and returns a :class:`Partial` whose size depends on K and D only, never on the number
of rows. They are plain functions, testable without a cluster, with one signature::

    task(source, opts, params, request) -> Partial

``source`` is a :class:`~xd_dask.distributed.manifest.Partition` (the task reads the file itself)
or a :class:`Block` already held in worker memory (``persist=True``); ``opts`` the fit's
:class:`TaskOptions`; ``params`` the mixture (:class:`xd_dask.params.Params`, whole: background
included) or None for tasks that need none; ``request`` a frozen object of the task's own
settings (:class:`Rows`, :class:`Diagnose`, :class:`ScoreRequest`, :class:`PosteriorRequest`;
the start's tasks and requests are in :mod:`xd_dask.distributed.start_tasks`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from dask.sizeof import sizeof

from xd_dask.config import key
from xd_dask.distributed.manifest import Partition
from xd_dask.distributed.split import side_mask
from xd_dask.io import read_partition
from xd_dask.kernels import (
    NotPositiveDefiniteError,
    SuffStats,
    compute_stats,
    log_component_densities,
    row_log_likelihood,
)
from xd_dask.kernels._common import array_namespace, to_numpy
from xd_dask.optim.arrays import rank_row_drops
from xd_dask.optim.strata import EpochStrata
from xd_dask.params import Params

__all__ = [
    "Block",
    "Diagnose",
    "Partial",
    "PartitionError",
    "Rows",
    "TaskOptions",
    "WorstRows",
    "combine",
    "diagnose",
    "estep",
    "estep_stacked",
    "read_block",
]


class PartitionError(ValueError):
    """A partition's rows could not be processed; the message names the file and the row's id
    (under the schema's id column name)."""


@dataclass(frozen=True)
class TaskOptions:
    """How workers read and process partitions (the same for every task of a fit).

    dtype : the row precision, resolved ("float64" or "float32"; see
        :func:`xd_dask.config.row_dtype`).
    split : None (every row) or (fraction, side): keep only the "train" or the "holdout" side of
        the row-level split by id hash (:mod:`xd_dask.distributed.split`), applied right
        after reading, so persisted blocks and every pass see that side only.
    """

    schema: Any  # xd_dask.io.CatalogSchema
    on_bad: str = key("catalog.on_bad").default
    dtype: str = "float64"
    backend: str = key("fit.backend").default
    gpu: bool = False
    numba_threads: int = 1
    split: tuple[float, str] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float64", "float32"):
            raise ValueError(
                f"TaskOptions.dtype must be resolved to float64 or float32, got {self.dtype!r}"
            )

    @property
    def id_name(self) -> str:
        """The id column's name in outputs and messages (``row`` without one)."""
        return getattr(self.schema, "id_column", None) or "row"


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
    ids: np.ndarray  # (n,) int64 ids (host)
    n_read: int
    dropped: dict[str, int]
    R: Any = None  # (n, d, D) projections, or None
    row_groups: tuple[int, ...] | None = None
    _strata: EpochStrata | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    def strata(self, unit: int | None, n_strata: int, seed: int, epoch: int) -> np.ndarray:
        """(n,) the stratum of each row in an epoch (:class:`xd_dask.optim.strata.
        EpochStrata`): a persisted block serves the epoch's waves from one computation."""
        if self._strata is None:
            self._strata = EpochStrata(self.ids)
        return self._strata(unit, n_strata, seed, epoch)


@sizeof.register(Block)
def _sizeof_block(blk: Block) -> int:
    """Bytes a persisted block holds, so the worker's memory manager can account for it."""
    R_bytes = 0 if blk.R is None else int(blk.R.nbytes)
    strata = 0 if blk._strata is None else blk._strata.nbytes
    return int(blk.X.nbytes + blk.X_cov.nbytes + blk.ids.nbytes) + R_bytes + strata + 256


@dataclass
class Partial:
    """What a task returns: a payload that adds up, plus bookkeeping (all O(K D^2) or smaller)."""

    payload: Any
    n_partitions: int = 1
    n_read: int = 0
    n_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    files: dict[str, int] = field(default_factory=dict)  # per-row outputs written: path -> rows

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
            self.files | other.files,
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
        from xd_dask.kernels._numba import pattern_stats_numba  # noqa: F401, PLC0415 - a probe
    except ImportError:
        return "reference"
    return "auto"


def _backend(opts: TaskOptions) -> str:
    """Prepare the calling task thread; return the kernel backend for this worker.

    Caps Numba's threads for this thread (a thread-local setting, so it holds for the reader's
    and the kernel's compiled code in this task): with ``numba_threads=1`` the parallelism comes
    from the worker threads and (worker threads x Numba threads) never oversubscribes the cores.
    (Per-process set-up, the allocator, is :class:`xd_dask.distributed.plugins.WorkerSetup`.)
    """
    numba.set_num_threads(max(1, min(int(opts.numba_threads), numba.config.NUMBA_NUM_THREADS)))
    return _resolved_backend(opts.backend, opts.gpu)


def _filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem or None, path within it) of a local path or an fsspec URL."""
    if "://" not in path:  # local: absolute, so that a worker in another directory finds it
        return None, os.path.abspath(path)
    import fsspec  # noqa: PLC0415 - only for URLs (s3://, gs://, https://, memory://, ...)

    fs, inner = fsspec.core.url_to_fs(path)
    return fs, inner


def read_block(part: Partition, opts: TaskOptions) -> Block:
    """Read, validate and convert one partition (``xd-read`` tasks and fused passes)."""
    _backend(opts)
    fs, path = _filesystem(part.path)
    blk = read_partition(
        path,
        opts.schema,
        on_bad=opts.on_bad,
        dtype=np.dtype(opts.dtype),
        filesystem=fs,
        row_groups=part.row_groups,
    )
    X, X_cov, ids, R = blk.X, blk.X_cov, np.asarray(blk.ids), blk.R
    if opts.split is not None:
        keep = side_mask(ids, *opts.split)
        X, X_cov, ids = X[keep], X_cov[keep], ids[keep]
        R = None if R is None else R[keep]
    if opts.gpu:  # device-resident rows: X, packed lower-triangle X_cov (xd_dask.distributed.gpu)
        from xd_dask.distributed.gpu import to_device  # noqa: PLC0415 - CuPy on GPU workers only

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
        None if part.row_groups is None else tuple(part.row_groups),
    )


def _block(source: Partition | Block, opts: TaskOptions) -> Block:
    return source if isinstance(source, Block) else read_block(source, opts)


def _kernel_error(
    blk: Block,
    opts: TaskOptions,
    rows: np.ndarray | None,
    err: NotPositiveDefiniteError,
) -> Exception:
    row = int(err.row) if rows is None else int(rows[err.row])
    rid = int(blk.ids[row]) if 0 <= row < blk.ids.shape[0] else row
    return PartitionError(f"{blk.path}: {opts.id_name} {rid} (row {row} of the partition): {err}")


def _partial(blk: Block, payload: Any, n_used: int, t0: float, **kw: Any) -> Partial:
    return Partial(
        payload, 1, blk.n_read, int(n_used), dict(blk.dropped), time.perf_counter() - t0, **kw
    )


# ----------------------------------------------------------------------------- row selection
@dataclass(frozen=True)
class Rows:
    """Which rows of a partition a pass uses (every row by default).

    subsample : (fraction, seed, epoch): a seeded random subset (depends on seed, epoch and the
        partition id only).
    stratum : (s, S, seed, epoch): the rows of hash stratum s of S
        (:func:`xd_dask.distributed.split.stratum_of`): by the id column's hash, or without one
        by the row's position in its file. With both, the rows in both.
    """

    subsample: tuple[float, int, int] | None = None
    stratum: tuple[int, int, int, int] | None = None

    def select(self, blk: Block, opts: TaskOptions) -> np.ndarray | None:
        """The selected row indices of ``blk`` (None: every row)."""
        out = None
        if self.subsample is not None and self.subsample[0] < 1.0:
            fraction, seed, epoch = self.subsample
            rng = np.random.default_rng([int(seed), 11, int(epoch), int(blk.pid)])
            out = np.flatnonzero(rng.random(blk.n_rows) < fraction)
        if self.stratum is not None:
            s, n_strata, seed, epoch = (int(x) for x in self.stratum)
            unit = None if getattr(opts.schema, "id_column", None) else blk.pid
            rows = np.flatnonzero(blk.strata(unit, n_strata, seed, epoch) == s)
            out = rows if out is None else np.intersect1d(out, rows, assume_unique=True)
        return out


def selected(blk: Block, opts: TaskOptions, rows: Rows) -> tuple[Any, Any, Any, np.ndarray | None]:
    """(X, X_cov, R, indices) of the rows ``rows`` selects (indices None: every row)."""
    idx = rows.select(blk, opts)
    X, S, R = blk.X, blk.X_cov, blk.R
    if idx is not None:
        xp = array_namespace(X)
        i = xp.asarray(idx)
        X, S = X[i], S[i]
        R = None if R is None else R[i]
    return X, S, R, idx


# ----------------------------------------------------------------------------- E-step
def estep(source: Partition | Block, opts: TaskOptions, params: Params, rows: Rows) -> Partial:
    """Sufficient statistics of a partition's ``rows`` at ``params`` (``xd-estep``)."""
    t0 = time.perf_counter()
    backend = _backend(opts)
    blk = _block(source, opts)
    X, S, R, idx = selected(blk, opts, rows)
    stats = _stats(X, S, R, params, backend, lambda err: _kernel_error(blk, opts, idx, err))
    return _partial(blk, stats, stats.n_rows, t0)


def _stats(X, S, R, params: Params, backend: str, error: Callable[[Any], Exception]) -> SuffStats:
    """The statistics of rows (X, S, R) at ``params`` as NumPy; ``error(err)`` is raised for
    a pair that is not positive definite."""
    if X.shape[0] == 0:
        return SuffStats.zeros(params.n_components, params.n_features)
    try:
        return compute_stats(
            X,
            S,
            params,
            R=R,
            backend=backend,
            check=False,  # the reader has validated them
        ).to_numpy()
    except NotPositiveDefiniteError as err:
        raise error(err) from None


#: A task over a group of partitions stacks the rows a wave selects in them into one kernel
#: call while they number at most this many (each call costs ~0.5 ms before its first pair:
#: a wave's stratum holds a few rows of every partition). Full passes never stack (a copy of
#: every row).
STACK_ROWS = 1 << 16


def estep_stacked(sources: Sequence[Any], opts: TaskOptions, params: Params, rows: Rows):
    """:func:`estep` over a group of partitions (one task), as the sum of their partials; the
    selected rows of a wave go through one kernel call (:data:`STACK_ROWS`)."""
    if rows == Rows() or len(sources) < 2:
        return combine(*(estep(src, opts, params, rows) for src in sources))
    t0 = time.perf_counter()
    backend = _backend(opts)
    blocks = [_block(src, opts) for src in sources]
    picks = [selected(blk, opts, rows) for blk in blocks]
    sizes = [int(p[0].shape[0]) for p in picks]
    if sum(sizes) > STACK_ROWS or len({p[2] is None for p in picks}) > 1:
        parts = []
        for blk, (X, S, R, idx) in zip(blocks, picks, strict=True):
            t1 = time.perf_counter()
            err = functools.partial(_kernel_error, blk, opts, idx)
            stats = _stats(X, S, R, params, backend, err)
            parts.append(_partial(blk, stats, stats.n_rows, t1))
        return combine(*parts)
    xp = array_namespace(picks[0][0])
    X = xp.concatenate([p[0] for p in picks])
    S = xp.concatenate([p[1] for p in picks])
    R = None if picks[0][2] is None else xp.concatenate([p[2] for p in picks])
    ends = np.cumsum(sizes)

    def error(err: NotPositiveDefiniteError) -> Exception:
        b = int(np.searchsorted(ends, int(err.row), side="right"))
        at = int(err.row) - (int(ends[b - 1]) if b else 0)
        local = NotPositiveDefiniteError(at, err.component)  # the row among ITS block's
        return _kernel_error(blocks[b], opts, picks[b][3], local)

    stats = _stats(X, S, R, params, backend, error)
    books = combine(*(_partial(blk, 0, 0, t0) for blk in blocks))  # partitions, read, dropped
    seconds = time.perf_counter() - t0
    return dataclasses.replace(books, payload=stats, n_used=stats.n_rows, seconds=seconds)


estep.stacked = estep_stacked  # how passes.map_combine runs estep over a group of partitions


@dataclass
class WorstRows:
    """The (at most) ``m`` rows a diagnosis names, as dicts (file, row, id, ll_before, ll_after,
    component, score); adds up by keeping the m of highest ``score`` (ties by file and row, so
    the result does not depend on the tree)."""

    rows: list[dict]
    m: int

    def __add__(self, other: WorstRows) -> WorstRows:
        def key(r: dict) -> tuple:
            score = r["score"]
            return (-np.inf if np.isnan(score) else -score, r["file"], r["row"])

        rows = sorted(self.rows + other.rows, key=key)
        return WorstRows(rows[: max(self.m, other.m)], max(self.m, other.m))


@dataclass(frozen=True)
class Diagnose:
    """The ``m`` rows whose log-likelihood fell most from the task's parameters to ``after``
    (None: the ``m`` least likely rows at the task's parameters); with ``component`` the ``m``
    rows most responsible to that component instead."""

    after: Params | None
    m: int
    component: int | None = None


def diagnose(
    source: Partition | Block, opts: TaskOptions, params: Params, req: Diagnose
) -> Partial:
    """The rows a diverged fit names (``xd-diagnose``): :class:`WorstRows` of a partition,
    component = the most probable one at ``params``."""
    t0 = time.perf_counter()
    _backend(opts)
    blk = _block(source, opts)
    X, S, R = blk.X, blk.X_cov, blk.R
    with np.errstate(all="ignore"):  # diagnosing rows that overflow is the point here
        lb = to_numpy(row_log_likelihood(X, S, params, R=R, check=False))
        la = None
        if req.after is not None:
            la = to_numpy(row_log_likelihood(X, S, req.after, R=R, check=False))
        logp = log_component_densities(X, S, params, R=R, check=False)
    logp = to_numpy(logp)
    comp = np.argmax(logp, axis=1)
    if req.component is None:
        picked = rank_row_drops(lb, la, int(req.m))
        score = -lb if la is None else lb - la
    else:
        score = np.exp(logp[:, int(req.component)] - lb)  # its responsibility
        picked = [int(i) for i in np.argsort(-score, kind="stable")[: int(req.m)]]
    found = [
        {
            "file": blk.path,
            "row": i,
            "id_column": opts.id_name,
            "id": int(blk.ids[i]),
            "ll_before": float(lb[i]),
            "ll_after": None if la is None else float(la[i]),
            "component": int(comp[i]),
            "score": float(score[i]),
        }
        for i in picked
    ]
    return _partial(blk, WorstRows(found, int(req.m)), X.shape[0], t0)
