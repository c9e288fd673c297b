"""Reading tables: FITS, VOTable, CSV, ECSV and CDS fixed width, as Arrow tables in pieces.

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

Columns keep their names and types, with ``unit`` and ``description`` as Arrow field metadata.
Float NaN becomes null (FITS and VOTable use NaN as the float null; CSV "nan" means missing too),
so a missing value is a missing field for the reader. Multidimensional columns are left out.
Plain CSV declares no types: they are astropy's guess per chunk. Writing Parquet is
:func:`xd_dask.io.ingest.ingest_table`'s business.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import itertools
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xd_dask.data import packaged_readme
from xd_dask.io.cds import cds_layout, check_lines, parse_lines
from xd_dask.io.ecsv import BOM, ecsv_batches, refuse_bom
from xd_dask.io.reader import CatalogError
from xd_dask.utils import get_logger

__all__ = [
    "FORMATS",
    "ROW_INDEX",
    "TableSource",
    "astropy_to_arrow",
    "detect_format",
    "find_readme",
    "guess_id_column",
    "open_table",
    "open_binary",
    "readme_beside",
    "strip_compression",
    "table_stem",
]

log = get_logger(__name__)

FORMATS = ("csv", "ecsv", "fits", "votable", "cds")
_COMPRESSED = (".gz", ".bz2")
TABLE_SUFFIXES = {
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


def strip_compression(name: str) -> str:
    low = name.lower()
    for suf in _COMPRESSED:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def table_stem(path: str | os.PathLike) -> str:
    """hip2.dat -> hip2; sources.fits.gz -> sources."""
    return Path(strip_compression(Path(path).name)).stem


def open_binary(path: Path):
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
        with open_binary(p) as fh:
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
    fmt = TABLE_SUFFIXES.get(Path(strip_compression(p.name)).suffix.lower())
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
        from astropy.io import ascii  # noqa: PLC0415 - astropy: slow import

        with open_binary(self.path) as fh:
            refuse_bom(str(self.path), fh.read(len(BOM)))
        # astropy's fast CSV reader without its padding of short rows with empty fields
        # (format "csv" is "fast_basic" with these options and fill_extra_cols = True)
        with _quiet():
            chunks = ascii.read(
                str(self.path),
                format="fast_basic",
                delimiter=",",
                comment=None,
                guess=False,
                fast_reader={"chunk_size": chunk_bytes, "chunk_generator": True},
            )
        rows = 0
        while True:
            try:
                with _quiet():
                    chunk = next(chunks, None)
            except ascii.InconsistentTableError as exc:
                raise _ragged(self.path, rows, exc) from None
            if chunk is None:
                return
            rows += len(chunk)
            yield astropy_to_arrow(chunk, self._skipped)

    def _ecsv(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        with open_binary(self.path) as fh:
            schema, batches = ecsv_batches(fh, str(self.path), None, min(chunk_bytes, 8 << 20))
            for b in batches:
                yield pa.Table.from_batches([b]).cast(schema)

    def _fits(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        from astropy.io import fits  # noqa: PLC0415 - astropy: slow import
        from astropy.table import Table  # noqa: PLC0415 - astropy: slow import

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
        from astropy.io.votable import parse  # noqa: PLC0415 - astropy: slow import

        with _quiet():
            table = parse(str(self.path)).get_first_table().to_table(use_names_over_ids=True)
        for start in range(0, max(len(table), 1), chunk_rows):
            yield astropy_to_arrow(table[start : start + chunk_rows], self._skipped)

    def _cds(self, chunk_rows: int, chunk_bytes: int) -> Iterator[pa.Table]:
        from astropy.io import ascii  # noqa: PLC0415 - astropy: slow import

        if self.readme is None:  # header and data in one file: astropy reads it whole
            with _quiet():
                table = ascii.read(str(self.path), format="cds", guess=False)
            yield astropy_to_arrow(table, self._skipped)
            return
        name = strip_compression(self.path.name)
        with _quiet():
            cols, schema = cds_layout(self.readme, name)
        first = 1  # line number of the chunk's first line in the file
        with open_binary(self.path) as fh:
            while True:
                raw = list(itertools.islice(fh, chunk_rows))
                if not raw:
                    return
                keep = [i for i, ln in enumerate(raw) if ln.strip()]
                lines = [raw[i] for i in keep]
                numbers = np.asarray(keep, np.int64) + first
                first += len(raw)
                if not lines:
                    continue
                check_lines(lines, numbers, cols, str(self.path))
                table = parse_lines(lines, cols, schema)  # compiled; None: not plain numbers
                if table is None:
                    # as ascii.read(format="cds") does: blank fields are null
                    reader = ascii.get_reader(
                        ascii.Cds, readme=str(self.readme), fill_values=[("", "0")]
                    )
                    reader.data.table_name = name  # the header: this file's ReadMe section
                    try:  # decoded as astropy decodes a file it reads
                        text = [ln.decode("utf-8").rstrip("\r\n") for ln in lines]
                        with _quiet():
                            table = astropy_to_arrow(reader.read(text), self._skipped)
                    except ValueError as exc:
                        raise _cds_error(self.path, lines, numbers, exc) from None
                yield table

    def __post_init__(self) -> None:
        self._skipped: set[str] = set()

    @property
    def skipped(self) -> list[str]:
        """Multidimensional columns left out so far."""
        return sorted(self._skipped)


def _ragged(path: Path, rows_before: int, exc: Exception) -> CatalogError:
    """A CatalogError for astropy's "inconsistent data columns" error in a CSV chunk, naming
    the row in the whole file (astropy counts data lines from 0 in each chunk)."""
    m = re.search(r"data line (\d+)", str(exc))
    row = rows_before + int(m.group(1)) if m else None
    where = f"row {row} (counting data rows from 0)" if row is not None else "a row"
    return CatalogError(
        f"{path}: {where} has a different number of fields than the header "
        f"({' '.join(str(exc).split())}); a ragged row is not read as missing values: fix it",
        path=str(path),
        row=row,
    )


def _cds_error(path: Path, lines: list[bytes], numbers: np.ndarray, exc: Exception) -> CatalogError:
    """astropy's error for a chunk of CDS lines, naming the first line with a byte that is not
    printable ASCII."""
    text = " ".join(str(exc).split())
    for ln, no in zip(lines, numbers, strict=True):
        body = ln.rstrip(b"\r\n")
        bad = [j for j, b in enumerate(body) if not 32 <= b <= 126]
        if bad:
            text += f" (line {int(no)}, byte {bad[0] + 1}: {body[bad[0]]:#04x}, not printable)"
            return CatalogError(f"{path}: cannot read as cds: {text}", path=str(path), row=int(no))
    return CatalogError(f"{path}: cannot read as cds: {text}", path=str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence astropy's warnings (e.g. a unit it does not know, kept as text) while reading."""
    from astropy.utils.exceptions import AstropyWarning  # noqa: PLC0415 - astropy: slow import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        yield


def readme_beside(path: Path) -> Path | None:
    """The ReadMe beside a CDS data file that describes it, if any."""
    for name in ("ReadMe", "README", "readme", "ReadMe.txt"):
        cand = path.parent / name
        if cand.is_file():
            text = cand.read_text(encoding="ascii", errors="replace")
            pattern = rf"Byte-by-byte Description of file:.*\b{re.escape(table_stem(path))}"
            if re.search(pattern, text):
                return cand
    return None


def find_readme(table: Path) -> Path | None:
    """The CDS ReadMe of a fixed-width table: one beside it that describes it, else one
    packaged with xd-dask (:mod:`xd_dask.data`: hip2.dat of Hipparcos I/311), else None."""
    beside = readme_beside(table)
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
        rm = readme_beside(p)
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
