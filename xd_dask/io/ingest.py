"""Convert Gaia bulk files (gzip ECSV, ``GaiaSource_XXXXXX-YYYYYY.csv.gz``) to Parquet.

One output file per input (``GaiaSource_XXXXXX-YYYYYY.parquet``) holding only the columns the
schema needs, written in row groups while the input is streamed (memory is bounded by the CSV
block and the row-group size, not by the file), atomically (a failed or interrupted conversion
leaves no partial output).

ECSV (https://github.com/astropy/astropy-APEs/blob/main/APE6.rst): a YAML header, each line
prefixed by ``#``, declaring the delimiter and each column's name, datatype, unit and description,
then the column-name line and the data. Gaia writes nulls as empty fields, ``null`` (bulk files)
or ``nan`` (archive query results); all three become nulls, i.e. missing fields for the reader.
"""

from __future__ import annotations

import bz2
import gzip
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from xd_dask.io.reader import CatalogError, require_columns
from xd_dask.io.schema import CatalogSchema, load_schema
from xd_dask.utils import atomic_path, get_logger

__all__ = [
    "ingest",
    "ingest_file",
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
    reader = pacsv.open_csv(
        fh,
        read_options=pacsv.ReadOptions(column_names=names, block_size=block_size),
        parse_options=pacsv.ParseOptions(delimiter=header.get("delimiter", " ")),
        convert_options=pacsv.ConvertOptions(
            include_columns=wanted,
            column_types=types,
            null_values=NULL_VALUES,
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    return out_schema, iter(reader)


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
