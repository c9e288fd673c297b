"""Per-worker set-up, run once in every worker process as a ``distributed`` WorkerPlugin.

:class:`WorkerSetup` raises glibc's mmap threshold (:data:`MMAP_THRESHOLD`): Dask's nanny starts
workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins the mmap threshold at 128 KiB, so
every partition-sized temporary array is a fresh ``mmap`` whose pages fault in again on every
task. On a 2-core VM two workers doing that at once ran the statistics pass 2x slower than one
(page-fault contention); with 64 MiB they run at full speed, reusing heap memory for arrays below
that size. Larger arrays are still mmapped.
"""

from __future__ import annotations

import ctypes
import sys

from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["MMAP_THRESHOLD", "PLUGIN_NAME", "WorkerSetup", "ensure_worker_setup"]

#: glibc ``M_MMAP_THRESHOLD`` set in each worker process (bytes; None leaves it alone).
MMAP_THRESHOLD: int | None = 64 << 20
PLUGIN_NAME = "xd-dask-worker-setup"
_M_MMAP_THRESHOLD = -3


def tune_allocator(threshold: int | None = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap threshold in this process; False where there is no glibc."""
    if threshold is None or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc
        return False


class WorkerSetup(WorkerPlugin):
    """What every xd-dask worker process does once (module docstring)."""

    name = PLUGIN_NAME

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed's Worker
        tune_allocator()


_REGISTERED: set[str] = set()


def ensure_worker_setup(client: Client) -> None:
    """Register :class:`WorkerSetup` with the client's scheduler (current and future workers),
    once per scheduler per process."""
    address = str(client.scheduler.address)
    if address in _REGISTERED:
        return
    client.register_plugin(WorkerSetup(), name=PLUGIN_NAME)
    _REGISTERED.add(address)
