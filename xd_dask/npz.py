"""Reading ``.npz`` files with every declared size checked before anything is allocated."""

from __future__ import annotations

import contextlib
import os
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib import format as npformat

__all__ = [
    "DIRECTORY_BYTES_PER_ENTRY",
    "MAX_INFLATED_BYTES",
    "BoundedReadError",
    "bounded_zip",
    "read_npy_header",
    "read_npz",
]


class BoundedReadError(ValueError):
    """A zip (``.npz``) file declares more entries or bytes than it may, or than it holds."""


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes)
_EOCD64_LOCATOR = struct.Struct("<4sLQL")  # zip64 end of central directory locator (20 bytes)
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record (56 bytes)
#: Bytes of central directory allowed per entry (a 46-byte header, a name, extra fields).
DIRECTORY_BYTES_PER_ENTRY = 1024
#: Largest uncompressed size all compressed members of a zip may declare together.
MAX_INFLATED_BYTES = 256 << 20


def read_npy_header(fh: Any, where: str, error: type[Exception]) -> tuple[tuple, bool, Any, int]:
    """(shape, fortran order, dtype, offset of the data) of the ``.npy`` member open in ``fh``
    (format 1.0 or 2.0; any other version raises ``error`` naming ``where``)."""
    version = npformat.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = npformat.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = npformat.read_array_header_2_0(fh)
    else:
        raise error(f"{where} has .npy format version {version}")
    return shape, fortran, dtype, fh.tell()


def _zip_directory_size(fh: Any, size: int) -> tuple[int, int]:
    """(entries, bytes) of the central directory that ``zipfile`` would read from ``fh``.

    The end records are found as ``zipfile`` finds them (the record at the very end, else the
    last signature in the final 64 KiB; a zip64 locator and record just before it override
    its counts), reading at most ~64 KiB from the end of the file; the larger of the two
    records' counts is returned (the classic record's "see zip64" placeholders aside).
    """
    tail_start = max(size - (1 << 16) - _EOCD.size, 0)
    fh.seek(tail_start)
    tail = fh.read()
    at = len(tail) - _EOCD.size
    if not (at >= 0 and tail[at : at + 4] == b"PK\x05\x06" and tail[-2:] == b"\x00\x00"):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise BoundedReadError("not a zip file (no end of central directory record)")
    *_, entries, dir_bytes, _, _ = _EOCD.unpack_from(tail, at)
    eocd = tail_start + at
    if eocd >= _EOCD64_LOCATOR.size + _EOCD64.size:
        fh.seek(eocd - _EOCD64_LOCATOR.size - _EOCD64.size)
        head = fh.read(_EOCD64.size + _EOCD64_LOCATOR.size)
        loc = _EOCD64_LOCATOR.unpack_from(head, _EOCD64.size)
        rec = _EOCD64.unpack_from(head, 0)
        if loc[0] == b"PK\x06\x07" and rec[0] == b"PK\x06\x06":  # 0xFFFF...: "see zip64"
            entries = max(rec[6], rec[7], 0 if entries == 0xFFFF else entries)
            dir_bytes = max(rec[8], 0 if dir_bytes == 0xFFFFFFFF else dir_bytes)
    return entries, dir_bytes


@contextlib.contextmanager
def bounded_zip(
    path: str | os.PathLike, *, max_entries: int, max_inflated_bytes: int = MAX_INFLATED_BYTES
) -> Iterator[Any]:
    """A ``zipfile.ZipFile`` of ``path``, opened only after its declared sizes were checked.

    Before ``zipfile`` parses the central directory (600,000 crafted entries take it half a
    minute and 400 MB), the end records are read (at most ~64 KiB from the end of the file) and
    the directory may declare at most ``max_entries`` entries and ``max_entries`` x
    :data:`DIRECTORY_BYTES_PER_ENTRY` bytes. Then every member must lie inside the file, a
    stored member must declare the size it occupies, and compressed members together may
    declare at most ``max_inflated_bytes`` uncompressed: nothing read afterwards can allocate
    more than the file holds (plus that allowance). The file is opened once; what is checked
    is what is parsed.

    Raises
    ------
    BoundedReadError (a ValueError) naming the file and the declared and allowed sizes.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            entries, dir_bytes = _zip_directory_size(fh, size)
        except BoundedReadError as exc:
            raise BoundedReadError(f"{path}: {exc}") from None
        max_dir = max_entries * DIRECTORY_BYTES_PER_ENTRY
        if entries > max_entries or dir_bytes > min(max_dir, size):
            raise BoundedReadError(
                f"{path}: the zip directory declares {entries} entries in {dir_bytes} bytes; at "
                f"most {max_entries} entries in {min(max_dir, size)} bytes are read"
            )
        fh.seek(0)
        with zipfile.ZipFile(fh) as zf:
            _check_members(path, zf.infolist(), size, max_entries, max_inflated_bytes)
            yield zf


def _check_members(path: Any, infos: list, size: int, max_entries: int, max_inflated: int) -> None:
    """Each member inside the file; stored ones as large as they declare; compressed ones
    declaring at most ``max_inflated`` bytes together (BoundedReadError otherwise)."""
    if len(infos) > max_entries:
        raise BoundedReadError(f"{path}: {len(infos)} zip entries; at most {max_entries}")
    inflated = 0
    for info in infos:
        where = f"{path}: member {info.filename!r}"
        if info.header_offset + info.compress_size > size:
            raise BoundedReadError(
                f"{where} declares {info.compress_size} bytes at offset {info.header_offset}, "
                f"beyond the end of the file ({size} bytes)"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise BoundedReadError(
                    f"{where} is stored in {info.compress_size} bytes but declares {info.file_size}"
                )
            continue
        inflated += info.file_size
        if inflated > max_inflated:
            raise BoundedReadError(
                f"{where}: compressed members declare more than {max_inflated} bytes "
                "uncompressed; refusing to inflate them"
            )


def read_npz(
    path: str | os.PathLike, *, max_entries: int, max_inflated_bytes: int = MAX_INFLATED_BYTES
) -> dict[str, Any]:
    """The arrays of an ``.npz`` file, every size checked before anything is allocated.

    The zip is opened with :func:`bounded_zip`; each member must be a ``.npy`` array whose
    header declares a dtype without Python objects and a shape whose bytes
    (shape x itemsize) are exactly what the member holds. Arrays are read only when every
    member has passed.

    Returns
    -------
    {name without ".npy": array}

    Raises
    ------
    BoundedReadError (a ValueError) naming the file, the member and the sizes.
    """
    with bounded_zip(path, max_entries=max_entries, max_inflated_bytes=max_inflated_bytes) as zf:
        infos = zf.infolist()
        for info in infos:
            where = f"{path}: member {info.filename!r}"
            if not info.filename.endswith(".npy"):
                raise BoundedReadError(f"{where} is not a .npy array")
            with zf.open(info) as fh:
                shape, _, dtype, offset = read_npy_header(fh, where, BoundedReadError)
            if dtype.hasobject:
                raise BoundedReadError(f"{where} holds Python objects ({dtype})")
            nbytes = dtype.itemsize
            for n in shape:
                nbytes *= int(n)
            if offset + nbytes != info.file_size:
                raise BoundedReadError(
                    f"{where} declares shape {tuple(shape)} of {dtype} ({nbytes} bytes) but "
                    f"holds {info.file_size - offset} bytes"
                )
        out = {}
        for info in infos:
            with zf.open(info) as fh:
                out[info.filename[:-4]] = np.asarray(npformat.read_array(fh, allow_pickle=False))
        return out
