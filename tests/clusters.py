"""Local test clusters: real worker processes on 127.0.0.1, forked from the fork server that
``xd_dask.distributed.connect`` uses for local clusters
(:func:`xd_dask.distributed.cluster.fork_server_method`: one server per test process, with the
worker modules and Numba's CPU target loaded once), as the CLI's clusters are."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dask
from distributed import LocalCluster

from xd_dask.distributed.cluster import fork_server_method

#: Dask's periodic background work that no test reads, slowed or off for the suite's in-process
#: clusters (test infrastructure only: the CLI's clusters keep Dask's defaults): the workers'
#: statistical profiler (a stack sample every 10 ms), the event-loop health tick (20 ms), the
#: system monitor (500 ms) and the memory monitor (100 ms; these clusters have no memory limit
#: to enforce). Measured on this 2-vCPU machine, an idle 2-worker cluster with its in-process
#: scheduler and client: 0.117 CPU s per second with the defaults, 0.018 with these; the suite
#: keeps such a cluster alive for ~300 of its ~500 test-seconds.
QUIET = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


@contextlib.contextmanager
def local_cluster(n_workers: int = 2) -> Iterator[LocalCluster]:
    """A LocalCluster of ``n_workers`` single-threaded worker processes, dashboard on a free
    port; closed on exit."""
    method = fork_server_method()
    config = dict(QUIET)
    if method is not None:
        config["distributed.worker.multiprocessing-method"] = method
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cl,
    ):
        yield cl
