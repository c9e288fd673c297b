"""The nightly store never deletes its newest runs and can be repaired (issue 19, point 5).

- names given out after pruning within one UTC day are new names (on main ``2026-12-07`` came
  back), and pruning follows the order in which runs were made, not how names sort;
- a run made after ``latest`` while the clock had gone back a day is still newer than it;
- a ``latest`` whose model does not load stops ``xd-dask nightly`` (exit 2) with a message that
  names ``xd-dask store repair``, which points ``latest`` at the newest promoted run whose model
  loads; a real nightly then runs against it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xd_dask.io import make_catalog
from xd_dask.io.synthetic import TRUE_MODEL
from xd_dask.jobs.store import ModelStore
from xd_dask.model import XDModel
from xd_dask.params import Params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAY = dt.datetime(2026, 12, 7, 2, 0, 0, tzinfo=dt.timezone.utc)


def _model(seed: int) -> XDModel:
    rng = np.random.default_rng(seed)
    return XDModel(Params(np.array([0.4, 0.6]), rng.normal(size=(2, 3)), np.stack([np.eye(3)] * 2)))


def _night(store: ModelStore, seconds: int, status: str, keep: int = 1) -> Path:
    """One nightly's store operations at DAY + ``seconds``: a run that ends ``status``."""
    run = store.new_run(DAY + dt.timedelta(seconds=seconds))
    if status == "promoted":
        _model(seconds).save(run / "model.npz")
        store.promote(run)
    store.finish_run(run, status)
    store.prune(keep)
    return run


def test_names_are_never_reused_and_pruning_keeps_the_newest_runs(tmp_path):
    store = ModelStore(tmp_path / "models")
    made: list[tuple[str, str]] = []  # (name, status) in the order the runs were made
    outcomes = ["promoted", "failed", "promoted", "rejected", "failed", "promoted", "failed"]
    for i, status in enumerate(outcomes):
        run = _night(store, i, status)
        assert run.name not in [n for n, _ in made], f"run name {run.name} given out twice"
        made.append((run.name, status))
        # expected survivors: latest (the last promoted), every run made after it, and the
        # newest finished run (keep = 1)
        last_promoted = max(j for j, (_, s) in enumerate(made) if s == "promoted")
        expected = [n for j, (n, _) in enumerate(made) if j >= last_promoted]
        assert [p.name for p in store.runs()] == expected
        assert store.latest().name == made[last_promoted][0]
    assert [n for n, _ in made] == ["2026-12-07"] + [f"2026-12-07.{k}" for k in range(2, 8)]
    state = json.loads((store.root / ".store.json").read_text())
    assert state == {"last_seq": 7, "last_run": "2026-12-07.7"}


def test_a_run_made_after_latest_is_newer_even_if_the_clock_went_back(tmp_path):
    store = ModelStore(tmp_path / "models")
    _night(store, 0, "promoted")
    back = _night(store, -86400, "failed")  # the host's clock is a day behind now
    assert back.exists() and store.runs()[-1] == back  # kept: made after latest
    assert back.name == "2026-12-06.2"  # not the plain date, which an earlier run may have had
    info = json.loads((back / "run.json").read_text())
    assert info["seq"] == 2 and info["status"] == "failed"


# --------------------------------------------------------------------------- corrupt latest
def _xd(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XD_DASK_")}
    if "XD_DASK_KERNEL_CACHE" in os.environ:
        env["XD_DASK_KERNEL_CACHE"] = os.environ["XD_DASK_KERNEL_CACHE"]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [str(BIN / "xd-dask"), *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def nightly_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-repair")
    make_catalog(root / "catalog", n_rows=2000, n_partitions=2, seed=3)
    job = root / "job.toml"
    job.write_text(
        textwrap.dedent(
            f"""
            [catalog]
            path = "{root / "catalog"}"
            holdout_rows = 0.25
            [fit]
            n_components = 6
            max_iter = 2
            tol = 0.0
            [output]
            plots = false
            checkpoint = false
            [nightly]
            keep = 3
            """
        )
    )
    return job, XDModel.load(root / "catalog" / TRUE_MODEL)


@pytest.mark.slow
@pytest.mark.cluster
def test_a_corrupt_latest_is_reported_and_repaired_by_a_command(nightly_job, cluster, tmp_path):
    job, truth = nightly_job
    store = ModelStore(tmp_path / "models")
    runs = []
    for i in range(3):
        run = store.new_run(DAY + dt.timedelta(days=i))
        truth.save(run / "model.npz")
        store.promote(run)
        store.finish_run(run, "promoted")
        runs.append(run)
    broken = runs[-1] / "model.npz"
    broken.write_bytes(broken.read_bytes()[:300])  # truncated, e.g. a disk filled up later

    night = _xd("nightly", str(job), "--store", str(store.root))
    assert night.returncode == 2, night.stdout + night.stderr
    assert f"{store.root / 'latest'} -> {runs[-1].name}: the model does not load" in night.stderr
    assert f"xd-dask store repair {store.root}" in night.stderr
    assert [p.name for p in store.runs()] == [r.name for r in runs]  # no run was made

    dry = _xd("store", "repair", str(store.root), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"latest would be pointed at {runs[1].name}" in dry.stdout
    assert store.latest() == runs[-1].resolve()  # unchanged by a dry run

    bad_to = _xd("store", "repair", str(store.root), "--to", runs[-1].name)
    assert bad_to.returncode == 2 and "model does not load" in bad_to.stderr

    fixed = _xd("store", "repair", str(store.root), "--log-format", "json")
    assert fixed.returncode == 0, fixed.stderr
    event = json.loads(fixed.stdout.strip().splitlines()[-1])
    assert (event["action"], event["latest"], event["previous"]) == (
        "repointed",
        runs[1].name,
        runs[2].name,
    )
    assert store.latest() == runs[1].resolve()
    assert "does not load" in json.loads((runs[-1] / "run.json").read_text())["latest_problem"]
    again = _xd("store", "repair", str(store.root))
    assert again.returncode == 0 and "nothing to repair" in again.stdout

    # the way forward: a real nightly runs, warm-started from and gated against the repaired latest
    night = _xd(
        "nightly",
        str(job),
        "--store",
        str(store.root),
        "--scheduler-address",
        cluster.scheduler_address,
        "--log-format",
        "json",
    )
    assert night.returncode in (0, 1), night.stderr
    result = [json.loads(ln) for ln in night.stdout.splitlines() if '"nightly"' in ln][-1]
    assert result["previous"] == runs[1].name
    assert result["warm_start_from"] == runs[1].name
    assert result["status"] in ("promoted", "rejected")


def test_repair_replaces_a_dangling_or_plain_file_latest(tmp_path):
    store = ModelStore(tmp_path / "models")
    good = _night(store, 0, "promoted")
    gone = _night(store, 1, "promoted", keep=5)
    (store.root / "latest").unlink()
    (store.root / "latest").symlink_to("2026-12-99")  # dangling
    assert "not a run of this store" in store.latest_problem()
    out = store.repair()
    assert (out["action"], out["latest"]) == ("repointed", gone.name)
    (store.root / "latest").unlink()
    (store.root / "latest").write_text("oops")
    assert store.repair(to=good.name)["latest"] == good.name
    assert os.readlink(store.root / "latest") == good.name
