"""Outputs land where asked on a real cluster whose scheduler and workers run in another
directory (issue 19.1), and a failed posterior leaves nothing behind (19.6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.distributed_data import make_rows, write_catalog
from tests.mixtures import known_mixture_3d
from xd_dask.cli import main
from xd_dask.model import XDModel
from xd_dask.params import Params

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent
SCHEMA = """name = "plain3"
id_column = "source_id"
""" + "".join(f'[[feature]]\nname = "x{i}"\nerror = "x{i}_error"\n' for i in range(3))


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes started in their own directory."""
    wd = tmp_path_factory.mktemp("cluster-home")
    sched = wd / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--scheduler-file", str(sched), "--port", "0",
             "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
            cwd=wd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while not sched.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    procs += [
        subprocess.Popen(
            [str(BIN / "dask"), "worker", "--scheduler-file", str(sched), "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "1GiB"],
            cwd=wd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]  # fmt: skip
    from distributed import Client

    with Client(scheduler_file=str(sched), timeout=60) as c:
        c.wait_for_workers(2, timeout=120)
    try:
        yield wd, str(sched)
    finally:  # the workers, then the scheduler (whose workers would wait 8 s to be killed)
        for group in (procs[1:], procs[:1]):
            for p in group:
                p.terminate()
            for p in group:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    X, S = make_rows(seed=4, n=3000)
    write_catalog(root / "cat", X, S, 3)
    (root / "plain3.toml").write_text(SCHEMA)
    w, m, V = known_mixture_3d()
    XDModel(Params(w, m, V), ["x0", "x1", "x2"]).save(root / "model.npz")
    return root


def _run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_relative_outputs_land_in_the_clients_directory(elsewhere, catalogue, tmp_path,
                                                        monkeypatch):  # fmt: skip
    wd, sched = elsewhere
    monkeypatch.chdir(tmp_path)
    common = ["--schema", catalogue / "plain3.toml", "--scheduler-file", sched]
    res = _run("posterior", catalogue / "model.npz", catalogue / "cat", "post", *common)
    assert res.exit_code == 0, res.output
    done = json.loads((tmp_path / "post" / "_SUCCESS.json").read_text())
    parts = sorted((tmp_path / "post").glob("posterior-*.parquet"))
    assert [p.name for p in parts] == done["files"] and len(parts) == 3
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == done["rows"] == 3000
    res = _run("score", catalogue / "model.npz", catalogue / "cat", "--per-row", "rows", *common)
    assert res.exit_code == 0, res.output
    rows = sorted((tmp_path / "rows").glob("score-*.parquet"))
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in rows) == 3000
    assert not list(wd.rglob("*.parquet"))  # nothing in the workers' directory


def test_a_failed_posterior_leaves_nothing_behind(elsewhere, catalogue, tmp_path, monkeypatch):
    """A bad row in the last file fails the pass (exit 1) while the other partitions are being
    written: no part, no temporary directory, no lock is left, here or beside the workers."""
    wd, sched = elsewhere
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted((catalogue / "cat").glob("*.parquet")):
        t = pq.read_table(p)
        if p.name.endswith("0002.parquet"):
            err = t["x1_error"].to_numpy().copy()
            err[7] = -1.0  # a negative error: a bad row
            t = t.set_column(t.schema.get_field_index("x1_error"), "x1_error", pa.array(err))
        pq.write_table(t, bad / p.name)
    monkeypatch.chdir(tmp_path)
    res = _run(
        "posterior", catalogue / "model.npz", bad, "post", "--schema", catalogue / "plain3.toml",
        "--scheduler-file", sched,
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "x1_error" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no post/, .post.*, lock
    assert not [p for p in wd.rglob("*") if "post" in p.name], list(wd.rglob("*"))
