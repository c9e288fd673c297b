"""The catalogue row builder's compiled pass: Python source for one schema (Numba).

For one schema the row computation - classify the row, build its noise covariance S, check
that S is positive definite - is generated as straight-line scalar code in a loop over the rows
of a block, with every index, scale and floor a literal. The loop reads one flat array and
writes one flat array and has no branches (conditional expressions become selects), so LLVM
vectorises it ACROSS ROWS (SIMD lane = row; a generic loop over features and pairs was measured
5-10x slower). Positive definiteness is the LDL^T of the kernels' algebra
(:func:`.algebra.ldlt`) applied to the correlation matrix of the correlated features.

The caller (:mod:`xd_dask.io.covariance`) compiles the source with ``np``, ``math``, ``numba``,
``_stage`` (its staging of Arrow buffers) and ``_CACHE``, and hands over what this module needs
to know of the catalogue layer as arguments (no upward import): the schema's plan (attributes
below), the row classification codes and the staging layout.

Plan attributes read: ``columns`` (logical columns), ``val_col``, ``kind`` (0 error column,
1 flux-over-error, 2 constant variance), ``err_col``, ``err_scale``, ``cos_feat``,
``cos_slot``, ``cos_feats``, ``foe_start``, ``foe_count``, ``foe_cols``, ``foe_floor2``,
``const_var``, ``corr_a``, ``corr_b``, ``corr_col``, ``chol_pos``, ``pair_index``,
``val_lo``/``val_hi``, ``err_lo``/``err_hi``, ``floor`` (see ``xd_dask.io.covariance._Plan``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xd_dask.kernels.codegen import algebra

__all__ = ["RowLayout", "source"]

IND = " " * 8


@dataclass(frozen=True)
class RowLayout:
    """What the generated pass must know of the catalogue layer.

    reasons : the row classification names (index = code; :data:`xd_dask.io.rows.BAD_REASONS`).
    stride : row stride of the flat staged blocks;  block_rows : rows per staged block.
    pivot_tol : smallest accepted LDL^T pivot of a row's correlation matrix.
    mag_per_ln_flux : magnitudes per natural log of flux (flux-over-error noise).
    """

    reasons: tuple[str, ...]
    stride: int
    block_rows: int
    pivot_tol: float
    mag_per_ln_flux: float


class _Writer:
    """Lines of the ``compute`` loop body, with the classification helpers."""

    def __init__(self, lay: RowLayout) -> None:
        self.lay = lay
        self.lines: list[str] = []

    def emit(self, line: str) -> None:
        self.lines.append(IND + line)

    def IN(self, row: int) -> str:
        return f"IN[{row * self.lay.stride} + i]"

    def flag(self, cond: str, reason: str, col: int) -> None:
        """The row's first reason (``r``) and column (``bc``) become these where ``cond``."""
        code = self.lay.reasons.index(reason)
        self.emit(f"t = ({cond}) & (r == 0.0)")
        self.emit(f"r = {float(code)!r} if t else r")
        self.emit(f"bc = {float(col)!r} if t else bc")


def _fin(x: str) -> str:
    """A finite test without a call: inf - inf and nan - nan are nan."""
    return f"(({x}) - ({x}) == 0.0)"


def _outside(x: str, lo: float, hi: float) -> str | None:
    """Out of [lo, hi] (None when unbounded)."""
    tests = [f"({x} {op} {v!r})" for op, v in (("<", lo), (">", hi)) if math.isfinite(v)]
    return "(" + " | ".join(tests) + ")" if tests else None


def _values(w: _Writer, plan: Any, nan_is_null: bool) -> None:
    """Values: null -> missing field; NaN/inf that is not a null -> bad row; ranges."""
    ncol = len(plan.columns)
    D = len(plan.val_col)
    for k in range(ncol):
        w.emit(f"c{k} = {w.IN(k)}")
    for j in range(D):
        c = int(plan.val_col[j])
        nl = f"({w.IN(ncol + j)} < 0.5)"
        if nan_is_null:
            nl = f"({nl} | (c{c} != c{c}))"
        w.emit(f"nl{j} = {nl}")
        w.emit(f"ob{j} = (not nl{j}) & {_fin(f'c{c}')}")
        w.flag(f"(not nl{j}) & (not {_fin(f'c{c}')})", "nonfinite_value", c)
        bad = _outside(f"c{c}", float(plan.val_lo[j]), float(plan.val_hi[j]))
        if bad:
            w.flag(f"ob{j} & {bad}", "value_out_of_range", c)
        w.flag(f"ob{j} & (abs(c{c}) > vlim)", "not_representable", c)
        w.emit(f"OUT[{j * w.lay.stride} + i] = c{c} if ob{j} else np.nan")
    w.flag("not (" + " | ".join(f"ob{j}" for j in range(D)) + ")", "no_observed_fields", -1)


def _error_variance(w: _Writer, plan: Any, j: int) -> int:
    """Variance ``w{j}`` of an error-column feature (its floor ``f{j}``); returns the column."""
    ncol, D = len(plan.columns), len(plan.val_col)
    e = int(plan.err_col[j])
    scale = float(plan.err_scale[j])
    floor = float(plan.floor[j])
    slot = int(plan.cos_slot[j])
    div = f" / {w.IN(ncol + D + slot)}" if slot >= 0 else ""
    w.emit(f"s{j} = c{e} * {scale!r}{div}")
    if floor > 0:
        w.emit(f"f{j} = {floor * scale!r}{div}")
    if slot >= 0:
        cf = int(plan.cos_feat[j])
        w.flag(f"ob{j} & (not ob{cf})", "nonfinite_error", int(plan.val_col[cf]))
    w.emit(f"w{j} = s{j} * s{j}")
    w.flag(f"ob{j} & (not {_fin(f'c{e}')})", "nonfinite_error", e)
    w.flag(f"ob{j} & (c{e} < 0.0)", "negative_error", e)
    bad = _outside(f"c{e}", float(plan.err_lo[j]), float(plan.err_hi[j]))
    if bad:
        w.flag(f"ob{j} & {bad}", "error_out_of_range", e)
    return e


def _variances(w: _Writer, plan: Any) -> None:
    """Per feature the diagonal of S (``wd{j}``, the floor included) and ``g{j}`` = sqrt of
    the catalogue variance. A variance above the dtype's largest, or below its smallest normal
    number (it underflows), is not representable in the working dtype (issue 19: an underflow is
    the dtype's limit, not a property of the star's noise); zero or negative is not positive
    definite."""
    for j in range(len(plan.val_col)):
        kind = int(plan.kind[j])
        floor = float(plan.floor[j])
        col = -1
        if kind == 0:
            col = _error_variance(w, plan, j)
        elif kind == 1:
            terms = []
            start, count = int(plan.foe_start[j]), int(plan.foe_count[j])
            for t in range(start, start + count):
                f = int(plan.foe_cols[t])
                w.emit(f"q{t} = {w.lay.mag_per_ln_flux!r} / c{f}")
                terms.append(f"q{t} * q{t} + {float(plan.foe_floor2[t])!r}")
                w.flag(f"ob{j} & (not {_fin(f'c{f}')})", "nonfinite_error", f)
                w.flag(f"ob{j} & (c{f} <= 0.0)", "negative_error", f)
            w.emit(f"w{j} = " + " + ".join(terms))
        else:
            w.emit(f"w{j} = {float(plan.const_var[j])!r}")
        if kind != 0 and floor > 0:
            w.emit(f"f{j} = {floor!r}")
        # wd: the diagonal of S, the catalogue variance plus the floor (an independent term)
        w.emit(f"wd{j} = w{j} + f{j} * f{j}" if floor > 0 else f"wd{j} = w{j}")
        w.flag(f"ob{j} & (wd{j} > wlim)", "not_representable", col)
        w.flag(f"ob{j} & (not {_fin(f'w{j}')})", "nonfinite_error", col)
        w.flag(f"ob{j} & (wd{j} > 0.0) & (wd{j} < wtiny)", "not_representable", col)
        w.flag(f"ob{j} & (wd{j} <= 0.0)", "not_positive_definite", col)
        w.emit(f"w{j} = w{j} if ob{j} else 0.0")
        w.emit(f"wd{j} = wd{j} if ob{j} else 0.0")
        w.emit(f"g{j} = math.sqrt(w{j})")


def _correlations(w: _Writer, plan: Any) -> None:
    """Correlations of observed pairs (``rho{p}``, 0 otherwise), and positive definiteness:
    the LDL^T of the correlation matrix of the correlated features, every pivot > pivot_tol."""
    for p in range(len(plan.corr_a)):
        a, b, c = int(plan.corr_a[p]), int(plan.corr_b[p]), int(plan.corr_col[p])
        w.emit(f"bo{p} = ob{a} & ob{b}")
        w.emit(f"gd{p} = abs(c{c}) <= 1.0")
        w.flag(f"bo{p} & (not gd{p})", "bad_correlation", c)
        w.emit(f"rho{p} = c{c} if (bo{p} & gd{p}) else 0.0")
    chol = [j for j in range(len(plan.val_col)) if plan.chol_pos[j] >= 0]
    if len(chol) < 2:
        return
    tol = repr(w.lay.pivot_tol)

    def entry(p: int, q: int) -> str:
        if p == q:
            return "1.0"
        pi = int(plan.pair_index[chol[p], chol[q]])
        return f"rho{pi}" if pi >= 0 else "0.0"

    # a pivot at or below the tolerance gets a harmless reciprocal: the row is flagged anyway
    for line in algebra.ldlt(len(chol), entry, lambda d: f"1.0 / ({d} if {d} > {tol} else 1.0)"):
        w.emit(line)
    for p in range(len(chol)):
        w.flag(f"not (D{p} > {tol})", "not_positive_definite", -1)


def _store(w: _Writer, plan: Any) -> None:
    """S as a packed lower triangle (a >= b) at OUT rows D + a (a + 1) / 2 + b, then the
    reason and the column."""
    D = len(plan.val_col)
    B = w.lay.stride
    for a in range(D):
        for b in range(a + 1):
            if a == b:
                val = f"wd{a}"
            else:
                pi = int(plan.pair_index[a, b])
                val = f"rho{pi} * g{a} * g{b}" if pi >= 0 else "0.0"
            w.emit(f"OUT[{(D + algebra.tri(a, b)) * B} + i] = {val}")
    npk = algebra.npk(D)
    w.emit(f"OUT[{(D + npk) * B} + i] = r")
    w.emit(f"OUT[{(D + npk + 1) * B} + i] = bc")


def _compute(plan: Any, nan_is_null: bool, lay: RowLayout) -> list[str]:
    """``compute(m, IN, OUT, vlim, wlim, wtiny)``: the pass over m staged rows. vlim: largest
    |value| or sigma whose square is finite in the working dtype; wlim, wtiny: the largest
    finite and the smallest normal variance (runtime arguments: one kernel serves float32 and
    float64)."""
    w = _Writer(lay)
    w.emit("r = 0.0")
    w.emit("bc = -1.0")
    steps: tuple[Callable[..., None], ...] = (_variances, _correlations, _store)
    _values(w, plan, nan_is_null)
    for step in steps:
        step(w, plan)
    head = [
        '@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")',
        "def compute(m, IN, OUT, vlim, wlim, wtiny):",
        "    for i in range(m):",
    ]
    return head + w.lines + ["    return 0", ""]


def _scatter(D: int, B: int) -> list[str]:
    """``scatter(o, m, OUT, X, X_cov, reason, bad_column)``: the block into the row-major
    outputs at rows o .. o + m."""
    out = [
        '@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")',
        "def scatter(o, m, OUT, X, X_cov, reason, bad_column):",
        "    for i in range(m):",
    ]
    out += [f"{IND}X[o + i, {j}] = OUT[{j * B} + i]" for j in range(D)]
    out += [
        f"{IND}X_cov[o + i, {a}, {b}] = OUT[{(D + algebra.tri(max(a, b), min(a, b))) * B} + i]"
        for a in range(D)
        for b in range(D)
    ]
    npk = algebra.npk(D)
    out += [
        f"{IND}reason[o + i] = np.int8(OUT[{(D + npk) * B} + i])",
        f"{IND}bad_column[o + i] = np.int16(OUT[{(D + npk + 1) * B} + i])",
        "    return 0",
        "",
    ]
    return out


def source(plan: Any, nan_is_null: bool, lay: RowLayout) -> str:
    """Source of ``build(start, n, addr, is_f32, vaddr, voff, val_col, cosv, lim, X, X_cov,
    reason, bad_column)`` for one schema's plan: per block of ``lay.block_rows`` rows, stage
    the Arrow buffers (``_stage``), run ``compute`` and ``scatter`` the rows to X (n, D),
    X_cov (n, D, D), the reason codes and the bad columns."""
    D = len(plan.val_col)
    n_in = len(plan.columns) + D + max(len(plan.cos_feats), 1)
    n_out = D + algebra.npk(D) + 2
    B = lay.stride
    out = _compute(plan, nan_is_null, lay) + _scatter(D, B)
    out += [
        '@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")',
        "def build(start, n, addr, is_f32, vaddr, voff, val_col, cosv, lim, X, X_cov, reason,",
        "          bad_column):",
        f"    IN = np.zeros({n_in * B})",
        f"    OUT = np.zeros({n_out * B})",
        f"    for b0 in range(0, n, {lay.block_rows}):",
        f"        m = min({lay.block_rows}, n - b0)",
        "        _stage(b0, m, addr, is_f32, vaddr, voff, val_col, cosv, IN)",
        "        compute(m, IN, OUT, lim[0], lim[1], lim[2])",
        "        scatter(start + b0, m, OUT, X, X_cov, reason, bad_column)",
        "    return 0",
    ]
    return "\n".join(out) + "\n"
