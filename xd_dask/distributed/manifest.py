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

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xd_dask.distributed.catalog_files import (
    DUPLICATE_FREE_KEY,
    ManifestError,
    check_copies,
    check_duplicate_ids,
    file_info,
    list_files,
)
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

#: The id column checked for duplicates across files unless build_manifest is told otherwise.
DEFAULT_ID_COLUMN = "source_id"


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
    files, label = list_files(source)
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files)))) as pool:
        infos = list(pool.map(lambda f: file_info(f, id_column), files))
    check_copies(infos)
    if id_column:
        check_duplicate_ids(infos, id_column, max_workers)
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
