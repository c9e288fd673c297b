"""CDS fixed-width data at compiled speed, with astropy's reading of the ReadMe.

astropy's CDS reader is the reference: it parses the ReadMe (byte ranges, formats, units,
descriptions, null markers ``?``, ``?=value``, ``?=-``) and splits the data in Python, about
20,000 rows of Hipparcos (41 columns) per second. Here the ReadMe is still parsed by astropy
(:func:`cds_layout`), but the data lines are cut and converted by a compiled pass
(:func:`parse_lines`): numbers with at most 15 significant digits and a power of ten up to 22
are converted exactly (an exact integer divided or multiplied by an exact power of ten is
correctly rounded, as is Python's ``float()``), integers with up to 18 digits; anything else (a
character that is not part of a number, more digits, a bigger exponent) makes
:func:`parse_lines` return None, and the caller reads that chunk with astropy instead. The result
equals astropy's read value for value (checked on all 117,955 records of Hipparcos hip2.dat; the
tests compare crafted tables and the first hip2.dat records with astropy).

Nulls follow astropy: a blank field is null; with ``?=V`` in the explanation a field equal to V is
null too (``?=-``: ``-`` to ``----``).

Checked against the ReadMe, beyond what astropy checks (:func:`cds_layout`, :func:`check_lines`):
every byte range must run forwards and be as wide as its format (``F6.3``: 6 bytes); a data line
may not end inside a numeric field (a line cut short would turn `` 0.10`` into 0.0) nor carry
anything beyond the last byte the ReadMe describes. A chunk holding any byte that is not
printable ASCII (a NUL, a tab, another control character, a non-ASCII byte) is never converted
here: astropy reads it (decoded as UTF-8, as astropy reads files), so the result is astropy's,
value for value or error for error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa

from xd_dask.codecache import numba_cache_ok
from xd_dask.io.reader import CatalogError

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = ["CdsColumn", "cds_layout", "check_lines", "parse_lines"]

_KIND_FLOAT, _KIND_INT, _KIND_STR = 0, 1, 2


@dataclass(frozen=True)
class CdsColumn:
    """One column of a CDS byte-by-byte description (0-based [start, end) bytes)."""

    name: str
    start: int
    end: int
    kind: int  # 0 float, 1 int, 2 string
    unit: str | None
    description: str
    nulls: tuple[bytes, ...]  # stripped field values read as null besides the blank field


def cds_layout(readme: str | Path, table_name: str) -> tuple[list[CdsColumn], pa.Schema]:
    """The columns of ``table_name`` described in ``readme`` (parsed by astropy), and the Arrow
    schema of the data (with ``unit`` and ``description`` field metadata, as astropy gives).

    Raises CatalogError naming the ReadMe and the column when a byte range runs backwards or
    is not as wide as the column's format says (``17-12 F6.3``: astropy reads it as blank).
    """
    from astropy.io import ascii  # noqa: PLC0415 - astropy: slow import
    from astropy.io.ascii import core  # noqa: PLC0415 - astropy: slow import

    reader = ascii.get_reader(ascii.Cds, readme=str(readme))
    reader.data.table_name = table_name
    reader.header.get_cols([])
    nulls: dict[str, list[bytes]] = {}
    for entry in reader.data.fill_values:
        value, cols = entry[0], entry[2:]
        if isinstance(value, str) and value:
            for c in cols:
                nulls.setdefault(c, []).append(value.encode("ascii"))
    out, fields = [], []
    for c in reader.header.cols:
        if issubclass(c.type, core.IntType):
            kind, typ = _KIND_INT, pa.int64()
        elif issubclass(c.type, core.FloatType):
            kind, typ = _KIND_FLOAT, pa.float64()
        else:
            kind, typ = _KIND_STR, pa.string()
        _check_range(readme, table_name, c)
        unit = None if c.unit is None else c.unit.to_string()
        null_values = tuple(nulls.get(c.name, ()))
        out.append(CdsColumn(c.name, c.start, c.end, kind, unit, c.description, null_values))
        meta = {"unit": unit} if unit else {}
        if c.description:
            meta["description"] = c.description
        fields.append(pa.field(c.name, typ, metadata=meta or None))
    return out, pa.schema(fields)


def _check_range(readme: str | Path, table_name: str, col) -> None:
    """CatalogError unless ``col``'s byte range runs forwards and has its format's width."""
    where = f"{readme}: column {col.name!r} of {table_name}"
    if not 0 <= col.start < col.end:
        raise CatalogError(
            f"{where}: bytes {col.start + 1}-{col.end} do not run forwards; fix the ReadMe",
            path=str(readme),
            column=col.name,
        )
    m = re.fullmatch(r"[A-Za-z](\d+)(\.\d+)?", str(col.raw_type))
    if m and int(m.group(1)) != col.end - col.start:
        raise CatalogError(
            f"{where}: bytes {col.start + 1}-{col.end} are {col.end - col.start} wide but the "
            f"format {col.raw_type} is {m.group(1)}; fix the ReadMe",
            path=str(readme),
            column=col.name,
        )


def _line_bytes(lines: list[bytes], chars: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(lengths without the line end, all bytes of the lines without their ends, concatenated);
    with ``chars`` a non-ASCII line counts UTF-8 characters (one byte each, as astropy counts
    them in the fallback)."""
    body = [ln.rstrip(b"\r\n") for ln in lines]
    if chars:
        body = [
            b if b.isascii() else b.decode("utf-8", "replace").encode("ascii", "replace")
            for b in body
        ]
    lengths = np.fromiter((len(b) for b in body), np.int64, len(body))
    return lengths, np.frombuffer(b"".join(body), np.uint8)


def printable(lines: list[bytes]) -> bool:
    """Whether every byte of the lines (line ends aside) is printable ASCII (32-126): no NUL,
    tab, DEL or other control character, and no byte of a multi-byte (UTF-8) character, whose
    fields astropy counts in characters, not bytes."""
    _, data = _line_bytes(lines)
    return not bool(np.any((data < 32) | (data > 126)))


def check_lines(lines: list[bytes], numbers: np.ndarray, cols: list[CdsColumn], path: str) -> None:
    """Data lines against the ReadMe's layout; CatalogError naming the file, line and column.

    ``numbers`` are the 1-based line numbers of ``lines`` in the file. Refused: a line that ends
    inside a numeric field whose present bytes are not blank (a truncated line: astropy would
    read `` 0.`` of `` 0.10`` as 0.0), and a line with non-blank bytes beyond the last byte the
    ReadMe describes (the ReadMe does not describe this file). String fields may end early
    (trailing blanks are often stripped).
    """
    lengths, data = _line_bytes(lines, chars=True)
    width = max(c.end for c in cols)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i in np.flatnonzero(lengths > width):
        extra = data[starts[i] + width : starts[i] + lengths[i]]
        if np.any(extra != 32):
            raise CatalogError(
                f"{path}: line {int(numbers[i])} has {int(lengths[i])} bytes, beyond the "
                f"{width} the ReadMe describes; is it the ReadMe of this file?",
                path=path,
                row=int(numbers[i]),
            )
    for c in cols:
        if c.kind == _KIND_STR:
            continue
        for i in np.flatnonzero((lengths > c.start) & (lengths < c.end)):
            field = data[starts[i] + c.start : starts[i] + lengths[i]]
            if np.any(field != 32):
                raise CatalogError(
                    f"{path}: line {int(numbers[i])} ends at byte {int(lengths[i])}, inside "
                    f"column {c.name!r} (bytes {c.start + 1}-{c.end}): the line is shorter "
                    "than the ReadMe says (truncated?)",
                    path=path,
                    row=int(numbers[i]),
                    column=c.name,
                )


@numba.njit(cache=_CACHE, nogil=True)
def _parse(a, starts, ends, kinds, fvals, ivals, null):  # pragma: no cover - compiled
    """Parse every numeric field of the (n, width) byte block ``a``; 0, or -1 to decline."""
    pow10 = np.empty(23)
    p = 1.0
    for k in range(23):
        pow10[k] = p
        p *= 10.0
    n = a.shape[0]
    for c in range(starts.shape[0]):
        kind = kinds[c]
        if kind == 2:
            continue
        s, e = starts[c], ends[c]
        for i in range(n):
            j = s
            while j < e and a[i, j] == 32:
                j += 1
            if j == e:
                null[c, i] = True
                fvals[c, i] = np.nan
                ivals[c, i] = 0
                continue
            neg = False
            if a[i, j] == 45 or a[i, j] == 43:  # - or +
                neg = a[i, j] == 45
                j += 1
            mant = 0
            ndig = 0  # significant digits in mant
            seen = 0  # digits seen at all
            frac = -1  # digits after the decimal point (-1: no point yet)
            exp = 0
            while j < e:
                ch = a[i, j]
                if 48 <= ch <= 57:
                    if mant > 0 or ch != 48:
                        ndig += 1
                    if ndig > (15 if kind == 0 else 18):  # exact in float64 / int64
                        return -1
                    mant = mant * 10 + (ch - 48)
                    seen += 1
                    if frac >= 0:
                        frac += 1
                elif ch == 46 and frac < 0 and kind == 0:
                    frac = 0
                elif (ch == 69 or ch == 101 or ch == 68 or ch == 100) and kind == 0 and seen:
                    j += 1  # exponent: [+-]digits
                    eneg = False
                    if j < e and (a[i, j] == 45 or a[i, j] == 43):
                        eneg = a[i, j] == 45
                        j += 1
                    ne = 0
                    while j < e and 48 <= a[i, j] <= 57:
                        exp = exp * 10 + (a[i, j] - 48)
                        ne += 1
                        j += 1
                        if ne > 3:
                            return -1
                    if ne == 0:
                        return -1
                    if eneg:
                        exp = -exp
                    break
                else:
                    break
                j += 1
            while j < e and a[i, j] == 32:  # trailing blanks only
                j += 1
            if j != e or seen == 0:
                return -1
            if kind == 1:
                ivals[c, i] = -mant if neg else mant
                continue
            k = exp - (frac if frac > 0 else 0)
            if k > 22 or k < -22:
                return -1
            v = mant * pow10[k] if k >= 0 else mant / pow10[-k]
            fvals[c, i] = -v if neg else v
    return 0


def _block(lines: list[bytes], width: int) -> np.ndarray:
    """(n, width) uint8: the lines, blank-padded (or cut) to ``width`` bytes."""
    a = np.array(lines, dtype=f"S{width}").view(np.uint8).reshape(len(lines), width)
    a[a == 0] = 32  # numpy pads bytes with NUL
    a[(a == 10) | (a == 13)] = 32
    return a


def parse_lines(lines: list[bytes], cols: list[CdsColumn], schema: pa.Schema) -> pa.Table | None:
    """The data lines (bytes, newline optional) as an Arrow table, or None if a field is not a
    plain number the compiled pass converts exactly or a line holds a byte that is not printable
    (read that chunk with astropy instead)."""
    if not printable(lines):
        return None
    width = max(c.end for c in cols)
    a = _block(lines, width)
    n = a.shape[0]
    starts = np.array([c.start for c in cols], np.int64)
    ends = np.array([c.end for c in cols], np.int64)
    kinds = np.array([c.kind for c in cols], np.int64)
    fvals = np.zeros((len(cols), n))
    ivals = np.zeros((len(cols), n), np.int64)
    null = np.zeros((len(cols), n), np.bool_)
    extra_null = [k for k, c in enumerate(cols) if c.nulls and c.kind != _KIND_STR]
    for k in extra_null:  # fields equal to a declared null value are null, not numbers
        field = np.ascontiguousarray(a[:, cols[k].start : cols[k].end])
        stripped = np.char.strip(field.view(f"S{ends[k] - starts[k]}").ravel())
        hit = np.isin(stripped, np.array(cols[k].nulls))
        null[k] = hit
        a[hit, cols[k].start : cols[k].end] = 32  # parsed as blank (null) below
    if _parse(a, starts, ends, kinds, fvals, ivals, null) != 0:
        return None
    arrays = []
    for k, c in enumerate(cols):
        mask = null[k] if null[k].any() else None
        if c.kind == _KIND_FLOAT:
            arrays.append(pa.array(fvals[k], mask=mask))
        elif c.kind == _KIND_INT:
            arrays.append(pa.array(ivals[k], mask=mask))
        else:
            field = np.ascontiguousarray(a[:, c.start : c.end]).view(f"S{c.end - c.start}")
            text = np.char.strip(np.char.decode(field.ravel(), "latin-1"))
            blank = (text == "") | np.isin(text, [v.decode() for v in c.nulls])
            arrays.append(pa.array(text, mask=blank))
    return pa.Table.from_arrays(arrays, schema=schema)
