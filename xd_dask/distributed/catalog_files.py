"""The catalogue's files: listing them, opening them, and what their Parquet footers say.

:func:`xd_dask.distributed.manifest.build_manifest` lists the files (:func:`list_files`),
reads each footer once (:func:`file_info`) and checks the duplicates policy of its module
docstring (:func:`check_copies`, :func:`check_duplicate_ids`).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "DUPLICATE_FREE_KEY",
    "FileInfo",
    "ManifestError",
    "check_copies",
    "check_duplicate_ids",
    "file_info",
    "is_url",
    "list_files",
    "open_file",
]

_GLOB_CHARS = set("*?[")
#: Parquet key-value metadata key: files sharing its value hold no id in common (module docstring).
DUPLICATE_FREE_KEY = b"xd_dask.duplicate_free"


class ManifestError(ValueError):
    """The catalogue cannot be listed (no files, bad footer, duplicates, changed)."""


def is_url(s: str) -> bool:
    return "://" in s


def _local(s: str) -> str:
    return s[len("file://") :] if s.startswith("file://") else s


def list_files(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], str]:
    """Sorted Parquet file paths/URLs for a directory, glob, file, URL or list of them.

    Raises ManifestError when one file is reached through two entries (the same real path).
    """
    if isinstance(source, (str, os.PathLike)):
        items, label = [os.fspath(source)], os.fspath(source)
    else:
        items = [os.fspath(s) for s in source]
        label = ",".join(items) if len(items) <= 3 else f"{items[0]},... ({len(items)} inputs)"
    found: dict[str, str] = {}  # real path or URL -> the entry it was listed as
    for item in items:
        item = _local(item)
        if is_url(item):
            entries = [(p, p) for p in _list_remote(item)]
        elif any(c in item for c in _GLOB_CHARS):
            entries = [
                (str(Path(p).resolve()), p)
                for p in sorted(_glob.glob(item, recursive=True))
                if Path(p).is_file() and not Path(p).name.startswith((".", "_"))
            ]
        elif Path(item).is_dir():
            entries = [
                (str(p.resolve()), str(p))
                for p in sorted(Path(item).rglob("*.parquet"))
                if p.is_file() and not p.name.startswith((".", "_"))
            ]
        elif Path(item).is_file():
            entries = [(str(Path(item).resolve()), item)]
        else:
            raise ManifestError(f"{item}: no such file, directory or glob match")
        for real, entry in entries:
            if real in found:
                raise ManifestError(
                    f"the same file is listed twice: {found[real]!r} and {entry!r} (both are "
                    f"{real}); list each file once"
                )
            found[real] = entry
    files = sorted(found)
    if not files:
        raise ManifestError(f"{label}: no Parquet files found")
    return files, label


def _list_remote(url: str) -> list[str]:
    import fsspec  # noqa: PLC0415 - only for URLs: not imported otherwise

    fs, path = fsspec.core.url_to_fs(url)
    if any(c in path for c in _GLOB_CHARS):
        found = fs.glob(path)
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".parquet")]
    else:
        found = [path]
    return [
        fs.unstrip_protocol(p) for p in found if not p.rsplit("/", 1)[-1].startswith((".", "_"))
    ]


@contextlib.contextmanager
def open_file(path: str) -> Iterator[Any]:
    if is_url(path):
        import fsspec  # noqa: PLC0415 - only for URLs: not imported otherwise

        with fsspec.open(path, "rb") as fh:
            yield fh
    else:
        with open(path, "rb") as fh:
            yield fh


@dataclass(frozen=True)
class FileInfo:
    """What build_manifest needs from one file's footer."""

    path: str
    row_groups: list[int]  # rows per row group
    footer: str  # SHA-256 of the footer bytes
    has_id: bool  # the id column exists
    id_range: tuple[int, int] | None  # [min, max] of the id column from statistics
    duplicate_free: bytes | None  # DUPLICATE_FREE_KEY value


def _raw_footer(fh: Any, path: str) -> bytes:
    """The footer bytes of a Parquet file (the Thrift FileMetaData before ``<len>PAR1``)."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    if size >= 12:
        fh.seek(size - 8)
        tail = fh.read(8)
        n = int.from_bytes(tail[:4], "little")
        if tail[4:] == b"PAR1" and n + 12 <= size:
            fh.seek(size - 8 - n)
            return fh.read(n)
    raise ManifestError(f"{path}: not a readable Parquet file (no Parquet footer)")


def _id_range(md: Any, id_column: str | None) -> tuple[bool, tuple[int, int] | None]:
    if not id_column:
        return False, None
    col = [md.schema.column(i).path for i in range(md.num_columns)]
    if id_column not in col:
        return False, None
    j = col.index(id_column)
    lo = hi = None
    for g in range(md.num_row_groups):
        if md.row_group(g).num_rows == 0:
            continue
        st = md.row_group(g).column(j).statistics
        if st is None or not st.has_min_max or not isinstance(st.min, int):
            return True, None
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    return True, None if lo is None else (lo, hi)


def file_info(path: str, id_column: str | None) -> FileInfo:
    try:
        with open_file(path) as fh:
            footer = _raw_footer(fh, path)
            fh.seek(0)
            md = pq.ParquetFile(fh).metadata
    except ManifestError:
        raise
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from None
    has_id, id_range = _id_range(md, id_column)
    return FileInfo(
        path,
        [md.row_group(i).num_rows for i in range(md.num_row_groups)],
        hashlib.sha256(footer).hexdigest(),
        has_id,
        id_range,
        (md.metadata or {}).get(DUPLICATE_FREE_KEY),
    )


def check_copies(infos: Sequence[FileInfo]) -> None:
    """Two files with byte-identical footers (and rows) are copies of one file: an error."""
    seen: dict[str, str] = {}
    for f in infos:
        if sum(f.row_groups) == 0:
            continue
        if f.footer in seen:
            raise ManifestError(
                f"{seen[f.footer]} and {f.path} have identical Parquet footers: the same file is "
                "listed twice (a copy); remove one"
            )
        seen[f.footer] = f.path


def _overlapping_groups(infos: Sequence[FileInfo]) -> list[list[FileInfo]]:
    """Groups of >= 2 files whose id ranges overlap (transitively), needing an exact check."""
    ranged = sorted((f for f in infos if f.id_range is not None), key=lambda f: f.id_range)
    groups: list[list[FileInfo]] = []
    hi = None
    for f in ranged:
        if hi is not None and f.id_range[0] <= hi:
            groups[-1].append(f)
            hi = max(hi, f.id_range[1])
        else:
            groups.append([f])
            hi = f.id_range[1]
    out = []
    for g in groups:
        tokens = {f.duplicate_free for f in g}
        if len(g) > 1 and (None in tokens or len(tokens) > 1):
            out.append(g)
    return out


def _read_ids(path: str, id_column: str) -> np.ndarray:
    with open_file(path) as fh:
        return pq.read_table(fh, columns=[id_column]).column(0).to_numpy(zero_copy_only=False)


def check_duplicate_ids(infos: Sequence[FileInfo], id_column: str, max_workers: int) -> None:
    """Exact check of the id columns of files whose id ranges overlap (module docstring)."""
    unknown = [f.path for f in infos if f.has_id and f.id_range is None and sum(f.row_groups)]
    if unknown:
        log.warning(
            "%d file(s) have no %s statistics; not checked for duplicate ids across files "
            "(first: %s)",
            len(unknown),
            id_column,
            unknown[0],
        )
    for group in _overlapping_groups(infos):
        log.info("id ranges of %d files overlap: reading their %s columns", len(group), id_column)
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(group)))) as pool:
            ids = list(pool.map(lambda f: _read_ids(f.path, id_column), group))
        allv = np.concatenate(ids)
        order = np.sort(allv, kind="stable")
        dup = order[1:][order[1:] == order[:-1]]
        if dup.size:
            example = dup[0].item()
            where = [f.path for f, v in zip(group, ids, strict=True) if np.any(v == example)]
            raise ManifestError(
                f"duplicate {id_column} {example!r} ({np.unique(dup).size} duplicated ids in all) "
                f"in {' and '.join(where)}: a row must appear in one file only"
            )
