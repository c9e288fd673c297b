"""Two nightlies on one store at the same time, as real processes (issue 10, point 1).

Each nightly is a separate Python process running ``run_nightly`` against the shared test cluster;
its first progress event (the run directory exists, the fit is running) blocks until the test
releases it, so the order in which the two runs reach the gate is chosen by the test. Run A fits
K = 3 (a good model), run B fits K = 1 (worse by far more than the margin). Whatever the order,
``latest`` must end on A, and the run still fitting must survive the other run's pruning
(keep = 1). The killed-run case checks that an interrupted run is marked and not counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xd_dask.io import make_catalog
from xd_dask.jobs.store import ModelStore
from xd_dask.params import Params

pytestmark = pytest.mark.cluster

SCRIPT = textwrap.dedent(
    """
    import datetime as dt, json, sys, time
    from pathlib import Path
    from distributed import Client
    from xd_dask.jobs.config import load_config
    from xd_dask.jobs.nightly import run_nightly

    job, address, gate, tag, k = sys.argv[1:]
    gate = Path(gate)
    cfg = load_config(job, {"fit.n_components": int(k)})

    def progress(event):
        (gate / f"{tag}.fitting").touch()
        while not (gate / f"{tag}.go").exists():
            time.sleep(0.05)

    with Client(address) as client:
        now = dt.datetime(2024, 5, 1, 2, 0, tzinfo=dt.timezone.utc)
        res = run_nightly(cfg, client=client, progress=progress, now=now)
    res.pop("traceback", None)
    print(json.dumps(res))
    """
)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    make_catalog(root / "catalog", n_rows=3000, n_partitions=3, seed=5)
    path = root / "job.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [catalog]
            path = "{root / "catalog"}"
            holdout_rows = 0.25
            [fit]
            max_iter = 2
            tol = 0.0
            [output]
            plots = false
            checkpoint = false
            [nightly]
            keep = 1
            margin = 0.01
            """
        )
    )
    (root / "nightly_run.py").write_text(SCRIPT)
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_")}
    if "XD_DASK_KERNEL_CACHE" in os.environ:
        env["XD_DASK_KERNEL_CACHE"] = os.environ["XD_DASK_KERNEL_CACHE"]
    return env


def _start(job: Path, cluster, store: Path, gate: Path, tag: str, k: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(job.parent / "nightly_run.py"),
            str(job),
            cluster.scheduler_address,
            str(gate),
            tag,
            str(k),
        ],
        env=dict(_env(), XD_DASK_NIGHTLY__STORE=str(store)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[4:]} ended early:\n{proc.stderr.read()}")
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {path}"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, gate: Path, tag: str) -> dict:
    (gate / f"{tag}.go").touch()
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("first", ["A", "B"])
def test_concurrent_nightlies_end_on_the_best_model(job, cluster, tmp_path, first):
    store, gate = tmp_path / "models", tmp_path / "gate"
    gate.mkdir()
    procs = {}
    try:
        procs["A"] = _start(job, cluster, store, gate, "A", 3)
        _wait_for(gate / "A.fitting", procs["A"])
        procs["B"] = _start(job, cluster, store, gate, "B", 1)
        _wait_for(gate / "B.fitting", procs["B"])
        run_of = {"A": store / "2024-05-01", "B": store / "2024-05-01.2"}
        second = "B" if first == "A" else "A"

        r1 = _finish(procs[first], gate, first)
        assert r1["status"] == "promoted" and r1["reason"] == "first model in the store"
        # the other run is still fitting: keep = 1 pruning left it whole
        st = ModelStore(store)
        assert st.run_state(run_of[second]) == "running"
        # left whole: its record is there (a fit writes job.toml with its model, at the end)
        assert (run_of[second] / "run.json").is_file()
        assert st.latest() == run_of[first].resolve()

        r2 = _finish(procs[second], gate, second)
        # the second run was gated against the CURRENT latest (the first run), not against the
        # empty store it started from
        assert r2["previous"] == run_of[first].name
        assert r2["previous_heldout_mean_loglike"] == pytest.approx(r1["heldout_mean_loglike"])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    good, bad = (r1, r2) if first == "A" else (r2, r1)
    assert good["heldout_mean_loglike"] > bad["heldout_mean_loglike"] + 0.05
    assert r2["status"] == ("rejected" if first == "A" else "promoted")
    latest = ModelStore(store).latest()
    assert latest == run_of["A"].resolve()
    for name in ("model.npz", "report.json", "job.toml", "history.json"):
        assert (latest / name).is_file(), name
    report = json.loads((latest / "report.json").read_text())
    assert report["nightly"]["status"] == "promoted"
    assert json.loads((latest / "run.json").read_text())["status"] == "promoted"


def test_a_killed_run_is_marked_interrupted_and_not_counted(tmp_path):
    import numpy as np

    from xd_dask.model import XDModel

    store = ModelStore(tmp_path / "models")
    old, best = store.new_run(), store.new_run()
    store.finish_run(old, "failed")
    XDModel(Params([1.0], np.zeros((1, 2)), np.eye(2)[None])).save(best / "model.npz")
    store.promote(best)
    store.finish_run(best, "promoted")
    # a separate process makes a run and is killed while "fitting"
    code = (
        "import sys, time; from xd_dask.jobs.store import ModelStore; "
        "r = ModelStore(sys.argv[1]).new_run(); print(r, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(store.root)], stdout=subprocess.PIPE, text=True
    )
    killed = Path(proc.stdout.readline().strip())
    assert store.run_state(killed) == "running"  # its process holds the run lock
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert store.run_state(killed) == "interrupted"
    # keep = 2 counts finished runs only: the killed run does not push `old` out
    assert store.prune(keep=2) == []
    assert json.loads((killed / "run.json").read_text())["status"] == "interrupted"
    assert store.prune(keep=1) == [old]  # older than latest and beyond keep
    assert [p.name for p in store.runs()] == [best.name, killed.name]
