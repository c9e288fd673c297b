"""Tables to Parquet: Gaia bulk files (:func:`ingest`) and any table (:func:`ingest_table`).

Gaia bulk files (gzip ECSV, ``GaiaSource_XXXXXX-YYYYYY.csv.gz``): one output file per input
(``GaiaSource_XXXXXX-YYYYYY.parquet``) holding only the columns the schema needs, written in row
groups while the input is streamed (memory is bounded by the CSV block and the row-group size,
not by the file), atomically (a failed or interrupted conversion leaves no partial output).

ECSV (https://github.com/astropy/astropy-APEs/blob/main/APE6.rst): a YAML header, each line
prefixed by ``#``, declaring the delimiter and each column's name, datatype, unit and description,
then the column-name line and the data. Gaia writes nulls as empty fields, ``null`` (bulk files)
or ``nan`` (archive query results); all three become nulls, i.e. missing fields for the reader.

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

import bz2
import contextlib
import gzip
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from xd_dask.io.reader import CatalogError, require_columns
from xd_dask.io.schema import CatalogSchema, load_schema
from xd_dask.io.tables import (
    ROW_INDEX,
    TABLE_SUFFIXES,
    detect_format,
    guess_id_column,
    open_binary,
    open_table,
    refuse_bom,
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

#: Strings read as nulls.
NULL_VALUES = ["", "null", "NULL", "nan", "NaN", "NAN"]
_SUFFIXES = (".csv.gz", ".ecsv.gz", ".csv.bz2", ".ecsv.bz2", ".csv", ".ecsv")
_ECSV_TYPES = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float32(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
}


def _open(path: Path) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def output_name(path: str | os.PathLike) -> str:
    """GaiaSource_000000-003111.csv.gz -> GaiaSource_000000-003111.parquet."""
    name = Path(path).name
    for suf in _SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)] + ".parquet"
    return Path(name).stem + ".parquet"


def read_ecsv_header(fh: BinaryIO, path: str) -> tuple[dict[str, Any], list[str]]:
    """Parse the ECSV header of an open file; leave ``fh`` at the first data line.

    Returns (header dict, column names from the column-name line).
    """
    first = fh.readline()
    refuse_bom(path, first)
    if not first.startswith(b"# %ECSV"):
        raise CatalogError(f"{path}: not an ECSV file (no '# %ECSV' first line)", path=path)
    lines = []
    while True:
        line = fh.readline()
        if not line:
            raise CatalogError(f"{path}: ECSV header without data (truncated file?)", path=path)
        if not line.startswith(b"#"):
            names_line = line
            break
        text = line[1:].decode("utf-8")
        lines.append(text[1:] if text.startswith(" ") else text)
    if lines and lines[0].strip() == "---":
        lines = lines[1:]
    try:
        header = yaml.safe_load("".join(lines)) or {}
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: malformed ECSV YAML header: {exc}", path=path) from None
    if not isinstance(header, dict) or "datatype" not in header:
        raise CatalogError(f"{path}: ECSV header has no 'datatype' list", path=path)
    delim = header.get("delimiter", " ")
    names = [n.strip().strip('"') for n in names_line.decode("utf-8").rstrip("\r\n").split(delim)]
    declared = [c.get("name") for c in header["datatype"]]
    if names != declared:
        raise CatalogError(
            f"{path}: ECSV column-name line does not match the header's datatype list", path=path
        )
    return header, names


def ecsv_batches(
    fh: BinaryIO, path_s: str, columns: list[str] | None = None, block_size: int = 8 << 20
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Stream an ECSV file open at its start: (output schema, record batches).

    ``columns`` are the columns to keep (as spelled in the file), or None for every column
    (datatypes outside the simple ECSV types, e.g. multidimensional columns, are kept as strings).
    The schema's fields carry the header's ``unit`` and ``description`` as metadata; each batch
    must be cast to it (``pa.Table.from_batches([b]).cast(schema)``).

    float32 (and float16) columns are parsed as float64 and narrowed once checked: a finite value
    beyond float32's range (|x| > 3.4e38) raises CatalogError naming the file, the row and the
    column instead of being stored as inf.
    """
    header, names = read_ecsv_header(fh, path_s)
    info = {c["name"]: c for c in header["datatype"]}
    wanted = names if columns is None else columns
    types, fields = {}, []
    for name in wanted:
        dt = str(info[name].get("datatype", "string"))
        if "subtype" in info[name] or dt not in _ECSV_TYPES:
            if columns is not None:
                raise CatalogError(
                    f"{path_s}: column {name!r} has unsupported ECSV datatype {dt!r}",
                    path=path_s,
                    column=name,
                )
            dt = "string"
        types[name] = _ECSV_TYPES[dt]
        meta = {k: str(info[name][k]) for k in ("unit", "description") if k in info[name]}
        fields.append(pa.field(name, types[name], metadata=meta or None))
    out_schema = pa.schema(fields)
    narrow = [n for n in wanted if types[n] == pa.float32()]
    reader = pacsv.open_csv(
        fh,
        read_options=pacsv.ReadOptions(column_names=names, block_size=block_size),
        parse_options=pacsv.ParseOptions(delimiter=header.get("delimiter", " ")),
        convert_options=pacsv.ConvertOptions(
            include_columns=wanted,
            column_types={n: pa.float64() if n in narrow else t for n, t in types.items()},
            null_values=NULL_VALUES,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    if not narrow:
        return out_schema, iter(reader)
    return out_schema, _narrowed(reader, narrow, path_s, _plain(out_schema))


def _narrowed(
    batches: Iterator[pa.RecordBatch], narrow: list[str], path_s: str, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    """``batches`` with the float64 columns ``narrow`` cast to float32 (``schema``), after
    checking that no finite value overflows float32 (CatalogError naming file, row, column)."""
    biggest = float(np.finfo(np.float32).max)
    rows = 0
    for batch in batches:
        for name in narrow:
            values = batch.column(name).to_numpy(zero_copy_only=False)  # null -> NaN
            bad = np.flatnonzero(np.isfinite(values) & (np.abs(values) > biggest))
            if bad.size:
                row = rows + int(bad[0])
                raise CatalogError(
                    f"{path_s}: row {row}: column {name!r} holds {values[bad[0]]:g}, beyond the "
                    f"range of float32 (|x| <= {biggest:.4g}) that the ECSV header declares for "
                    "it; it would be stored as inf. Declare the column float64",
                    path=path_s,
                    row=row,
                    column=name,
                )
        rows += batch.num_rows
        arrays = [batch.column(f.name).cast(f.type) for f in schema]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


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
        with _open(src) as fh:
            header_pos = fh.tell()
            _, names = read_ecsv_header(fh, path_s)
            found = require_columns(path_s, names, schema)
            wanted = [found[c] for c in schema.required_columns()]
            fh.seek(header_pos)
            out_schema, batches = ecsv_batches(fh, path_s, wanted, block_size)
            out_schema = out_schema.with_metadata({b"source": src.name.encode()})
            n_rows = 0
            with atomic_path(target, suffix=".parquet") as tmp:
                with pq.ParquetWriter(
                    tmp, out_schema, compression=compression, use_dictionary=False
                ) as writer:
                    pending: list[pa.RecordBatch] = []
                    n_pending = 0
                    for batch in batches:
                        pending.append(batch)
                        n_pending += batch.num_rows
                        if n_pending >= row_group_size:
                            table = pa.Table.from_batches(pending).cast(out_schema)
                            writer.write_table(table, row_group_size=row_group_size)
                            n_rows += table.num_rows
                            pending, n_pending = [], 0
                    if pending or n_rows == 0:
                        table = pa.Table.from_batches(pending, schema=_plain(out_schema))
                        writer.write_table(table.cast(out_schema), row_group_size=row_group_size)
                        n_rows += table.num_rows
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


def _plain(schema: pa.Schema) -> pa.Schema:
    """``schema`` without field metadata (the type of the batches the CSV reader yields)."""
    return pa.schema([pa.field(f.name, f.type) for f in schema])


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
class _Parts:
    """Parquet parts ``<stem>-NNNNN.parquet`` of at most ``rows_per_file`` rows in row groups of
    ``row_group_size`` rows (the last of a part smaller), each written to a temporary file
    (:func:`xd_dask.utils.atomic_path`) renamed into place only when every part has been written
    (:meth:`commit`); :meth:`abort` removes them."""

    def __init__(
        self, out_dir: Path, stem: str, rows_per_file: int, row_group_size: int, compression: str
    ) -> None:
        self.out_dir, self.stem = out_dir, stem
        self.rows_per_file, self.row_group_size = rows_per_file, row_group_size
        self.compression = None if compression == "none" else compression
        self.stack = contextlib.ExitStack()
        self.paths: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.pending: list[pa.Table] = []  # rows of the current part not yet in a row group
        self.in_part = 0
        self.n_rows = 0

    def _flush(self, whole: bool) -> None:
        """Write the pending rows as full row groups (and, if ``whole``, the remainder)."""
        n = sum(t.num_rows for t in self.pending)
        k = n if whole else n - n % self.row_group_size
        if k == 0 or self.writer is None:
            return
        rows = pa.concat_tables(self.pending)
        self.writer.write_table(rows.slice(0, k), row_group_size=self.row_group_size)
        self.pending = [rows.slice(k)] if k < n else []

    def _new_part(self, schema: pa.Schema) -> None:
        if self.writer is not None:
            self._flush(whole=True)
            self.writer.close()
        target = self.out_dir / f"{self.stem}-{len(self.paths):05d}.parquet"
        tmp = self.stack.enter_context(atomic_path(target, suffix=".parquet"))
        self.writer = pq.ParquetWriter(tmp, schema, compression=self.compression)
        self.paths.append(target)
        self.schema, self.in_part = schema, 0

    def write(self, table: pa.Table) -> None:
        if self.schema is not None and not table.schema.equals(self.schema):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                log.info("%s: column types change at row %d: new part", self.stem, self.n_rows)
                self._new_part(table.schema)
        while table.num_rows:
            if self.writer is None or self.in_part >= self.rows_per_file:
                self._new_part(self.schema or table.schema)
            take = min(table.num_rows, self.rows_per_file - self.in_part)
            self.pending.append(table.slice(0, take))
            self._flush(whole=False)
            table = table.slice(take)
            self.in_part += take
            self.n_rows += take

    def commit(self) -> list[Path]:
        if self.writer is not None:
            self._flush(whole=True)
            self.writer.close()
        self.stack.close()  # renames every temporary part onto its name
        return self.paths

    def abort(self, exc: BaseException) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.stack.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary parts


def _existing_parts(out_dir: Path, stem: str) -> list[Path]:
    pattern = re.compile(rf"{re.escape(stem)}-\d{{5}}\.parquet")
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))


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
    old = _existing_parts(out, stem)
    if old and not overwrite:
        raise FileExistsError(
            f"{old[0]} exists; pass overwrite=True (--overwrite) to replace {stem}-*.parquet"
        )
    out.mkdir(parents=True, exist_ok=True)
    parts = _Parts(out, stem, rows_per_file, row_group_size, compression)
    path_s = str(src.path)
    id_name: str | None = id_column
    keep: list[str] | None = None
    first = True
    try:
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
        written = parts.commit()
    except BaseException as exc:
        parts.abort(exc)
        if isinstance(exc, (CatalogError, FileExistsError, MemoryError, KeyboardInterrupt)):
            raise
        readable = (OSError, EOFError, zlib.error, ValueError, TypeError, IndexError, KeyError)
        if isinstance(exc, (*readable, pa.ArrowException)):
            raise CatalogError(
                f"{path_s}: cannot read as {src.format}: {' '.join(str(exc).split())}",
                path=path_s,
            ) from None
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
        old = _existing_parts(out, table_stem(f))
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


def find_readme(table: Path) -> Path | None:
    """The CDS ReadMe of a fixed-width table: one beside it that describes it, else one
    packaged with xd-dask (:mod:`xd_dask.data`: hip2.dat of Hipparcos I/311), else None."""
    from xd_dask.data import packaged_readme  # noqa: PLC0415
    from xd_dask.io.tables import _find_readme  # noqa: PLC0415 - the lookup beside the table

    beside = _find_readme(table)
    if beside is not None:
        return beside
    packaged = packaged_readme(table)
    if packaged is not None:
        log.info(
            "%s: no ReadMe beside it; using the ReadMe packaged with xd-dask for %s (%s); give "
            "--readme if this file is another table",
            table,
            table.name,
            packaged.name,
        )
    return packaged


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
