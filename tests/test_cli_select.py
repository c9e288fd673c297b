"""`xd-dask select` keeps the user informed and refuses early (issues 21.3 and 19): a line (or a
JSON event) per K as each finishes, with the rows each K dropped; every refusal that needs no
cluster (output in use, a K's checkpoints, K against the rows, a missing column) before one is
started or joined; no k<K>/ directory left behind by a failed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from click.testing import CliRunner

from tests.distributed_data import FEATURES, make_rows, schema, write_catalog
from xd_dask.cli import main
from xd_dask.locks import output_lock

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
N_ROWS, BAD = 3000, (17, 1500, 2999)  # rows whose x1 error is negative


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """3000 rows of the known 3-d mixture in 3 files, three with a negative x1 error, and a
    job (held-out: 10 % of the rows by id, select's default)."""
    root = tmp_path_factory.mktemp("sel")
    X, S = make_rows(5, N_ROWS)
    write_catalog(root / "cat", X, S, 3)
    import pyarrow.parquet as pq

    for path in sorted((root / "cat").glob("*.parquet")):  # the bad rows, by source_id
        t = pq.read_table(path)
        ids = t["source_id"].to_numpy() - 1000
        err = t["x1_error"].to_numpy().copy()
        err[np.isin(ids, BAD)] = -1.0
        pq.write_table(t.set_column(t.column_names.index("x1_error"), "x1_error", [err]), path)
    (root / "schema.toml").write_text(tomli_w.dumps(schema().to_dict()))
    job = root / "job.toml"
    job.write_text(
        tomli_w.dumps(
            {
                "catalog": {"path": str(root / "cat"), "schema": str(root / "schema.toml")},
                "fit": {"max_iter": 25, "tol": 0.0, "seed": 1},
                "output": {"plots": False},
            }
        )
    )
    return job


def _connections(cluster) -> int:
    """Clients the test cluster's scheduler has seen connect (its own log)."""
    return sum("Receive client connection" in msg for _, msg in cluster.scheduler.get_logs())


def _refusal_case(case: str, job: Path, out: Path, stack) -> tuple[list[str], str]:
    """(extra arguments, a fragment of the message) of each refusal."""
    if case == "locked":
        stack.enter_context(output_lock(out))  # another run writes into --out
        return ["-k", "2,3"], "is in use by pid"
    if case == "checkpoints":
        (out / "k3" / "checkpoints").mkdir(parents=True)
        return ["-k", "2,3"], "already holds the checkpoints"
    if case == "too_many":
        return ["-k", "2,400"], "fit.n_components = 400 (xd-dask select -k) in 3 features"
    bad = json.loads(json.dumps(schema().to_dict()))
    bad["feature"][0]["column"] = "x9"
    (out.parent / "bad.toml").write_text(tomli_w.dumps(bad))
    return ["-k", "2,3", "--schema", str(out.parent / "bad.toml")], "x9"


@pytest.mark.parametrize("case", ["locked", "checkpoints", "too_many", "missing_column"])
def test_refusals_come_before_a_cluster_is_joined(case, job, cluster, tmp_path):
    import contextlib

    out = tmp_path / "out"
    with contextlib.ExitStack() as stack:
        args, fragment = _refusal_case(case, job, out, stack)
        seen = _connections(cluster)
        res = CliRunner().invoke(
            main,
            ["select", str(job), *args, "--out", str(out),
             "--scheduler-address", cluster.scheduler_address, "--on-bad", "drop"],
        )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert fragment in res.output
    assert "Dask dashboard" not in res.output
    time.sleep(0.5)  # a connection would be in the scheduler's log by now
    assert _connections(cluster) == seen  # the scheduler never saw this command
    assert not [p.name for p in out.glob("k*") if p.name != "k3" or case != "checkpoints"]


def test_a_refusal_starts_no_local_cluster(job, tmp_path):
    """Without a scheduler `select` would start a local cluster: a locked --out is refused
    first (-v would log the cluster's start; measured before: 13-22 s, now the time to import)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_") or "CACHE" in k}
    with output_lock(out):
        t0 = time.perf_counter()
        run = subprocess.run(
            [str(BIN / "xd-dask"), "select", str(job), "-k", "2,3", "--out", str(out), "-v"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    assert run.returncode == 2, run.stderr
    assert "is in use by pid" in run.stderr
    assert "LocalCluster" not in run.stderr and "Dask dashboard" not in run.stdout
    assert seconds < 60  # generous: no cluster start, no worker import


def test_each_k_is_reported_as_it_finishes_with_its_dropped_rows(job, cluster, tmp_path):
    """JSON events, read as the subprocess writes them: K = 2's `k_done` arrives while K = 3 is
    still being fitted; each K's rows dropped are counted per reason on both sides."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_") or "CACHE" in k}
    args = [str(BIN / "xd-dask"), "select", str(job), "-k", "2,3", "--out", str(out),
            "--scheduler-address", cluster.scheduler_address, "--on-bad", "drop",
            "--log-format", "json"]  # fmt: skip
    events, k3_done_when_k2_reported = [], None
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            ev = json.loads(line)
            events.append(ev)
            if ev["event"] == "k_done" and ev["n_components"] == 2:
                k3_done_when_k2_reported = (out / "k3" / "report.json").exists()
    assert proc.returncode == 0, events[-1]
    assert k3_done_when_k2_reported is False  # reported before the last fit ended
    kinds = [e["event"] for e in events]
    assert kinds.index("k_done") < kinds.index("k_start", kinds.index("k_done"))
    done = {e["n_components"]: e for e in events if e["event"] == "k_done"}
    for row in done.values():  # the held-out rows are a row split: dropped when read, once
        assert row["dropped"] == {"negative_error": len(BAD)} and row["heldout_dropped"] == {}
        assert row["train_rows"] + row["heldout_rows"] == N_ROWS - len(BAD)
    final = events[-1]
    assert final["event"] == "select"
    assert [r["dropped"] for r in final["rows"]] == [done[2]["dropped"], done[3]["dropped"]]


def test_text_mode_prints_a_line_per_k_and_the_dropped_rows(job, cluster, tmp_path):
    res = CliRunner().invoke(
        main,
        ["select", str(job), "-k", "2,3", "--out", str(tmp_path / "out"),
         "--scheduler-address", cluster.scheduler_address, "--on-bad", "drop"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    order = [
        next(i for i, ln in enumerate(lines) if ln.startswith(prefix))
        for prefix in ("Fitting K = 2", "K = 2: held-out", "Fitting K = 3", "K = 3: held-out")
    ]
    assert order == sorted(order)
    assert "rows dropped 3 (negative_error 3)" in lines[order[1]]
    assert "rows dropped (--on-bad drop), per K:" in lines
    assert "  K = 2: 3 (negative_error 3)" in lines


def test_a_failed_select_leaves_no_k_directories(job, cluster, tmp_path):
    """K = 2 is fitted (its k_done event is out), K = 3 fails on the cluster (its start model
    has K = 2): exit 1, and neither k2/ nor k3/ (nor the --out this run made) is left."""
    from xd_dask.estimator import XDGMM
    from xd_dask.model import XDModel

    X, S = make_rows(5, 500)
    start = tmp_path / "start.npz"
    XDModel(XDGMM(2, max_iter=5, tol=0.0).fit(X, S).params_, FEATURES).save(start)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        ["select", str(job), "-k", "2,3", "--out", str(out), "--init", str(start),
         "--scheduler-address", cluster.scheduler_address, "--on-bad", "drop",
         "--log-format", "json"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["n_components"] for e in events if e["event"] == "k_done"] == [2]
    assert events[-1]["event"] == "error" and "K=3" in events[-1]["message"]
    assert not out.exists()
