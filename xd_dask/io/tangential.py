"""Build tangential velocities: X (n, 2), S (n, 2, 2) and R (n, 2, 3) from astrometric columns.

The mathematics and the contract are in :mod:`xd_dask.io.projection`. One compiled pass over the
rows (Numba, float64 arithmetic) reads the Arrow buffers in place, a block of rows at a time
(:mod:`xd_dask.io.staging`), classifies each row (valid, or the first reason it is bad and the
column responsible) and writes X, S and R in the dtype asked for. The first failing
check wins, in this order: a null value (``missing_input``), a non-finite value
(``nonfinite_value``), |dec| > 90 deg (``value_out_of_range``), parallax <= 0
(``nonpositive_parallax``), a non-finite or negative error, a correlation that is not finite or
outside [-1, 1] (or a weight-matrix element that is not finite), a weight-matrix diagonal element,
correlation matrix or S that is not positive definite, and values or variances the dtype cannot
hold (``not_representable``).
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np

from xd_dask.codecache import numba_cache_ok
from xd_dask.io.projection import ProjectionSpec
from xd_dask.io.rows import (
    BAD_REASONS,
    PIVOT_TOL,
    BuildResult,
    as_table,
    check_allocation,
    dtype_limits,
    resolve_columns,
)
from xd_dask.io.staging import BLOCK_ROWS, BLOCK_STRIDE, batch_buffers, stage_block

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = ["build_tangential"]

_MISSING = BAD_REASONS.index("missing_input")
_NONFINITE = BAD_REASONS.index("nonfinite_value")
_RANGE = BAD_REASONS.index("value_out_of_range")
_PARALLAX = BAD_REASONS.index("nonpositive_parallax")
_ERR_NONFINITE = BAD_REASONS.index("nonfinite_error")
_ERR_NEGATIVE = BAD_REASONS.index("negative_error")
_CORR = BAD_REASONS.index("bad_correlation")
_NOT_PD = BAD_REASONS.index("not_positive_definite")
_REPR = BAD_REASONS.index("not_representable")
_CODES = np.array([_MISSING, _NONFINITE, _RANGE, _PARALLAX, _ERR_NONFINITE, _ERR_NEGATIVE, _CORR,
                   _NOT_PD, _REPR], np.int64)  # fmt: skip
_HALF_PI = 0.5 * math.pi * (1.0 + 1e-15)

# Roles of the columns; ``_roles`` maps each to its index among the staged columns (the index that
# ``bad_column`` reports), -1 when absent.
_VALUE_ROLES = ("ra", "dec", "parallax", "pmra", "pmdec")
(_RA, _DEC, _PLX, _PMRA, _PMDEC, _EPMRA, _EPMDEC, _EPLX, _CPA, _CPD, _CAD) = range(11)
_N_ROLES = 11 + 6  # then the weight-matrix block t22, t23, t33, t24, t34, t44 (or t33, t34, t44)


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _fin(x):
    return x - x == 0.0


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _first_bad(r, bc, cond, code, col):
    """(code, col) if the row is still valid and ``cond`` holds, else (r, bc) unchanged."""
    if r == 0 and cond:
        return code, col
    return r, bc


# The steps of _block_rows, inlined into it; each passes on the row's first failure (r, bc).
_step = numba.njit(cache=_CACHE, nogil=True, error_model="numpy", inline="always")


@_step
def _check_values(IN, i, o, ov, c, codes, nan_null, ang):  # pragma: no cover - compiled
    """(r, bc) after the checks of the 5 values: valid, finite, |dec| <= 90 deg, parallax > 0."""
    B = BLOCK_STRIDE
    r = 0
    bc = -1
    for k in range(5):
        r, bc = _first_bad(r, bc, IN[ov + k * B + i] < 0.5, codes[0], c[k])
    for k in range(5):
        v = IN[o[k] + i]
        bad = codes[0] if nan_null and v != v else codes[1]
        r, bc = _first_bad(r, bc, not _fin(v), bad, c[k])
    de, w = IN[o[_DEC] + i], IN[o[_PLX] + i]
    r, bc = _first_bad(r, bc, abs(de * ang) > _HALF_PI, codes[2], c[_DEC])
    r, bc = _first_bad(r, bc, not w > 0.0, codes[3], c[_PLX])
    return r, bc


@_step
def _check_errors(r, bc, IN, i, o, c, codes, has_ex):  # pragma: no cover - compiled
    """(r, bc, sigma(pmra), sigma(pmdec), sigma(parallax) or 0): errors finite and >= 0."""
    sa, sd = IN[o[_EPMRA] + i], IN[o[_EPMDEC] + i]
    sw = IN[o[_EPLX] + i] if has_ex else 0.0
    for k, e in ((_EPMRA, sa), (_EPMDEC, sd), (_EPLX, sw)):
        r, bc = _first_bad(r, bc, not _fin(e), codes[4], c[k])
        r, bc = _first_bad(r, bc, e < 0.0, codes[5], c[k])
    return r, bc, sa, sd, sw


@_step
def _weight_correlations(r, bc, IN, i, o, c, codes, wmode):  # pragma: no cover - compiled
    """(r, bc, rho(plx, pmra), rho(plx, pmdec), rho(pmra, pmdec)) from the trailing block T of
    the weight matrix: C' = T^-1 T^-T up to column scaling (wmode 6: full block, 3: pm only)."""
    bw = 11
    rpa = 0.0
    rpd = 0.0
    for k in range(bw, bw + wmode):
        r, bc = _first_bad(r, bc, not _fin(IN[o[k] + i]), codes[6], c[k])
    if wmode == 6:
        t22, t23, t33 = IN[o[bw] + i], IN[o[bw + 1] + i], IN[o[bw + 2] + i]
        t24, t34, t44 = IN[o[bw + 3] + i], IN[o[bw + 4] + i], IN[o[bw + 5] + i]
        r, bc = _first_bad(r, bc, not t22 > 0.0, codes[7], c[bw])
        r, bc = _first_bad(r, bc, not t33 > 0.0, codes[7], c[bw + 2])
        r, bc = _first_bad(r, bc, not t44 > 0.0, codes[7], c[bw + 5])
    else:
        t22, t23, t24 = 1.0, 0.0, 0.0
        t33, t34, t44 = IN[o[bw] + i], IN[o[bw + 1] + i], IN[o[bw + 2] + i]
        r, bc = _first_bad(r, bc, not t33 > 0.0, codes[7], c[bw])
        r, bc = _first_bad(r, bc, not t44 > 0.0, codes[7], c[bw + 2])
    v22 = 1.0 / t22
    v33 = 1.0 / t33
    v44 = 1.0 / t44
    v23 = -t23 * v33 * v22
    v34 = -t34 * v44 * v33
    v24 = -(t23 * v34 + t24 * v44) * v22
    c22 = v22 * v22 + v23 * v23 + v24 * v24
    c23 = v23 * v33 + v24 * v34
    c24 = v24 * v44
    c33 = v33 * v33 + v34 * v34
    c34 = v34 * v44
    c44 = v44 * v44
    if wmode == 6:
        rpa = c23 / math.sqrt(c22 * c33)
        rpd = c24 / math.sqrt(c22 * c44)
    rad = c34 / math.sqrt(c33 * c44)
    return r, bc, rpa, rpd, rad


@_step
def _correlations(r, bc, IN, i, o, c, codes, wmode, has_ex):  # pragma: no cover - compiled
    """(r, bc, rho(plx, pmra), rho(plx, pmdec), rho(pmra, pmdec)): from the correlation columns
    (absent: 0) or the weight matrix; their matrix (of (plx, pmra, pmdec), or of (pmra, pmdec)
    without a parallax error) must be positive definite."""
    if wmode == 0:
        rpa = IN[o[_CPA] + i] if c[_CPA] >= 0 else 0.0
        rpd = IN[o[_CPD] + i] if c[_CPD] >= 0 else 0.0
        rad = IN[o[_CAD] + i] if c[_CAD] >= 0 else 0.0
        for k, rho in ((_CPA, rpa), (_CPD, rpd), (_CAD, rad)):
            r, bc = _first_bad(r, bc, not abs(rho) <= 1.0, codes[6], c[k])
    else:
        r, bc, rpa, rpd, rad = _weight_correlations(r, bc, IN, i, o, c, codes, wmode)
    if has_ex:
        d1 = 1.0 - rpa * rpa
        l21 = (rad - rpd * rpa) / (d1 if d1 > PIVOT_TOL else 1.0)
        d2 = 1.0 - rpd * rpd - l21 * l21 * d1
    else:
        d1 = 1.0 - rad * rad
        d2 = 1.0
    r, bc = _first_bad(r, bc, not (d1 > PIVOT_TOL and d2 > PIVOT_TOL), codes[7], -1)
    return r, bc, rpa, rpd, rad


@_step
def _write_triad(R, j0, A, ra, de, ang):  # pragma: no cover - compiled
    """R[j0]: the normal-triad rows p, q (ICRS) at (ra, dec) rotated by A."""
    a = ra * ang
    d = de * ang
    sin_a, cos_a = math.sin(a), math.cos(a)
    sin_d, cos_d = math.sin(d), math.cos(d)
    qx, qy, qz = -sin_d * cos_a, -sin_d * sin_a, cos_d
    for j in range(3):
        R[j0, 0, j] = -A[j, 0] * sin_a + A[j, 1] * cos_a
        R[j0, 1, j] = A[j, 0] * qx + A[j, 1] * qy + A[j, 2] * qz


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def _block_rows(  # pragma: no cover - compiled
    m, IN, ncol, c, codes, opts, A, lim, X, S, R, reason, bad_column, o0
):
    """Classify the m staged rows of ``IN`` and fill rows o0 .. o0 + m of X, S, R.

    IN : flat staged block (column k at k * BLOCK_STRIDE, NaN for nulls; then the validity of
        the 5 value columns). c : (_N_ROLES,) column of each role, -1 absent.
    codes : reason codes (see _CODES).
    opts : (angle scale [rad/unit], velocity scale [km/s per pm/parallax unit], nan_is_null,
        has parallax error, weight mode (0 none, 3 pm block only, 6 full block)).
    A : (3, 3) rotation ICRS -> frame of the true features. lim : dtype_limits of the output.
    """
    B = BLOCK_STRIDE
    ang, kv, nan_null = opts[0], opts[1], opts[2] > 0.5
    has_ex, wmode = opts[3] > 0.5, int(opts[4])
    vlim, wlim, wtiny = lim[0], lim[1], lim[2]
    # block offsets of every role (absent roles alias column 0 and are never used)
    o = np.empty(_N_ROLES, np.int64)
    for k in range(_N_ROLES):
        o[k] = max(c[k], 0) * B
    ov = ncol * B  # validity of the value columns
    for i in range(m):
        r, bc = _check_values(IN, i, o, ov, c, codes, nan_null, ang)
        ra, de, w = IN[o[_RA] + i], IN[o[_DEC] + i], IN[o[_PLX] + i]
        ma, md = IN[o[_PMRA] + i], IN[o[_PMDEC] + i]
        r, bc, sa, sd, sw = _check_errors(r, bc, IN, i, o, c, codes, has_ex)
        r, bc, rpa, rpd, rad = _correlations(r, bc, IN, i, o, c, codes, wmode, has_ex)
        # x = K mu / varpi; S = J C J^T, J = (K / varpi) [[-mu_a / varpi, 1, 0], [-mu_d / varpi,
        # 0, 1]] over (varpi, mu_a*, mu_d); e = sigma(varpi) / varpi
        x0 = kv * ma / w
        x1 = kv * md / w
        e = sw / w
        ga = kv * sa / w
        gd = kv * sd / w
        s00 = x0 * x0 * e * e - 2.0 * x0 * e * ga * rpa + ga * ga
        s11 = x1 * x1 * e * e - 2.0 * x1 * e * gd * rpd + gd * gd
        s01 = x0 * x1 * e * e - x0 * e * gd * rpd - x1 * e * ga * rpa + ga * gd * rad
        pd = s00 > 0.0 and s11 > 0.0 and s00 * s11 - s01 * s01 > PIVOT_TOL * s00 * s11
        r, bc = _first_bad(r, bc, not pd, codes[7], -1)
        ok = abs(x0) <= vlim and abs(x1) <= vlim and wtiny <= s00 <= wlim and wtiny <= s11 <= wlim
        r, bc = _first_bad(r, bc, not ok, codes[8], -1)
        j0 = o0 + i
        _write_triad(R, j0, A, ra, de, ang)
        X[j0, 0] = x0
        X[j0, 1] = x1
        S[j0, 0, 0] = s00
        S[j0, 0, 1] = s01
        S[j0, 1, 0] = s01
        S[j0, 1, 1] = s11
        reason[j0] = r
        bad_column[j0] = bc
    return 0


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def _build(  # pragma: no cover - compiled
    n, addr, is_f32, vaddr, voff, c, codes, opts, A, lim, X, S, R, reason, bad_column, start
):
    """Stage and classify rows start .. start + n (one record batch), a block at a time."""
    ncol = addr.shape[0]
    val_col = c[:5].copy()
    no_cos = np.zeros((0, n))
    IN = np.zeros((ncol + 5) * BLOCK_STRIDE)
    for b0 in range(0, n, BLOCK_ROWS):
        m = min(BLOCK_ROWS, n - b0)
        stage_block(b0, m, addr, is_f32, vaddr, voff, val_col, no_cos, IN)
        _block_rows(m, IN, ncol, c, codes, opts, A, lim, X, S, R, reason, bad_column, start + b0)
    return 0


def _roles(spec: ProjectionSpec, columns: tuple[str, ...]) -> np.ndarray:
    """(_N_ROLES,) column index of each role (-1 absent)."""
    index = {c.lower(): k for k, c in enumerate(columns)}
    names: list[str | None] = [getattr(spec, r) for r in _VALUE_ROLES]
    names += [spec.pmra_error, spec.pmdec_error, spec.parallax_error, *spec.correlations]
    names += list(spec.weight_columns())
    out = np.full(_N_ROLES, -1, np.int64)
    for k, nm in enumerate(names):
        if nm:
            out[k] = index[nm.lower()]
    return out


def build_tangential(
    data: Any,
    spec: ProjectionSpec,
    *,
    dtype: Any = np.float64,
    nan_is_null: bool = False,
    check_memory: bool = True,
) -> BuildResult:
    """Tangential velocities X (n, 2) [km/s], S (n, 2, 2), R (n, 2, 3) and a code per row.

    Parameters
    ----------
    data : pyarrow Table / RecordBatch, or a mapping column -> array (columns matched
        case-insensitively; extra columns are ignored).
    spec : the schema's projection (kind ``tangential_velocity``).
    dtype : float32 or float64 for X, S and R (the arithmetic is float64).
    nan_is_null : a NaN value is a missing input (``missing_input``) rather than
        ``nonfinite_value``.
    check_memory : check that the outputs fit in available memory before allocating.

    Returns
    -------
    BuildResult with R (rows are not dropped here; see ``reason``).

    Raises
    ------
    KeyError if a column is missing; TypeError for a non-numeric column.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    table = as_table(data)
    columns = spec.input_columns()
    found, missing = resolve_columns(table.column_names, list(columns))
    if missing:
        raise KeyError(f"missing column(s) {missing}")
    n = table.num_rows
    if check_memory:
        check_allocation(n * 12 * dtype.itemsize, f"X, X_cov and R for {n} rows")
    X = np.empty((n, 2), dtype)
    X_cov = np.empty((n, 2, 2), dtype)
    R = np.empty((n, 2, 3), dtype)
    reason = np.zeros(n, np.int8)
    bad_column = np.full(n, -1, np.int16)
    col_of = _roles(spec, columns)
    wmode = len(spec.weight_columns())
    opts = np.array(
        [spec.angle_scale, spec.velocity_scale, nan_is_null, bool(spec.parallax_error), wmode],
        np.float64,
    )
    A = np.ascontiguousarray(spec.rotation)
    lim = dtype_limits(dtype)
    start = 0
    for batch in table.select([found[c] for c in columns]).to_batches():
        m = batch.num_rows
        if m == 0:
            continue
        # the arrays whose buffers the kernel reads stay referenced (keep) until it returns
        addr, is_f32, vaddr, voff, keep = batch_buffers(batch, columns)
        _build(m, addr, is_f32, vaddr, voff, col_of, _CODES, opts, A, lim, X, X_cov, R, reason,
               bad_column, start)  # fmt: skip
        del keep
        start += m
    return BuildResult(X, X_cov, reason, bad_column, columns, R)
