"""The nightly model store: one directory per run, and a ``latest`` pointer to the best one.

Layout::

    <store>/2024-05-01/          model.npz, history.json, report.json, training_curve.png, ...
    <store>/2024-05-02/          (each run also holds run.json: its status, pid, host, times)
    <store>/2024-05-02.2/        a second run on the same UTC day
    <store>/latest -> 2024-05-02 (a relative symbolic link)
    <store>/.store.lock          the store lock
    <store>/.store.json          the last run number and name given out (names are never reused)

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

Order: each run records in ``run.json`` a sequence number ``seq`` given out under the store lock
and its start time. "Newest", "newer than ``latest``" and "the last ``keep``" follow that record,
never the names: a name is never given out twice (``.store.json`` remembers the last one), even
after the runs of the day were pruned, and ordering never depends on how names sort.

A ``latest`` that cannot be used (not a link, dangling, pointing outside the store, or at a run
whose model is missing or does not load) is reported (:class:`CorruptLatestError`) and repaired
with :meth:`ModelStore.repair` (``xd-dask store repair STORE``): ``latest`` is pointed at the
newest promoted run whose model loads, or at a run given by name.
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
from xd_dask.model import ModelFileError, XDModel
from xd_dask.outputs import atomic_path
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "FINISHED",
    "INTERRUPTED",
    "LATEST",
    "MODEL_FILE",
    "RUNNING",
    "CorruptLatestError",
    "ModelStore",
    "StoreError",
]

LATEST = "latest"
MODEL_FILE = "model.npz"
REPORT_FILE = "report.json"
RUN_FILE = "run.json"
RUN_LOCK = ".run.lock"
STORE_LOCK = ".store.lock"
STORE_FILE = ".store.json"
RUNNING, INTERRUPTED = "running", "interrupted"
#: Final statuses of a run (``finished`` is a run of an older xd-dask that has a report).
FINISHED = ("promoted", "rejected", "failed", "finished")
_RUN_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:\.(\d+))?$")


class StoreError(RuntimeError):
    """The model store is unusable (``latest`` is not a link into the store, ...)."""


class CorruptLatestError(StoreError):
    """``latest`` cannot be used: ``problem`` says why; the message adds how to repair it."""

    def __init__(self, problem: str, root: Path) -> None:
        super().__init__(f"{problem}; {repair_hint(root)}")
        self.problem = problem


def _run_key(name: str) -> tuple[str, int]:
    m = _RUN_RE.match(name)
    if not m:
        raise ValueError(name)
    return m.group(1), int(m.group(2) or 1)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _time(text: Any) -> _dt.datetime:
    """A recorded UTC time (``datetime.min`` when missing or unreadable)."""
    try:
        t = _dt.datetime.fromisoformat(str(text))
    except ValueError:
        return _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return t if t.tzinfo is not None else t.replace(tzinfo=_dt.timezone.utc)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def repair_hint(root: Path) -> str:
    return (
        f"repair the store with `xd-dask store repair {root}` (points latest at the newest "
        "promoted run whose model loads; --to RUN picks the run)"
    )


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
        """Run directories, oldest first, in the order they were created: by the sequence number
        recorded in ``run.json`` (runs of an older xd-dask without one first), then by the
        recorded start time, then by name."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]
        found = [p for p in found if _RUN_RE.match(p.name)]
        return sorted(found, key=self._order_key)

    def _order_key(self, run: Path) -> tuple[int, _dt.datetime, tuple[str, int]]:
        info = self._read_status(run)
        return _int(info.get("seq"), -1), _time(info.get("started_utc")), _run_key(run.name)

    def _next_name(self, day: str) -> tuple[int, int]:
        """(sequence number, same-day number) for a new run on ``day`` (under the store lock):
        after the last ones given out, so that no name is ever given out twice."""
        try:
            state = json.loads((self.root / STORE_FILE).read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            state = None
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s): rebuilt from the runs", self.root / STORE_FILE, exc)
            state = None
        runs = self.runs()
        seqs = [_int(self._read_status(r).get("seq"), 0) for r in runs]
        seq = max([len(runs), *seqs, _int((state or {}).get("last_seq"), 0)]) + 1
        if state is not None and isinstance(state.get("last_run"), str):
            last_day, last_n = _run_key(state["last_run"])
        elif runs:
            last_day, last_n = max(_run_key(r.name) for r in runs)
        else:
            return seq, 1
        if day == last_day:
            return seq, last_n + 1
        if day > last_day:
            return seq, 1
        # the clock went back: every same-day number given out so far is below seq
        return seq, max(seq, 2)

    def new_run(self, now: _dt.datetime | None = None) -> Path:
        """Create and return the directory of a new run: ``<root>/<UTC date>[.N]``.

        The run's lock is taken (under the store lock, so that pruning never sees the run
        unlocked) and held by this object until :meth:`finish_run`. The name follows the last
        one given out (``.store.json``): a name is never reused, even after its run was pruned;
        the run records its sequence number ``seq`` and start time in ``run.json``.
        """
        now = now or _dt.datetime.now(_dt.timezone.utc)
        if now.tzinfo is not None:
            now = now.astimezone(_dt.timezone.utc)
        day = now.strftime("%Y-%m-%d")
        with self.lock():
            seq, n = self._next_name(day)
            while True:
                path = self.root / (day if n == 1 else f"{day}.{n}")
                try:
                    path.mkdir()
                except FileExistsError:
                    n += 1
                    continue
                break
            with atomic_path(self.root / STORE_FILE) as tmp:
                tmp.write_text(json.dumps({"last_seq": seq, "last_run": path.name}) + "\n")
            self._run_locks[path.name] = FileLock(path / RUN_LOCK, f"nightly run {path}").acquire()
            self._write_status(path, RUNNING, seq=seq, started_utc=_utc_now())
        return path

    def finish_run(self, run: str | os.PathLike, status: str) -> None:
        """Record the final ``status`` ("promoted", "rejected", "failed") and release the run."""
        run = Path(run)
        if status not in FINISHED:
            raise ValueError(f"status must be one of {FINISHED}, got {status!r}")
        self._write_status(run, status, finished_utc=_utc_now())
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
        """Record ``status`` and ``info`` in ``run.json``, keeping what it already says."""
        old = self._read_status(run)
        info = {"pid": os.getpid(), "host": socket.gethostname(), **old, "status": status, **info}
        with atomic_path(run / RUN_FILE) as tmp:
            tmp.write_text(json.dumps(info, indent=1) + "\n")

    # ------------------------------------------------------------------ latest
    @property
    def latest_link(self) -> Path:
        return self.root / LATEST

    def latest(self) -> Path | None:
        """The run directory ``latest`` points to, or None when there is none yet.

        Raises CorruptLatestError when ``latest`` is not a link to a run directory of the store.
        """
        problem = self._link_problem()
        if problem:
            raise CorruptLatestError(f"{self.latest_link} {problem}", self.root)
        link = self.latest_link
        return link.resolve() if link.is_symlink() else None

    def _link_problem(self) -> str | None:
        """Why ``latest`` is not a link to a run directory of this store (None: it is, or there
        is no ``latest``)."""
        link = self.latest_link
        if not link.is_symlink():
            if link.exists():
                return "exists but is not a symbolic link"
            return None
        target = link.resolve()
        if target.parent != self.root.resolve() or not target.is_dir():
            return f"points to {os.readlink(link)!r}, not a run of this store"
        return None

    def latest_model_path(self) -> Path | None:
        """The model file of the run ``latest`` points to (None without ``latest``);
        CorruptLatestError when the run has none."""
        run = self.latest()
        if run is None:
            return None
        path = run / MODEL_FILE
        if not path.is_file():
            raise CorruptLatestError(
                f"{self.latest_link} -> {run.name} has no {MODEL_FILE}", self.root
            )
        return path

    def latest_model(self) -> XDModel | None:
        """The model ``latest`` points to (None without ``latest``); CorruptLatestError, naming
        the file and the repair command, when it cannot be read."""
        path = self.latest_model_path()
        return None if path is None else self.read_latest_model(path)

    def read_latest_model(self, path: Path) -> XDModel:
        """The model file ``path`` that :meth:`latest_model_path` gave; CorruptLatestError
        (naming the file and the repair command) when it does not load."""
        try:
            return XDModel.load(path)
        except ModelFileError as exc:
            raise CorruptLatestError(
                f"{self.latest_link} -> {path.parent.name}: the model does not load ({exc})",
                self.root,
            ) from None

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
        ``latest`` points to, every running run and every run created after ``latest``'s run
        (order: :meth:`runs`, from what each run recorded, not its name). Interrupted runs that
        are kept are marked so in their ``run.json``.
        """
        if keep < 1:
            raise ValueError("keep must be >= 1")
        with self.lock():
            runs = self.runs()
            latest = self.latest()
            position = {run.resolve(): i for i, run in enumerate(runs)}
            newer_than = position.get(latest, -1) if latest is not None else len(runs)
            states = {run: self.run_state(run) for run in runs}
            finished = [run for run in runs if states[run] in FINISHED]
            keep_set = set(finished[-keep:])
            removed = []
            for i, run in enumerate(runs):
                state = states[run]
                if run in keep_set or state == RUNNING or i >= newer_than:
                    if state == INTERRUPTED and self._read_status(run).get("status") != state:
                        self._write_status(run, INTERRUPTED, noticed_utc=_utc_now())
                        log.warning("run %s was interrupted (no final status)", run.name)
                    continue
                shutil.rmtree(run)
                removed.append(run)
                log.info("pruned old %s run %s", state, run.name)
        return removed

    # ------------------------------------------------------------------ repair
    def latest_problem(self) -> str | None:
        """Why ``latest`` cannot be used (not a link into the store, or its run has no model
        or one that does not load), or None when it can (or there is no ``latest``)."""
        try:
            self.latest_model()
        except CorruptLatestError as exc:
            return exc.problem
        return None

    def _loadable(self, run: Path) -> str | None:
        """Why the model of ``run`` cannot be used (None: it loads)."""
        path = run / MODEL_FILE
        if not path.is_file():
            return f"no {MODEL_FILE}"
        try:
            XDModel.load(path)
        except ModelFileError as exc:
            return f"model does not load ({exc})"
        return None

    def repair(self, to: str | None = None, *, dry_run: bool = False) -> dict[str, Any]:
        """Point ``latest`` at a usable run when it cannot be used (under the store lock).

        Without ``to``: nothing happens when ``latest`` is usable; otherwise ``latest`` is
        pointed at the newest run (order: :meth:`runs`) whose status is "promoted" (each such
        model passed the nightly gate against the one before it) and whose model loads, and
        without one ``latest`` is removed (the next nightly starts cold and its model becomes
        the first). With ``to`` (a run name), ``latest`` is pointed at that run, if its model
        loads, whatever the state of ``latest`` (a roll-back). The run ``latest`` pointed to is
        marked in its ``run.json`` (``latest_problem``). A ``latest`` that is a real directory
        is never deleted (StoreError: move it away).

        Returns
        -------
        dict: ``action`` ("none", "repointed", "removed"), ``latest`` (the run name or None),
        ``previous`` (what ``latest`` named before), ``problem`` (why it was repaired) and
        ``skipped`` ({run: why} for the promoted runs passed over); nothing is changed with
        ``dry_run``.
        """
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such model store")
        link = self.latest_link
        with self.lock():
            problem = self.latest_problem()
            previous = os.readlink(link) if link.is_symlink() else None
            out: dict[str, Any] = {"previous": previous, "problem": problem, "skipped": {}}
            if link.is_dir() and not link.is_symlink():
                raise StoreError(f"{link} is a directory, not a link; move it away and repair")
            if to is None and problem is None:
                if previous is not None or not self._promoted():
                    return out | {"action": "none", "latest": previous}
                out["problem"] = problem = "latest is missing but the store has promoted runs"
            target = self._chosen(to) if to is not None else self._best(out["skipped"])
            out["latest"] = None if target is None else target.name
            out["action"] = "removed" if target is None else "repointed"
            if dry_run:
                return out
            if target is not None:
                self.promote(target)
            else:
                link.unlink(missing_ok=True)
            old = self.root / previous if previous else None
            if problem and old is not None and _RUN_RE.match(old.name) and old.is_dir():
                self._write_status(
                    old,
                    self._read_status(old).get("status", INTERRUPTED),
                    latest_problem=problem,
                    noticed_utc=_utc_now(),
                )
        log.warning("store %s repaired: latest -> %s (%s)", self.root, out["latest"], problem)
        return out

    def _promoted(self) -> list[Path]:
        return [r for r in self.runs() if self._read_status(r).get("status") == "promoted"]

    def _best(self, skipped: dict[str, str]) -> Path | None:
        """The newest promoted run whose model loads; the others passed over go to ``skipped``."""
        for run in reversed(self._promoted()):
            why = self._loadable(run)
            if why is None:
                return run
            skipped[run.name] = why
        return None

    def _chosen(self, name: str) -> Path:
        run = self.root / name
        if not _RUN_RE.match(name) or not run.is_dir() or run.is_symlink():
            raise StoreError(f"{run} is not a run of the store {self.root}")
        if self.run_state(run) == RUNNING:
            raise StoreError(f"{run} is still running")
        why = self._loadable(run)
        if why:
            raise StoreError(f"{run}: {why}; choose another run")
        return run
