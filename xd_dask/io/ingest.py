"""Tables to Parquet: Gaia bulk files (:func:`ingest`) and any table (:func:`ingest_table`).

Gaia bulk files (gzip ECSV, ``GaiaSource_XXXXXX-YYYYYY.csv.gz``): one output file per input
(``GaiaSource_XXXXXX-YYYYYY.parquet``) holding only the columns the schema needs, written in row
groups while the input is streamed (memory is bounded by the CSV block and the row-group size,
not by the file), atomically (a failed or interrupted conversion leaves no partial output).

ECSV is read by :mod:`xd_dask.io.ecsv` (Gaia's nulls, empty, ``null`` or ``nan``, become
missing fields for the reader).

Any table (FITS, VOTable, CSV, ECSV, CDS; read by :mod:`xd_dask.io.tables`):
``<out_dir>/<stem>-00000.parquet``, ``-00001``, ... of at most ``rows_per_file`` rows each, in row
groups of ``row_group_size`` rows, with every column (or those asked for), units and descriptions
as field metadata. An id column is always kept: the one asked for, or a guessed one (an integer
column named like ``source_id``, ``HIP``, ``id``, ``*_id``), else a new ``row_index`` column (the
row number in the input, from 0). A CSV chunk whose guessed types differ from the previous one's
starts a new part. The parts appear only when all are written: a failure leaves no output.
:func:`ingest_inputs` is ``xd-dask ingest``: Gaia ECSV files one way, other tables the other.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.io.ecsv import NULL_VALUES, ecsv_batches, plain_schema, read_ecsv_header
from xd_dask.io.parts import ParquetParts, existing_parts
from xd_dask.io.reader import CatalogError, require_columns
from xd_dask.io.schema import CatalogSchema, load_schema
from xd_dask.io.tables import (
    ROW_INDEX,
    TABLE_SUFFIXES,
    TableSource,
    detect_format,
    find_readme,
    guess_id_column,
    open_binary,
    open_table,
    strip_compression,
    table_stem,
)
from xd_dask.utils import atomic_path, get_logger

__all__ = [
    "find_readme",
    "ingest",
    "ingest_file",
    "ingest_inputs",
    "ingest_table",
    "ecsv_batches",
    "read_ecsv_header",
    "output_name",
    "NULL_VALUES",
]

log = get_logger(__name__)

_SUFFIXES = (".csv.gz", ".ecsv.gz", ".csv.bz2", ".ecsv.bz2", ".csv", ".ecsv")


def output_name(path: str | os.PathLike) -> str:
    """GaiaSource_000000-003111.csv.gz -> GaiaSource_000000-003111.parquet."""
    name = Path(path).name
    for suf in _SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)] + ".parquet"
    return Path(name).stem + ".parquet"


def ingest_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    schema: CatalogSchema | str | None = None,
    *,
    overwrite: bool = False,
    row_group_size: int = 1 << 17,
    block_size: int = 8 << 20,
    compression: str = "snappy",
) -> Path:
    """Convert one (gzip) ECSV file to Parquet with only the schema's columns; returns the path."""
    schema = load_schema(schema)
    src = Path(path)
    path_s = str(src)
    target = Path(out_dir) / output_name(src)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    if not src.is_file():
        raise CatalogError(f"{path_s}: no such file", path=path_s)
    try:
        with open_binary(src) as fh:
            header_pos = fh.tell()
            _, names = read_ecsv_header(fh, path_s)
            found = require_columns(path_s, names, schema)
            wanted = [found[c] for c in schema.required_columns()]
            fh.seek(header_pos)
            out_schema, batches = ecsv_batches(fh, path_s, wanted, block_size)
            out_schema = out_schema.with_metadata({b"source": src.name.encode()})
            with atomic_path(target, suffix=".parquet") as tmp:
                n_rows = _write_row_groups(tmp, out_schema, batches, row_group_size, compression)
                os.chmod(tmp, 0o644)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise
        raise CatalogError(
            f"{path_s}: cannot read (truncated or corrupt compressed file?): {exc}", path=path_s
        ) from None
    except pa.ArrowInvalid as exc:
        raise CatalogError(f"{path_s}: cannot parse ECSV data: {exc}", path=path_s) from None
    log.info("ingest: %s -> %s (%d rows, %d columns)", src.name, target, n_rows, len(wanted))
    return target


def _write_row_groups(
    path: Path,
    schema: pa.Schema,
    batches: Iterator[pa.RecordBatch],
    row_group_size: int,
    compression: str,
) -> int:
    """Write ``batches`` (cast to ``schema``) to ``path`` in row groups; returns the rows."""
    n_rows = 0
    with pq.ParquetWriter(path, schema, compression=compression, use_dictionary=False) as writer:
        pending: list[pa.RecordBatch] = []
        n_pending = 0
        for batch in batches:
            pending.append(batch)
            n_pending += batch.num_rows
            if n_pending >= row_group_size:
                table = pa.Table.from_batches(pending).cast(schema)
                writer.write_table(table, row_group_size=row_group_size)
                n_rows += table.num_rows
                pending, n_pending = [], 0
        if pending or n_rows == 0:
            table = pa.Table.from_batches(pending, schema=plain_schema(schema))
            writer.write_table(table.cast(schema), row_group_size=row_group_size)
            n_rows += table.num_rows
    return n_rows


def _expand(inputs: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.name.lower().endswith(_SUFFIXES))
            if not found:
                raise CatalogError(f"{p}: no .csv.gz/.ecsv files in this directory", path=str(p))
            files += found
        else:
            files.append(p)
    return files


def ingest(
    inputs: Iterable[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    schema: CatalogSchema | str | None = None,
    *,
    overwrite: bool = False,
    skip_existing: bool = False,
    row_group_size: int = 1 << 17,
    compression: str = "snappy",
) -> list[Path]:
    """Convert Gaia bulk ECSV files (or directories of them) to Parquet, one file per input.

    Parameters
    ----------
    inputs : files and/or directories (``*.csv.gz``, ``*.ecsv``, ``*.ecsv.gz``, ``*.csv``).
    out_dir : output directory (created).
    schema : which columns to keep (default: the Gaia DR3 schema's).
    overwrite : replace existing outputs; skip_existing : leave them and move on.
    row_group_size, compression : Parquet layout.

    Returns
    -------
    Paths of the Parquet files written (or skipped because they existed).
    """
    schema = load_schema(schema)
    files = _expand(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [output_name(f) for f in files]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise CatalogError(f"several inputs would write the same output {sorted(dupes)[0]}")
    written = []
    for f in files:
        target = out / output_name(f)
        if target.exists() and skip_existing and not overwrite:
            log.info("ingest: %s exists, skipped", target)
            written.append(target)
            continue
        written.append(
            ingest_file(
                f,
                out,
                schema,
                overwrite=overwrite,
                row_group_size=row_group_size,
                compression=compression,
            )
        )
    return written


# --------------------------------------------------------------------------- any table
def _select(table: pa.Table, columns: Sequence[str] | None, path: str) -> pa.Table:
    if columns is None:
        return table
    by_lower = {n.lower(): n for n in table.column_names}
    missing = [c for c in columns if c.lower() not in by_lower]
    if missing:
        raise CatalogError(
            f"{path}: missing column(s) {missing} (the table has {table.column_names})",
            path=path,
            column=missing[0],
        )
    return table.select([by_lower[c.lower()] for c in columns])


def ingest_table(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "auto",
    readme: str | os.PathLike | None = None,
    hdu: int | str | None = None,
    columns: Sequence[str] | None = None,
    id_column: str | None = None,
    rows_per_file: int = 1 << 20,
    row_group_size: int = 1 << 17,
    chunk_rows: int = 100_000,
    chunk_bytes: int = 32 << 20,
    compression: str = "snappy",
    overwrite: bool = False,
) -> list[Path]:
    """Convert one table (FITS, VOTable, CSV, ECSV, CDS) to partitioned Parquet.

    Parameters
    ----------
    path : the table file.
    out_dir : output directory (created); parts are ``<stem>-NNNNN.parquet``.
    format : "auto" (from the content and the name) or one of :data:`FORMATS`.
    readme : CDS ReadMe (default: a ``ReadMe`` beside the file that describes it).
    hdu : FITS HDU (default: the first table HDU).
    columns : columns to keep (matched case-insensitively); None keeps every 1-d column.
    id_column : the row-id column (kept whatever ``columns`` says); None guesses one
        (:func:`guess_id_column`), and without one adds ``row_index`` (0-based input row).
    rows_per_file, row_group_size : Parquet layout.
    chunk_rows : rows converted at a time (memory bound of the streamed formats).
    chunk_bytes : bytes of CSV text parsed at a time (astropy's chunk size).
    compression : Parquet codec ("snappy", "zstd", ..., "none").
    overwrite : replace existing parts of the same stem (else FileExistsError).

    Returns
    -------
    The Parquet parts written, in row order.

    Raises
    ------
    CatalogError for an unreadable or malformed table or a missing column; FileExistsError.
    """
    src = open_table(path, format, readme=readme, hdu=hdu)
    out = Path(out_dir)
    stem = table_stem(src.path)
    old = existing_parts(out, stem)
    if old and not overwrite:
        raise FileExistsError(
            f"{old[0]} exists; pass overwrite=True (--overwrite) to replace {stem}-*.parquet"
        )
    out.mkdir(parents=True, exist_ok=True)
    parts = ParquetParts(out, stem, rows_per_file, row_group_size, compression)
    path_s = str(src.path)
    try:
        id_name = _copy_batches(src, parts, columns, id_column, chunk_rows, chunk_bytes)
        written = parts.commit()
    except BaseException as exc:
        parts.abort(exc)
        if _is_unreadable(exc):
            raise _as_catalog_error(exc, src) from None
        raise
    if not written:
        raise CatalogError(f"{path_s}: the table has no rows", path=path_s)
    for stale in old:
        if stale not in written:
            stale.unlink()
    if src.skipped:
        log.warning("%s: multidimensional column(s) left out: %s", path_s, src.skipped)
    log.info(
        "ingest: %s (%s, %s) -> %d rows in %d file(s) %s-*.parquet, id column %s",
        src.path.name,
        src.format,
        "streamed" if src.streamed else "read whole",
        parts.n_rows,
        len(written),
        out / stem,
        id_name or ROW_INDEX,
    )
    return written


def _copy_batches(
    src: TableSource,
    parts: ParquetParts,
    columns: Sequence[str] | None,
    id_column: str | None,
    chunk_rows: int,
    chunk_bytes: int,
) -> str | None:
    """Write the table's batches to ``parts``: the ``columns`` asked for and the id column
    (``id_column``, a guessed one, or a new ``row_index``). Returns the id column's name, or
    None for ``row_index``."""
    path_s = str(src.path)
    id_name: str | None = id_column
    keep: list[str] | None = None
    first = True
    for table in src.batches(chunk_rows=chunk_rows, chunk_bytes=chunk_bytes):
        if first:
            first = False
            if id_name is None:
                id_name = guess_id_column(table.schema)
            if columns is not None:
                keep = list(columns)
                if id_name and id_name.lower() not in {c.lower() for c in keep}:
                    keep.insert(0, id_name)
            if id_name is not None:
                _select(table, [id_name], path_s)  # the id column must exist
        table = _select(table, keep, path_s)
        if id_name is None:
            idx = pa.array(np.arange(parts.n_rows, parts.n_rows + table.num_rows))
            table = table.add_column(0, ROW_INDEX, idx)
        parts.write(table)
    return id_name


_UNREADABLE = (OSError, EOFError, zlib.error, ValueError, TypeError, IndexError, KeyError)


def _is_unreadable(exc: BaseException) -> bool:
    """Whether ``exc``, raised while converting a table, means the file cannot be read as its
    format (then it becomes a CatalogError); errors of ours and interruptions pass through."""
    if isinstance(exc, (CatalogError, FileExistsError, MemoryError, KeyboardInterrupt)):
        return False
    return isinstance(exc, (*_UNREADABLE, pa.ArrowException))


def _as_catalog_error(exc: BaseException, src: TableSource) -> CatalogError:
    path_s = str(src.path)
    return CatalogError(
        f"{path_s}: cannot read as {src.format}: {' '.join(str(exc).split())}", path=path_s
    )


def _gaia_ecsv(path: Path, schema: Any) -> bool:
    """Whether an ECSV file has every column of ``schema`` (default Gaia DR3)."""
    try:
        with open_binary(path) as fh:
            _, names = read_ecsv_header(fh, str(path))
    except (EOFError, zlib.error, OSError) as exc:
        raise CatalogError(
            f"{path}: cannot read (truncated or corrupt compressed file?): {exc}", path=str(path)
        ) from None
    try:
        require_columns(str(path), names, load_schema(schema))
    except CatalogError:
        return False
    return True


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, and the table files (by suffix) of directories, in order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.is_dir():
            files.append(p)
            continue
        found = sorted(
            f
            for f in p.iterdir()
            if f.is_file()
            and TABLE_SUFFIXES.get(Path(strip_compression(f.name)).suffix.lower(), "parquet")
            != "parquet"
            and not f.name.lower().startswith("readme")
        )
        if not found:
            raise CatalogError(f"{p}: no table files in this directory", path=str(p))
        files += found
    return files


def ingest_inputs(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    schema: Any = None,
    format: str = "auto",
    skip_existing: bool = False,
    overwrite: bool = False,
    row_group_size: int = 1 << 17,
    compression: str = "snappy",
    **table_options: Any,
) -> list[Path]:
    """``xd-dask ingest``: each input file (or directory of them) to Parquet in ``out_dir``.

    ECSV files with the schema's columns (default: the Gaia DR3 schema; Gaia bulk files and
    archive results) go through :func:`xd_dask.io.ingest.ingest` (one Parquet per input, only the
    schema's columns). Every other table goes through :func:`ingest_table` (partitioned Parquet;
    with ``schema`` only its columns, and its id column), ``table_options`` passed on.

    Returns the Parquet files written (or skipped because they existed, with ``skip_existing``).
    """
    sch = None if schema is None else load_schema(schema)
    out = Path(out_dir)
    written: list[Path] = []
    for f in expand_inputs(inputs):
        fmt = detect_format(f) if format == "auto" else format
        if fmt == "ecsv" and _gaia_ecsv(f, sch):
            target = out / output_name(f)
            if skip_existing and target.exists() and not overwrite:
                written.append(target)
                continue
            written += ingest(
                f,
                out,
                sch,
                overwrite=overwrite,
                row_group_size=row_group_size,
                compression=compression,
            )
            continue
        old = existing_parts(out, table_stem(f))
        if skip_existing and old and not overwrite:
            log.info("ingest: %s-*.parquet exist, skipped", out / table_stem(f))
            written += old
            continue
        opts = dict(table_options)
        if sch is not None:
            opts.setdefault("columns", sch.required_columns())
            opts.setdefault("id_column", sch.id_column)
        if fmt == "cds" and opts.get("readme") is None:
            opts["readme"] = find_readme(f)
        try:
            written += ingest_table(
                f,
                out,
                format=fmt,
                overwrite=overwrite,
                row_group_size=row_group_size,
                compression=compression,
                **opts,
            )
        except CatalogError as exc:
            raise _with_readme_hint(exc, f, fmt, opts.get("readme")) from None
    return written


def _with_readme_hint(
    exc: CatalogError, table: Path, fmt: str, readme: Path | None
) -> CatalogError:
    """A CDS table read without a ReadMe fails in astropy's words; say what to give."""
    if fmt != "cds" or readme is not None:
        return exc
    return CatalogError(
        f"{exc} -- {table.name} looks like a CDS fixed-width table, whose columns are described "
        "by a separate ReadMe, and none was found (beside the file, or packaged with xd-dask): "
        "give it with --readme README (a VizieR catalogue's ReadMe is at "
        "https://cdsarc.cds.unistra.fr/ftp/<catalogue>/ReadMe), or --format if it is not CDS",
        path=exc.path,
        row=exc.row,
        column=exc.column,
        reason=exc.reason,
    )
