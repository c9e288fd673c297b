"""The nightly model store: one directory per run, and a ``latest`` pointer to the best one.

Layout::

    <store>/2024-05-01/          model.npz, history.json, report.json, training_curve.png, ...
    <store>/2024-05-02/          (each run also holds run.json: its status, pid, host, times)
    <store>/2024-05-02.2/        a second run on the same UTC day
    <store>/latest -> 2024-05-02 (a relative symbolic link)
    <store>/.store.lock          the store lock

``latest`` is replaced atomically (a new link is made beside it and renamed onto it), so a reader
always sees the previous target or the new one, never a missing or half-made pointer.

Concurrent runs (two nightlies on one store) are safe:

- the **store lock** (``flock`` on ``.store.lock``, see :mod:`xd_dask.locks` for the file systems
  where that works) is held while a run directory is created, while a run is gated and promoted,
  and while old runs are pruned; a run that wants to promote itself re-reads ``latest`` under the
  lock and is compared with *that* model, not the one it warm-started from;
- each run holds its own **run lock** (``<run>/.run.lock``) from creation until it has finished;
  :meth:`ModelStore.prune` never deletes a run whose lock is held, nor one newer than ``latest``
  (in progress, or the rejected runs that explain why ``latest`` has not moved);
- a run whose lock is free but which never recorded a final status was interrupted (killed): it is
  marked ``"interrupted"`` in its ``run.json`` and does not count toward ``keep``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xd_dask.locks import FileLock, is_locked
from xd_dask.model import XDModel
from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = ["FINISHED", "INTERRUPTED", "LATEST", "MODEL_FILE", "RUNNING", "ModelStore", "StoreError"]

LATEST = "latest"
MODEL_FILE = "model.npz"
REPORT_FILE = "report.json"
RUN_FILE = "run.json"
RUN_LOCK = ".run.lock"
STORE_LOCK = ".store.lock"
RUNNING, INTERRUPTED = "running", "interrupted"
#: Final statuses of a run (``finished`` is a run of an older xd-dask that has a report).
FINISHED = ("promoted", "rejected", "failed", "finished")
_RUN_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.(\d+))?$")


class StoreError(RuntimeError):
    """The model store is unusable (``latest`` is not a link into the store, ...)."""


def _run_key(name: str) -> tuple[str, int]:
    m = _RUN_RE.match(name)
    if not m:
        raise ValueError(name)
    return m.group(1), int(m.group(2) or 1)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ModelStore:
    """Runs under ``root`` named by UTC date, and the ``latest`` link.

    Parameters
    ----------
    root : the store directory (created when needed). It must be on a file system with working
        ``flock`` locks between every process that runs nightlies on it (:mod:`xd_dask.locks`).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._store_lock = FileLock(self.root / STORE_LOCK, f"model store {self.root}")
        self._depth = 0
        self._mutex = threading.RLock()
        self._run_locks: dict[str, FileLock] = {}

    @contextlib.contextmanager
    def lock(self) -> Iterator[ModelStore]:
        """Hold the store lock (waits for other processes; re-entrant within this object)."""
        with self._mutex:
            if self._depth == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                self._store_lock.acquire(timeout=None)
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._store_lock.release()

    # ------------------------------------------------------------------ runs
    def runs(self) -> list[Path]:
        """Run directories, oldest first (by date, then by the same-day sequence number)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]
        found = [p for p in found if _RUN_RE.match(p.name)]
        return sorted(found, key=lambda p: _run_key(p.name))

    def new_run(self, now: _dt.datetime | None = None) -> Path:
        """Create and return the directory of a new run: ``<root>/<UTC date>[.N]``.

        The run's lock is taken (under the store lock, so that pruning never sees the run
        unlocked) and held by this object until :meth:`finish_run`.
        """
        now = now or _dt.datetime.now(_dt.timezone.utc)
        if now.tzinfo is not None:
            now = now.astimezone(_dt.timezone.utc)
        day = now.strftime("%Y-%m-%d")
        with self.lock():
            n = 1
            while True:
                path = self.root / (day if n == 1 else f"{day}.{n}")
                try:
                    path.mkdir()
                except FileExistsError:
                    n += 1
                    continue
                break
            self._run_locks[path.name] = FileLock(path / RUN_LOCK, f"nightly run {path}").acquire()
            self._write_status(path, RUNNING, started_utc=_utc_now())
        return path

    def finish_run(self, run: str | os.PathLike, status: str) -> None:
        """Record the final ``status`` ("promoted", "rejected", "failed") and release the run."""
        run = Path(run)
        if status not in FINISHED:
            raise ValueError(f"status must be one of {FINISHED}, got {status!r}")
        started = self._read_status(run).get("started_utc")
        self._write_status(run, status, started_utc=started, finished_utc=_utc_now())
        self.release_run(run)

    def release_run(self, run: str | os.PathLike) -> None:
        """Release the run's lock without a final status (it then counts as interrupted)."""
        lock = self._run_locks.pop(Path(run).name, None)
        if lock is not None:
            lock.release()

    def run_state(self, run: str | os.PathLike) -> str:
        """ "running" (its lock is held), a final status, or "interrupted"."""
        run = Path(run)
        if is_locked(run / RUN_LOCK):
            return RUNNING
        status = self._read_status(run).get("status")
        if status in FINISHED:
            return status
        if status is None and (run / REPORT_FILE).is_file():
            return "finished"  # a run of an xd-dask that wrote no run.json
        return INTERRUPTED

    def _read_status(self, run: Path) -> dict[str, Any]:
        try:
            info = json.loads((run / RUN_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _write_status(self, run: Path, status: str, **info: Any) -> None:
        info = {"status": status, "pid": os.getpid(), "host": socket.gethostname(), **info}
        with atomic_path(run / RUN_FILE) as tmp:
            tmp.write_text(json.dumps(info, indent=1) + "\n")

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
        """Point ``latest`` at ``run`` atomically (the run must hold a model file).

        Takes the store lock; a caller that gates on the current ``latest`` holds :meth:`lock`
        around reading it, comparing and calling this, so that no other run moves ``latest`` in
        between.
        """
        run = Path(run)
        if run.resolve().parent != self.root.resolve():
            raise StoreError(f"{run} is not a run directory of {self.root}")
        if not (run / MODEL_FILE).is_file():
            raise StoreError(f"{run} has no {MODEL_FILE}; refusing to make it latest")
        with self.lock():
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
        """Delete old runs, under the store lock; returns the deleted directories.

        Kept: the newest ``keep`` finished runs (interrupted runs do not count), the run
        ``latest`` points to, every running run and every run newer than ``latest``. Interrupted
        runs that are kept are marked so in their ``run.json``.
        """
        if keep < 1:
            raise ValueError("keep must be >= 1")
        with self.lock():
            runs = self.runs()
            latest = self.latest()
            states = {run: self.run_state(run) for run in runs}
            finished = [run for run in runs if states[run] in FINISHED]
            keep_set = set(finished[-keep:])
            removed = []
            for run in runs:
                state = states[run]
                newer = latest is not None and (
                    run.resolve() == latest or _run_key(run.name) > _run_key(latest.name)
                )
                if run in keep_set or state == RUNNING or newer:
                    if state == INTERRUPTED and self._read_status(run).get("status") != state:
                        self._write_status(run, INTERRUPTED, noticed_utc=_utc_now())
                        log.warning("run %s was interrupted (no final status)", run.name)
                    continue
                shutil.rmtree(run)
                removed.append(run)
                log.info("pruned old %s run %s", state, run.name)
        return removed
