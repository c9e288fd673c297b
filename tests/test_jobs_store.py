"""The nightly model store: run naming, the atomic `latest` link, pruning."""

from __future__ import annotations

import datetime as dt
import json
import os

import numpy as np
import pytest

from xd_dask.jobs.store import ModelStore, StoreError
from xd_dask.model import XDModel
from xd_dask.params import Params


def _model(seed: int) -> XDModel:
    rng = np.random.default_rng(seed)
    return XDModel(Params(np.array([0.4, 0.6]), rng.normal(size=(2, 3)), np.stack([np.eye(3)] * 2)))


def _day(d: int) -> dt.datetime:
    return dt.datetime(2024, 5, d, 2, 0, tzinfo=dt.timezone.utc)


def test_runs_are_named_by_utc_date_and_ordered(tmp_path):
    store = ModelStore(tmp_path / "models")
    assert store.runs() == [] and store.latest() is None and store.latest_model() is None
    # 23:30 at UTC-5 is the next UTC day
    late = dt.datetime(2024, 5, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert store.new_run(late).name == "2024-05-02"
    names = [store.new_run(_day(3)).name for _ in range(11)]
    assert names[:3] == ["2024-05-03", "2024-05-03.2", "2024-05-03.3"]
    assert names[-1] == "2024-05-03.11"
    # numeric, not lexical, order of same-day runs
    assert [p.name for p in store.runs()] == ["2024-05-02", *names]


def test_promote_moves_latest_atomically_and_refuses_runs_without_model(tmp_path):
    store = ModelStore(tmp_path / "models")
    r1, r2 = store.new_run(_day(1)), store.new_run(_day(2))
    with pytest.raises(StoreError, match="no model.npz"):
        store.promote(r1)
    assert store.latest() is None
    _model(1).save(r1 / "model.npz")
    store.promote(r1)
    assert store.latest() == r1.resolve()
    assert os.readlink(store.latest_link) == "2024-05-01"  # relative link
    _model(2).save(r2 / "model.npz")
    store.promote(r2)
    assert store.latest() == r2.resolve()
    np.testing.assert_array_equal(store.latest_model().means, _model(2).means)
    # no temporary links are left behind
    names = sorted(p.name for p in store.root.iterdir())
    assert names == [".store.json", ".store.lock", "2024-05-01", "2024-05-02", "latest"]
    with pytest.raises(StoreError, match="not a run directory"):
        store.promote(tmp_path)


def test_prune_keeps_last_n_finished_latest_running_and_newer_runs(tmp_path):
    store = ModelStore(tmp_path / "models")
    runs = [store.new_run(_day(d)) for d in range(1, 9)]
    assert all(store.run_state(r) == "running" for r in runs)  # this object holds their locks
    _model(0).save(runs[2] / "model.npz")
    store.promote(runs[2])
    for r, status in zip(
        runs[:5], ["failed", "rejected", "promoted", "rejected", "rejected"], strict=True
    ):
        store.finish_run(r, status)
    store.release_run(runs[5])  # "killed": no final status, lock free
    # runs[6], runs[7] are still running (newer than latest as well)
    removed = store.prune(keep=1)
    # keep = 1 finished run (runs[4]); latest (runs[2]); runs[3], runs[5] are newer than latest;
    # runs[0], runs[1] are older than latest and not kept
    assert [p.name for p in removed] == ["2024-05-01", "2024-05-02"]
    assert [p.name for p in store.runs()] == [f"2024-05-0{d}" for d in range(3, 9)]
    assert store.latest() == runs[2].resolve()
    assert store.run_state(runs[5]) == "interrupted"
    assert json.loads((runs[5] / "run.json").read_text())["status"] == "interrupted"
    # once a newer run is promoted, the interrupted and rejected runs older than it go
    _model(1).save(runs[6] / "model.npz")
    store.promote(runs[6])
    store.finish_run(runs[6], "promoted")
    removed = store.prune(keep=1)
    assert [p.name for p in removed] == [f"2024-05-0{d}" for d in range(3, 7)]
    assert [p.name for p in store.runs()] == ["2024-05-07", "2024-05-08"]  # latest, running


def test_broken_latest_is_an_error(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.root.mkdir()
    (store.root / "latest").write_text("not a link")
    with pytest.raises(StoreError, match="not a symbolic link"):
        store.latest()
    (store.root / "latest").unlink()
    os.symlink("/", store.root / "latest")
    with pytest.raises(StoreError, match="not a run of this store"):
        store.latest()
