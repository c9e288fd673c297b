"""Partition manifest: the catalogue's Parquet fragments with stable ids and row counts.

One task reads one known fragment (a whole file, or a run of its row groups), so waves,
checkpoints and resumes refer to the same rows every time. Nothing here reads rows: only
Parquet footers (row counts per row group).
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = ["Manifest", "ManifestError", "Partition", "build_manifest"]

_GLOB_CHARS = set("*?[")


class ManifestError(ValueError):
    """The catalogue cannot be listed (no files, bad footer, changed since a checkpoint)."""


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
    """

    pid: int
    path: str
    row_groups: tuple[int, ...] | None
    n_rows: int

    @property
    def name(self) -> str:
        """Short readable name: the file name plus the row-group range when split."""
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        if self.row_groups is None:
            return base
        return f"{base}[rg {self.row_groups[0]}-{self.row_groups[-1]}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "path": self.path,
            "row_groups": None if self.row_groups is None else list(self.row_groups),
            "n_rows": self.n_rows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partition:
        rg = d.get("row_groups")
        return cls(
            int(d["pid"]), str(d["path"]), None if rg is None else tuple(rg), int(d["n_rows"])
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
        """SHA-256 of the partitions (paths, row groups, row counts): changes with the catalogue."""
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
    """Sorted Parquet file paths/URLs for a directory, glob, file, URL or list of them."""
    if isinstance(source, (str, os.PathLike)):
        items, label = [os.fspath(source)], os.fspath(source)
    else:
        items = [os.fspath(s) for s in source]
        label = ",".join(items) if len(items) <= 3 else f"{items[0]},... ({len(items)} inputs)"
    files: list[str] = []
    for item in items:
        item = _local(item)
        if _is_url(item):
            files.extend(_list_remote(item))
        elif any(c in item for c in _GLOB_CHARS):
            files.extend(
                str(Path(p).resolve())
                for p in _glob.glob(item, recursive=True)
                if Path(p).is_file() and not Path(p).name.startswith((".", "_"))
            )
        elif Path(item).is_dir():
            files.extend(
                str(p.resolve())
                for p in Path(item).rglob("*.parquet")
                if p.is_file() and not p.name.startswith((".", "_"))
            )
        elif Path(item).is_file():
            files.append(str(Path(item).resolve()))
        else:
            raise ManifestError(f"{item}: no such file, directory or glob match")
    files = sorted(set(files))
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


def _row_group_counts(path: str) -> list[int]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        if _is_url(path):
            import fsspec  # noqa: PLC0415

            with fsspec.open(path, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
        else:
            md = pq.ParquetFile(path).metadata
    except Exception as exc:  # pyarrow raises several types for a bad footer
        raise ManifestError(f"{path}: not a readable Parquet file ({exc})") from None
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def build_manifest(
    source: str | os.PathLike | Sequence[str],
    *,
    max_rows_per_partition: int | None = None,
    max_workers: int = 8,
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

    Returns
    -------
    Manifest
        Partitions in path order, then row-group order; files without rows are left out.
    """
    if max_rows_per_partition is not None and max_rows_per_partition < 1:
        raise ValueError("max_rows_per_partition must be >= 1")
    files, label = _list_files(source)
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files)))) as pool:
        counts = list(pool.map(_row_group_counts, files))
    parts: list[Partition] = []
    for path, rg in zip(files, counts, strict=True):
        total = sum(rg)
        if total == 0:
            log.info("%s: no rows, left out of the manifest", path)
            continue
        if max_rows_per_partition is None or total <= max_rows_per_partition or len(rg) == 1:
            parts.append(Partition(len(parts), path, None, total))
            continue
        start, rows = 0, 0
        for i, n in enumerate(rg):
            rows += n
            if rows >= max_rows_per_partition or i == len(rg) - 1:
                parts.append(Partition(len(parts), path, tuple(range(start, i + 1)), rows))
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
