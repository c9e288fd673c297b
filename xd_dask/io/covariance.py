"""Build X (n, D) and the noise covariances S (n, D, D) from catalogue columns, with validation.

One compiled pass over the rows (Numba) reads the Arrow value buffers and validity bitmaps in
place (no per-column NumPy copies), fills X and S, and classifies every row: valid, or the first
reason it is bad and the column responsible. The policy (raise or drop) is applied by the reader.

Conventions
-----------
- A null value is a missing field: NaN in X and zero rows/columns in S (the statistics kernel only
  looks at the observed block). Its error, flux-over-error and correlation columns are not needed.
- An observed value must lie in the schema's ``[min, max]`` (if given) and an error column's value
  in ``[error_min, error_max]``; a value or 1-sigma error whose square overflows the working dtype
  (or a variance that underflows it) is bad whatever the schema says, because float32 S would hold
  inf or 0 there. ``error_floor`` is added to the diagonal of S (an independent noise term).
- Every observed feature needs a finite, non-negative error (or positive flux-over-error); every
  correlation between two observed features must be finite and in [-1, 1]; S restricted to the
  observed features must be positive definite. This is checked on the correlation matrix (scale
  free: S = diag(sigma) C diag(sigma) is PD iff all sigma > 0 and C is PD) with a Cholesky
  factorisation whose pivots must exceed ``PIVOT_TOL``.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numba
import numpy as np

from xd_dask.io import staging
from xd_dask.io.rows import (
    BAD_REASONS,
    PIVOT_TOL,
    REASON_TEXT,
    BuildResult,
    as_table,
    check_allocation,
    dtype_limits,
    resolve_columns,
)
from xd_dask.io.schema import MAG_PER_LN_FLUX, CatalogSchema
from xd_dask.io.selection import apply_selection
from xd_dask.io.staging import BLOCK_ROWS as _B
from xd_dask.io.staging import BLOCK_STRIDE as _S
from xd_dask.io.staging import batch_buffers
from xd_dask.io.staging import stage_block as _stage
from xd_dask.io.tangential import build_tangential
from xd_dask.utils import get_logger, kernel_cache_dir, load_generated_module, write_once

log = get_logger(__name__)

__all__ = [
    "BAD_REASONS",
    "PIVOT_TOL",
    "REASON_TEXT",
    "BuildResult",
    "build_covariance",
    "check_allocation",
    "dtype_limits",
    "resolve_columns",
]

_DEG2RAD = math.pi / 180.0


# --------------------------------------------------------------------------- plan (per schema)
@dataclass(frozen=True)
class _Plan:
    columns: tuple[str, ...]  # logical columns (no id), schema spelling
    val_col: np.ndarray  # (D,) column index of each feature's value
    kind: np.ndarray  # (D,) 0 error column, 1 flux-over-error, 2 constant variance
    err_col: np.ndarray  # (D,)
    err_scale: np.ndarray  # (D,)
    cos_feat: np.ndarray  # (D,) feature index whose cos divides the error, or -1
    foe_start: np.ndarray  # (D,)
    foe_count: np.ndarray  # (D,)
    foe_cols: np.ndarray  # (T,)
    foe_floor2: np.ndarray  # (T,)
    const_var: np.ndarray  # (D,)
    corr_a: np.ndarray  # (P,)
    corr_b: np.ndarray  # (P,)
    corr_col: np.ndarray  # (P,)
    chol_pos: np.ndarray  # (D,) position among the correlated features, or -1
    pair_index: np.ndarray  # (D, D) correlation index of a feature pair, or -1
    cos_feats: tuple[int, ...]  # features whose cosine divides an error
    cos_slot: np.ndarray  # (D,) index into cos_feats of the feature's cos divisor, or -1
    val_lo: np.ndarray  # (D,) inclusive value range (+-inf: unbounded)
    val_hi: np.ndarray  # (D,)
    err_lo: np.ndarray  # (D,) inclusive range of the error column (kind 0)
    err_hi: np.ndarray  # (D,)
    floor: np.ndarray  # (D,) noise floor in the error's unit (scaled like the error for kind 0)


@lru_cache(maxsize=64)
def _plan(schema: CatalogSchema) -> _Plan:
    cols = [c for c in schema.required_columns() if c != schema.id_column]
    index = {c.lower(): i for i, c in enumerate(cols)}
    D = schema.n_features
    kind = np.zeros(D, np.int64)
    err_col = np.full(D, -1, np.int64)
    err_scale = np.ones(D)
    cos_feat = np.full(D, -1, np.int64)
    foe_start = np.zeros(D, np.int64)
    foe_count = np.zeros(D, np.int64)
    foe_cols: list[int] = []
    foe_floor2: list[float] = []
    const_var = np.zeros(D)
    for j, spec in enumerate(schema.noise):
        if spec.kind == "error":
            err_col[j] = index[spec.columns[0].lower()]
            err_scale[j] = spec.scale
            if spec.divide_by_cos:
                cos_feat[j] = schema.feature_index(spec.divide_by_cos)
        elif spec.kind == "flux_over_error":
            kind[j] = 1
            foe_start[j] = len(foe_cols)
            foe_count[j] = len(spec.columns)
            foe_cols += [index[c.lower()] for c in spec.columns]
            foe_floor2 += [f * f for f in spec.mag_floors]
        else:
            kind[j] = 2
            const_var[j] = spec.variance
    corr_a = np.array([schema.feature_index(c.features[0]) for c in schema.correlations], np.int64)
    corr_b = np.array([schema.feature_index(c.features[1]) for c in schema.correlations], np.int64)
    corr_col = np.array([index[c.column.lower()] for c in schema.correlations], np.int64)
    chol = sorted(set(corr_a.tolist()) | set(corr_b.tolist()))
    chol_pos = np.full(D, -1, np.int64)
    chol_pos[chol] = np.arange(len(chol))
    pair_index = np.full((D, D), -1, np.int64)
    for p, (a, b) in enumerate(zip(corr_a, corr_b, strict=True)):
        pair_index[a, b] = pair_index[b, a] = p
    cos_feats = tuple(sorted({int(f) for f in cos_feat if f >= 0}))
    cos_slot = np.array([cos_feats.index(f) if f >= 0 else -1 for f in cos_feat], np.int64)
    ranges = [schema.value_range(j) for j in range(D)]
    return _Plan(
        columns=tuple(cols),
        val_col=np.array([index[c.lower()] for c in schema.columns], np.int64),
        kind=kind,
        err_col=err_col,
        err_scale=err_scale,
        cos_feat=cos_feat,
        foe_start=foe_start,
        foe_count=foe_count,
        foe_cols=np.array(foe_cols, np.int64),
        foe_floor2=np.array(foe_floor2, np.float64),
        const_var=const_var,
        corr_a=corr_a,
        corr_b=corr_b,
        corr_col=corr_col,
        chol_pos=chol_pos,
        pair_index=pair_index,
        cos_feats=cos_feats,
        cos_slot=cos_slot,
        val_lo=np.array([r[0] for r in ranges]),
        val_hi=np.array([r[1] for r in ranges]),
        err_lo=np.array([spec.error_range[0] for spec in schema.noise]),
        err_hi=np.array([spec.error_range[1] for spec in schema.noise]),
        floor=np.array([spec.floor for spec in schema.noise]),
    )


# --------------------------------------------------------------------------- compiled row pass
# For one schema the row computation (classify, S, LDL^T check of the correlation matrix) is
# generated as straight-line scalar code in a loop over the rows of a block, with every index,
# scale and floor a literal. The loop reads one flat array and writes one flat array, and has no
# branches (conditional expressions become selects), so LLVM vectorises it ACROSS ROWS.
# A generic loop over features and pairs was measured 5-10x slower.
def _kernel_source(plan: _Plan, nan_is_null: bool) -> str:
    D = len(plan.val_col)
    ncol = len(plan.columns)
    B = _S  # row stride of the flat blocks
    out: list[str] = []
    emit = out.append
    ind = " " * 8

    def IN(row: int) -> str:
        return f"IN[{row * B} + i]"

    def flag(cond: str, code: int, col: int) -> None:
        emit(f"{ind}t = ({cond}) & (r == 0.0)")
        emit(f"{ind}r = {float(code)!r} if t else r")
        emit(f"{ind}bc = {float(col)!r} if t else bc")

    def fin(x: str) -> str:  # finite test without a call: inf - inf and nan - nan are nan
        return f"(({x}) - ({x}) == 0.0)"

    def outside(x: str, lo: float, hi: float) -> str | None:  # None when unbounded
        tests = [f"({x} {op} {v!r})" for op, v in (("<", lo), (">", hi)) if math.isfinite(v)]
        return "(" + " | ".join(tests) + ")" if tests else None

    # vlim: largest |value| or sigma whose square is finite in the working dtype; wlim, wtiny:
    # the largest finite and the smallest normal variance (runtime arguments: one kernel serves
    # float32 and float64).
    emit('@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")')
    emit("def compute(m, IN, OUT, vlim, wlim, wtiny):")
    emit("    for i in range(m):")
    emit(f"{ind}r = 0.0")
    emit(f"{ind}bc = -1.0")
    for k in range(ncol):
        emit(f"{ind}c{k} = {IN(k)}")
    # values: null -> missing field; NaN/inf that is not a null -> bad row
    for j in range(D):
        c = int(plan.val_col[j])
        nl = f"({IN(ncol + j)} < 0.5)"
        if nan_is_null:
            nl = f"({nl} | (c{c} != c{c}))"
        emit(f"{ind}nl{j} = {nl}")
        emit(f"{ind}ob{j} = (not nl{j}) & {fin(f'c{c}')}")
        flag(f"(not nl{j}) & (not {fin(f'c{c}')})", 1, c)
        bad = outside(f"c{c}", float(plan.val_lo[j]), float(plan.val_hi[j]))
        if bad:
            flag(f"ob{j} & {bad}", 8, c)
        flag(f"ob{j} & (abs(c{c}) > vlim)", 10, c)
        emit(f"{ind}OUT[{j * B} + i] = c{c} if ob{j} else np.nan")
    flag("not (" + " | ".join(f"ob{j}" for j in range(D)) + ")", 6, -1)
    # variances (nulls were staged as NaN, so one finiteness test covers null and NaN/inf)
    for j in range(D):
        kind = int(plan.kind[j])
        floor = float(plan.floor[j])
        if kind == 0:
            e = int(plan.err_col[j])
            scale = float(plan.err_scale[j])
            slot = int(plan.cos_slot[j])
            if slot >= 0:
                cf = int(plan.cos_feat[j])
                emit(f"{ind}s{j} = c{e} * {scale!r} / {IN(ncol + D + slot)}")
                if floor > 0:
                    emit(f"{ind}f{j} = {floor * scale!r} / {IN(ncol + D + slot)}")
                flag(f"ob{j} & (not ob{cf})", 2, int(plan.val_col[cf]))
            else:
                emit(f"{ind}s{j} = c{e} * {scale!r}")
                if floor > 0:
                    emit(f"{ind}f{j} = {floor * scale!r}")
            emit(f"{ind}w{j} = s{j} * s{j}")
            flag(f"ob{j} & (not {fin(f'c{e}')})", 2, e)
            flag(f"ob{j} & (c{e} < 0.0)", 3, e)
            bad = outside(f"c{e}", float(plan.err_lo[j]), float(plan.err_hi[j]))
            if bad:
                flag(f"ob{j} & {bad}", 9, e)
            col = e
        elif kind == 1:
            terms = []
            start, count = int(plan.foe_start[j]), int(plan.foe_count[j])
            for t in range(start, start + count):
                f = int(plan.foe_cols[t])
                emit(f"{ind}q{t} = {MAG_PER_LN_FLUX!r} / c{f}")
                terms.append(f"q{t} * q{t} + {float(plan.foe_floor2[t])!r}")
                flag(f"ob{j} & (not {fin(f'c{f}')})", 2, f)
                flag(f"ob{j} & (c{f} <= 0.0)", 3, f)
            emit(f"{ind}w{j} = " + " + ".join(terms))
            col = -1
        else:
            emit(f"{ind}w{j} = {float(plan.const_var[j])!r}")
            col = -1
        if kind != 0 and floor > 0:
            emit(f"{ind}f{j} = {floor!r}")
        # wd: the diagonal of S, the catalogue variance plus the floor (an independent term)
        emit(f"{ind}wd{j} = w{j} + f{j} * f{j}" if floor > 0 else f"{ind}wd{j} = w{j}")
        flag(f"ob{j} & (wd{j} > wlim)", 10, col)
        flag(f"ob{j} & (not {fin(f'w{j}')})", 2, col)
        flag(f"ob{j} & (wd{j} > 0.0) & (wd{j} < wtiny)", 10, col)
        flag(f"ob{j} & (wd{j} <= 0.0)", 5, col)
        emit(f"{ind}w{j} = w{j} if ob{j} else 0.0")
        emit(f"{ind}wd{j} = wd{j} if ob{j} else 0.0")
        emit(f"{ind}g{j} = math.sqrt(w{j})")
    # correlations
    for p in range(len(plan.corr_a)):
        a, b, c = int(plan.corr_a[p]), int(plan.corr_b[p]), int(plan.corr_col[p])
        emit(f"{ind}bo{p} = ob{a} & ob{b}")
        emit(f"{ind}gd{p} = abs(c{c}) <= 1.0")
        flag(f"bo{p} & (not gd{p})", 4, c)
        emit(f"{ind}rho{p} = c{c} if (bo{p} & gd{p}) else 0.0")
    # positive definiteness: LDL^T of the correlation matrix of the correlated features
    chol = [j for j in range(D) if plan.chol_pos[j] >= 0]
    M = len(chol)
    tol = repr(PIVOT_TOL)

    def entry(p: int, q: int) -> str:
        pi = int(plan.pair_index[chol[p], chol[q]])
        return f"rho{pi}" if pi >= 0 else "0.0"

    if M > 1:
        for p in range(M):
            for q in range(p):
                sub = "".join(f" - l{p}_{t} * l{q}_{t} * d{t}" for t in range(q))
                emit(f"{ind}l{p}_{q} = ({entry(p, q)}{sub}) * id{q}")
            sub = "".join(f" - l{p}_{t} * l{p}_{t} * d{t}" for t in range(p))
            emit(f"{ind}d{p} = 1.0{sub}")
            flag(f"not (d{p} > {tol})", 5, -1)
            emit(f"{ind}id{p} = 1.0 / (d{p} if d{p} > {tol} else 1.0)")
    # S, packed lower triangle (a >= b) at OUT rows D + a(a+1)/2 + b
    for a in range(D):
        for b in range(a + 1):
            row = D + a * (a + 1) // 2 + b
            if a == b:
                val = f"wd{a}"
            else:
                pi = int(plan.pair_index[a, b])
                val = f"rho{pi} * g{a} * g{b}" if pi >= 0 else "0.0"
            emit(f"{ind}OUT[{row * B} + i] = {val}")
    npk = D * (D + 1) // 2
    emit(f"{ind}OUT[{(D + npk) * B} + i] = r")
    emit(f"{ind}OUT[{(D + npk + 1) * B} + i] = bc")
    emit("    return 0")
    emit("")
    # scatter the block into the row-major outputs
    emit('@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")')
    emit("def scatter(o, m, OUT, X, X_cov, reason, bad_column):")
    emit("    for i in range(m):")
    for j in range(D):
        emit(f"{ind}X[o + i, {j}] = OUT[{j * B} + i]")
    for a in range(D):
        for b in range(D):
            hi, lo = max(a, b), min(a, b)
            row = D + hi * (hi + 1) // 2 + lo
            emit(f"{ind}X_cov[o + i, {a}, {b}] = OUT[{row * B} + i]")
    emit(f"{ind}reason[o + i] = np.int8(OUT[{(D + npk) * B} + i])")
    emit(f"{ind}bad_column[o + i] = np.int16(OUT[{(D + npk + 1) * B} + i])")
    emit("    return 0")
    emit("")
    n_in = ncol + D + max(len(plan.cos_feats), 1)
    n_out = D + npk + 2
    emit('@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")')
    emit("def build(start, n, addr, is_f32, vaddr, voff, val_col, cosv, lim, X, X_cov, reason,")
    emit("          bad_column):")
    emit(f"    IN = np.zeros({n_in * B})")
    emit(f"    OUT = np.zeros({n_out * B})")
    emit(f"    for b0 in range(0, n, {_B}):")
    emit(f"        m = min({_B}, n - b0)")
    emit("        _stage(b0, m, addr, is_f32, vaddr, voff, val_col, cosv, IN)")
    emit("        compute(m, IN, OUT, lim[0], lim[1], lim[2])")
    emit("        scatter(start + b0, m, OUT, X, X_cov, reason, bad_column)")
    emit("    return 0")
    return "\n".join(out) + "\n"


_kernels: dict[CatalogSchema, Any] = {}
_kernels_lock = threading.Lock()


def _cache_dir() -> Path | None:
    """See :func:`xd_dask.utils.kernel_cache_dir`."""
    return kernel_cache_dir("io")


def _load_generated(src: str, title: str) -> Any:
    """The generated ``build`` function: from a cached module file (compiled code cached on disk
    by Numba) when a cache directory is usable, else compiled in memory."""
    ns: dict[str, Any] = {"np": np, "math": math, "numba": numba, "_stage": _stage}
    cache = _cache_dir()
    if cache is not None:
        # the stem hashes the generated source, this module, the one defining _stage, and Numba
        h = hashlib.sha256(src.encode())
        h.update(Path(__file__).read_bytes())
        h.update(Path(staging.__file__).read_bytes())
        h.update(numba.__version__.encode())
        stem = f"xdio_{h.hexdigest()[:20]}"
        path = cache / f"{stem}.py"
        try:
            if not path.exists():
                write_once(
                    path,
                    f"# generated by xd_dask.io.covariance ({title}); safe to "
                    f"delete\n_CACHE = True\n{src}",
                )
            return load_generated_module(
                path,
                f"_xd_dask_generated_{stem}",
                ns,
                source=f"# generated by xd_dask.io.covariance ({title}); safe to "
                f"delete\n_CACHE = True\n{src}",
            ).build
        except OSError as exc:
            log.warning("kernel cache %s not usable (%s); compiling in memory", cache, exc)
    ns["_CACHE"] = False
    exec(compile(src, f"<xd_dask.io generated pass {title}>", "exec"), ns)
    return ns["build"]


def _kernel(schema: CatalogSchema):
    """The compiled pass for ``schema``: generated on first use in a process (compiled code is
    reused from Numba's on-disk cache when available)."""
    fn = _kernels.get(schema)
    if fn is None:
        with _kernels_lock:
            fn = _kernels.get(schema)
            if fn is None:
                src = _kernel_source(_plan(schema), schema.nan_is_null)
                fn = _load_generated(src, f"schema {schema.name}")
                _kernels[schema] = fn
    return fn


# --------------------------------------------------------------------------- helpers
def build_covariance(
    data: Any,
    schema: CatalogSchema,
    *,
    dtype: Any = np.float64,
    check_memory: bool = True,
) -> BuildResult:
    """X (n, D), S (n, D, D) and a validity code per row from the schema's columns.

    A schema with a projection gives the observed values instead: X (n, d), S (n, d, d) and
    R (n, d, D) (:func:`xd_dask.io.tangential.build_tangential`).

    Parameters
    ----------
    data : pyarrow Table / RecordBatch, or a mapping column -> array (None entries are nulls).
        Column names are matched case-insensitively; extra columns are ignored.
    schema : the catalogue schema.
    dtype : float64 (default) or float32 for X and S; the arithmetic is float64 either way.
    check_memory : check that the (n, D, D) output fits in available memory before allocating.

    Returns
    -------
    BuildResult (rows are not dropped here; see ``reason``). With a schema ``[selection]`` the
    rows outside it have reason ``not_selected`` (:func:`xd_dask.io.selection.apply_selection`).

    Raises
    ------
    KeyError if a required column is missing; TypeError for a non-numeric column.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    table = as_table(data)
    result = _build(table, schema, dtype, check_memory)
    if schema.selection is not None:  # rows outside the sample: not_selected (not bad rows)
        apply_selection(result, table, schema.selection)
    return result


def _build(table: Any, schema: CatalogSchema, dtype: np.dtype, check_memory: bool) -> BuildResult:
    if schema.projection is not None:
        return build_tangential(
            table,
            schema.projection,
            dtype=dtype,
            nan_is_null=schema.nan_is_null,
            check_memory=check_memory,
        )
    plan = _plan(schema)
    found, missing = resolve_columns(table.column_names, list(plan.columns))
    if missing:
        raise KeyError(f"missing column(s) {missing}")
    n = table.num_rows
    D = schema.n_features
    if check_memory:
        check_allocation(n * D * (D + 1) * dtype.itemsize, f"X_cov for {n} rows x {D} features")
    X = np.empty((n, D), dtype)
    X_cov = np.empty((n, D, D), dtype)
    reason = np.zeros(n, np.int8)
    bad_column = np.full(n, -1, np.int16)
    sub = table.select([found[c] for c in plan.columns])
    kernel = _kernel(schema)
    lim = dtype_limits(dtype)
    start = 0
    for batch in sub.to_batches():
        m = batch.num_rows
        if m == 0:
            continue
        # the arrays whose buffers the kernel reads stay referenced (keep) until it returns
        addr, is_f32, vaddr, voff, keep = batch_buffers(batch, plan.columns)
        # |cos| of the features that divide errors (Gaia: cos(dec) for sigma(alpha)), computed
        # with NumPy's vectorised cos; values of null rows are never used.
        cosv = np.ones((max(len(plan.cos_feats), 1), m))
        for slot, f in enumerate(plan.cos_feats):
            deg = batch.column(int(plan.val_col[f])).to_numpy(zero_copy_only=False)
            np.abs(np.cos(np.radians(deg, dtype=np.float64)), out=cosv[slot])
        kernel(
            start,
            m,
            addr,
            is_f32,
            vaddr,
            voff,
            plan.val_col,
            cosv,
            lim,
            X,
            X_cov,
            reason,
            bad_column,
        )
        del keep
        start += m
    return BuildResult(X, X_cov, reason, bad_column, plan.columns)
