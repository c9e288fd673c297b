"""ECSV tables (https://github.com/astropy/astropy-APEs/blob/main/APE6.rst), streamed.

A YAML header, each line prefixed by ``#``, declares the delimiter and each column's name,
datatype, unit and description; then come the column-name line and the data, which pyarrow's CSV
reader parses in blocks. Gaia writes nulls as empty fields, ``null`` (bulk files) or ``nan``
(archive query results); all three become nulls, i.e. missing fields for the reader. Used by
:func:`xd_dask.io.ingest.ingest` (Gaia bulk files) and :class:`xd_dask.io.tables.TableSource`
(any ECSV table).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import yaml

from xd_dask.io.reader import CatalogError

__all__ = ["BOM", "NULL_VALUES", "ecsv_batches", "plain_schema", "read_ecsv_header", "refuse_bom"]

#: Strings read as nulls.
NULL_VALUES = ["", "null", "NULL", "nan", "NaN", "NAN"]
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


#: The UTF-8 byte-order mark.
BOM = b"\xef\xbb\xbf"


def refuse_bom(path: str, head: bytes) -> None:
    """CatalogError when a text table starts with a UTF-8 byte-order mark (``head``: its first
    bytes), which the readers would glue to the first column's name."""
    if head.startswith(BOM):
        raise CatalogError(
            f"{path}: starts with a UTF-8 byte-order mark (bytes EF BB BF, as some spreadsheet "
            "programs write), which would become part of the first column's name; save it "
            f"without one (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' {path}`)",
            path=path,
        )


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
    return out_schema, _narrowed(reader, narrow, path_s, plain_schema(out_schema))


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


def plain_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` without field metadata (the type of the batches the CSV reader yields)."""
    return pa.schema([pa.field(f.name, f.type) for f in schema])
