"""Shared fixtures: a real two-process Dask cluster on 127.0.0.1 (one per test module).

Its workers are forked from the fork server that ``xd_dask.distributed.connect`` uses for local
clusters (:func:`xd_dask.distributed.cluster.fork_server_method`: one server per test session,
with the worker modules and Numba's CPU target loaded once), as the CLI's clusters are; a
cluster then starts in ~0.2 s instead of ~0.6 s plus each worker's imports at its first task.

The suite runs in two processes (pytest-xdist, ``-n 2 --dist loadfile`` in pyproject.toml: a
module's tests, and so its cluster, stay in one process); modules with a test marked ``slow``
are handed out first, so that the longest ones do not start last.
"""

from __future__ import annotations

import dask
import pytest
from distributed import Client, LocalCluster

from xd_dask.distributed.cluster import fork_server_method


def pytest_collection_modifyitems(config, items):
    """Modules holding a ``slow`` test first, otherwise in collection order."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)


@pytest.fixture(scope="module")
def cluster():
    method = fork_server_method()
    config = {} if method is None else {"distributed.worker.multiprocessing-method": method}
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cl,
    ):
        yield cl


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as c:
        yield c
