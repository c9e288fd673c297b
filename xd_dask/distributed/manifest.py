"""Partition manifest: the catalogue's Parquet fragments with stable ids and row counts.

One task reads one known fragment (a whole file, or a run of its row groups), so waves,
checkpoints and resumes refer to the same rows every time. Only Parquet footers are read (row
counts per row group, column statistics), once per file; each partition records the SHA-256 of
its file's footer, so the manifest's fingerprint changes when a file's values change (the
row-group statistics, and with any compression the page sizes, are in the footer). A change that
leaves every footer byte equal (same row counts, same min/max, same compressed sizes) is not seen:
that would need reading every byte. :func:`check_unchanged` says what changed.

Duplicates (policy): the same file listed twice (two entries with one real path, or two files
with byte-identical footers, i.e. copies) is an error naming both. Rows with the same id in
different files are found from the id column's footer statistics: files whose [min, max] id
ranges overlap have just that column read and compared exactly, and a duplicate is an error
naming the files and an example id. Files written together by a tool that guarantees unique ids
can say so in their Parquet key-value metadata (``xd_dask.duplicate_free`` = a token shared by
those files, e.g. from a future ``xd-dask shuffle``); overlaps among files sharing a token are not
read. Duplicates inside one file are the reader's business, not checked here; files without id
statistics are not checked (logged).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.outputs import atomic_path
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "DEFAULT_ID_COLUMN",
    "DUPLICATE_FREE_KEY",
    "CatalogueChangedError",
    "Manifest",
    "ManifestError",
    "Partition",
    "build_manifest",
    "check_unchanged",
]

_GLOB_CHARS = set("*?[")
#: The id column checked for duplicates across files unless build_manifest is told otherwise.
DEFAULT_ID_COLUMN = "source_id"
#: Parquet key-value metadata key: files sharing its value hold no id in common (module docstring).
DUPLICATE_FREE_KEY = b"xd_dask.duplicate_free"


class ManifestError(ValueError):
    """The catalogue cannot be listed (no files, bad footer, duplicates, changed)."""


class CatalogueChangedError(ManifestError):
    """The catalogue differs from the one a checkpoint was written for (the message says how)."""


@dataclass(frozen=True)
class Partition:
    """One fragment of the catalogue: the unit of work of every distributed pass.

    Attributes
    ----------
    pid : int
        Stable id: the position in the manifest (files sorted by path, row groups in file order).
    path : str
        Local path or fsspec URL of the Parquet file.
    row_groups : tuple of int or None
        Row groups of ``path`` that make up this fragment; None for the whole file.
    n_rows : int
        Rows in the fragment (from the Parquet footer, before validation).
    footer : str or None
        SHA-256 of the file's Parquet footer (None in manifests of older xd-dask versions).
    """

    pid: int
    path: str
    row_groups: tuple[int, ...] | None
    n_rows: int
    footer: str | None = None

    @property
    def name(self) -> str:
        """Short readable name: the file name plus the row-group range when split."""
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        if self.row_groups is None:
            return base
        return f"{base}[rg {self.row_groups[0]}-{self.row_groups[-1]}]"

    def to_dict(self) -> dict[str, Any]:
        d = {
            "pid": self.pid,
            "path": self.path,
            "row_groups": None if self.row_groups is None else list(self.row_groups),
            "n_rows": self.n_rows,
        }
        if self.footer is not None:  # absent in old manifests: their fingerprints stay valid
            d["footer"] = self.footer
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partition:
        rg = d.get("row_groups")
        footer = d.get("footer")
        return cls(
            int(d["pid"]),
            str(d["path"]),
            None if rg is None else tuple(rg),
            int(d["n_rows"]),
            None if footer is None else str(footer),
        )


@dataclass(frozen=True)
class Manifest:
    """The ordered list of partitions of a catalogue."""

    partitions: tuple[Partition, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.partitions)

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.partitions)

    def __getitem__(self, i: int) -> Partition:
        return self.partitions[i]

    @property
    def n_rows(self) -> int:
        return sum(p.n_rows for p in self.partitions)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the partitions (paths, row groups, row counts, footer checksums)."""
        blob = json.dumps([p.to_dict() for p in self.partitions], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "n_rows": self.n_rows,
            "fingerprint": self.fingerprint,
            "partitions": [p.to_dict() for p in self.partitions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        m = cls(tuple(Partition.from_dict(p) for p in d["partitions"]), str(d.get("source", "")))
        if "fingerprint" in d and d["fingerprint"] != m.fingerprint:
            raise ManifestError(
                "manifest fingerprint does not match its partitions (corrupt file?)"
            )
        return m

    def save(self, path: str | os.PathLike) -> Path:
        """Write the manifest as JSON, atomically."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise ManifestError(f"{path}: cannot read manifest ({exc})") from None


def _is_url(s: str) -> bool:
    return "://" in s


def _local(s: str) -> str:
    return s[len("file://") :] if s.startswith("file://") else s


def _list_files(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], str]:
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
        if _is_url(item):
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
    import fsspec  # noqa: PLC0415 - only for URLs

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
def _open(path: str) -> Iterator[Any]:
    if _is_url(path):
        import fsspec  # noqa: PLC0415

        with fsspec.open(path, "rb") as fh:
            yield fh
    else:
        with open(path, "rb") as fh:
            yield fh


@dataclass(frozen=True)
class _FileInfo:
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


def _file_info(path: str, id_column: str | None) -> _FileInfo:
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        with _open(path) as fh:
            footer = _raw_footer(fh, path)
            fh.seek(0)
            md = pq.ParquetFile(fh).metadata
    except ManifestError:
        raise
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from None
    has_id, id_range = _id_range(md, id_column)
    return _FileInfo(
        path,
        [md.row_group(i).num_rows for i in range(md.num_row_groups)],
        hashlib.sha256(footer).hexdigest(),
        has_id,
        id_range,
        (md.metadata or {}).get(DUPLICATE_FREE_KEY),
    )


def _check_copies(infos: Sequence[_FileInfo]) -> None:
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


def _overlapping_groups(infos: Sequence[_FileInfo]) -> list[list[_FileInfo]]:
    """Groups of >= 2 files whose id ranges overlap (transitively), needing an exact check."""
    ranged = sorted((f for f in infos if f.id_range is not None), key=lambda f: f.id_range)
    groups: list[list[_FileInfo]] = []
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
    import pyarrow.parquet as pq  # noqa: PLC0415

    with _open(path) as fh:
        return pq.read_table(fh, columns=[id_column]).column(0).to_numpy(zero_copy_only=False)


def _check_duplicate_ids(infos: Sequence[_FileInfo], id_column: str, max_workers: int) -> None:
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


def build_manifest(
    source: str | os.PathLike | Sequence[str],
    *,
    max_rows_per_partition: int | None = None,
    max_workers: int = 8,
    id_column: str | None = DEFAULT_ID_COLUMN,
) -> Manifest:
    """List a catalogue's Parquet fragments.

    Parameters
    ----------
    source : directory (all ``*.parquet`` below it), glob, file, fsspec URL, or a list of those.
        Files whose name starts with ``.`` or ``_`` are ignored.
    max_rows_per_partition : int, optional
        Split files with more rows than this into runs of whole row groups (never inside a row
        group). Default: one partition per file.
    max_workers : threads used to read the footers.
    id_column : the row-id column checked for duplicates across files (files without it are
        not checked); None: no check. See the module docstring for the policy.

    Returns
    -------
    Manifest
        Partitions in path order, then row-group order; files without rows are left out.

    Raises
    ------
    ManifestError
        No files, an unreadable footer, a file listed twice, or an id in two files.
    """
    if max_rows_per_partition is not None and max_rows_per_partition < 1:
        raise ValueError("max_rows_per_partition must be >= 1")
    files, label = _list_files(source)
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files)))) as pool:
        infos = list(pool.map(lambda f: _file_info(f, id_column), files))
    _check_copies(infos)
    if id_column:
        _check_duplicate_ids(infos, id_column, max_workers)
    parts: list[Partition] = []
    for f in infos:
        rg, total = f.row_groups, sum(f.row_groups)
        if total == 0:
            log.info("%s: no rows, left out of the manifest", f.path)
            continue
        if max_rows_per_partition is None or total <= max_rows_per_partition or len(rg) == 1:
            parts.append(Partition(len(parts), f.path, None, total, f.footer))
            continue
        start, rows = 0, 0
        for i, n in enumerate(rg):
            rows += n
            if rows >= max_rows_per_partition or i == len(rg) - 1:
                groups = tuple(range(start, i + 1))
                parts.append(Partition(len(parts), f.path, groups, rows, f.footer))
                start, rows = i + 1, 0
    if not parts:
        raise ManifestError(f"{label}: the Parquet files hold no rows")
    manifest = Manifest(tuple(parts), label)
    log.info(
        "manifest: %d partitions, %d rows from %d files (%s)",
        len(manifest),
        manifest.n_rows,
        len(files),
        label,
    )
    return manifest


def _by_file(manifest: Manifest) -> dict[str, tuple[list[tuple], int, str | None]]:
    """{path: (row-group layout, rows, footer checksum)}"""
    out: dict[str, tuple[list[tuple], int, str | None]] = {}
    for p in manifest:
        layout, rows, _ = out.get(p.path, ([], 0, None))
        out[p.path] = ([*layout, (p.row_groups, p.n_rows)], rows + p.n_rows, p.footer)
    return out


def check_unchanged(saved: Manifest, current: Manifest, where: str) -> None:
    """Raise CatalogueChangedError unless ``current`` lists the same catalogue as ``saved``.

    Parameters
    ----------
    saved : the manifest recorded when ``where`` was written (e.g. a checkpoint).
    current : the manifest built now from the same source.
    where : what ``saved`` belongs to, for the message ("the checkpoint in out/checkpoints").

    The message names every changed file (up to 5) and says what changed: removed, new, rows,
    row groups, or the footer (values / statistics with the same rows). A ``saved`` manifest of an
    older xd-dask has no footer checksums: then only names, row groups and rows are compared
    (a warning says so).
    """
    if saved.fingerprint == current.fingerprint:
        return
    old, new = _by_file(saved), _by_file(current)
    changes = [f"{p}: removed" for p in sorted(old.keys() - new.keys())]
    changes += [f"{p}: new file" for p in sorted(new.keys() - old.keys())]
    legacy = False
    for p in sorted(old.keys() & new.keys()):
        (layout0, rows0, foot0), (layout1, rows1, foot1) = old[p], new[p]
        if rows0 != rows1:
            changes.append(f"{p}: {rows1} rows now, {rows0} then")
        elif layout0 != layout1:
            changes.append(f"{p}: row groups changed (same {rows1} rows)")
        elif foot0 is None:
            legacy = True
        elif foot0 != foot1:
            changes.append(
                f"{p}: footer changed with the same {rows1} rows and row groups (values, column "
                "statistics or encoding changed)"
            )
    if not changes:
        if legacy:
            log.warning(
                "%s was written by an older xd-dask without footer checksums: only file names, "
                "row groups and row counts were compared, not values",
                where,
            )
            return
        changes.append("the partition list differs (split differently?)")
    more = f"; and {len(changes) - 5} more" if len(changes) > 5 else ""
    raise CatalogueChangedError(
        f"the catalogue {current.source} changed since {where} was written: "
        f"{'; '.join(changes[:5])}{more}. Start a new fit (or restore the catalogue)"
    )
