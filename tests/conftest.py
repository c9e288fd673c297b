"""Shared fixtures: a real two-process Dask cluster on 127.0.0.1 (one per test module).

Its workers are forked from connect()'s fork server (:func:`tests.clusters.local_cluster`): a
cluster starts in ~0.2 s instead of ~0.6 s plus each worker's imports at its first task.

The suite runs in two processes (pytest-xdist, ``-n 2 --dist loadfile`` in pyproject.toml: a
module's tests, and so its cluster, stay in one process); modules with a test marked ``slow``
are handed out first, so that the longest ones do not start last.
"""

from __future__ import annotations

import pytest
from distributed import Client

from tests.clusters import local_cluster


def pytest_collection_modifyitems(config, items):
    """Modules holding a ``slow`` test first, otherwise in collection order."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2) as cl:
        yield cl


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as c:
        yield c
