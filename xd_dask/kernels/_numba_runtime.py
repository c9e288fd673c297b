"""The runtime of the generated CPU kernels: the helpers their source calls.

Bit casts (``_bits``/``_float``), a vectorisable polynomial ``exp``/``log`` (Numba has no
vector exp/log here) and row helpers (max, exp-and-sum, argmax, the background split, the
float32 -> float64 flush). :func:`namespace` gives the generated code its globals: these
helpers, the lane sums of :mod:`._numba_lanes` and the emitter's constants
(:func:`xd_dask.kernels.codegen.emit_numba.constants`).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from xd_dask.kernels._numba_lanes import FM_STRICT, _comp_sums, _lanesum
from xd_dask.kernels.codegen import emit_numba
from xd_dask.kernels.codegen.algebra import BG_OFF

__all__ = ["FM_STRICT", "namespace"]


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


@njit(fastmath=FM_STRICT, error_model="numpy", inline="always")
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


@njit(fastmath=FM_STRICT, error_model="numpy", inline="always")
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


@njit(fastmath=FM_STRICT, error_model="numpy", inline="always")
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


@njit(fastmath=FM_STRICT, error_model="numpy", inline="always")
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


def namespace(fp32: bool) -> dict:
    """Globals of the generated code: the emitter's constants and this module's helpers."""
    helpers = {
        "np": np,
        "math": math,
        "_bits": _bits32 if fp32 else _bits64,
        "_float": _float32 if fp32 else _float64,
        "_log": _log_f32 if fp32 else _log_f64,
        "_rowmax": _rowmax,
        "_rowexp": _rowexp_f32 if fp32 else _rowexp_f64,
        "_flush": _flush,
        "_argmax": _argmax,
        "_first_at": _first_at,
        "_bg_split": _bg_split,
        "_lanesum": _lanesum,
        "_comp_sums": _comp_sums,
    }
    return emit_numba.constants(fp32) | helpers
