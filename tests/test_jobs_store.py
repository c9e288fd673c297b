"""The nightly model store: run naming, the atomic `latest` link, pruning."""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pytest

from xd_dask.jobs.store import ModelStore, StoreError
from xd_dask.model import XDModel


def _model(seed: int) -> XDModel:
    rng = np.random.default_rng(seed)
    return XDModel(np.array([0.4, 0.6]), rng.normal(size=(2, 3)), np.stack([np.eye(3)] * 2))


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
    assert sorted(p.name for p in store.root.iterdir()) == ["2024-05-01", "2024-05-02", "latest"]
    with pytest.raises(StoreError, match="not a run directory"):
        store.promote(tmp_path)


def test_prune_keeps_last_n_and_latest(tmp_path):
    store = ModelStore(tmp_path / "models")
    runs = [store.new_run(_day(d)) for d in range(1, 7)]
    _model(0).save(runs[1] / "model.npz")
    store.promote(runs[1])  # an old run stays latest (later runs were rejected)
    removed = store.prune(keep=2)
    assert [p.name for p in removed] == ["2024-05-01", "2024-05-03", "2024-05-04"]
    assert [p.name for p in store.runs()] == ["2024-05-02", "2024-05-05", "2024-05-06"]
    assert store.latest() == runs[1].resolve()


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
