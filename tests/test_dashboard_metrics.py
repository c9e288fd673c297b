"""The ``xd_dask_*`` metrics scraped from ``/metrics`` of a scheduler started as operations start
one: ``deploy/local/cluster.sh`` (``dask scheduler --preload xd_dask.dashboard.preload`` and two
``dask worker`` processes, in their own directory). A job fit on a catalogue with bad rows, then
two nightlies (the first promoted, the second rejected by the gate); every metric must equal what
the jobs wrote in their own outputs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xd_dask.io import make_catalog
from xd_dask.jobs.config import load_config
from xd_dask.jobs.nightly import run_nightly
from xd_dask.jobs.runner import run_fit

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BAD_ROWS = 7


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory):
    """A cluster.sh cluster (2 workers x 1 thread) on free ports; its directory."""
    pytest.importorskip("prometheus_client", reason="Dask serves /metrics with prometheus_client")
    cdir = tmp_path_factory.mktemp("ops") / "dask-local"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_")}
    if "XD_DASK_KERNEL_CACHE" in os.environ:
        env["XD_DASK_KERNEL_CACHE"] = os.environ["XD_DASK_KERNEL_CACHE"]
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "CLUSTER_DIR": str(cdir),
        "SCHEDULER_PORT": "0",
        "DASHBOARD_ADDRESS": ":0",
        "WORKER_MEMORY": "1GiB",
    }
    script = REPO / "deploy" / "local" / "cluster.sh"
    cwd = cdir.parent  # not the tests' directory: the scheduler must import the preload itself
    subprocess.run(["bash", str(script), "start", "2", "1"], env=env, cwd=cwd, check=True)
    try:
        yield cdir
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def client(cluster_dir):
    from distributed import Client

    with Client(scheduler_file=str(cluster_dir / "scheduler.json")) as c:
        yield c


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """A Gaia-like catalogue whose first file has BAD_ROWS negative parallax errors."""
    root = tmp_path_factory.mktemp("metrics-catalog")
    make_catalog(root, n_rows=3000, n_partitions=3, seed=5, overwrite=True)
    first = sorted(root.glob("*.parquet"))[0]
    table = pq.read_table(first)
    err = table.column("parallax_error").to_pylist()
    err[:BAD_ROWS] = [-1.0] * BAD_ROWS
    i = table.column_names.index("parallax_error")
    pq.write_table(table.set_column(i, "parallax_error", pa.array(err, pa.float32())), first)
    return root


def _job(path: Path, catalog: Path, store: Path, K: int):
    path.write_text(
        textwrap.dedent(
            f"""
            [catalog]
            path = "{catalog}"
            holdout_rows = 0.25
            on_bad = "drop"
            [fit]
            n_components = {K}
            max_iter = 3
            tol = 0.0
            backend = "reference"
            [output]
            plots = false
            checkpoint = false
            [nightly]
            store = "{store}"
            margin = 0.01
            """
        )
    )
    return load_config(path, environ={})


def scrape(client) -> dict[tuple[str, tuple], float]:
    """{(name, sorted labels): value} of every xd_dask_* sample on the scheduler's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = client.dashboard_link.replace("/status", "/metrics")
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("xd_dask_")
    }


def scrape_when(client, sample: tuple[str, tuple], value: float, timeout: float = 30.0):
    """scrape() once ``sample`` has ``value``: events reach the scheduler asynchronously
    (``Client.log_event`` returns before the scheduler has them), as they reach a Prometheus
    server. Returns the last scrape, which the caller's assertions then check in full."""
    deadline = time.monotonic() + timeout
    m = scrape(client)
    while m.get(sample) != value and time.monotonic() < deadline:
        time.sleep(0.1)
        m = scrape(client)
    return m


def test_fit_metrics_equal_what_the_fit_reported(client, catalog, tmp_path):
    cfg = _job(tmp_path / "job.toml", catalog, tmp_path / "store", K=2)
    outcome = run_fit(cfg, client, out_dir=tmp_path / "out")
    report, meta = outcome.report, outcome.model.metadata
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    m = scrape(client)
    n_iter = report["n_iter"]
    assert m["xd_dask_fit_iteration", ()] == len(history) == n_iter == 3
    assert m["xd_dask_fit_iterations_planned", ()] == 3
    assert m["xd_dask_fit_running", ()] == 0
    assert m["xd_dask_fit_mean_loglike", ()] == pytest.approx(history[-1]["mean_loglike"])
    assert m["xd_dask_fit_heldout_mean_loglike", ()] == pytest.approx(
        report["heldout_mean_loglike"]
    )
    last = history[-1]
    assert m["xd_dask_fit_rows_per_second", ()] == pytest.approx(last["rows"] / last["seconds"])
    # every iteration of batch EM reads every row: the counters add up n_iter full passes
    dropped = report["dropped"]["negative_error"]
    assert 0 < dropped <= BAD_ROWS
    assert m["xd_dask_fit_rows_dropped_total", (("reason", "negative_error"),)] == n_iter * dropped
    assert m["xd_dask_fit_rows_read_total", ()] == n_iter * meta["rows_read"]
    assert m["xd_dask_fits_total", (("status", "ok"),)] >= 1
    workers = {k[1][0][1]: v for k, v in m.items() if k[0] == "xd_dask_worker_ns_per_pair"}
    assert len(workers) == 2 and all(v > 0 for v in workers.values())
    page = urllib.request.urlopen(client.dashboard_link.replace("/status", "/xd"), timeout=30)
    assert page.status == 200  # the preloaded scheduler serves the XD page too


def test_nightly_metrics_follow_the_gate(client, catalog, tmp_path):
    store = tmp_path / "store"
    night = dt.datetime(2024, 5, 1, 2, 0, tzinfo=dt.timezone.utc)
    first = run_nightly(_job(tmp_path / "a.toml", catalog, store, K=3), client=client, now=night)
    assert first.status == "promoted", first["reason"]
    m = scrape_when(client, ("xd_dask_nightly_last_promoted", ()), 1.0)
    assert m["xd_dask_nightly_last_verdict", (("verdict", "promoted"),)] == 1
    assert m["xd_dask_nightly_last_promoted", ()] == 1
    second = run_nightly(
        _job(tmp_path / "b.toml", catalog, store, K=1),
        client=client,
        now=night + dt.timedelta(days=1),
    )
    assert second.status == "rejected", second["reason"]
    m = scrape_when(client, ("xd_dask_nightly_last_verdict", (("verdict", "rejected"),)), 1.0)
    assert m["xd_dask_nightly_last_verdict", (("verdict", "rejected"),)] == 1
    assert m["xd_dask_nightly_last_verdict", (("verdict", "promoted"),)] == 0
    assert m["xd_dask_nightly_last_promoted", ()] == 0
    assert m["xd_dask_nightly_last_heldout_mean_loglike", ()] == pytest.approx(
        second["heldout_mean_loglike"]
    )
    finished = json.loads((second.run_dir / "report.json").read_text())["nightly"]["finished_utc"]
    success = dt.datetime.fromisoformat(finished).timestamp()  # a rejected run reached its gate
    assert m["xd_dask_nightly_last_success_timestamp_seconds", ()] == success
    info = dict(next(labels for name, labels in m if name == "xd_dask_fit_info"))
    assert info["nightly"] == second["run"] and info["n_components"] == "1"
