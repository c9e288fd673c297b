"""Compiled CPU kernels (Numba) for one missingness pattern.

The per-pair algebra is generated for each dimension ``d`` (:mod:`xd_dask.kernels.codegen`) and
vectorised across components; this module compiles and caches one kernel per (kind, d,
dtype[, du | D]) (the helpers the generated code calls are :mod:`._numba_runtime`), runs it on
a thread pool and wraps the statistics and log-density kernels (DESIGN.md sections 2-3; the
posterior's wrapper is :mod:`._numba_posterior`):

``pattern_stats_numba(x, S, rw, log_weights, means, covs, R=None) -> (n_j, a, C, ll, W, n_bg)``
``pattern_logdens_numba(x, S, log_weights, means, covs, R=None) -> (n, K)``
``pattern_moves_numba(x, S, rw, log_weights, means, covs, R=None) -> (RR, sums)``

With projections ``R`` (n, d, D) the parameters are D-dimensional and the statistics come back
in the D-space (one more kernel variant per (d, D), generated from the same algebra).

Compilation, the on-disk cache, the compile-cost estimate and the cross-process warm-up are in
:mod:`._numba_compile`.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from xd_dask.kernels._common import NotPositiveDefiniteError, stats_from_sums, tril
from xd_dask.kernels._numba_compile import LANE_BLOCK, _kernel, on_disk, readiness, warm
from xd_dask.kernels.codegen import algebra, emit_numba
from xd_dask.kernels.codegen.algebra import BG_OFF, PAD_LOGW
from xd_dask.kernels.packing import param_matrix

__all__ = [
    "LANE_BLOCK",
    "on_disk",
    "pattern_logdens_numba",
    "pattern_moves_numba",
    "pattern_stats_numba",
    "readiness",
    "warm",
]

#: float32 sums are flushed into float64 after at most this many rows per thread.
FLUSH_ROWS = 2048
#: Fewest rows worth giving a thread of its own.
MIN_ROWS_PER_THREAD = 64


_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own
_pool_lock = threading.Lock()


def _run_blocks(body, n: int, nt: int) -> list:
    """Run ``body(t, r0, r1)`` on ``nt`` static row blocks, blocks 1.. in helper threads (the
    kernels release the GIL). Returns the results in block order."""
    global _pool
    bounds = [(t, (t * n) // nt, ((t + 1) * n) // nt) for t in range(nt)]
    if nt == 1:
        return [body(*bounds[0])]
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            workers = max(1, numba.config.NUMBA_NUM_THREADS - 1)
            _pool = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="xd-kernel"))
        pool = _pool[1]
    futures = [pool.submit(body, *b) for b in bounds[1:]]
    first = body(*bounds[0])
    return [first] + [f.result() for f in futures]


# --------------------------------------------------------------------------- wrappers
def _check(
    x: np.ndarray, S: np.ndarray, means: np.ndarray, R: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool]:
    """(x, S, R, fp32): the row arrays C-contiguous in x's dtype, after checking the shapes
    (means (K, d), or (K, D) with projections R (n, d, D))."""
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    fp32 = x.dtype == np.float32
    x = np.ascontiguousarray(x)
    S = np.ascontiguousarray(S, dtype=x.dtype)
    n, d = x.shape
    if S.shape != (n, d, d):
        raise ValueError(f"S has shape {S.shape}, expected {(n, d, d)}")
    dim = d if R is None else R.shape[-1]
    if means.ndim != 2 or means.shape[1] != dim:
        raise ValueError(f"means has shape {means.shape}, expected (K, {dim})")
    if R is not None:
        if R.shape != (n, d, dim):
            raise ValueError(f"R has shape {R.shape}, expected {(n, d, dim)}")
        R = np.ascontiguousarray(R, dtype=x.dtype)
    return x, S, R, fp32


def _pack(log_weights, means, covs, dtype, obs=None, unobs=None) -> np.ndarray:
    """Component parameters (:func:`.packing.param_matrix`) as flat structure-of-arrays lane
    blocks (see :mod:`.codegen.emit_numba`), padded to whole blocks with components of
    covariance I and log weight ``PAD_LOGW`` (their responsibilities flush to zero)."""
    P = param_matrix(log_weights, means, covs, obs, unobs)
    n_par, K = P.shape
    d = means.shape[1] if obs is None else len(obs)
    B = LANE_BLOCK
    nblk = -(-K // B)
    Pp = np.zeros((n_par, nblk * B))
    Pp[:, :K] = P
    rows, cols = tril(d)
    Pp[d + np.flatnonzero(rows == cols), K:] = 1.0  # padding: V = I
    Pp[d + len(rows), K:] = PAD_LOGW
    # (n_par, nblk, B) -> (nblk, n_par, B), flattened
    blocks = Pp.reshape(n_par, nblk, B).transpose(1, 0, 2)
    return np.ascontiguousarray(blocks, dtype=dtype).reshape(-1)


def _unpack_acc(acc64: np.ndarray, d: int, K: int):
    """Thread accumulator blocks (nt, nblk * n_acc * B) -> n_j (K,), a (K, d), C (K, d, d)."""
    lay = emit_numba.layout(d)
    B = LANE_BLOCK
    tot = acc64.sum(axis=0).reshape(-1, lay["n_acc"], B)  # (nblk, n_acc, B)
    acc = tot.transpose(1, 0, 2).reshape(lay["n_acc"], -1)[:, :K]  # (n_acc, K)
    return stats_from_sums(acc, K, d)


def _n_threads(n: int) -> int:
    return max(1, min(numba.get_num_threads(), n // MIN_ROWS_PER_THREAD))


def _raise_if_bad(status: np.ndarray) -> None:
    """Raise for the first bad (row, component): blocks are in row order, each stops at its
    first bad row."""
    for row, comp in status:
        if row >= 0:
            raise NotPositiveDefiniteError(row=int(row), component=int(comp))


def pattern_stats_numba(
    x: np.ndarray,
    S: np.ndarray,
    rw: np.ndarray,
    log_weights: np.ndarray,
    means: np.ndarray,
    covs: np.ndarray,
    log_background: float | None = None,
    R: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, float]:
    """XD sufficient statistics of rows sharing one missingness pattern (compiled kernel).

    Parameters
    ----------
    x : (n, d) float32 or float64
        Observed, centred values; no NaN. The computation runs in this dtype.
    S : (n, d, d) same dtype
        Symmetric noise covariances (only the lower triangle is read).
    rw : (n,) float64
        Row weights.
    log_weights : (K,) float64
        Log mixture weights ``log alpha_j``.
    means : (K, d) float64
    covs : (K, d, d) float64
        Component means and covariances (observed sub-blocks; (K, D) and (K, D, D) with R).
    log_background : float, optional
        Log density (weight included) of a uniform background component on these fields; it
        joins every row's normalisation. None: no background.
    R : (n, d, D), optional
        Projections (cast to x's dtype): T_ij = R_i V_j R_i^T + S_i, w_ij = x_i - R_i m_j.

    Returns
    -------
    n_j : (K,) float64
        ``sum_i rw_i r_ij``.
    a : (K, d) float64 ((K, D) with R)
        ``sum_i rw_i r_ij u_ij`` with ``u_ij = T_ij^-1 (x_i - m_j)``, ``T_ij = V_j + S_i``
        (with R: ``sum_i rw_i r_ij R_i^T u_ij``).
    C : (K, d, d) float64 ((K, D, D) with R)
        ``sum_i rw_i r_ij (u_ij u_ij^T - T_ij^-1)``, symmetric (with R: ``R_i^T (...) R_i``).
    ll : float
        ``sum_i rw_i log sum_j alpha_j N(x_i | m_j, T_ij)``.
    W : float
        ``sum_i rw_i``.
    n_bg : float
        ``sum_i rw_i r_i,bg``, the rows' weighted background responsibilities (0 without).

    Raises
    ------
    NotPositiveDefiniteError
        For the first (row, component) whose ``T_ij`` has a non-positive pivot.
    """
    x, S, R, fp32 = _check(x, S, means, R)
    n, d = x.shape
    K, Dp = means.shape
    D = 0 if R is None else Dp
    rw = np.ascontiguousarray(rw, dtype=np.float64)
    if rw.shape != (n,):
        raise ValueError(f"rw has shape {rw.shape}, expected ({n},)")
    lay = emit_numba.layout(d, 0, D)
    if n == 0:
        return np.zeros(K), np.zeros((K, Dp)), np.zeros((K, Dp, Dp)), 0.0, 0.0, 0.0
    P = _pack(log_weights, means, covs, x.dtype)
    nt = _n_threads(n)
    acc64 = np.zeros((nt, P.size // lay["n_par"] * lay["n_acc"]))
    status = np.full((nt, 2), -1, dtype=np.int64)
    bgsum = np.zeros((nt, 1))
    lbg = _background_arg(log_background)
    fn = _kernel("stats", d, fp32, 0, D)
    rows = (x, S) if R is None else (x, S, R)

    def body(t, r0, r1):
        return fn(
            *rows, rw, P, K, LANE_BLOCK, r0, r1, FLUSH_ROWS, acc64[t], status[t], lbg, bgsum[t]
        )

    ll = _run_blocks(body, n, nt)
    _raise_if_bad(status)
    n_j, a, C = _unpack_acc(acc64, Dp, K)
    return n_j, a, C, float(np.sum(ll)), float(rw.sum()), float(bgsum.sum())


def _densities(mode, x, S, R, rw, P, K, log_background=None, *, out=None, logw=None,
               macc=None, RR=None) -> None:  # fmt: skip
    """Run the densities kernel in ``mode`` over the rows on the threads (arrays a mode does
    not use are passed empty; ``macc`` and ``RR``, when given, have a leading thread axis)."""
    n, d = x.shape
    nt = _n_threads(n) if macc is None else macc.shape[0]
    D = 0 if R is None else R.shape[-1]
    fn = _kernel("dens", d, x.dtype == np.float32, 0, D)
    none64 = np.zeros((nt, 0))
    macc = none64 if macc is None else macc
    RR = none64 if RR is None else RR
    out = np.zeros((0, 0), dtype=x.dtype) if out is None else out
    logw = np.zeros(0) if logw is None else logw
    rw = np.ones(n) if rw is None else rw
    status = np.full((nt, 2), -1, dtype=np.int64)
    lbg = _background_arg(log_background)
    rows = (x, S) if R is None else (x, S, R)

    def body(t, r0, r1):
        return fn(*rows, rw, P, K, LANE_BLOCK, r0, r1, lbg, mode, out, logw, macc[t], RR[t],
                  status[t])  # fmt: skip

    _run_blocks(body, n, nt)
    _raise_if_bad(status)


def _background_arg(log_background: float | None) -> float:
    """The kernel's ``lbg`` argument: a finite log density, or the "off" marker."""
    if log_background is None or log_background == -math.inf:
        return 2.0 * BG_OFF
    lbg = float(log_background)
    if not math.isfinite(lbg) or lbg <= BG_OFF:
        raise ValueError(f"log_background must be finite (or None), got {log_background!r}")
    return lbg


def pattern_logdens_numba(
    x: np.ndarray,
    S: np.ndarray,
    log_weights: np.ndarray,
    means: np.ndarray,
    covs: np.ndarray,
    R: np.ndarray | None = None,
) -> np.ndarray:
    """``log alpha_j + log N(x_i | R_i m_j, R_i V_j R_i^T + S_i)`` for every row and component
    (R_i = I without ``R``).

    Shapes and dtypes as in :func:`pattern_stats_numba`; returns an (n, K) float64 array.
    Raises :class:`NotPositiveDefiniteError` like :func:`pattern_stats_numba`.
    """
    x, S, R, _ = _check(x, S, means, R)
    n = x.shape[0]
    K = means.shape[0]
    out = np.empty((n, K), dtype=x.dtype)
    if n == 0:
        return out.astype(np.float64)
    P = _pack(log_weights, means, covs, x.dtype)
    _densities(emit_numba.MODE_LOGDENS, x, S, R, None, P, K, out=out)
    out = out.astype(np.float64, copy=False)
    out[:, np.isneginf(log_weights)] = -np.inf  # computed with a finite stand-in, see _pack
    return out


def pattern_moves_numba(
    x: np.ndarray,
    S: np.ndarray,
    rw: np.ndarray,
    log_weights: np.ndarray,
    means: np.ndarray,
    covs: np.ndarray,
    log_background: float | None = None,
    R: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The split-and-merge criteria's sums over rows sharing one missingness pattern (compiled
    kernel; DESIGN.md 4c). Arguments as in :func:`pattern_stats_numba`.

    Returns
    -------
    RR : (K, K) float64, sum_i rw_i r_ij r_ik (symmetric).
    sums : (len(MOVE_SUMS), K) float64, the terms of :data:`.codegen.algebra.MOVE_SUMS`.
    """
    x, S, R, _ = _check(x, S, means, R)
    n = x.shape[0]
    K = means.shape[0]
    rw = np.ascontiguousarray(rw, dtype=np.float64)
    if rw.shape != (n,):
        raise ValueError(f"rw has shape {rw.shape}, expected ({n},)")
    n_terms = len(algebra.MOVE_SUMS)
    if n == 0:
        return np.zeros((K, K)), np.zeros((n_terms, K))
    P = _pack(log_weights, means, covs, x.dtype)
    logw = np.maximum(np.asarray(log_weights, dtype=np.float64), PAD_LOGW)
    nt = _n_threads(n)
    acc = np.zeros((nt, n_terms * K))
    RR = np.zeros((nt, K * K))
    _densities(emit_numba.MODE_MOVES, x, S, R, rw, P, K, log_background, logw=logw, macc=acc,
               RR=RR)  # fmt: skip
    low = RR.sum(axis=0).reshape(K, K)  # lower triangle
    return low + np.tril(low, -1).T, acc.sum(axis=0).reshape(n_terms, K)
