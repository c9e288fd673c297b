"""What the scheduler knows about fits, selections and nightlies: the published events
(:mod:`xd_dask.dashboard.events`) folded into plain records that the XD page and the Prometheus
collector read. Pure Python: no Dask, no Bokeh.

Memory is bounded: the last :data:`MAX_FITS` fits; the last :data:`MAX_POINTS` progress points
of the current fit (the fit that started last) and :data:`MAX_WEIGHT_POINTS` weight vectors
(float32, thinned evenly over the whole fit); earlier fits keep :data:`KEPT_POINTS` points,
evenly thinned, and no weights; the last :data:`MAX_RUNS` nightly runs.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xd_dask.dashboard.events import TASK_TOPIC, TOPIC

__all__ = ["MAX_FITS", "PLUGIN_NAME", "FitRecord", "WorkerMeter", "XDState", "plugin_state"]

#: Name of the XD scheduler plugin (:mod:`xd_dask.dashboard.plugin`).
PLUGIN_NAME = "xd-dask-dashboard"

MAX_FITS = 20
MAX_POINTS = 20_000
MAX_WEIGHT_POINTS = 1_000
KEPT_POINTS = 1_000
MAX_SELECTS = 10
MAX_RUNS = 200
#: Steps whose mean duration estimates the time left.
RECENT_STEPS = 10
#: Nightly statuses that mean "the job ran to its gate".
SUCCESS = ("promoted", "rejected")


@dataclass
class WorkerMeter:
    """One worker's ``xd-estep`` tasks in one fit: rows processed, task seconds, tasks."""

    rows: int = 0
    seconds: float = 0.0
    tasks: int = 0

    def add(self, rows: int, seconds: float) -> None:
        self.rows += int(rows)
        self.seconds += float(seconds)
        self.tasks += 1

    @property
    def rows_per_second(self) -> float | None:
        return self.rows / self.seconds if self.seconds > 0 else None

    def ns_per_pair(self, n_components: int | None) -> float | None:
        """Task nanoseconds per (row, component) pair."""
        if not n_components or self.rows <= 0:
            return None
        return 1e9 * self.seconds / (self.rows * n_components)


@dataclass
class FitRecord:
    """One fit as published: its start, progress points, weights, end and worker meters."""

    fit: str
    info: dict[str, Any]
    started: float
    points: list[dict[str, Any]] = field(default_factory=list)
    weights: list[tuple[int, np.ndarray]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    steps: int = 0
    workers: dict[str, WorkerMeter] = field(default_factory=dict)
    rows_read: int = 0
    rows_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "running" if self.end is None else str(self.end.get("status", "ok"))

    @property
    def n_components(self) -> int | None:
        k = self.info.get("n_components")
        return int(k) if k else None

    @property
    def iterations(self) -> int:
        """Iterations (batch EM) or waves (online EM, Adam) done (``points`` keeps the last
        MAX_POINTS of them)."""
        return self.steps

    @property
    def total(self) -> int | None:
        return self.points[-1].get("total") if self.points else None

    @property
    def last(self) -> dict[str, Any]:
        return self.points[-1] if self.points else {}

    def rows_per_second(self) -> float | None:
        """Rows of the last step over its wall-clock seconds."""
        rows, secs = self.last.get("rows"), self.last.get("seconds")
        return rows / secs if rows and secs else None

    def seconds_left(self) -> float | None:
        """Planned steps left times the mean duration of the recent steps (0 once ended; for
        batch EM with a tolerance an upper bound: it may converge sooner)."""
        if self.end is not None:
            return 0.0
        total = self.total
        recent = [p["seconds"] for p in self.points[-RECENT_STEPS:] if p.get("seconds")]
        if not total or not recent:
            return None
        return max(0, int(total) - self.iterations) * sum(recent) / len(recent)

    def moves(self) -> list[dict[str, Any]]:
        """Split-and-merge verdicts (the fit's list once ended, else the steps that moved)."""
        if self.end is not None and self.end.get("moves"):
            return list(self.end["moves"])
        return [
            {"iteration": p["iteration"], "accepted": None, "action": p.get("split_merge")}
            for p in self.points
            if p.get("moved")
        ]

    def add_progress(self, msg: dict[str, Any]) -> None:
        point = {k: v for k, v in msg.items() if k not in ("weights", "kind", "v", "fit")}
        point["reseeded"] = len(msg.get("reseeded") or [])
        self.steps += 1
        self.points.append(point)
        del self.points[:-MAX_POINTS]
        if msg.get("weights"):
            w = np.asarray(msg["weights"], dtype=np.float32)
            self.weights.append((int(msg.get("iteration") or self.iterations), w))
            if len(self.weights) > MAX_WEIGHT_POINTS:  # every other one, first and last kept
                self.weights = [*self.weights[:-1:2], self.weights[-1]]

    def shrink(self) -> None:
        """Keep what a fit that is no longer current shows: KEPT_POINTS points, no weights."""
        self.points = thin(self.points, KEPT_POINTS)
        self.weights = []

    def add_task(self, msg: dict[str, Any]) -> None:
        meter = self.workers.setdefault(str(msg.get("worker")), WorkerMeter())
        meter.add(int(msg.get("rows") or 0), float(msg.get("seconds") or 0.0))
        self.rows_read += int(msg.get("read") or 0)
        self.rows_used += int(msg.get("rows") or 0)
        for reason, n in (msg.get("dropped") or {}).items():
            self.dropped[reason] = self.dropped.get(reason, 0) + int(n)


def thin(items: list, limit: int) -> list:
    """At most ``limit`` of ``items``, evenly spaced, the last one included."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    picked = [items[int(i * step)] for i in range(limit)]
    return picked if picked[-1] is items[-1] else [*picked[:-1], items[-1]]


def plugin_state(scheduler: Any) -> XDState | None:
    """The state of the XD plugin on ``scheduler``, or None when it does not run there."""
    plugin = getattr(scheduler, "plugins", {}).get(PLUGIN_NAME)
    return getattr(plugin, "state", None)


def utc_seconds(text: Any) -> float | None:
    """Unix seconds of an ISO-8601 time (UTC when it names no zone), or None."""
    try:
        t = _dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def run_order(name: str) -> tuple[str, int]:
    """Sort key of a store's run names: ``2024-05-01`` < ``2024-05-01.2`` < ``2024-05-01.10``."""
    day, _, n = name.partition(".")
    return day, int(n) if n.isdigit() else 1


class XDState:
    """Every published event folded in (:meth:`handle`); ``version`` grows with each change.

    ``handle`` runs on the scheduler's event loop; readers (the page's callbacks, the Prometheus
    collector on its own thread) take :attr:`lock` while they read.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.version = 0
        self.fits: OrderedDict[str, FitRecord] = OrderedDict()
        self.selects: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.runs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.fits_ended: dict[str, int] = {}
        self._token_fit: dict[str, str] = {}

    # ------------------------------------------------------------------ reading
    def current(self) -> FitRecord | None:
        """The most recently started fit."""
        return next(reversed(self.fits.values()), None)

    def latest_select(self) -> dict[str, Any] | None:
        return next(reversed(self.selects.values()), None)

    def last_run(self) -> dict[str, Any] | None:
        """The nightly run that finished last (by its finish time; finish times are whole
        seconds, so of two runs finished in the same second the one that started later)."""
        runs = list(self.runs.values())
        ends = [(utc_seconds(r.get("finished_utc")), i) for i, r in enumerate(runs)]
        finished = [end for end in ends if end[0]]
        return runs[max(finished)[1]] if finished else None

    def last_success(self) -> float | None:
        """Unix time the latest nightly that ran to its gate finished."""
        times = [
            utc_seconds(r.get("finished_utc"))
            for r in self.runs.values()
            if r.get("status") in SUCCESS
        ]
        return max((t for t in times if t), default=None)

    # ------------------------------------------------------------------ writing
    def handle(self, topic: str, msg: Any, now: float | None = None) -> bool:
        """Fold one event in; False for an event that is not ours or is malformed."""
        if not isinstance(msg, dict):
            return False
        with self.lock:
            if topic == TASK_TOPIC:
                ok = self._task(msg)
            elif topic == TOPIC:
                ok = self._event(msg, time.time() if now is None else now)
            else:
                return False
            if ok:
                self.version += 1
            return ok

    def _event(self, msg: dict[str, Any], now: float) -> bool:
        kind = msg.get("kind")
        if kind == "fit-start":
            return self._fit_start(msg, now)
        if kind in ("progress", "fit-end"):
            fit = self.fits.get(str(msg.get("fit")))
            if fit is None:
                return False
            if kind == "progress":
                fit.add_progress(msg)
            else:
                fit.end = msg
                status = str(msg.get("status", "ok"))
                self.fits_ended[status] = self.fits_ended.get(status, 0) + 1
            return True
        if kind in ("select-start", "select-k", "select-end"):
            return self._select(kind, msg)
        if kind == "nightly":
            return self._nightly(msg)
        return False

    def _fit_start(self, msg: dict[str, Any], now: float) -> bool:
        fit_id = str(msg.get("fit"))
        info = {k: v for k, v in msg.items() if k not in ("kind", "v", "fit")}
        for fit in self.fits.values():
            fit.shrink()
        self.fits[fit_id] = FitRecord(fit_id, info, now)
        while len(self.fits) > MAX_FITS:
            old, _ = self.fits.popitem(last=False)
            self._token_fit = {t: f for t, f in self._token_fit.items() if f != old}
        sel = self.selects.get(str(msg.get("select")))
        if sel is not None:
            sel["fits"][fit_id] = int(msg.get("n_components") or 0)
        return True

    def _task(self, msg: dict[str, Any]) -> bool:
        """A worker's record of one ``xd-estep`` task, for the fit whose passes carry its key's
        token (the running fit that started last, when the token is new)."""
        key = msg.get("key") or [""]
        token = str(key[0]).rsplit("-", 1)[-1]
        fit_id = self._token_fit.get(token)
        if fit_id is None:
            bound = set(self._token_fit.values())
            running = [f for f in reversed(self.fits.values()) if f.end is None]
            free = [f for f in running if f.fit not in bound]
            if not free:
                return False
            fit_id = self._token_fit[token] = free[0].fit
        fit = self.fits.get(fit_id)
        if fit is None:
            return False
        fit.add_task(msg)
        return True

    def _select(self, kind: str, msg: dict[str, Any]) -> bool:
        sid = str(msg.get("select"))
        if kind == "select-start":
            self.selects[sid] = {
                "select": sid,
                "ks": list(msg.get("ks") or []),
                "criterion": msg.get("criterion"),
                "heldout": msg.get("heldout"),
                "rows": {},
                "fits": {},
                "chosen": None,
            }
            while len(self.selects) > MAX_SELECTS:
                self.selects.popitem(last=False)
            return True
        sel = self.selects.get(sid)
        if sel is None:
            return False
        if kind == "select-k":
            sel["rows"][int(msg.get("n_components") or 0)] = msg
        else:
            sel["chosen"] = msg.get("chosen")
        return True

    def _nightly(self, msg: dict[str, Any]) -> bool:
        run = str(msg.get("run"))
        for entry in msg.get("history") or []:  # the store's record of earlier runs
            name = str(entry.get("run"))
            if name != run:
                self.runs[name] = {**self.runs.get(name, {}), **entry}
        entry = {k: v for k, v in msg.items() if k not in ("history", "kind", "v")}
        self.runs[run] = {**self.runs.get(run, {}), **entry}
        latest = [h["run"] for h in msg.get("history") or [] if h.get("latest")]
        if latest or msg.get("status") == "promoted":
            now_latest = run if msg.get("status") == "promoted" else latest[0]
            for name, r in self.runs.items():
                r["latest"] = name == now_latest
        self.runs = OrderedDict(sorted(self.runs.items(), key=lambda kv: run_order(kv[0])))
        while len(self.runs) > MAX_RUNS:
            self.runs.popitem(last=False)
        return True
