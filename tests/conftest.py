"""Shared fixtures: a real two-process Dask cluster on 127.0.0.1 (one per test module)."""

from __future__ import annotations

import pytest
from distributed import Client, LocalCluster


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
    ) as cl:
        yield cl


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as c:
        yield c
