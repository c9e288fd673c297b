"""A starter schema TOML from a table's columns (``xd-dask schema init``).

The columns found are matched by name (case-insensitively):

- value/error pairs: ``X`` with ``e_X`` (CDS), ``X_error`` (Gaia), ``X_err``, ``err_X``,
  ``error_X``, ``sigma_X`` or ``X_sigma`` becomes a feature with
  ``error`` noise; ``X_mag`` with ``X_flux_over_error`` (Gaia photometry) a feature with
  ``flux_over_error`` noise;
- correlations: ``A_B_corr`` (Gaia) or ``ABcor`` / ``ABcorr`` (CDS, e.g. ``RADEcor``) where A and
  B name two features (a feature ``RA_ICRS`` answers to ``RA`` too);
- units: each column's unit from the table metadata (error units converted to the feature unit
  by the schema loader, or by an explicit ``error_scale`` computed here with astropy);
- the id column: an integer column named like ``source_id``, ``HIP``, ``id`` or ``*_id``.

The output is commented for a person to edit: the columns left out, where ranges and floors go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.io.reader import CatalogError
from xd_dask.io.schema import schema_from_dict, unit_scale
from xd_dask.io.tables import ROW_INDEX, detect_format, find_readme, guess_id_column, open_table

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ColumnInfo",
    "ZeroErrors",
    "count_zero_errors",
    "error_columns",
    "schema_init",
    "starter_schema",
    "table_columns",
]

_ERROR_PATTERNS = (
    "e_{}",
    "{}_error",
    "{}_err",
    "err_{}",
    "error_{}",
    "sigma_{}",
    "{}_sigma",
)
_CORR_SUFFIXES = ("_corr", "_cor", "corr", "cor")


@dataclass(frozen=True)
class ColumnInfo:
    """A column's name, Arrow type, unit ("" if none) and description."""

    name: str
    type: pa.DataType
    unit: str = ""
    description: str = ""

    @property
    def numeric(self) -> bool:
        return pa.types.is_integer(self.type) or pa.types.is_floating(self.type)


def _infos(schema: pa.Schema) -> list[ColumnInfo]:
    out = []
    for f in schema:
        meta = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
        out.append(ColumnInfo(f.name, f.type, meta.get("unit", ""), meta.get("description", "")))
    return out


def _parquet_files(p: Path) -> list[Path]:
    if not p.is_dir():
        return [p]
    files = sorted(p.rglob("*.parquet"))
    if not files:
        raise CatalogError(f"{p}: no .parquet files in this directory", path=str(p))
    return files


def _is_parquet(p: Path, format: str) -> bool:
    return p.is_dir() or p.suffix.lower() == ".parquet" or format == "parquet"


def _source(p: Path, format: str, readme: Any, hdu: Any):
    """The table source of a non-Parquet table; a CDS table without ``readme`` gets the one
    beside it or packaged with xd-dask (:func:`xd_dask.io.tables.find_readme`)."""
    fmt = detect_format(p) if format == "auto" else format
    if fmt == "cds" and readme is None and p.is_file():
        readme = find_readme(p)
    return open_table(p, fmt, readme=readme, hdu=hdu)


def table_columns(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    readme: str | os.PathLike | None = None,
    hdu: int | str | None = None,
) -> list[ColumnInfo]:
    """The columns of a table file (any ingest format, or Parquet: a file or a directory of
    files, whose first file is used). Only the first rows are read."""
    p = Path(path)
    if _is_parquet(p, format):
        first = _parquet_files(p)[0]
        try:
            return _infos(pq.read_schema(first))
        except (OSError, pa.ArrowException) as exc:
            raise CatalogError(
                f"{first}: not a readable Parquet file: {exc}", path=str(first)
            ) from None
    return _infos(_source(p, format, readme, hdu).sample().schema)


#: Rows of the error columns :func:`count_zero_errors` reads at most.
SCAN_ROWS = 1_000_000


def _batches(p: Path, format: str, readme: Any, hdu: Any, columns: list[str]):
    """The table's ``columns`` in Arrow batches."""
    if _is_parquet(p, format):
        for f in _parquet_files(p):
            yield from pq.ParquetFile(f).iter_batches(columns=columns, batch_size=1 << 16)
        return
    for table in _source(p, format, readme, hdu).batches():
        yield table.select(columns)


def count_zero_errors(
    path: str | os.PathLike,
    columns: list[str],
    format: str = "auto",
    *,
    readme: str | os.PathLike | None = None,
    hdu: int | str | None = None,
    max_rows: int = SCAN_ROWS,
) -> ZeroErrors:
    """Rows whose error is exactly 0 in each of the error ``columns`` (the first ``max_rows``
    rows of the table), and the smallest non-zero |error| of each."""
    counts = {c: [0, np.inf] for c in columns}
    rows, complete = 0, True
    if not columns:
        return ZeroErrors(0, {})
    for batch in _batches(Path(path), format, readme, hdu, columns):
        if rows >= max_rows:
            complete = False
            break
        batch = batch.slice(0, max_rows - rows)
        rows += batch.num_rows
        for c in columns:
            v = np.abs(batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64))
            counts[c][0] += int((v == 0).sum())
            pos = v[np.isfinite(v) & (v > 0)]
            if pos.size:
                counts[c][1] = min(counts[c][1], float(pos.min()))
    out = {c: (n, None if not np.isfinite(m) else m) for c, (n, m) in counts.items()}
    return ZeroErrors(rows, out, complete)


def _lookup(by_lower: dict[str, ColumnInfo], name: str) -> ColumnInfo | None:
    return by_lower.get(name.lower())


def _aliases(feature: str) -> set[str]:
    low = feature.lower()
    return {low, low.split("_")[0]} if "_" in low else {low}


def _corr_pair(name: str, features: list[str]) -> tuple[str, str] | None:
    """The two features a correlation column couples, or None."""
    low = name.lower()
    stem = next((low[: -len(s)] for s in _CORR_SUFFIXES if low.endswith(s)), None)
    if not stem:
        return None
    alias = {}
    for f in features:
        for a in _aliases(f):
            alias.setdefault(a, f)
    found = set()
    for i in range(1, len(stem)):
        a, b = stem[:i].rstrip("_"), stem[i:].lstrip("_")
        fa, fb = alias.get(a), alias.get(b)
        if fa and fb and fa != fb:
            found.add((fa, fb))
    return found.pop() if len(found) == 1 else None


def _astropy_scale(err_unit: str, unit: str) -> float | None:
    """The factor from ``err_unit`` to ``unit`` by astropy's unit conversion, or None."""
    from astropy import units as u  # noqa: PLC0415 - astropy: slow import

    try:
        return float(u.Unit(err_unit).to(u.Unit(unit)))
    except (ValueError, TypeError, u.UnitsError):
        return None


def _toml(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


@dataclass
class ZeroErrors:
    """What a scan of the error columns found: ``rows`` read (``complete``: the whole table),
    and per error column the rows whose error is exactly 0 and the smallest non-zero |error|
    (None when every value read was 0 or null)."""

    rows: int
    counts: dict[str, tuple[int, float | None]]
    complete: bool = True


@dataclass
class _Match:
    """The features found in a table's columns (value, noise kind, noise columns), the
    correlation columns, the id column and the columns used."""

    feats: list[tuple[ColumnInfo, str, list[ColumnInfo]]]
    corrs: list
    id_col: str | None
    used: set[str]


def _error_column(by_lower: dict[str, ColumnInfo], c: ColumnInfo) -> ColumnInfo | None:
    for pat in _ERROR_PATTERNS:
        e = _lookup(by_lower, pat.format(c.name))
        if e is not None and e.numeric:
            return e
    return None


def _match(columns: list[ColumnInfo], source: str) -> _Match:
    """Value/error pairs, flux-over-error magnitudes, correlations and the id column."""
    by_lower = {c.name.lower(): c for c in columns}
    numeric = [c for c in columns if c.numeric]
    id_col = guess_id_column(pa.schema([pa.field(c.name, c.type) for c in columns]))
    used: set[str] = {id_col.lower()} if id_col else set()
    feats: list[tuple[ColumnInfo, str, list[ColumnInfo]]] = []  # value, kind, noise columns
    for c in numeric:
        if c.name.lower() in used:
            continue
        err = _error_column(by_lower, c)
        if err is not None:
            feats.append((c, "error", [err]))
            used |= {c.name.lower(), err.name.lower()}
            continue
        low = c.name.lower()
        foe = _lookup(by_lower, c.name[:-4] + "_flux_over_error") if low.endswith("_mag") else None
        if foe is not None and foe.numeric:
            feats.append((c, "flux_over_error", [foe]))
            used |= {low, foe.name.lower()}
    if not feats:
        raise CatalogError(
            f"{source or 'table'}: no value/error column pairs found (X with e_X, X_error, "
            "X_err, sigma_X, ...); write the schema by hand (see README, Catalogue schemas)"
        )
    fnames = [v.name for v, _, _ in feats]
    corrs = []
    for c in numeric:
        if c.name.lower() in used:
            continue
        pair = _corr_pair(c.name, fnames)
        if pair is not None:
            corrs.append((pair, c))
            used.add(c.name.lower())
    corrs = _first_per_pair(corrs)
    used |= {c.name.lower() for _, c in corrs}
    return _Match(feats, corrs, id_col, used)


def error_columns(columns: list[ColumnInfo], source: str = "") -> list[str]:
    """The error columns (``error`` noise) a starter schema for these columns uses."""
    return [n[0].name for _, kind, n in _match(columns, source).feats if kind == "error"]


_HEADER = (
    "# Check and edit it before fitting; every key is documented in README.md",
    '# ("Catalogue schemas"). Features are the columns that have an error column;',
    "# units come from the table's metadata.",
    "#",
    "# Per feature you may add:",
    "#   min = ..., max = ...        physical range of the value (rows outside are bad)",
    "#   error_min/error_max = ...   range of the error column (in error_unit)",
    "#   error_floor = ...           noise floor added in quadrature (in error_unit); needed",
    "#                               when some errors are 0 ('not positive definite')",
    '#   error_divide_by_cos = "<dec feature>"  if the RA error is on alpha* = alpha cos(dec)',
    "#                               (Gaia, Hipparcos) and RA is a feature in deg",
)


def starter_schema(
    columns: list[ColumnInfo],
    name: str = "my_catalogue",
    source: str = "",
    zeros: ZeroErrors | None = None,
) -> str:
    """The text of a starter schema TOML for a table with these columns.

    zeros : what a scan of the error columns found (:func:`count_zero_errors`): an error column
        with zeros gets a commented ``error_floor`` proposal naming the count.

    Raises CatalogError when no value/error pair is found (nothing to fit).
    """
    m = _match(columns, source)
    out = [
        f"# xd-dask catalogue schema: a STARTER written by `xd-dask schema init` from {source}."
        if source
        else "# xd-dask catalogue schema: a STARTER written by `xd-dask schema init`.",
        *_HEADER,
    ]
    left = [c.name for c in columns if c.name.lower() not in m.used]
    if left:
        out += ["#", "# Columns not used (no error column found; add features by hand if wanted):"]
        out += _wrap(left, "#   ")
    out += ["", f"name = {_toml(name)}"]
    if m.id_col and m.id_col != ROW_INDEX:
        out.append(f"id_column = {_toml(m.id_col)}")
    elif m.id_col:
        out.append(f"id_column = {_toml(m.id_col)}   # the input's row number (added by ingest)")
    else:
        out.append('# id_column = "..."   # no integer id column found: ids are row numbers')
    out.append("nan_is_null = false   # true if NaN (not only null) marks a missing value")
    for value, kind, noise in m.feats:
        out += _feature_lines(value, kind, noise, zeros)
    for (a, b), c in m.corrs:
        out += ["", "[[correlation]]", f"features = {_toml([a, b])}", f"column = {_toml(c.name)}"]
    text = "\n".join(out) + "\n"
    _check(text, source)
    return text


def _feature_lines(
    value: ColumnInfo, kind: str, noise: list[ColumnInfo], zeros: ZeroErrors | None
) -> list[str]:
    """The ``[[feature]]`` table of one feature."""
    out = ["", "[[feature]]", f"name = {_toml(value.name)}"]
    if value.description:
        out[-1] += f"   # {value.description[:70]}"
    if value.unit:
        out.append(f"unit = {_toml(value.unit)}")
    if kind == "flux_over_error":
        out.append(f"flux_over_error = {_toml([noise[0].name])}")
        out.append("mag_floor = [0.0]   # zero-point uncertainty (mag), e.g. Riello+2021 for Gaia")
        return out
    err = noise[0]
    out.append(f"error = {_toml(err.name)}")
    if err.unit and err.unit != value.unit:
        out.append(f"error_unit = {_toml(err.unit)}")
        if value.unit and unit_scale(err.unit, value.unit) is None:
            scale = _astropy_scale(err.unit, value.unit)
            if scale is not None:
                out.append(f"error_scale = {_toml(scale)}   # {err.unit} -> {value.unit}")
            else:
                out.append(
                    f"# CHECK: cannot convert {err.unit!r} to {value.unit!r}: set "
                    "error_scale (error column -> feature unit)"
                )
    return out + _floor_lines(err.name, zeros)


def _floor_lines(err: str, zeros: ZeroErrors | None) -> list[str]:
    """A commented ``error_floor`` proposal when the scan found errors of 0 in ``err``."""
    if zeros is None or zeros.counts.get(err, (0, None))[0] == 0:
        return []
    n0, smallest = zeros.counts[err]
    of = f"{n0:,} of {zeros.rows:,} rows" + ("" if zeros.complete else " read")
    if smallest is None:
        return [
            f"# error_floor = ...   # every {err} read is 0 ({of}): set a floor in the",
            "#                     # error's unit, or a constant variance = ... instead of error",
        ]
    floor = float(f"{smallest / 2:.6g}")
    return [
        f"# error_floor = {floor!r}   # proposed: {of} have {err} = 0, which no fit can use",
        f"#     (a zero variance); {floor!r} is half the smallest non-zero {err} ({smallest:.6g},",
        "#     a rounding step?). Uncomment it, or fit with --on-bad drop to leave them out.",
    ]


def _first_per_pair(corrs: list) -> list:
    seen, out = set(), []
    for pair, c in corrs:
        key = frozenset(pair)
        if key not in seen:
            seen.add(key)
            out.append((pair, c))
    return out


def _wrap(names: list[str], prefix: str, width: int = 96) -> list[str]:
    lines, cur = [], prefix
    for n in names:
        if len(cur) + len(n) + 2 > width and cur != prefix:
            lines.append(cur.rstrip(", ").rstrip())
            cur = prefix
        cur += n + ", "
    lines.append(cur.rstrip(", ").rstrip())
    return lines


def _check(text: str, source: str) -> None:
    """The starter must load as written (so that editing starts from a valid schema)."""
    schema_from_dict(tomllib.loads(text), f"starter schema for {source or 'table'}")


def schema_init(
    table: str | os.PathLike,
    format: str = "auto",
    *,
    readme: str | os.PathLike | None = None,
    hdu: int | str | None = None,
    name: str | None = None,
    scan_rows: int = SCAN_ROWS,
) -> str:
    """The starter schema TOML text for a table file (see :func:`starter_schema`); the error
    columns of the first ``scan_rows`` rows are scanned for zeros (0: not scanned)."""
    cols = table_columns(table, format, readme=readme, hdu=hdu)
    stem = Path(table).name.split(".")[0] if not Path(table).is_dir() else Path(table).name
    label = name or "".join(ch if ch.isalnum() else "_" for ch in stem) or "my_catalogue"
    zeros = None
    if scan_rows > 0:
        errs = error_columns(cols, str(table))
        zeros = count_zero_errors(table, errs, format, readme=readme, hdu=hdu, max_rows=scan_rows)
    return starter_schema(cols, label, str(table), zeros)
