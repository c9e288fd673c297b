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


@contextlib.contextmanager
def local_cluster(n_workers: int = 2) -> Iterator[LocalCluster]:
    """A LocalCluster of ``n_workers`` single-threaded worker processes, dashboard on a free
    port; closed on exit."""
    method = fork_server_method()
    config = {} if method is None else {"distributed.worker.multiprocessing-method": method}
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
