"""Per-worker throughput: a worker plugin that reports each finished ``xd-estep`` task.

Only a worker knows how many rows one of its tasks processed: the task's result (the partial
statistics of :mod:`xd_dask.distributed.tasks`) carries ``n_used``, ``n_read``, ``dropped`` and
``seconds``. When an ``xd-estep`` task's result lands in the worker's memory, :class:`TaskMeter`
reads those four numbers (never the statistics) and sends them to the scheduler as a structured
event on :data:`~xd_dask.dashboard.events.TASK_TOPIC`, on the worker's batched stream (before the
task's own "finished" message). The XD scheduler plugin registers it on every worker.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from xd_dask.dashboard.events import TASK_TOPIC
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["TaskMeter", "estep_key", "task_record"]

#: Prefix of the keys of the statistics passes (:mod:`xd_dask.distributed.passes`).
ESTEP_PREFIX = "xd-estep-"


def estep_key(key: Any) -> bool:
    """True for the key of an ``xd-estep`` task: ``("xd-estep-<token>", *label, attempt, pid)``."""
    return isinstance(key, tuple) and isinstance(key[0], str) and key[0].startswith(ESTEP_PREFIX)


def task_record(worker: str, key: tuple, result: Any) -> dict[str, Any] | None:
    """The event for one finished ``xd-estep`` task, or None when ``result`` does not carry the
    row counts (another kind of result)."""
    try:
        rows, read = int(result.n_used), int(result.n_read)
        seconds = float(result.seconds)
        dropped = {str(k): int(v) for k, v in dict(result.dropped).items() if v}
    except (AttributeError, TypeError, ValueError):
        return None
    return {
        "worker": worker,
        "key": [x if isinstance(x, int | str) else str(x) for x in key],
        "rows": rows,
        "read": read,
        "dropped": dropped,
        "seconds": seconds,
    }


class TaskMeter(WorkerPlugin):
    """Report the rows and seconds of every ``xd-estep`` task this worker computes."""

    name = "xd-dask-task-meter"
    idempotent = True

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "memory" or start not in ("executing", "long-running") or not estep_key(key):
            return
        data = self.worker.data
        fast = getattr(data, "fast", data)  # never unspill a result from disk to look at it
        result = fast.get(key) if hasattr(fast, "get") else None
        record = task_record(self.worker.address, key, result)
        if record is not None:
            self.worker.log_event(TASK_TOPIC, record)
