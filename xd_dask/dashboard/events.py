"""The publishing side: what a fit, a selection and a nightly tell the scheduler.

Everything goes through :func:`publish` as Dask structured events (``Client.log_event``) on the
topic :data:`TOPIC`; the XD scheduler plugin (:mod:`xd_dask.dashboard.plugin`) turns them into the
XD page and the ``xd_dask_*`` Prometheus metrics. Without the plugin the events only sit in the
scheduler's bounded event log (``Client.get_events("xd-dask")``). Publishing never fails a job:
without a client it does nothing, and an error is logged and swallowed.

Event schema (version :data:`SCHEMA_VERSION`)
----------------------------------------------
Every event is a dict with ``kind``, ``v`` (schema version) and ``time`` (client clock, Unix
seconds), plus the tags of the enclosing :func:`tagged` blocks (``select``, ``nightly``), plus:

``fit-start``
    fit (id), method, n_components, max_iter, epochs, tol, catalog, out_dir, resume.
``progress`` (one per iteration of batch EM, one per wave of online EM / Adam)
    fit, iteration, epoch, wave, total (planned), mean_loglike (per row, at the parameters before
    the update, on the iteration's / wave's rows), step, rows, seconds (wall clock of the step),
    task_seconds (summed task time), reseeded (components), split_merge (the move controller's
    action, when split-and-merge runs), moved (bool), weights (K floats after the step, when
    known).
``fit-end``
    fit, status ("ok" / "failed"), error (failed), n_iter, converged, final_mean_loglike,
    heldout_mean_loglike, heldout_rows, rows_used, rows_read, dropped ({reason: rows} in the
    last full pass), fit_seconds, moves (split-and-merge verdicts: iteration, merge, split,
    ll_before, ll_after, accepted).
``select-start`` / ``select-k`` / ``select-end``
    select (id), ks, criterion, heldout / one K's row (n_components, heldout_mean_loglike, bic,
    train_mean_loglike, n_iter, converged, fit_seconds) / chosen.
``nightly``
    run, status ("running", "promoted", "rejected", "failed"), reason, heldout_mean_loglike,
    previous_heldout_mean_loglike, previous, margin, started_utc, finished_utc, store, history
    (the store's runs, oldest first: run, status, heldout_mean_loglike, finished_utc, latest).

Workers add one event per ``xd-estep`` task on :data:`TASK_TOPIC` (see
:mod:`xd_dask.dashboard.worker`): worker, key, rows, read, dropped, seconds.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "TASK_TOPIC",
    "TOPIC",
    "FitPublisher",
    "fit_run",
    "nightly_run",
    "plain",
    "publish",
    "selection",
    "tagged",
]

#: Dask event topic of the client's events.
TOPIC = "xd-dask"
#: Dask event topic of the workers' per-task records.
TASK_TOPIC = "xd-dask-task"
SCHEMA_VERSION = 1
#: Job keys copied into ``fit-start`` (as their last part).
_START_KEYS = ("fit.method", "fit.n_components", "fit.max_iter", "fit.epochs", "fit.tol")

_TAGS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "xd_dask_tags", default=None
)


def plain(obj: Any) -> Any:
    """``obj`` as msgpack-able plain data: numpy scalars and arrays as Python numbers and lists,
    tuples as lists, paths as strings, non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | np.ndarray):
        return [plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def publish(client: Any, kind: str, payload: Mapping[str, Any]) -> bool:
    """Send one event of ``kind`` to the scheduler (module docstring); True when sent.

    A no-op without a client; never raises (a failure is logged)."""
    if client is None:
        return False
    msg = plain(
        {**(_TAGS.get() or {}), **payload, "kind": kind, "v": SCHEMA_VERSION, "time": time.time()}
    )
    try:
        client.log_event(TOPIC, msg)
    except Exception as exc:  # noqa: BLE001 - watching must never break the job
        log.warning("could not publish %s event to the scheduler: %s", kind, exc)
        return False
    return True


@contextlib.contextmanager
def tagged(**tags: Any) -> Iterator[None]:
    """Add ``tags`` to every event published inside the block (in this thread)."""
    token = _TAGS.set({**(_TAGS.get() or {}), **tags})
    try:
        yield
    finally:
        _TAGS.reset(token)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def checkpoint_weights(directory: Path | None) -> list[float] | None:
    """The current component weights in the fit's checkpoint (``params.weights`` of
    ``checkpoint.npz``, :mod:`xd_dask.distributed.checkpoint`), or None."""
    if directory is None:
        return None
    try:
        with np.load(Path(directory) / "checkpoint.npz") as arrays:
            return arrays["params.weights"].tolist()
    except (OSError, KeyError, ValueError):
        return None


class FitPublisher:
    """Publishes one fit: ``fit-start`` on creation, ``progress`` through :meth:`wrap`, and
    ``fit-end`` through :meth:`finished` or :meth:`failed`.

    checkpoint : the fit's checkpoint directory; the weights of a progress event that carries
        none are read from the checkpoint written just before it.
    """

    def __init__(self, client: Any, start: Mapping[str, Any], checkpoint: Path | None = None):
        self.client = client
        self.fit = _new_id()
        self.checkpoint = checkpoint
        publish(client, "fit-start", {"fit": self.fit, **start})

    def progress(self, event: Mapping[str, Any]) -> None:
        ev = dict(event)
        if "wave_mean_loglike" in ev:  # on waves the step's figure is its wave's
            ev["mean_loglike"] = ev.pop("wave_mean_loglike")
        if ev.get("weights") is None:
            ev["weights"] = checkpoint_weights(self.checkpoint)
        ev["reseeded"] = list(ev.get("reseeded") or [])
        ev.pop("partitions", None)  # wave bookkeeping, not for watching
        ev.pop("stratum", None)
        publish(self.client, "progress", {"fit": self.fit, **ev})

    def wrap(self, callback: Callable[[dict], None] | None) -> Callable[[dict], None]:
        """A progress callback that publishes each event, then calls ``callback``."""

        def progress(event: dict) -> None:
            self.progress(event)
            if callback is not None:
                callback(event)

        return progress

    def finished(self, report: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        keys = (
            "n_iter",
            "converged",
            "final_mean_loglike",
            "heldout_mean_loglike",
            "heldout_rows",
            "rows_used",
            "rows_read",
            "dropped",
            "fit_seconds",
        )
        end = {k: report.get(k) for k in keys}
        end["moves"] = list(metadata.get("split_merge") or [])
        publish(self.client, "fit-end", {"fit": self.fit, "status": "ok", **end})

    def failed(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        publish(self.client, "fit-end", {"fit": self.fit, "status": "failed", "error": error})


@contextlib.contextmanager
def fit_run(
    client: Any,
    settings: Mapping[str, Any],
    out_dir: Path,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
) -> Iterator[FitPublisher]:
    """Publish a job's fit into ``out_dir``: ``settings`` are the job's {dotted key: value},
    ``checkpoint`` its checkpoint directory; a fit that raises inside the block is published as
    failed (and the exception goes on)."""
    start = {k.rsplit(".", 1)[1]: settings.get(k) for k in _START_KEYS}
    start |= {"catalog": settings.get("catalog.path"), "out_dir": str(out_dir), "resume": resume}
    pub = FitPublisher(client, start, checkpoint)
    try:
        yield pub
    except BaseException as exc:
        pub.failed(exc)
        raise


class SelectPublisher:
    """Publishes one ``xd-dask select``: :meth:`k` after each K, :meth:`chosen` at the end."""

    def __init__(self, client: Any, select: str) -> None:
        self.client = client
        self.select = select

    def k(self, row: Mapping[str, Any]) -> None:
        publish(self.client, "select-k", dict(row))

    def chosen(self, n_components: int) -> None:
        publish(self.client, "select-end", {"chosen": int(n_components)})


@contextlib.contextmanager
def selection(
    client: Any, ks: list[int], criterion: str, heldout: str = ""
) -> Iterator[SelectPublisher]:
    """Tag the fits inside the block as one selection over ``ks`` and publish its rows."""
    select = _new_id()
    with tagged(select=select):
        start = {"ks": list(ks), "criterion": criterion, "heldout": heldout}
        publish(client, "select-start", start)
        yield SelectPublisher(client, select)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_history(store: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The nightly runs of a model store (``runs()`` and ``latest()`` as
    :class:`xd_dask.jobs.store.ModelStore`), oldest first, from each run's ``report.json``
    nightly section and ``run.json``."""
    try:
        runs, latest = store.runs()[-limit:], store.latest()
    except Exception as exc:  # noqa: BLE001 - a store we cannot read: no history
        log.warning("could not read the nightly history of %s: %s", store, exc)
        return []
    out = []
    for run in runs:
        night = _read_json(run / "report.json").get("nightly") or {}
        status = _read_json(run / "run.json")
        out.append(
            {
                "run": run.name,
                "status": night.get("status") or status.get("status"),
                "heldout_mean_loglike": night.get("heldout_mean_loglike"),
                "previous_heldout_mean_loglike": night.get("previous_heldout_mean_loglike"),
                "finished_utc": night.get("finished_utc") or status.get("finished_utc"),
                "latest": latest is not None and run.resolve() == latest,
            }
        )
    return out


@contextlib.contextmanager
def nightly_run(client: Any, store: Any, run: Path, result: dict[str, Any]) -> Iterator[None]:
    """Tag the fit inside the block as nightly run ``run`` and publish the run's verdict at the
    end: ``result`` (the nightly section, as the gate left it) or, when the block raises, a
    failure."""
    keys = (
        "status",
        "reason",
        "heldout_mean_loglike",
        "previous_heldout_mean_loglike",
        "previous",
        "margin",
        "started_utc",
        "finished_utc",
    )
    with tagged(nightly=run.name):
        publish(client, "nightly", {"run": run.name, "status": "running", "store": str(store.root)})
        try:
            yield
        except BaseException as exc:
            night = {k: result.get(k) for k in keys}
            night |= {"status": "failed", "reason": f"fit failed: {type(exc).__name__}: {exc}"}
            raise
        else:
            night = {k: result.get(k) for k in keys}
        finally:
            if not night.get("finished_utc"):  # the report's time once it was written
                night["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
            night |= {"run": run.name, "store": str(store.root)}
            publish(client, "nightly", night | {"history": store_history(store)})
