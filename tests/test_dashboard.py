"""The XD dashboard's parts without a cluster: the Groups page's layout, the scheduler-side
state built from published events, the Prometheus collector, the publishing side.

The page and the Groups page on a real cluster and in a browser are tested in
tests/test_dashboard_page.py; the scrape of ``/metrics`` on a ``dask scheduler --preload``
cluster in tests/test_dashboard_metrics.py.
"""

from __future__ import annotations

import pytest

from xd_dask.dashboard import events, groups
from xd_dask.dashboard.state import XDState


# --------------------------------------------------------------------------- the Groups page
def test_ordered_groups_puts_every_group_after_its_dependencies():
    deps = {"reduce": ["estep"], "estep": ["read", "params"], "read": [], "params": []}
    order = groups.ordered_groups(deps)
    assert sorted(order) == sorted(deps)
    for name, ds in deps.items():
        assert all(order.index(d) < order.index(name) for d in ds)


def test_ordered_groups_breaks_a_cycle_and_layout_never_looks_up_a_missing_group():
    deps = {"a": ["c"], "b": ["a"], "c": ["b"], "d": ["c", "gone"]}
    nodes, arrows = groups.layout(deps)
    assert set(nodes) == set(deps)
    assert all(set(a["nstart"]) <= set(nodes) for a in arrows.values())
    assert len({(n["x"], n["y"]) for n in nodes.values()}) == len(nodes)  # no two on one spot


# --------------------------------------------------------------------------- state and metrics
def _fit_events(state: XDState, fit: str = "f1", n: int = 3, K: int = 2) -> None:
    state.handle(events.TOPIC, {"kind": "fit-start", "fit": fit, "method": "em", "n_components": K})
    for i in range(1, n + 1):
        ev = {
            "kind": "progress",
            "fit": fit,
            "iteration": i,
            "total": 10,
            "mean_loglike": -5.0 + i,
            "step": 1.0,
            "rows": 1000,
            "seconds": 2.0,
            "weights": [0.5, 0.5],
            "moved": i == 2,
            "split_merge": "moved" if i == 2 else "update",
        }
        state.handle(events.TOPIC, ev)


def _task(worker: str, token: str, rows: int, seconds: float, dropped: dict | None = None):
    return {
        "worker": worker,
        "key": [f"xd-estep-{token}", 1, 0, 0],
        "rows": rows,
        "read": rows + sum((dropped or {}).values()),
        "dropped": dropped or {},
        "seconds": seconds,
    }


def test_state_folds_a_fit_its_workers_and_its_time_left():
    state = XDState()
    _fit_events(state)
    state.handle(events.TASK_TOPIC, _task("w1", "aaa", 600, 0.5, {"negative_error": 4}))
    state.handle(events.TASK_TOPIC, _task("w2", "aaa", 400, 0.5))
    fit = state.current()
    assert fit.iterations == 3 and fit.status == "running"
    assert fit.seconds_left() == pytest.approx(7 * 2.0)  # 7 planned steps of 2 s left
    assert fit.rows_per_second() == pytest.approx(500.0)
    assert fit.workers["w1"].rows_per_second == pytest.approx(1200.0)
    assert fit.workers["w1"].ns_per_pair(2) == pytest.approx(1e9 * 0.5 / (600 * 2))
    assert fit.dropped == {"negative_error": 4} and fit.rows_read == 1004
    assert [m["iteration"] for m in fit.moves()] == [2]
    # a second fit: the first's late task (its token is bound) is not counted for the second
    _fit_events(state, fit="f2", n=1)
    state.handle(events.TASK_TOPIC, _task("w1", "aaa", 600, 0.5))
    state.handle(events.TASK_TOPIC, _task("w1", "bbb", 100, 0.1))
    assert state.fits["f1"].workers["w1"].tasks == 2
    assert state.current().workers["w1"].rows == 100
    state.handle(events.TOPIC, {"kind": "fit-end", "fit": "f2", "status": "failed"})
    assert state.current().status == "failed" and state.current().seconds_left() == 0.0
    assert state.fits_ended == {"failed": 1}


def test_state_memory_stays_bounded_over_a_long_fit(monkeypatch):
    from xd_dask.dashboard import state as state_mod

    monkeypatch.setattr(state_mod, "MAX_WEIGHT_POINTS", 50)
    monkeypatch.setattr(state_mod, "KEPT_POINTS", 20)
    state = XDState()
    state.handle(events.TOPIC, {"kind": "fit-start", "fit": "long", "n_components": 2})
    for i in range(1, 501):
        state.handle(
            events.TOPIC,
            {
                "kind": "progress",
                "fit": "long",
                "iteration": i,
                "mean_loglike": -1.0,
                "weights": [0.5, 0.5],
            },
        )
    fit = state.current()
    assert fit.iterations == len(fit.points) == 500
    its = [it for it, _ in fit.weights]
    assert len(its) <= 50 and its[-1] == 500 and its[0] <= 10 and its == sorted(its)
    state.handle(events.TOPIC, {"kind": "fit-start", "fit": "next", "n_components": 2})
    old = state.fits["long"]
    assert old.iterations == 500 and len(old.points) == 20 and old.weights == []
    assert old.points[-1]["iteration"] == 500


def test_state_keeps_the_store_history_and_the_last_nightly():
    state = XDState()
    history = [
        {
            "run": "2024-05-01",
            "status": "promoted",
            "finished_utc": "2024-05-01T03:00:00+00:00",
            "heldout_mean_loglike": -3.0,
            "latest": True,
        },
        {"run": "2024-05-02", "status": "failed", "finished_utc": "2024-05-02T03:00:00+00:00"},
    ]
    state.handle(
        events.TOPIC,
        {
            "kind": "nightly",
            "run": "2024-05-03",
            "status": "rejected",
            "finished_utc": "2024-05-03T03:00:00+00:00",
            "heldout_mean_loglike": -3.5,
            "history": history,
        },
    )
    assert list(state.runs) == ["2024-05-01", "2024-05-02", "2024-05-03"]
    assert state.last_run()["run"] == "2024-05-03"
    assert state.last_success() == pytest.approx(1714705200.0)  # the rejected run reached its gate
    assert [r.get("latest") for r in state.runs.values()] == [True, False, False]


def test_of_two_nightlies_finished_in_the_same_second_the_later_is_the_last():
    """Finish times are whole seconds: a rejected run that ends in the second its promoted
    predecessor ended is still the last run (it was the newest-first tie that the metrics
    test met once starting a fit got fast)."""
    state = XDState()
    same = "2024-05-01T03:00:00+00:00"
    for run, status in (("2024-05-01.1", "promoted"), ("2024-05-01.2", "rejected")):
        state.handle(events.TOPIC, {"kind": "nightly", "run": run, "status": "running"})
        state.handle(
            events.TOPIC, {"kind": "nightly", "run": run, "status": status, "finished_utc": same}
        )
    assert state.last_run()["run"] == "2024-05-01.2"
    assert state.last_run()["status"] == "rejected"


def test_collector_reports_the_published_values():
    prometheus_client = pytest.importorskip("prometheus_client")
    from xd_dask.dashboard.metrics import XDCollector

    state = XDState()
    _fit_events(state)
    state.handle(events.TASK_TOPIC, _task("w1", "aaa", 600, 0.5, {"negative_error": 4}))
    state.handle(
        events.TOPIC,
        {
            "kind": "nightly",
            "run": "2024-05-03",
            "status": "promoted",
            "finished_utc": "2024-05-03T03:00:00+00:00",
            "heldout_mean_loglike": -3.5,
        },
    )
    registry = prometheus_client.CollectorRegistry()
    registry.register(XDCollector(state))
    value = registry.get_sample_value
    assert value("xd_dask_fit_iteration") == 3
    assert value("xd_dask_fit_mean_loglike") == -2.0
    assert value("xd_dask_fit_rows_per_second") == 500.0
    assert value("xd_dask_fit_rows_dropped_total", {"reason": "negative_error"}) == 4
    assert value("xd_dask_worker_ns_per_pair", {"worker": "w1"}) == pytest.approx(1e9 / 2400)
    assert value("xd_dask_nightly_last_verdict", {"verdict": "promoted"}) == 1
    assert value("xd_dask_nightly_last_verdict", {"verdict": "rejected"}) == 0
    assert value("xd_dask_nightly_last_success_timestamp_seconds") == 1714705200.0
    assert value("xd_dask_nightly_last_heldout_mean_loglike") == -3.5


# --------------------------------------------------------------------------- publishing
class _Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[str, dict]] = []
        self.fail = fail

    def log_event(self, topic, msg):
        if self.fail:
            raise OSError("scheduler gone")
        self.events.append((topic, msg))


def test_publish_is_plain_tagged_and_never_raises():
    import numpy as np

    assert events.publish(None, "progress", {"x": 1}) is False
    rec = _Recorder()
    with events.tagged(select="s1"):
        events.publish(rec, "progress", {"w": np.array([0.25, 0.75]), "ll": float("nan")})
    topic, msg = rec.events[0]
    assert topic == events.TOPIC and msg["select"] == "s1" and msg["kind"] == "progress"
    assert msg["w"] == [0.25, 0.75] and msg["ll"] is None and msg["v"] == events.SCHEMA_VERSION
    events.publish(rec, "progress", {})
    assert "select" not in rec.events[1][1]
    assert events.publish(_Recorder(fail=True), "progress", {}) is False


def test_a_fit_that_raises_is_published_as_failed(tmp_path):
    rec = _Recorder()
    with pytest.raises(ValueError, match="bad rows"):
        with events.fit_run(rec, {"fit.method": "em", "fit.n_components": 4}, tmp_path) as pub:
            pub.wrap(None)({"iteration": 1, "mean_loglike": -1.0})
            raise ValueError("bad rows")
    kinds = [m["kind"] for _, m in rec.events]
    assert kinds == ["fit-start", "progress", "fit-end"]
    start, _, end = (m for _, m in rec.events)
    assert start["n_components"] == 4 and end["status"] == "failed" and "bad rows" in end["error"]
    assert len({m["fit"] for _, m in rec.events}) == 1
