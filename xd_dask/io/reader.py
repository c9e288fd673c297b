"""Read one catalogue partition (a Parquet file, or some of its row groups) into (X, S, ids), and
the per-row projection R when the schema has one (:mod:`xd_dask.io.projection`).

Only the schema's columns are read (matched case-insensitively: archive output says SOURCE_ID).
Each row is validated while X and S are built (:mod:`xd_dask.io.covariance`); the policy decides
what a bad row does: ``"error"`` raises :class:`CatalogError` naming the file, the row (and its
id) and the column; ``"drop"`` removes it and counts it under its reason in
:attr:`CatalogBlock.dropped`. Rows outside the schema's ``[selection]`` are not bad rows: under
either policy they are removed and counted as ``not_selected``.

Units: a value, error, flux-over-error or correlation column whose unit in the file (the ``unit``
field metadata that ``xd-dask ingest`` keeps from FITS, VOTable, ECSV and CDS headers) is not the
unit the schema gives it stops the read with :class:`CatalogError` naming the file, the column
and both units (compared with ``astropy.units``: ``mas/yr`` and ``mas.yr**-1`` agree, ``deg``
and ``rad`` do not). A column without a unit in the file, or without one in the schema, is not
checked.

Duplicate ids: a row whose id equals that of an earlier valid row among the rows read in one call
(a file, or the row groups asked for) is bad with reason ``duplicate_id``; under ``"drop"`` the
first occurrence is kept and the later ones are dropped and counted. (Duplicates across files are
the manifest's business.) Files sorted by id (Gaia bulk files) are checked in one linear pass.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from xd_dask.config import key
from xd_dask.io.covariance import build_covariance
from xd_dask.io.rows import (
    BAD_REASONS,
    REASON_TEXT,
    BuildResult,
    later_duplicates,
    resolve_columns,
)
from xd_dask.io.schema import CatalogSchema, load_schema
from xd_dask.utils import get_logger

__all__ = ["CatalogBlock", "CatalogError", "read_partition", "open_parquet", "empty_counts"]

log = get_logger(__name__)
_MISSING_ID = BAD_REASONS.index("missing_id")
_DUPLICATE_ID = BAD_REASONS.index("duplicate_id")
_NOT_SELECTED = BAD_REASONS.index("not_selected")


class CatalogError(ValueError):
    """Bad catalogue input: unreadable/truncated file, missing column, or a bad row.

    Attributes ``path``, ``row`` (index within the file, or None), ``row_id`` (the id column's
    value, or None) and ``column`` (or None) say where.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        row: int | None = None,
        row_id: int | None = None,
        column: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path, self.row, self.row_id, self.column, self.reason = (
            path,
            row,
            row_id,
            column,
            reason,
        )


@dataclass
class CatalogBlock:
    """One partition's arrays, ready for the statistics kernel.

    X : (n, d) float observed values, NaN = missing field (d = D without a projection).
    X_cov : (n, d, d) float noise covariances (rows/columns of missing fields are 0).
    ids : (n,) int64 row ids (the id column, or row numbers within the file).
    R : (n, d, D) projections from the schema's D true features to the d observed values
        (x_i = R_i v_i + noise), same dtype as X; None when the schema has no projection.
    n_read : rows read from the file (before dropping).
    dropped : rows dropped per reason (every reason of :data:`BAD_REASONS` except "ok" is a key).
    path : the file read.
    """

    X: np.ndarray
    X_cov: np.ndarray
    ids: np.ndarray
    n_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    path: str = ""
    R: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])


def empty_counts() -> dict[str, int]:
    """A drop-count dict with every reason at zero."""
    return {r: 0 for r in BAD_REASONS[1:]}


def _open_source(path: str, filesystem: Any):
    """An input file object for ``path`` (local, pyarrow FileSystem, or fsspec filesystem)."""
    if filesystem is None:
        return path
    if not isinstance(filesystem, pafs.FileSystem):
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(filesystem))
    return filesystem.open_input_file(path)


def open_parquet(path: str | os.PathLike, filesystem: Any = None) -> pq.ParquetFile:
    """Open a Parquet file; any failure becomes a CatalogError that names the file."""
    path = os.fspath(path)
    try:
        return pq.ParquetFile(_open_source(path, filesystem))
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such file", path=path) from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CatalogError(
            f"{path}: not a readable Parquet file (truncated or corrupt?): {exc}", path=path
        ) from None


def _bad_row_error(
    path: str,
    result: BuildResult,
    ids: np.ndarray,
    table: pa.Table,
    found: dict[str, str],
    schema: CatalogSchema,
    row: int,
    file_rows: np.ndarray,
    dtype: np.dtype,
) -> CatalogError:
    """The CatalogError for bad row ``row`` of the rows read (``file_rows[row]`` in the file)."""
    file_row = int(file_rows[row])
    code = int(result.reason[row])
    reason = BAD_REASONS[code]
    id_name = schema.id_column or "row"
    rid: int | None = None if code == _MISSING_ID else int(ids[row])
    col_idx = int(result.bad_column[row])
    where = f"{path}: row {file_row} ({id_name}={'null' if rid is None else rid})"
    if code in (_MISSING_ID, _DUPLICATE_ID):
        column = found.get(schema.id_column or "", schema.id_column)
        detail = REASON_TEXT[reason]
        if code == _DUPLICATE_ID:
            first = int(np.flatnonzero(ids == rid)[0])
            detail += f": row {int(file_rows[first])} has the same {id_name}"
            detail += ". Use on_bad='drop' to keep the first and drop and count the others."
        return CatalogError(
            f"{where}: column {column!r}: {detail}",
            path=path,
            row=file_row,
            row_id=rid,
            column=column,
            reason=reason,
        )
    if col_idx >= 0:
        column = found[result.columns[col_idx]]
        value = table.column(column)[row].as_py()
        text = _reason_text(reason, result.columns[col_idx], schema, dtype)
        detail = f"column {column!r}: {text} (value {value!r})"
    else:
        column = None
        if reason in ("not_positive_definite", "not_representable"):
            err_names, corr_names = schema.noise_columns()
            cols = [found[c] for c in corr_names]
            errs = [found[c] for c in err_names]
            detail = (
                f"columns {errs + cols}: {_reason_text(reason, '', schema, dtype)} (check the "
                "errors and the correlation coefficients of this row)"
            )
        else:
            detail = REASON_TEXT[reason]
    hint = " Use on_bad='drop' to drop and count such rows."
    if reason == "nonfinite_value" and not schema.nan_is_null:
        hint += " If NaN marks missing values in this file, set nan_is_null = true in the schema."
    return CatalogError(
        f"{where}: {detail}.{hint}",
        path=path,
        row=file_row,
        row_id=rid,
        column=column,
        reason=reason,
    )


def _bounds_text(keys: tuple[str, str], lo: float, hi: float, unit: str = "") -> str:
    parts = [f"{k} = {v:g}" for k, v in zip(keys, (lo, hi), strict=True) if np.isfinite(v)]
    return ", ".join(parts) + (f" {unit}" if unit else "")


def _reason_text(reason: str, column: str, schema: CatalogSchema, dtype: np.dtype) -> str:
    """REASON_TEXT[reason], with the schema's bounds of ``column`` or the dtype where they help."""
    text = REASON_TEXT[reason]
    col = column.lower()
    if reason == "value_out_of_range" and schema.projection is not None:
        return f"{text} (declination beyond +-90 deg, in {schema.projection.angle_unit})"
    if reason == "value_out_of_range":
        for j, c in enumerate(schema.columns):
            if c.lower() == col:
                bounds = _bounds_text(("min", "max"), *schema.value_range(j))
                return f"{text} (feature {schema.features[j]!r}: {bounds})"
    if reason == "error_out_of_range":
        for name, spec in zip(schema.features, schema.noise, strict=True):
            if spec.kind == "error" and spec.columns[0].lower() == col:
                keys = ("error_min", "error_max")
                bounds = _bounds_text(keys, *spec.error_range, spec.error_unit)
                return f"{text} (feature {name!r}: {bounds})"
    if reason == "not_representable":
        fi = np.finfo(dtype)
        return (
            f"{text} ({dtype.name}: |value| and 1-sigma error at most "
            f"{float(np.sqrt(fi.max)):.3g} in the feature's unit, variance at least {fi.tiny:.3g})"
        )
    return text


def _file_rows(pf: pq.ParquetFile, row_groups: Sequence[int] | None) -> np.ndarray:
    """(n,) file row number of each row read (all row groups, or the selected ones in order)."""
    sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    groups = range(pf.num_row_groups) if row_groups is None else row_groups
    parts = [np.arange(starts[g], starts[g] + sizes[g], dtype=np.int64) for g in groups]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def require_columns(path_s: str, names: list[str], schema: CatalogSchema) -> dict[str, str]:
    """Match the schema's columns to a file's (case-insensitively): {wanted: actual}.

    Raises CatalogError naming the file and the first missing (or ambiguous) column.
    """
    try:
        found, missing = resolve_columns(names, schema.required_columns())
    except KeyError as exc:
        raise CatalogError(f"{path_s}: {exc.args[0]}", path=path_s) from None
    if missing:
        raise CatalogError(
            f"{path_s}: missing required column(s) {missing} for schema {schema.name!r} "
            f"(the file has {len(names)} columns; names are matched case-insensitively)",
            path=path_s,
            column=missing[0],
        )
    return found


# --------------------------------------------------------------------------- units
def _schema_units(schema: CatalogSchema) -> Iterator[tuple[str, str, str]]:
    """(column, unit the schema gives it, what it is) for every column with a known unit;
    "" means dimensionless (flux-over-error and correlation columns)."""
    p = schema.projection
    if p is not None:
        yield from ((c, p.angle_unit, "position") for c in (p.ra, p.dec))
        for col in (p.parallax, p.parallax_error):
            if col:
                yield col, p.parallax_unit, "parallax (parallax_unit)"
        for col in (p.pmra, p.pmdec, p.pmra_error, p.pmdec_error):
            yield col, p.pm_unit, "proper motion (pm_unit)"
        yield from ((c, "", "correlation") for c in p.correlations if c)
        return
    for name, col, unit, spec in zip(
        schema.features, schema.columns, schema.units, schema.noise, strict=True
    ):
        if unit:
            yield col, unit, f"feature {name!r}: unit"
        if spec.kind == "error" and (spec.error_unit or unit):
            yield spec.columns[0], spec.error_unit or unit, f"feature {name!r}: error_unit"
        if spec.kind == "flux_over_error":
            yield from ((c, "", f"feature {name!r}: flux_over_error") for c in spec.columns)
    yield from ((c.column, "", "correlation") for c in schema.correlations)


@functools.lru_cache(maxsize=512)
def _parse_unit(text: str) -> Any:
    """An astropy unit from ``text`` in any of the formats tables use, or None."""
    from astropy import units as u  # noqa: PLC0415 - astropy: slow import, only for units

    text = text.strip()
    if text in ("", "-", "---"):
        return u.dimensionless_unscaled
    for fmt in (None, "cds", "fits", "vounit", "ogip"):
        try:
            return u.Unit(text, format=fmt, parse_strict="raise")
        except (ValueError, TypeError):
            continue
    return None


def _spelling(unit: str) -> str:
    """``unit`` with its blanks collapsed and a trailing ``.u**-1`` written ``/u`` (the Gaia
    archive's ``mas.yr**-1`` is the schemas' ``mas/yr``): text that is equal after this names
    the same unit in every grammar astropy reads."""
    return re.sub(r"\.([A-Za-z]+)\*\*-1$", r"/\1", " ".join(unit.split()))


@functools.lru_cache(maxsize=512)
def units_agree(file_unit: str, schema_unit: str) -> bool:
    """Whether a column in ``file_unit`` holds numbers in ``schema_unit`` (astropy.units: the
    same unit however spelt; text comparison when either cannot be parsed). The same text is
    the same unit without asking astropy: a worker whose files spell the schema's units (the
    usual case) never imports it (0.3-0.5 s of every worker's first partition)."""
    if _spelling(file_unit) == _spelling(schema_unit):
        return True
    from astropy import units as u  # noqa: PLC0415 - astropy: slow import, only for units

    a, b = _parse_unit(file_unit), _parse_unit(schema_unit)
    if a is None or b is None:
        return False
    try:
        return math.isclose(a.to(b), 1.0, rel_tol=1e-9)
    except u.UnitsError:
        return False


def check_units(
    path_s: str, file_schema: pa.Schema, found: dict[str, str], schema: CatalogSchema
) -> None:
    """CatalogError when a column's unit in the file disagrees with the schema (module
    docstring); ``found`` maps the schema's column names to the file's."""
    actual = {k.lower(): v for k, v in found.items()}
    for column, unit, what in _schema_units(schema):
        name = actual.get(column.lower())
        if name is None or file_schema.get_field_index(name) < 0:
            continue
        meta = file_schema.field(name).metadata or {}
        file_unit = meta.get(b"unit", b"").decode("utf-8", "replace").strip()
        if not file_unit or units_agree(file_unit, unit):
            continue
        said = repr(unit) if unit else "no unit (a pure number)"
        raise CatalogError(
            f"{path_s}: column {name!r} is in {file_unit!r} (the file's unit) but schema "
            f"{schema.name!r} says {said} ({what}); the values would be taken in the wrong "
            "unit. Fix the schema's unit (error_unit / error_scale for an error column), or the "
            "file's",
            path=path_s,
            column=name,
            reason="unit_mismatch",
        )


def read_partition(
    path: str | os.PathLike,
    schema: CatalogSchema | str | None = None,
    *,
    on_bad: str = key("catalog.on_bad").default,
    dtype: Any = np.float64,
    filesystem: Any = None,
    row_groups: Sequence[int] | None = None,
    use_threads: bool = False,
) -> CatalogBlock:
    """Read, validate and build (X, S, ids) for one Parquet partition (and R with a projection).

    Parameters
    ----------
    path : Parquet file.
    schema : :class:`CatalogSchema`, a packaged schema name or a TOML path (default Gaia DR3).
    on_bad : "error" (raise CatalogError at the first bad row) or "drop" (drop and count).
    dtype : float64 (default) or float32 for X, X_cov and R.
    filesystem : pyarrow.fs.FileSystem or fsspec filesystem holding ``path`` (default local).
    row_groups : read only these row groups (a fragment of the file); ids without an id column
        are then the rows' numbers within the whole file.
    use_threads : let pyarrow decode columns in parallel (off by default: one task, one core).

    Returns
    -------
    CatalogBlock

    Raises
    ------
    CatalogError for an unreadable/truncated file, a missing column, a column whose unit in the
    file is not the schema's, or (on_bad="error") a bad row.
    """
    if on_bad not in ("error", "drop"):
        raise ValueError(f"on_bad must be 'error' or 'drop', got {on_bad!r}")
    schema = load_schema(schema)
    path_s = os.fspath(path)
    pf = open_parquet(path_s, filesystem)
    found = require_columns(path_s, pf.schema_arrow.names, schema)
    check_units(path_s, pf.schema_arrow, found, schema)
    columns = [found[c] for c in schema.required_columns()]
    table, row_groups = _read_columns(pf, path_s, columns, row_groups, use_threads)
    n = table.num_rows
    ids, null_ids = _row_ids(pf, path_s, table, found, schema, row_groups)
    try:
        result = build_covariance(table, schema, dtype=dtype)
    except TypeError as exc:
        raise CatalogError(f"{path_s}: {exc}", path=path_s) from None
    if null_ids is not None:
        result.reason[null_ids & (result.reason == 0)] = _MISSING_ID
    if schema.id_column:
        result.reason[later_duplicates(ids, result.reason == 0)] = _DUPLICATE_ID
    dropped = empty_counts()
    bad_rows = np.flatnonzero(result.reason)
    if bad_rows.size:
        # rows outside the schema's selection are excluded and counted whatever on_bad says
        faulty = bad_rows[result.reason[bad_rows] != _NOT_SELECTED]
        if on_bad == "error" and faulty.size:
            row = int(faulty[0])
            file_rows = _file_rows(pf, row_groups)  # messages give positions in the file
            raise _bad_row_error(
                path_s, result, ids, table, found, schema, row, file_rows, np.dtype(dtype)
            )
        counts = np.bincount(result.reason, minlength=len(BAD_REASONS))
        for code, name in enumerate(BAD_REASONS[1:], start=1):
            dropped[name] = int(counts[code])
        keep = result.reason == 0
        X, X_cov, ids = result.X[keep], result.X_cov[keep], ids[keep]
        R = None if result.R is None else result.R[keep]
        log.info(
            "%s: dropped %d of %d rows: %s",
            path_s,
            int(bad_rows.size),
            n,
            {k: v for k, v in dropped.items() if v},
        )
    else:
        X, X_cov, R = result.X, result.X_cov, result.R
    return CatalogBlock(X=X, X_cov=X_cov, ids=ids, n_read=n, dropped=dropped, path=path_s, R=R)


def _read_columns(
    pf: pq.ParquetFile,
    path_s: str,
    columns: list[str],
    row_groups: Sequence[int] | None,
    use_threads: bool,
) -> tuple[pa.Table, list[int] | None]:
    """(the ``columns`` of the file or of its ``row_groups``, the row groups as ints);
    CatalogError if unreadable."""
    try:
        if row_groups is None:
            return pf.read(columns=columns, use_threads=use_threads), None
        row_groups = [int(g) for g in row_groups]
        bad = [g for g in row_groups if not 0 <= g < pf.num_row_groups]
        if bad:
            raise CatalogError(
                f"{path_s}: row group(s) {bad} out of range (file has {pf.num_row_groups})",
                path=path_s,
            )
        table = pf.read_row_groups(row_groups, columns=columns, use_threads=use_threads)
        return table, row_groups
    except CatalogError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CatalogError(
            f"{path_s}: cannot read columns (truncated or corrupt file?): {exc}", path=path_s
        ) from None


def _row_ids(
    pf: pq.ParquetFile,
    path_s: str,
    table: pa.Table,
    found: dict[str, str],
    schema: CatalogSchema,
    row_groups: list[int] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids (n,) int64, mask of null ids or None): the id column (nulls as 0), else the rows'
    numbers in the file."""
    if not schema.id_column:
        return _file_rows(pf, row_groups), None
    id_col = table.column(found[schema.id_column])
    if not (pa.types.is_integer(id_col.type)):
        raise CatalogError(
            f"{path_s}: id column {found[schema.id_column]!r} has type {id_col.type}, "
            "expected an integer",
            path=path_s,
            column=found[schema.id_column],
        )
    ids = pc.fill_null(id_col, 0).to_numpy().astype(np.int64, copy=False)
    if id_col.null_count == 0:
        return ids, None
    return ids, pc.is_null(id_col).to_numpy(zero_copy_only=False)
