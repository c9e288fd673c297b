"""XD on dask arrays: rows that are not in Parquet, fitted on a cluster by the one fitting loop.

dask-ml's convention: ``X`` a dask array (n, D) of values (NaN = missing) and ``X_cov`` (n, D, D)
of noise covariances, chunked along the rows (any chunks: they are aligned, X_cov and the row
weights to X's row chunks, the columns whole). :class:`ChunkStatistics` is the fitting loop's
statistics source over them, as :class:`xd_dask.distributed.passes.PassStatistics` is over Parquet
partitions: the chunks are held in worker memory (computed once, like dask-ml's estimators persist
their input), the parameters are scattered to the workers once per pass, one task per chunk
computes :func:`xd_dask.kernels.compute_stats` on it, and the partial statistics are tree-reduced
on the cluster (:func:`xd_dask.distributed.passes.tree_reduce`); only the root comes back. Waves
(online EM, Adam) are the hash strata of the rows by their position, the strata
:class:`xd_dask.optim.ArrayStatistics` draws in memory, so a fit equals the in-memory
:class:`xd_dask.estimator.XDGMM` fit of the same rows from the same start (up to the order of
summation). The k-means start maps the same passes over the chunks (each chunk a unit, as a
catalogue's partitions are).

:class:`DaskXDGMM` is the estimator (the settings, defaults and attributes of ``XDGMM``); its
``score_samples``, ``predict_proba`` and ``predict`` return dask arrays, chunked as the rows.
"""

from __future__ import annotations

import functools
import operator
import uuid
from typing import Any

import numpy as np

from xd_dask.config import key
from xd_dask.distributed.passes import tree_reduce
from xd_dask.kernels import (
    SuffStats,
    compute_stats,
    log_component_densities,
    responsibilities,
    row_log_likelihood,
)
from xd_dask.optim import Batch, BatchStats
from xd_dask.optim.arrays import rank_row_drops
from xd_dask.optim.kmeans import KMeansSums, SampleMoments, cluster_sums, sample_moments
from xd_dask.optim.kmeans import standardise as kmeans_standardise
from xd_dask.optim.strata import row_keys, stratum_of
from xd_dask.params import Params
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["ChunkStatistics", "aligned", "chunk_log_likelihood", "chunk_responsibilities"]


def aligned(X: Any, X_cov: Any, weights: Any = None) -> tuple[Any, Any, Any]:
    """(X, X_cov, weights) as dask arrays chunked alike along the rows, columns whole.

    ValueError for shapes that are not (n, D), (n, D, D), (n,), or rows of unknown size.
    """
    import dask.array as da  # noqa: PLC0415 - heavy; off the CLI's start-up path

    X = X if isinstance(X, da.Array) else da.from_array(np.asarray(X))
    X_cov = X_cov if isinstance(X_cov, da.Array) else da.from_array(np.asarray(X_cov))
    if X.ndim != 2 or X_cov.ndim != 3:
        raise ValueError(f"X must be (n, D) and X_cov (n, D, D), got {X.shape} and {X_cov.shape}")
    if any(np.isnan(c) for c in X.chunks[0]):
        X = X.compute_chunk_sizes()
    n, D = X.shape
    if X_cov.shape != (n, D, D):
        raise ValueError(f"X must be (n, D) and X_cov (n, D, D), got {X.shape} and {X_cov.shape}")
    X = X.rechunk({1: -1})
    X_cov = X_cov.rechunk({0: X.chunks[0], 1: -1, 2: -1})
    if weights is not None:
        weights = weights if isinstance(weights, da.Array) else da.from_array(np.asarray(weights))
        if weights.shape != (n,):
            raise ValueError(f"weights must be (n,) = ({n},), got {weights.shape}")
        weights = weights.rechunk({0: X.chunks[0]})
    return X, X_cov, weights


# ----------------------------------------------------------------------------- worker tasks
def _rows(n: int, offset: int, stratum: tuple[int, int, int, int] | None) -> np.ndarray | None:
    """The chunk's rows in hash stratum (s, S, seed, epoch) of their positions, or None (all)."""
    if stratum is None:
        return None
    s, n_strata, seed, epoch = stratum
    keys = row_keys(np.arange(offset, offset + n, dtype=np.int64))
    return np.flatnonzero(stratum_of(keys, n_strata, seed, epoch) == s)


def _take(a: Any, rows: np.ndarray | None) -> Any:
    return a if a is None or rows is None else a[rows]


def chunk_stats(x, s, w, params: Params, offset: int, stratum, backend: str, check: bool):
    """(SuffStats, rows) of one chunk's rows (of a stratum) at ``params`` (runs on a worker)."""
    rows = _rows(x.shape[0], offset, stratum)
    x, s, w = _take(x, rows), _take(s, rows), _take(w, rows)
    if x.shape[0] == 0:
        K, D = params.means.shape
        zero = SuffStats(np.zeros(K), np.zeros((K, D)), np.zeros((K, D, D)), 0.0, 0.0, 0)
        return zero, 0
    stats = compute_stats(x, s, params, row_weights=w, backend=backend, check=check)
    return stats, int(x.shape[0])


def add_pairs(*parts: tuple[Any, int]) -> tuple[Any, int]:
    """The sum of (sums, rows) pairs -- statistics, k-means sums or samples -- left to right
    (the reduction's combine)."""
    return functools.reduce(operator.add, [p[0] for p in parts]), sum(p[1] for p in parts)


def chunk_worst(x, s, before: Params, after: Params | None, offset: int, m: int, backend: str):
    """The chunk's ``m`` rows that lost most log-likelihood (or the least likely ones)."""
    with np.errstate(all="ignore"):  # diagnosing rows that overflow is the point here
        lb = np.asarray(row_log_likelihood(x, s, before, backend=backend))
        la = None if after is None else np.asarray(row_log_likelihood(x, s, after, backend=backend))
        comp = np.argmax(np.asarray(log_component_densities(x, s, before, backend=backend)), 1)
    return [
        (offset + i, float(lb[i]), None if la is None else float(la[i]), int(comp[i]))
        for i in rank_row_drops(lb, la, m)
    ]


def chunk_sample(x, seed: int, fraction: float, unit: int) -> tuple[SampleMoments, int]:
    """The k-means sample pass of one chunk (unit ``unit``)."""
    return sample_moments(x, seed, fraction, unit), int(x.shape[0])


def chunk_lloyd(x, centres, col_mean, col_scale, d2_max) -> tuple[KMeansSums, int]:
    """A Lloyd pass of one chunk."""
    z = kmeans_standardise(x, col_mean, col_scale)
    return cluster_sums(z, centres, d2_max), int(x.shape[0])


# ----------------------------------------------------------------------------- the source
class ChunkStatistics:
    """The fitting loop's statistics source over the row chunks of dask arrays (module
    docstring). One unit per chunk; ``close()`` releases the chunks held on the workers.

    client : a connected ``distributed.Client``.  X, X_cov, weights : as :func:`aligned` makes
    them.  backend : kernel backend.  seed : the strata's seed.  fan_in : reduction fan-in.
    """

    def __init__(
        self,
        client: Any,
        X: Any,
        X_cov: Any,
        weights: Any = None,
        *,
        backend: str = key("fit.backend").default,
        seed: int = 0,
        fan_in: int = key("fit.fan_in").default,
    ) -> None:
        X, X_cov, weights = aligned(X, X_cov, weights)
        self.client, self.backend, self.seed, self.fan_in = client, backend, int(seed), fan_in
        self.n_rows, self.n_features = int(X.shape[0]), int(X.shape[1])
        sizes = [int(c) for c in X.chunks[0]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        self.n_units = len(sizes)
        held = [X.to_delayed().ravel().tolist(), X_cov.to_delayed().ravel().tolist()]
        if weights is not None:
            held.append(weights.to_delayed().ravel().tolist())
        futures = client.compute([d for group in held for d in group])  # held in worker memory
        self._x = futures[: self.n_units]
        self._s = futures[self.n_units : 2 * self.n_units]
        self._w = futures[2 * self.n_units :] or [None] * self.n_units
        self._token = uuid.uuid4().hex[:8]
        self._checked = False
        self._passes = 0

    def _pass(self, name: str, func: Any, args: Any, label: tuple, units=None):
        """Map ``func(chunk..., *args(i))`` over the chunks, tree-reduce, gather the root."""
        units = range(self.n_units) if units is None else units
        futures = [
            self.client.submit(func, *args(i), key=(f"xd-array-{name}-{self._token}", *label, i))
            for i in units
        ]
        root = tree_reduce(
            self.client, futures, self.fan_in, f"xd-array-reduce-{self._token}",
            (name, *label), add_pairs,
        )  # fmt: skip
        return root.result()

    def _params(self, params: Params) -> Any:
        return self.client.scatter(params, broadcast=True, hash=False)

    def __call__(self, params: Params, batch: Batch) -> BatchStats:
        stratum = None
        if batch.stratum is not None:
            stratum = (*batch.stratum, self.seed, batch.drawn)
        p, check = self._params(params), not self._checked
        stats, n = self._pass(
            "estep",
            chunk_stats,
            lambda i: (self._x[i], self._s[i], self._w[i], p, self.offsets[i], stratum,
                       self.backend, check),
            batch.label,
            batch.units,
        )  # fmt: skip
        self._checked = self._checked or batch.full  # strata: each checks its own rows
        return BatchStats(stats, {"read": n, "used": n, "dropped": {}})

    def worst_rows(self, before: Params, after: Params | None, m: int) -> list[dict]:
        """The ``m`` rows (by position) that lost most from ``before`` to ``after`` (``after``
        None: the least likely at ``before``)."""
        self._passes += 1
        b = self._params(before)
        a = None if after is None else self._params(after)
        futures = [
            self.client.submit(
                chunk_worst, self._x[i], self._s[i], b, a, self.offsets[i], int(m), self.backend,
                key=(f"xd-array-diagnose-{self._token}", self._passes, i),
            )
            for i in range(self.n_units)
        ]  # fmt: skip
        rows = [r for part in self.client.gather(futures) for r in part]
        lb = np.array([r[1] for r in rows])
        la = None if after is None else np.array([r[2] for r in rows], dtype=np.float64)
        return [
            {"row": rows[i][0], "ll_before": rows[i][1], "ll_after": rows[i][2],
             "component": rows[i][3]}
            for i in rank_row_drops(lb, la, m)
        ]  # fmt: skip

    def sample_pass(self, fraction: float) -> tuple[SampleMoments, int]:
        """The k-means sample pass (:data:`xd_dask.optim.kmeans.SamplePass`) over the chunks."""
        return self._pass(
            "kmeans-sample", chunk_sample, lambda i: (self._x[i], self.seed, fraction, i), (0,)
        )  # fmt: skip

    def lloyd_pass(self, i: int, centres, col_mean, col_scale, d2_max) -> tuple[KMeansSums, int]:
        """A Lloyd pass (:data:`xd_dask.optim.kmeans.LloydPass`) over the chunks."""
        return self._pass(
            "kmeans", chunk_lloyd, lambda u: (self._x[u], centres, col_mean, col_scale, d2_max),
            (i,),
        )  # fmt: skip

    def close(self) -> None:
        """Release the chunks held on the workers."""
        for group in (self._x, self._s, self._w):
            for f in group:
                if f is not None:
                    f.release()
        self._x, self._s, self._w = [], [], []


# The tasks of DaskXDGMM's lazy methods: here, not beside the estimator, so that a worker
# unpickling them imports no scikit-learn (0.5-1 s of each worker's first task).
def chunk_log_likelihood(x: Any, s: Any, params: Params, backend: str) -> np.ndarray:
    """The log-likelihood of each row of a chunk (background included)."""
    return np.asarray(row_log_likelihood(x, s, params, backend=backend))


def chunk_responsibilities(x: Any, s: Any, params: Params, backend: str) -> np.ndarray:
    """The responsibilities (n, K) of the rows of a chunk."""
    return np.asarray(responsibilities(x, s, params, backend=backend))
