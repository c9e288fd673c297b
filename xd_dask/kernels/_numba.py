"""Compiled CPU kernels (Numba) for one missingness pattern: the runtime of the generated code.

The per-pair algebra is generated for each dimension ``d`` (:mod:`xd_dask.kernels.codegen`) and
vectorised across components; this module supplies the vectorisable ``exp``/``log`` and row
helpers it calls, compiles and caches one kernel per (kind, d, dtype[, du | D]), runs it on a thread
pool and wraps the statistics and log-density kernels with the contract used by
``xd_dask.kernels`` (DESIGN.md sections 2-3; the posterior's wrapper is ``_numba_posterior``):

``pattern_stats_numba(x, S, rw, log_weights, means, covs, R=None) -> (n_j, a, C, ll, W, n_bg)``
``pattern_logdens_numba(x, S, log_weights, means, covs, R=None) -> (n, K)``

With projections ``R`` (n, d, D) the parameters are D-dimensional and the statistics come back
in the D-space (one more kernel variant per (d, D), generated from the same algebra).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from xd_dask.kernels import codegen
from xd_dask.kernels._common import NotPositiveDefiniteError, stats_from_sums
from xd_dask.kernels.codegen import emit_numba
from xd_dask.utils import kernel_cache_dir, load_generated_module, write_once

__all__ = ["pattern_stats_numba", "pattern_logdens_numba"]

logger = logging.getLogger(__name__)

#: Components are padded to a multiple of this (one or two SIMD vectors of lanes).
LANE_BLOCK = 16
#: float32 sums are flushed into float64 after at most this many rows per thread.
FLUSH_ROWS = 2048
#: Fewest rows worth giving a thread of its own.
MIN_ROWS_PER_THREAD = 64
#: Log weight of padding components: their responsibilities flush to exactly zero.
_PAD_LOGW = -1.0e30
#: A background log density at or below this means "no background component".
BG_OFF = -1.0e29

# All fast-math flags except reassociation: the polynomial exp/log rely on their evaluation
# order, and the per-pair loop needs no reductions across lanes to vectorise.
_FM_STRICT = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


# --------------------------------------------------------------------------- bit casts
@intrinsic
def _bits64(typingctx, x):
    """float64 -> its bits as int64."""
    if x != types.float64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _float64(typingctx, b):
    """int64 bits -> float64."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width != 64:
            v = builder.sext(v, ir.IntType(64))
        return builder.bitcast(v, ir.DoubleType())

    return types.float64(b), codegen


@intrinsic
def _bits32(typingctx, x):
    """float32 -> its bits as int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _float32(typingctx, b):
    """int bits (low 32 used) -> float32."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.sext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(b), codegen


# --------------------------------------------------------------------------- exp / log
# exp: x = n ln2 + r, |r| <= ln2/2, Taylor polynomial in r, 2^n from the exponent bits.
# Arguments below the flush threshold give exactly 0 (the result would be (nearly) subnormal).
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_EXP64_FLUSH = -500.0
_EXP32_FLUSH = -60.0


@njit(fastmath=_FM_STRICT, error_model="numpy", inline="always")
def _exp_f64(x):
    xc = max(x, -708.0)
    k = np.rint(xc * _LOG2E)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    s = _float64((np.int64(k) + 1023) << 52)
    return p * s if x >= _EXP64_FLUSH else 0.0


_F32 = np.float32


@njit(fastmath=_FM_STRICT, error_model="numpy", inline="always")
def _exp_f32(x):
    xc = max(x, _F32(-87.0))
    k = np.rint(xc * _F32(_LOG2E))
    r = (xc - k * _F32(0.693359375)) - k * _F32(-2.12194440e-4)
    p = _F32(1.0 / 5040.0)
    p = p * r + _F32(1.0 / 720.0)
    p = p * r + _F32(1.0 / 120.0)
    p = p * r + _F32(1.0 / 24.0)
    p = p * r + _F32(1.0 / 6.0)
    p = p * r + _F32(0.5)
    p = p * r + _F32(1.0)
    p = p * r + _F32(1.0)
    s = _float32((np.int32(k) + np.int32(127)) << np.int32(23))
    return p * s if x >= _F32(_EXP32_FLUSH) else _F32(0.0)


# log for y > 0 (fdlibm): y = 2^e m, m in [sqrt(2)/2, sqrt(2)), log(m) = log(1 + f) by a
# minimax polynomial in s = f / (2 + f).
_LG = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
    1.818357216161805012e-01,
    1.531383769920937332e-01,
    1.479819860511658591e-01,
)


@njit(fastmath=_FM_STRICT, error_model="numpy", inline="always")
def _log_f64(y):
    b = _bits64(y)
    e = (b >> 52) - 1023
    m = _float64((b & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    big = m > 1.4142135623730951
    m = m * 0.5 if big else m
    e = e + 1 if big else e
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG[1] + w * (_LG[3] + w * _LG[5]))
    t2 = z * (_LG[0] + w * (_LG[2] + w * (_LG[4] + w * _LG[6])))
    rr = t2 + t1
    hfsq = 0.5 * f * f
    fe = float(e)
    return fe * _LN2_HI - ((hfsq - (s * (hfsq + rr) + fe * _LN2_LO)) - f)


@njit(fastmath=_FM_STRICT, error_model="numpy", inline="always")
def _log_f32(y):
    b = _bits32(y)
    e = (b >> np.int32(23)) - np.int32(127)
    m = _float32((b & np.int32(0x007FFFFF)) | np.int32(0x3F800000))
    big = m > _F32(1.4142135)
    m = m * _F32(0.5) if big else m
    e = e + 1 if big else e
    f = m - _F32(1.0)
    s = f / (_F32(2.0) + f)
    z = s * s
    w = z * z
    t1 = w * (_F32(0.40000972152) + w * _F32(0.24279078841))
    t2 = z * (_F32(0.66666662693) + w * _F32(0.28498786688))
    rr = t2 + t1
    hfsq = _F32(0.5) * f * f
    fe = _F32(e)
    return fe * _F32(0.693359375) - ((hfsq - (s * (hfsq + rr) + fe * _F32(-2.12194440e-4))) - f)


# --------------------------------------------------------------------------- row helpers
@njit(fastmath=True, error_model="numpy")
def _rowmax(v, Kp):
    mx = v[0]
    for k in range(1, Kp):
        mx = max(mx, v[k])
    return mx


@njit(fastmath=True, error_model="numpy")
def _rowexp_f64(v, mx, Kp):
    tot = 0.0
    for k in range(Kp):
        e = _exp_f64(v[k] - mx)
        v[k] = e
        tot += e
    return tot


@njit(fastmath=True, error_model="numpy")
def _rowexp_f32(v, mx, Kp):
    tot = _F32(0.0)
    for k in range(Kp):
        e = _exp_f32(v[k] - mx)
        v[k] = e
        tot += e
    return float(tot)


@njit(fastmath=True, error_model="numpy")
def _argmax(v, K):
    """First index of the largest of v[:K]."""
    best = 0
    for k in range(1, K):
        if v[k] > v[best]:
            best = k
    return best


@njit(fastmath=True, error_model="numpy")
def _first_at(v, mx, K):
    """First k < K with v[k] == mx (0 if none): with mx = max(v), the argmax without a
    loop-carried dependence."""
    for k in range(K):
        if v[k] == mx:
            return k
    return 0


@njit(error_model="numpy")
def _bg_split(tot, mx, lbg):
    """(g, r_bg) of a row: the Gaussian part's share of its density and the background's
    responsibility, from the Gaussian total ``tot`` relative to the log-density maximum ``mx``
    (no overflow whichever side dominates)."""
    if lbg <= BG_OFF:
        return 1.0, 0.0
    t = lbg - mx
    if t > 0.0:
        a = tot * math.exp(-t)
        return a / (a + 1.0), 1.0 / (a + 1.0)
    e = math.exp(t)
    return tot / (tot + e), e / (tot + e)


@njit(fastmath=True, error_model="numpy")
def _flush(acc, acc64):
    for k in range(acc.shape[0]):
        acc64[k] += acc[k]
        acc[k] = 0.0


# --------------------------------------------------------------------------- compilation
def _namespace(fp32: bool) -> dict:
    dt = np.float32 if fp32 else np.float64
    return {
        "np": np,
        "math": math,
        "DT": dt,
        "ONE": dt(1.0),
        "ZERO": dt(0.0),
        "HALF": dt(0.5),
        "LN2": dt(math.log(2.0)),
        "MSHIFT": np.int32(23) if fp32 else 52,
        "MMASK": np.int32(0x007FFFFF) if fp32 else 0x000FFFFFFFFFFFFF,
        "MONE": np.int32(0x3F800000) if fp32 else 0x3FF0000000000000,
        "EBIAS": 127 if fp32 else 1023,
        "_bits": _bits32 if fp32 else _bits64,
        "_float": _float32 if fp32 else _float64,
        "_log": _log_f32 if fp32 else _log_f64,
        "_rowmax": _rowmax,
        "_rowexp": _rowexp_f32 if fp32 else _rowexp_f64,
        "_flush": _flush,
        "_argmax": _argmax,
        "_first_at": _first_at,
        "_bg_split": _bg_split,
        "BG_OFF": BG_OFF,
    }


def _signature(kind: str, fp32: bool, proj: bool = False):
    dt = types.float32 if fp32 else types.float64
    i64 = types.int64
    x, S, P = types.Array(dt, 2, "C"), types.Array(dt, 3, "C"), types.Array(dt, 1, "C")
    xS = (x, S, S) if proj else (x, S)  # R (n, d, D) has S's type
    f64v, i64v = types.Array(types.float64, 1, "C"), types.Array(i64, 1, "C")
    if kind == "stats":
        # x, S, [R,] rw, P, K, nl, r0, r1, flush_rows, acc64, status, lbg, bgsum -> ll
        return types.float64(*xS, f64v, P, i64, i64, i64, i64, i64, f64v, i64v, types.float64, f64v)
    if kind.startswith("posterior"):
        f64 = types.float64
        f64m, f64t = types.Array(f64, 2, "C"), types.Array(f64, 3, "C")
        # x, S, xorig, rows, cols, c0, P, K, nl, r0, r1, lbg, topk, tau,
        # mean, cov, mapc, mapr, bgr, resp, tidx, tresp, tmean, tcov, tight, status
        return f64(
            x, S, types.Array(dt, 2, "A"), i64v, i64v, f64v, P, i64, i64, i64, i64, f64, i64, f64,
            f64m, f64t, i64v, f64v, f64v, f64m, types.Array(i64, 2, "C"), f64m, f64t,
            types.Array(f64, 4, "C"), f64v, i64v,
        )  # fmt: skip
    # x, S, [R,] P, K, nl, r0, r1, out, status
    return types.float64(*xS, P, i64, i64, i64, i64, types.Array(dt, 2, "C"), i64v)


_cache: dict[tuple[str, int, bool, int, int], object] = {}
_cache_lock = threading.Lock()
_llvm_tuned = False


def _tune_llvm() -> None:
    """Raise LLVM's budget for merging the loop vectoriser's runtime alias checks.

    The lane loops read ~d^2/2 parameter addresses and write as many scratch addresses; LLVM
    merges them into a few checks only within a budget of 100 comparisons, which d >= 9 exceeds,
    and the loop then stays scalar (5-15x slower at d = 12). The option is process-wide but only
    lets the vectoriser spend more compile time merging checks. It is set for the LLVM versions
    known to have it (an unknown option would make LLVM exit the process).
    """
    global _llvm_tuned
    if not _llvm_tuned:
        if 14 <= llvm.llvm_version_info[0] <= 22:
            llvm.set_option("", "-memory-check-merge-threshold=10000")
        else:  # pragma: no cover - depends on the installed llvmlite
            logger.warning(
                "LLVM %s: not raising memory-check-merge-threshold; the compiled XD kernel may "
                "not vectorise for d >= 9",
                ".".join(map(str, llvm.llvm_version_info)),
            )
        _llvm_tuned = True


def _cache_dir() -> Path | None:
    """See :func:`xd_dask.utils.kernel_cache_dir`."""
    return kernel_cache_dir(None)


def _source_tag() -> str:
    """Hash of everything the generated code depends on (stale cache files are never used)."""
    h = hashlib.sha256()
    for path in (Path(__file__), *map(Path, codegen.source_files())):
        h.update(path.read_bytes())
    h.update(f"{numba.__version__} {LANE_BLOCK}".encode())
    return h.hexdigest()[:16]


def _load_source(kind: str, d: int, fp32: bool, src: str):
    """The generated ``kernel`` function, from a cached module file if possible."""
    ns = _namespace(fp32)
    cache = _cache_dir()
    if cache is not None:
        stem = f"xdk_{kind}_d{d}_{'f32' if fp32 else 'f64'}_{_source_tag()}"
        path = cache / f"{stem}.py"
        try:
            if not path.exists():
                write_once(path, "# generated by xd_dask.kernels._numba; safe to delete\n" + src)
            module = load_generated_module(
                path,
                f"_xd_dask_generated_{stem}",
                ns,
                source="# generated by xd_dask.kernels._numba; safe to delete\n" + src,
            )
            return module.kernel, True
        except OSError as exc:
            logger.warning("kernel cache %s not usable (%s); compiling in memory", cache, exc)
    exec(compile(src, f"<xd_dask generated {kind} d={d} fp32={fp32}>", "exec"), ns)
    return ns["kernel"], False


def _source(kind: str, d: int, du: int, fp32: bool, D: int = 0) -> str:
    """Generated source of a kernel (``du``: unobserved fields, posterior only; ``D``: the
    dimension of projected parameters, stats and logdens only)."""
    if kind == "stats":
        return emit_numba.stats_source(d, LANE_BLOCK, fp32, D)
    if kind == "logdens":
        return emit_numba.logdens_source(d, LANE_BLOCK, fp32, D)
    return emit_numba.posterior_source(d, du, LANE_BLOCK, fp32, topk=kind == "posterior_top")


def _kernel(kind: str, d: int, fp32: bool, du: int = 0, D: int = 0):
    """Compiled kernel for (kind, d, dtype[, du | D]): generated and compiled on first use, then
    kept in memory and (see :func:`_cache_dir`) in Numba's on-disk cache."""
    key = (kind, d, fp32, du, D)
    fn = _cache.get(key)
    if fn is not None:
        return fn
    with _cache_lock:
        fn = _cache.get(key)
        if fn is None:
            _tune_llvm()
            name = f"{kind}_u{du}" if kind.startswith("posterior") else kind
            name += f"_R{D}" if D else ""
            py_func, on_disk = _load_source(name, d, fp32, _source(kind, d, du, fp32, D))
            t0 = time.perf_counter()
            fn = njit(
                _signature(kind, fp32, bool(D)),
                fastmath=_FM_STRICT,
                error_model="numpy",
                nogil=True,
                cache=on_disk,
            )(py_func)
            logger.debug(
                "XD %s kernel d=%d %s ready in %.1f s (%s)",
                kind,
                d,
                "float32" if fp32 else "float64",
                time.perf_counter() - t0,
                "from disk cache" if fn.stats.cache_hits else "compiled",
            )
            _cache[key] = fn
    return fn


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


def _pack(log_weights, means, covs, dtype) -> np.ndarray:
    """Component parameters as flat structure-of-arrays blocks (see :mod:`.codegen.emit_numba`),
    padded."""
    K, d = means.shape
    lay = emit_numba.layout(d)
    B = LANE_BLOCK
    nblk = -(-K // B)
    Kp = nblk * B
    P = np.zeros((lay["n_par"], Kp), dtype=np.float64)
    P[:d, :K] = means.T
    rows, cols = np.tril_indices(d)
    P[d : d + lay["npk"], :K] = np.asarray(covs, dtype=np.float64)[:, rows, cols].T
    P[d : d + lay["npk"], K:] = (rows == cols)[:, None]  # padding: V = I
    # A zero weight (log = -inf) becomes a huge finite negative: the fast-math code assumes no inf.
    P[lay["row_logw"], :K] = np.maximum(log_weights, _PAD_LOGW)
    P[lay["row_logw"], K:] = _PAD_LOGW
    # (n_par, nblk, B) -> (nblk, n_par, B), flattened
    blocks = P.reshape(lay["n_par"], nblk, B).transpose(1, 0, 2)
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
    x, S, R, fp32 = _check(x, S, means, R)
    n, d = x.shape
    K = means.shape[0]
    out = np.empty((n, K), dtype=x.dtype)
    if n == 0:
        return out.astype(np.float64)
    P = _pack(log_weights, means, covs, x.dtype)
    nt = _n_threads(n)
    status = np.full((nt, 2), -1, dtype=np.int64)
    D = 0 if R is None else means.shape[1]
    fn = _kernel("logdens", d, fp32, 0, D)
    rows = (x, S) if R is None else (x, S, R)

    def body(t, r0, r1):
        return fn(*rows, P, K, LANE_BLOCK, r0, r1, out, status[t])

    _run_blocks(body, n, nt)
    _raise_if_bad(status)
    out = out.astype(np.float64, copy=False)
    out[:, np.isneginf(log_weights)] = -np.inf  # computed with a finite stand-in, see _pack
    return out
