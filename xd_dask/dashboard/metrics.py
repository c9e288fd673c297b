"""Prometheus metrics of fits and nightlies on the scheduler's ``/metrics``, beside Dask's own.

Dask serves ``/metrics`` from ``prometheus_client``'s default registry when that package is
installed on the scheduler; :func:`register` adds one collector to it that reads the XD plugin's
state (:class:`xd_dask.dashboard.state.XDState`) at each scrape. "The fit" is the fit that
started last on this scheduler.

Fit (gauges unless named ``_total``):

- ``xd_dask_fit_info{fit,method,n_components,select,nightly}``: 1, the fit's labels;
- ``xd_dask_fit_running``: 1 while the fit runs, else 0;
- ``xd_dask_fit_iteration``: iterations (batch EM) or waves (online EM, Adam) done;
- ``xd_dask_fit_iterations_planned``: max_iter, or epochs x waves per epoch;
- ``xd_dask_fit_mean_loglike``: mean log-likelihood per row at the last step;
- ``xd_dask_fit_heldout_mean_loglike``: per held-out row, once the fit has ended (if any);
- ``xd_dask_fit_step_size``: step size of the last update;
- ``xd_dask_fit_rows_per_second``: rows of the last step over its wall-clock seconds;
- ``xd_dask_fit_seconds_remaining``: planned steps left x mean recent step time;
- ``xd_dask_fit_rows_read_total`` (counter): rows read by the fit's ``xd-estep`` tasks;
- ``xd_dask_fit_rows_dropped_total{reason}`` (counter): rows those tasks dropped;
- ``xd_dask_fits_total{status}`` (counter): fits ended on this scheduler (ok, failed);
- ``xd_dask_worker_rows_per_second{worker}``: rows per task second of the worker's tasks;
- ``xd_dask_worker_ns_per_pair{worker}``: task nanoseconds per (row, component) pair.

Nightly (the runs this scheduler was told about, including the store's history):

- ``xd_dask_nightly_last_success_timestamp_seconds``: end of the last run that reached its gate
  (promoted or rejected);
- ``xd_dask_nightly_last_run_timestamp_seconds``: end of the last run, whatever its status;
- ``xd_dask_nightly_last_verdict{verdict}``: 1 for the last run's verdict (promoted, rejected,
  failed), 0 for the others;
- ``xd_dask_nightly_last_heldout_mean_loglike``: the last run's held-out score;
- ``xd_dask_nightly_last_promoted``: 1 if the last run was promoted to ``latest``.

The two ``_total`` counters of the fit start again at each fit (Prometheus reads that as a
reset); ``rows_dropped_total / rows_read_total`` is the share of rows dropped. Metrics of a fit
or nightly that has not happened are absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from xd_dask.dashboard.state import FitRecord, XDState, utc_seconds

__all__ = ["PREFIX", "XDCollector", "register"]

PREFIX = "xd_dask"
VERDICTS = ("promoted", "rejected", "failed")

_COLLECTOR: XDCollector | None = None


class XDCollector:
    """A ``prometheus_client`` collector of :class:`XDState` (module docstring)."""

    def __init__(self, state: XDState | None = None) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        state = self.state
        if state is None:
            return
        with state.lock:
            fit = state.current()
            families = list(_fit_metrics(fit)) if fit is not None else []
            families += list(_fits_total(state))
            if fit is not None:
                families += list(_worker_metrics(fit))
            families += list(_nightly_metrics(state))
        yield from families


def _gauge(name: str, doc: str, value: float | None = None, labels: list[str] | None = None):
    from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415 - optional package

    if labels is not None:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, labels: list[str] | None = None, value: float | None = None):
    from prometheus_client.core import CounterMetricFamily  # noqa: PLC0415 - optional package

    if labels is not None:
        return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _fit_metrics(fit: FitRecord) -> Iterator[Any]:
    info = _gauge(
        "fit_info",
        "The fit that started last",
        labels=["fit", "method", "n_components", "select", "nightly"],
    )
    info.add_metric(
        [
            fit.fit,
            str(fit.info.get("method") or ""),
            str(fit.n_components or ""),
            str(fit.info.get("select") or ""),
            str(fit.info.get("nightly") or ""),
        ],
        1,
    )
    yield info
    yield _gauge("fit_running", "1 while the fit runs", float(fit.end is None))
    yield _gauge("fit_iteration", "Iterations (batch EM) or waves done", fit.iterations)
    values = {
        "fit_iterations_planned": (fit.total, "Planned iterations or waves"),
        "fit_mean_loglike": (
            fit.last.get("mean_loglike"),
            "Mean log-likelihood per row at the last step",
        ),
        "fit_heldout_mean_loglike": (
            (fit.end or {}).get("heldout_mean_loglike"),
            "Mean log-likelihood per held-out row of the finished fit",
        ),
        "fit_step_size": (fit.last.get("step"), "Step size of the last update"),
        "fit_rows_per_second": (
            fit.rows_per_second(),
            "Rows of the last step over its wall-clock seconds",
        ),
        "fit_seconds_remaining": (fit.seconds_left(), "Estimated seconds until the fit ends"),
    }
    for name, (value, doc) in values.items():
        if value is not None:
            yield _gauge(name, doc, float(value))
    yield _counter("fit_rows_read", "Rows read by the fit's passes", value=fit.rows_read)
    dropped = _counter("fit_rows_dropped", "Rows the fit's passes dropped", labels=["reason"])
    for reason, n in sorted(fit.dropped.items()):
        dropped.add_metric([reason], n)
    yield dropped


def _fits_total(state: XDState) -> Iterator[Any]:
    ended = _counter("fits", "Fits ended on this scheduler", labels=["status"])
    for status, n in sorted(state.fits_ended.items()):
        ended.add_metric([status], n)
    yield ended


def _worker_metrics(fit: FitRecord) -> Iterator[Any]:
    rate = _gauge(
        "worker_rows_per_second",
        "Rows per task second of the fit's xd-estep tasks",
        labels=["worker"],
    )
    pair = _gauge("worker_ns_per_pair", "Task ns per (row, component) pair", labels=["worker"])
    for worker, meter in sorted(fit.workers.items()):
        if meter.rows_per_second is not None:
            rate.add_metric([worker], meter.rows_per_second)
        ns = meter.ns_per_pair(fit.n_components)
        if ns is not None:
            pair.add_metric([worker], ns)
    yield rate
    yield pair


def _nightly_metrics(state: XDState) -> Iterator[Any]:
    success = state.last_success()
    if success is not None:
        yield _gauge(
            "nightly_last_success_timestamp_seconds",
            "End of the last nightly run that reached its gate (Unix seconds)",
            success,
        )
    last = state.last_run()
    if last is None:
        return
    yield _gauge(
        "nightly_last_run_timestamp_seconds",
        "End of the last nightly run (Unix seconds)",
        utc_seconds(last["finished_utc"]),
    )
    verdict = _gauge("nightly_last_verdict", "The last nightly run's verdict", labels=["verdict"])
    for v in VERDICTS:
        verdict.add_metric([v], float(last.get("status") == v))
    yield verdict
    score = last.get("heldout_mean_loglike")
    if score is not None:
        yield _gauge(
            "nightly_last_heldout_mean_loglike",
            "Mean log-likelihood per held-out row of the last nightly's model",
            float(score),
        )
    yield _gauge(
        "nightly_last_promoted",
        "1 if the last nightly run was promoted to latest",
        float(last.get("status") == "promoted"),
    )


def register(state: XDState) -> bool:
    """Serve ``state`` on ``/metrics`` (one collector per process, pointed at the newest
    scheduler's state, as Dask does with its own); False without ``prometheus_client``."""
    global _COLLECTOR
    try:
        from prometheus_client import REGISTRY  # noqa: PLC0415 - optional package
    except ImportError:
        return False
    if _COLLECTOR is None:
        _COLLECTOR = XDCollector(state)
        REGISTRY.register(_COLLECTOR)
    _COLLECTOR.state = state
    return True
