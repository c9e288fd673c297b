"""Any table in: FITS, VOTable, CSV, ECSV and CDS fixed-width tables -> partitioned Parquet.

Tables are read through astropy (``astropy.io.fits``, ``astropy.io.votable``,
``astropy.io.ascii``), the field's standard readers, so units, descriptions, null conventions
(FITS TNULL and NaN, VOTable masks, empty CSV fields, CDS blank fields) and CDS ReadMe files mean
what they mean elsewhere. Streaming, per format:

========  ==============================================================================
format    how it is read
========  ==============================================================================
csv       streamed: astropy's fast CSV reader in chunks of ``chunk_bytes``
ecsv      streamed: the ECSV header (units, types) then pyarrow's CSV reader in blocks
fits      streamed: the first table HDU (or ``hdu``) memory-mapped, converted ``chunk_rows``
          rows at a time (a gzipped FITS file is decompressed whole by astropy)
cds       streamed with a separate ReadMe (given, or ``ReadMe`` beside the file): the ReadMe
          parsed by astropy, the data file in runs of ``chunk_rows`` lines converted by a
          compiled fixed-width parser equal to astropy's reader (:mod:`xd_dask.io.cds`; a run
          it cannot convert exactly is read by astropy); a single-file CDS/MRT table (header
          and data together) is read whole by astropy
votable   read whole (astropy parses the XML document at once)
========  ==============================================================================

Output: ``<out_dir>/<stem>-00000.parquet``, ``-00001``, ... of at most ``rows_per_file`` rows
each, in row groups of ``row_group_size`` rows; columns keep their names, types and (as field
metadata) ``unit`` and ``description``. Float NaN becomes null (FITS and VOTable use NaN as the
float null; CSV "nan" means missing too), so a missing value is a missing field for the reader.
Multidimensional columns are skipped (logged). An id column is always kept: the one asked for, or
a guessed one (an integer column named like ``source_id``, ``HIP``, ``id``, ``*_id``), else a new
``row_index`` column (row number in the input, from 0). Plain CSV declares no types: they are
astropy's guess per chunk, and a chunk whose types differ from the previous one's starts a new
part file. The parts are written atomically: a failure leaves no output of this input.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import itertools
import os
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.io.reader import CatalogError
from xd_dask.utils import atomic_path, get_logger

__all__ = [
    "FORMATS",
    "TableSource",
    "detect_format",
    "guess_id_column",
    "ingest_table",
    "open_table",
]

log = get_logger(__name__)

FORMATS = ("csv", "ecsv", "fits", "votable", "cds")
_COMPRESSED = (".gz", ".bz2")
_BY_SUFFIX = {
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".fz": "fits",
    ".vot": "votable",
    ".votable": "votable",
    ".xml": "votable",
    ".ecsv": "ecsv",
    ".csv": "csv",
    ".dat": "cds",
    ".mrt": "cds",
    ".txt": "cds",
    ".parquet": "parquet",
}
#: Names (lower case) taken for an id column when the input has an integer column so named.
ID_NAMES = ("source_id", "sourceid", "objid", "obj_id", "object_id", "id", "hip", "tyc", "recno")
ROW_INDEX = "row_index"


def _strip_compression(name: str) -> str:
    low = name.lower()
    for suf in _COMPRESSED:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def table_stem(path: str | os.PathLike) -> str:
    """hip2.dat -> hip2; sources.fits.gz -> sources."""
    return Path(_strip_compression(Path(path).name)).stem


def _open_binary(path: Path):
    low = path.name.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def detect_format(path: str | os.PathLike) -> str:
    """The format of a table file, from its first bytes and its name (see :data:`FORMATS`)."""
    p = Path(path)
    try:
        with _open_binary(p) as fh:
            head = fh.read(512)
    except OSError as exc:
        raise CatalogError(f"{p}: cannot read: {exc}", path=str(p)) from None
    if head.startswith(b"SIMPLE  ="):
        return "fits"
    if head.startswith(b"# %ECSV"):
        return "ecsv"
    if head.lstrip().startswith((b"<?xml", b"<VOTABLE")):
        return "votable"
    if head.startswith(b"PAR1"):
        return "parquet"
    fmt = _BY_SUFFIX.get(Path(_strip_compression(p.name)).suffix.lower())
    if fmt is None:
        raise CatalogError(
            f"{p}: cannot tell the table format from the name or the content; give it "
            f"(--format {'|'.join(FORMATS)})",
            path=str(p),
        )
    return fmt


# --------------------------------------------------------------------------- astropy -> Arrow
def _unit_text(unit: Any) -> str | None:
    if unit is None:
        return None
    text = unit if isinstance(unit, str) else unit.to_string()
    return text or None


def _field_meta(unit: Any, description: Any) -> dict[str, str] | None:
    meta = {}
    if (u := _unit_text(unit)) is not None:
        meta["unit"] = u
    if description:
        meta["description"] = str(description)
    return meta or None


def _arrow_column(col: Any) -> pa.Array | None:
    """One astropy (masked) column as an Arrow array; None for a multidimensional column."""
    data = np.ma.getdata(col)
    if data.ndim != 1:
        return None
    mask = np.ma.getmaskarray(col) if np.ma.is_masked(col) else None
    kind = data.dtype.kind
    if kind == "f":
        nan = np.isnan(data)
        if nan.any():
            mask = nan if mask is None else (mask | nan)
    if kind == "S":
        data = np.char.decode(data, "ascii", errors="replace")
    elif kind in "biuf" and not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if kind == "O":
        return pa.array(list(data), mask=mask)
    return pa.array(data, mask=mask)


def astropy_to_arrow(table: Any, skipped: set[str] | None = None) -> pa.Table:
    """An astropy Table as an Arrow table (units and descriptions as field metadata).

    Multidimensional columns are left out (their names are added to ``skipped``).
    """
    arrays, fields = [], []
    for name in table.colnames:
        col = table[name]
        arr = _arrow_column(col)
        if arr is None:
            if skipped is not None:
                skipped.add(name)
            continue
        arrays.append(arr)
        meta = _field_meta(getattr(col, "unit", None), getattr(col, "description", None))
        fields.append(pa.field(name, arr.type, metadata=meta))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --------------------------------------------------------------------------- sources
@dataclass
class TableSource:
    """A table file and how to read it.

    path : the table (possibly gzip/bzip2-compressed for text formats).
    format : one of :data:`FORMATS` (``open_table`` detects it).
    readme : CDS ReadMe describing ``path`` (None: single-file CDS/MRT table).
    hdu : FITS HDU index or name (None: the first table HDU).
    streamed : whether :meth:`batches` reads the file in pieces (False: read whole).
    """

    path: Path
    format: str
    readme: Path | None = None
    hdu: int | str | None = None

    @property
    def streamed(self) -> bool:
        return self.format in ("csv", "ecsv", "fits") or (
            self.format == "cds" and self.readme is not None
        )

    def batches(self, chunk_rows: int = 100_000, chunk_bytes: int = 32 << 20) -> Iterator[pa.Table]:
        """The table as Arrow tables of at most ~``chunk_rows`` rows (CSV: ``chunk_bytes``)."""
        return getattr(self, f"_{self.format}")(chunk_rows, chunk_bytes)

    def sample(self, rows: int = 1000) -> pa.Table:
        """The first rows of the table (for its columns, types and units)."""
        for batch in self.batches(chunk_rows=rows, chunk_bytes=1 << 20):
            return batch.slice(0, rows)
        raise CatalogError(f"{self.path}: the table has no rows", path=str(self.path))

    # one generator per format -------------------------------------------------------------
    def _csv(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        from astropy.io import ascii  # noqa: PLC0415

        with _quiet():
            chunks = ascii.read(
                str(self.path),
                format="csv",
                guess=False,
                fast_reader={"chunk_size": chunk_bytes, "chunk_generator": True},
            )
        while True:
            with _quiet():
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield astropy_to_arrow(chunk, self._skipped)

    def _ecsv(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        from xd_dask.io.ingest import ecsv_batches  # noqa: PLC0415

        with _open_binary(self.path) as fh:
            schema, batches = ecsv_batches(fh, str(self.path), None, min(chunk_bytes, 8 << 20))
            for b in batches:
                yield pa.Table.from_batches([b]).cast(schema)

    def _fits(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        from astropy.io import fits  # noqa: PLC0415
        from astropy.table import Table  # noqa: PLC0415

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(self.path, memmap=True)
            hdul.verify("silentfix")
            len(hdul)  # reads every header: a truncated file shows here
        for w in caught:
            if "truncated" in str(w.message):
                hdul.close()
                raise CatalogError(
                    f"{self.path}: truncated FITS file ({w.message})", path=str(self.path)
                )
        with hdul:
            hdu = self.hdu
            if hdu is None:
                tables = [i for i, h in enumerate(hdul) if isinstance(h, fits.BinTableHDU)]
                tables += [i for i, h in enumerate(hdul) if isinstance(h, fits.TableHDU)]
                if not tables:
                    raise CatalogError(f"{self.path}: no table HDU", path=str(self.path))
                hdu = tables[0]
            # memmap: columns are views of the file; only the rows converted are in memory
            with _quiet():
                table = Table.read(hdul[hdu], mask_invalid=False)
            for start in range(0, max(len(table), 1), chunk_rows):
                yield astropy_to_arrow(table[start : start + chunk_rows], self._skipped)
            del table

    def _votable(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        from astropy.io.votable import parse  # noqa: PLC0415

        with _quiet():
            table = parse(str(self.path)).get_first_table().to_table(use_names_over_ids=True)
        for start in range(0, max(len(table), 1), chunk_rows):
            yield astropy_to_arrow(table[start : start + chunk_rows], self._skipped)

    def _cds(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        from astropy.io import ascii  # noqa: PLC0415

        from xd_dask.io.cds import cds_layout, parse_lines  # noqa: PLC0415

        if self.readme is None:  # header and data in one file: astropy reads it whole
            with _quiet():
                table = ascii.read(str(self.path), format="cds", guess=False)
            yield astropy_to_arrow(table, self._skipped)
            return
        name = _strip_compression(self.path.name)
        with _quiet():
            cols, schema = cds_layout(self.readme, name)
        with _open_binary(self.path) as fh:
            while True:
                raw = list(itertools.islice(fh, chunk_rows))
                if not raw:
                    return
                lines = [ln for ln in raw if ln.strip()]
                if not lines:
                    continue
                table = parse_lines(lines, cols, schema)  # compiled; None: not plain numbers
                if table is None:
                    # as ascii.read(format="cds") does: blank fields are null
                    reader = ascii.get_reader(
                        ascii.Cds, readme=str(self.readme), fill_values=[("", "0")]
                    )
                    reader.data.table_name = name  # the header: this file's ReadMe section
                    text = [ln.decode("latin-1").rstrip("\r\n") for ln in lines]
                    with _quiet():
                        table = astropy_to_arrow(reader.read(text), self._skipped)
                yield table

    def __post_init__(self) -> None:
        self._skipped: set[str] = set()

    @property
    def skipped(self) -> list[str]:
        """Multidimensional columns left out so far."""
        return sorted(self._skipped)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence astropy's warnings (e.g. a unit it does not know, kept as text) while reading."""
    from astropy.utils.exceptions import AstropyWarning  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        yield


def _find_readme(path: Path) -> Path | None:
    """The ReadMe beside a CDS data file that describes it, if any."""
    for name in ("ReadMe", "README", "readme", "ReadMe.txt"):
        cand = path.parent / name
        if cand.is_file():
            text = cand.read_text(encoding="ascii", errors="replace")
            pattern = rf"Byte-by-byte Description of file:.*\b{re.escape(table_stem(path))}"
            if re.search(pattern, text):
                return cand
    return None


def open_table(
    path: str | os.PathLike,
    format: str = "auto",
    *,
    readme: str | os.PathLike | None = None,
    hdu: int | str | None = None,
) -> TableSource:
    """A :class:`TableSource` for ``path`` (format detected unless given)."""
    p = Path(path)
    if not p.is_file():
        raise CatalogError(f"{p}: no such file", path=str(p))
    fmt = detect_format(p) if format == "auto" else format
    if fmt == "parquet":
        raise CatalogError(f"{p}: already Parquet; nothing to ingest", path=str(p))
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or 'auto', got {format!r}")
    rm = Path(readme) if readme is not None else None
    if rm is not None and not rm.is_file():
        raise CatalogError(f"{rm}: no such ReadMe file", path=str(rm))
    if fmt == "cds" and rm is None:
        rm = _find_readme(p)
    if rm is not None and fmt != "cds":
        raise ValueError(f"{p}: a ReadMe only applies to CDS tables (format is {fmt})")
    return TableSource(p, fmt, rm, hdu)


# --------------------------------------------------------------------------- ids
def guess_id_column(schema: pa.Schema) -> str | None:
    """An integer column that looks like a row id: by name (:data:`ID_NAMES`, ``*_id``), else
    None."""
    ints = [f.name for f in schema if pa.types.is_integer(f.type)]
    by_lower = {n.lower(): n for n in ints}
    for name in ID_NAMES:
        if name in by_lower:
            return by_lower[name]
    for n in ints:
        if n.lower().endswith("_id"):
            return n
    return None


# --------------------------------------------------------------------------- writing
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
    first_schema: pa.Schema | None = None
    try:
        for table in src.batches(chunk_rows=chunk_rows, chunk_bytes=chunk_bytes):
            if first_schema is None:
                first_schema = table.schema
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
    from xd_dask.io.ingest import read_ecsv_header  # noqa: PLC0415
    from xd_dask.io.reader import require_columns  # noqa: PLC0415
    from xd_dask.io.schema import load_schema  # noqa: PLC0415

    try:
        with _open_binary(path) as fh:
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
            and Path(_strip_compression(f.name)).suffix.lower() in _BY_SUFFIX
            and not f.name.lower().endswith(".parquet")
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
    from xd_dask.io.ingest import ingest, output_name  # noqa: PLC0415
    from xd_dask.io.schema import load_schema  # noqa: PLC0415

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
        written += ingest_table(
            f,
            out,
            format=fmt,
            overwrite=overwrite,
            row_group_size=row_group_size,
            compression=compression,
            **opts,
        )
    return written
