"""What the commands print: progress of a fit, summary tables, JSON events, the dashboard link,
and a note when the numerical kernels are about to be compiled."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from xd_dask.optim.methods import method, method_names

__all__ = ["Progress", "connected", "jsonable", "kernels_cold", "summary", "table"]


class Progress:
    """Renders fit events: a progress bar on a terminal, plain lines otherwise, or JSON lines."""

    def __init__(self, log_format: str) -> None:
        self.json = log_format == "json"
        self.tty = sys.stdout.isatty() and not self.json
        self.bar: Any = None
        self.t0 = time.perf_counter()

    def emit(self, event: str, **fields: Any) -> None:
        """One JSON object (json mode) for ``event``; text mode prints nothing here."""
        if self.json:
            click.echo(json.dumps({"event": event, **jsonable(fields)}))

    def message(self, text: str, **fields: Any) -> None:
        if self.json:
            self.emit("message", text=text, **fields)
        else:
            self._close_bar()
            click.echo(text)

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.json:
            self.emit("progress", **ev)
            return
        on_waves = ev.get("unit") == "wave"
        where = (
            f"epoch {ev['epoch']} wave {ev['wave']} (t={ev['iteration']})"
            if on_waves
            else f"iteration {ev['iteration']}"
        )
        ll = ev["wave_mean_loglike"] if on_waves else ev["mean_loglike"]
        label = f"{where}  mean log-likelihood {ll:.6f}"
        if self.tty:
            if self.bar is None:
                self.bar = click.progressbar(
                    length=int(ev.get("total") or 1), label=label, show_pos=True, width=30
                )
                self.bar.__enter__()
            self.bar.label = label
            self.bar.update(1)
        else:
            total = ev.get("total")
            n = f"[{ev['iteration']}/{total}] " if total else ""
            step = f"  step {ev['step']:.4g}" if on_waves else ""
            click.echo(f"{n}{label}{step}  rows {ev['rows']}  {ev['seconds']:.2f} s")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 1e6 else f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items() if x) or "none"
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v)
    return "-" if v is None else str(v)


def table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + min(60, max(len(_fmt(v)) for _, v in rows)))
    return "\n".join([line, *(f"{k.ljust(width)}  {_fmt(v)}" for k, v in rows), line])


def _converged(report: dict[str, Any]) -> str:
    """'yes', or how far from converged a fit stopped."""
    if report.get("converged"):
        return "yes"
    last, tol = report.get("last_change"), report.get("tol")
    if last is None:
        return "no"
    known = report.get("method") in method_names()
    limit = "max_iter" if not known or method(report["method"]).full_batch else "fit.epochs"
    per = "" if limit == "max_iter" else " per epoch"
    if not tol:
        return f"no (tol = 0: ran {limit}; last change {last:.2g} nats/row{per})"
    return (
        f"no: stopped at {limit}; last change {last:.2g} nats/row{per} vs tol {tol:g} "
        f"({abs(last) / tol:.3g} x tol)"
    )


def summary(progress: Progress, report: dict[str, Any], title: str) -> None:
    if progress.json:
        progress.emit("summary", **report)
        return
    rows = [
        ("method", report.get("method")),
        ("components (K)", report.get("n_components")),
        ("features", report.get("features")),
        ("iterations / waves", report.get("n_iter")),
        ("converged", _converged(report)),
        ("mean log-likelihood", report.get("final_mean_loglike")),
        ("held-out mean log-lik.", report.get("heldout_mean_loglike")),
        ("rows used", report.get("rows_used")),
        ("rows dropped", report.get("dropped")),
        ("partitions", report.get("partitions")),
        ("fit time [s]", report.get("fit_seconds")),
    ]
    if any((report.get("heldout_dropped") or {}).values()):
        rows.insert(7, ("held-out rows dropped", report.get("heldout_dropped")))
    rows += [(name, path) for name, path in (report.get("files") or {}).items()]
    rows += [(f"not drawn: {name}", why) for name, why in skipped_figures(report).items()]
    progress.message(f"{title}\n{table(rows)}")


def skipped_figures(report: dict[str, Any]) -> dict[str, str]:
    """{figure file: why it was not drawn} of a fit's report."""
    return dict(report.get("figures_skipped") or {})


def _dashboard(client: Any) -> str | None:
    """The dashboard link, or None when the scheduler runs without a dashboard."""
    from xd_dask.dashboard.plugin import serves_dashboard  # noqa: PLC0415 - loads distributed

    try:
        served = client.run_on_scheduler(serves_dashboard)
    except Exception:  # noqa: BLE001 - a scheduler without xd-dask: ask for its HTTP server
        try:
            served = "dashboard" in client.scheduler_info().get("services", {})
        except Exception:  # noqa: BLE001 - an old or unusual scheduler: the client's guess
            served = True
    return client.dashboard_link if served else None


def show_dashboard(client: Any, progress: Progress) -> None:
    """The dashboard line: Dask's link and, when the scheduler serves it, the XD fit page's."""
    from xd_dask.dashboard.links import page_link  # noqa: PLC0415 - loads distributed

    link = _dashboard(client)
    xd = page_link(client) if link else None
    page = f"  (XD fit page: {xd})" if xd else ""
    progress.message(
        f"Dask dashboard: {link or 'none (the scheduler runs without a dashboard)'}{page}",
        dashboard=link,
        xd_page=xd,
    )


def kernels_cold(n_features: int, dtype: str = "float64") -> bool:
    """True when this machine's kernel cache holds no compiled statistics kernel for
    (``n_features``, ``dtype``) of this xd-dask (the first fit then compiles its kernels)."""
    try:
        from xd_dask.kernels import _numba  # noqa: PLC0415

        return not _numba.on_disk("stats", n_features, dtype == "float32")
    except Exception:  # the kernels' cache layout changed: say nothing
        return False


@contextlib.contextmanager
def connected(cfg: Any, progress: Progress, verbose: int = 0) -> Iterator[Any]:
    """A client as ``[cluster]`` says; prints the dashboard link. Without ``-v``, and in JSON
    mode (whose every line must be JSON), a new local cluster's workers do not print failed
    tasks' tracebacks (the error reaches the CLI)."""
    from xd_dask.jobs.runner import cluster_client  # noqa: PLC0415

    with cluster_client(cfg, quiet=verbose == 0 or progress.json) as client:
        show_dashboard(client, progress)
        yield client


def compile_note(cfg: Any, progress: Progress, n_features: int) -> None:
    """Say that kernels will compile when a local cluster starts with a cold kernel cache."""
    cl = cfg.cluster
    if cl.scheduler_address or cl.scheduler_file or cl.gpu or cfg.fit.backend == "reference":
        return
    from xd_dask.config import row_dtype  # noqa: PLC0415

    dtype = row_dtype(cfg.fit.dtype, cl.gpu)
    if kernels_cold(n_features, dtype):
        progress.message(
            f"Compiling the numerical kernels for D = {n_features} ({dtype}): with an empty "
            "kernel cache the first run compiles one statistics and one densities kernel per "
            "missing-field pattern of the catalogue (~1-10 s each on one core, each compiled "
            "once and shared by the workers); later runs load them in well under a second "
            "(XD_DASK_KERNEL_CACHE, default ~/.cache/xd-dask/kernels)"
        )
