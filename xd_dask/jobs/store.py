"""The nightly model store: one directory per run, and a ``latest`` pointer to the best one.

Layout::

    <store>/2024-05-01/          model.npz, history.json, report.json, training_curve.png, ...
    <store>/2024-05-02/
    <store>/2024-05-02.2/        a second run on the same UTC day
    <store>/latest -> 2024-05-02 (a relative symbolic link)

``latest`` is replaced atomically (a new link is made beside it and renamed onto it), so a reader
always sees the previous target or the new one, never a missing or half-made pointer. Only
:meth:`ModelStore.promote` moves it; the nightly runner calls it only for a run that succeeded and
passed the held-out gate.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import uuid
from pathlib import Path

from xd_dask.model import XDModel
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["LATEST", "MODEL_FILE", "ModelStore", "StoreError"]

LATEST = "latest"
MODEL_FILE = "model.npz"
REPORT_FILE = "report.json"
_RUN_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.(\d+))?$")


class StoreError(RuntimeError):
    """The model store is unusable (``latest`` is not a link into the store, ...)."""


def _run_key(name: str) -> tuple[str, int]:
    m = _RUN_RE.match(name)
    if not m:
        raise ValueError(name)
    return m.group(1), int(m.group(2) or 1)


class ModelStore:
    """Runs under ``root`` named by UTC date, and the ``latest`` link.

    Parameters
    ----------
    root : the store directory (created when needed).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ runs
    def runs(self) -> list[Path]:
        """Run directories, oldest first (by date, then by the same-day sequence number)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]
        found = [p for p in found if _RUN_RE.match(p.name)]
        return sorted(found, key=lambda p: _run_key(p.name))

    def new_run(self, now: _dt.datetime | None = None) -> Path:
        """Create and return the directory of a new run: ``<root>/<UTC date>[.N]``."""
        now = now or _dt.datetime.now(_dt.timezone.utc)
        if now.tzinfo is not None:
            now = now.astimezone(_dt.timezone.utc)
        day = now.strftime("%Y-%m-%d")
        self.root.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            path = self.root / (day if n == 1 else f"{day}.{n}")
            try:
                path.mkdir()
            except FileExistsError:
                n += 1
                continue
            return path

    # ------------------------------------------------------------------ latest
    @property
    def latest_link(self) -> Path:
        return self.root / LATEST

    def latest(self) -> Path | None:
        """The run directory ``latest`` points to, or None when there is none yet."""
        link = self.latest_link
        if not link.is_symlink():
            if link.exists():
                raise StoreError(f"{link} exists but is not a symbolic link; move it away")
            return None
        target = link.resolve()
        if target.parent != self.root.resolve() or not target.is_dir():
            raise StoreError(f"{link} points to {os.readlink(link)!r}, not a run of this store")
        return target

    def latest_model_path(self) -> Path | None:
        run = self.latest()
        if run is None:
            return None
        path = run / MODEL_FILE
        if not path.is_file():
            raise StoreError(f"{self.latest_link} -> {run.name} has no {MODEL_FILE}")
        return path

    def latest_model(self) -> XDModel | None:
        path = self.latest_model_path()
        return None if path is None else XDModel.load(path)

    def promote(self, run: str | os.PathLike) -> None:
        """Point ``latest`` at ``run`` atomically (the run must hold a model file)."""
        run = Path(run)
        if run.resolve().parent != self.root.resolve():
            raise StoreError(f"{run} is not a run directory of {self.root}")
        if not (run / MODEL_FILE).is_file():
            raise StoreError(f"{run} has no {MODEL_FILE}; refusing to make it latest")
        tmp = self.root / f".{LATEST}.{uuid.uuid4().hex}"
        os.symlink(run.name, tmp)  # relative: the store can be moved as a whole
        try:
            os.replace(tmp, self.latest_link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.info("%s -> %s", self.latest_link, run.name)

    # ------------------------------------------------------------------ pruning
    def prune(self, keep: int) -> list[Path]:
        """Delete all but the newest ``keep`` runs; the run ``latest`` points to always stays.

        Returns the deleted directories.
        """
        if keep < 1:
            raise ValueError("keep must be >= 1")
        runs = self.runs()
        latest = self.latest()
        keep_set = set(runs[-keep:])
        if latest is not None:
            keep_set.add(latest)
        removed = []
        for run in runs:
            if run.resolve() in {p.resolve() for p in keep_set}:
                continue
            shutil.rmtree(run)
            removed.append(run)
            log.info("pruned old run %s", run)
        return removed
