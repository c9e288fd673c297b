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
  is bad whatever the schema says (``not_representable``: float32 S would hold inf there), and so
  is a variance that underflows it (S would be singular there).
  ``error_floor`` is added to the diagonal of S (an independent noise term).
- Every observed feature needs a finite, non-negative error (or positive flux-over-error); every
  correlation between two observed features must be finite and in [-1, 1]; S restricted to the
  observed features must be positive definite. This is checked on the correlation matrix (scale
  free: S = diag(sigma) C diag(sigma) is PD iff all sigma > 0 and C is PD) with an LDL^T
  factorisation (the kernels' algebra) whose pivots must exceed ``PIVOT_TOL``.

The pass is generated per schema by :mod:`xd_dask.kernels.codegen.rows`; this module plans it
from the schema, compiles and caches it, and runs it over Arrow record batches.
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
from xd_dask.kernels import codegen
from xd_dask.kernels.codegen.rows import RowLayout
from xd_dask.kernels.codegen.rows import source as rows_source
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
#: What the generated pass (:mod:`xd_dask.kernels.codegen.rows`) must know of this layer.
_ROW_LAYOUT = RowLayout(BAD_REASONS, _S, _B, PIVOT_TOL, MAG_PER_LN_FLUX)


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
        # the stem hashes the generated source, this module, the one defining _stage, the code
        # generator and Numba
        h = hashlib.sha256(src.encode())
        for path in (__file__, staging.__file__, *codegen.source_files()):
            h.update(Path(path).read_bytes())
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
                src = rows_source(_plan(schema), schema.nan_is_null, _ROW_LAYOUT)
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
