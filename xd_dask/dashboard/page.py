"""The "XD fit" page: a Bokeh document the scheduler's dashboard serves at ``/xd``.

Three tabs, refreshed twice a second from the plugin's :class:`~xd_dask.dashboard.state.XDState`:

- **Fit** (the fit that started last): a summary line (method, K, status, iterations done of
  planned, estimated time left, rows/s, last and held-out mean log-likelihood); the mean
  log-likelihood per iteration or wave, with the held-out score at the end and the
  split-and-merge moves marked; the step size; the component weights over time; rows/s and ns
  per (row, component) pair per worker; rows dropped per reason; the split-and-merge moves.
- **Select**: one curve per K of the last ``xd-dask select`` and its table (held-out mean
  log-likelihood, BIC, iterations, the chosen K).
- **Nightly**: the model store's runs (held-out score, gate verdict, promoted or not).

Every data source has a ``name`` (``xd-loglike``, ``xd-weights``, ``xd-workers``, ...) so that a
browser can find it in ``Bokeh.documents[0]``.
"""

from __future__ import annotations

import math
from typing import Any

from bokeh.layouts import column, row
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    Div,
    FactorRange,
    HoverTool,
    NumberFormatter,
    TableColumn,
    TabPanel,
    Tabs,
)
from bokeh.palettes import Category10_10, Category20_20
from bokeh.plotting import figure
from distributed.dashboard.components import add_periodic_callback
from distributed.dashboard.components.scheduler import BOKEH_THEME, env

from xd_dask.dashboard.state import FitRecord, XDState, plugin_state, thin

__all__ = ["XDPage", "xd_doc"]

#: Page refresh, milliseconds.
REFRESH_MS = 500
#: Weight vectors drawn at most (evenly thinned beyond).
MAX_WEIGHT_DRAWN = 400
VERDICT_COLOURS = {"promoted": "#2ca02c", "rejected": "#ff7f0e", "failed": "#d62728"}


def fmt_seconds(s: float | None) -> str:
    """``3 h 02 min``, ``4 min 05 s``, ``12 s``; ``-`` when unknown."""
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def _num(v: Any, spec: str = ".6f") -> str:
    return "-" if v is None else format(float(v), spec)


def summary_html(fit: FitRecord | None) -> str:
    """The page's summary line for ``fit``."""
    if fit is None:
        return "<b>No XD fit has published to this scheduler yet.</b>"
    info, last = fit.info, fit.last
    unit = "iterations" if info.get("method") in (None, "em") else "waves"
    planned = f" of {fit.total}" if fit.total else ""
    left = fit.seconds_left()
    bound = "at most " if info.get("method") == "em" and info.get("tol") else ""
    parts = [
        f"<b>fit {fit.fit}</b>",
        f"method {info.get('method')}, K = {info.get('n_components')}",
        f"<b>{fit.status}</b>",
        f"<span class='xd-done'>{fit.iterations}</span>{planned} {unit}",
        f"time left {bound}{fmt_seconds(left)}" if fit.end is None else "",
        f"{_num(fit.rows_per_second(), ',.0f')} rows/s",
        f"mean log-likelihood {_num(last.get('mean_loglike'))}",
    ]
    end = fit.end or {}
    if end.get("heldout_mean_loglike") is not None:
        parts.append(f"held-out {_num(end['heldout_mean_loglike'])}")
    if end.get("error"):
        parts.append(f"error: {end['error']}")
    for tag in ("select", "nightly"):
        if info.get(tag):
            parts.append(f"{tag} {info[tag]}")
    return " &middot; ".join(p for p in parts if p)


def _figure(title: str, y_label: str, **kw: Any):
    fig = figure(
        title=title,
        height=260,
        sizing_mode="stretch_width",
        tools="pan,wheel_zoom,box_zoom,reset,save",
        **kw,
    )
    fig.yaxis.axis_label = y_label
    return fig


#: Number formats of table columns, by field.
FORMATS = {
    "rows": "0,0",
    "rows_per_second": "0,0",
    "ns_per_pair": "0.0",
    "ll_before": "0.000000",
    "ll_after": "0.000000",
    "heldout": "0.000000",
    "previous": "0.000000",
    "bic": "0,0.0",
    "seconds": "0.0",
}


def _table(source: ColumnDataSource, columns: list[tuple[str, str]], height: int = 160):
    cols = [
        TableColumn(field=f, title=t, formatter=NumberFormatter(format=FORMATS[f]))
        if f in FORMATS
        else TableColumn(field=f, title=t)
        for f, t in columns
    ]
    return DataTable(
        source=source, columns=cols, height=height, sizing_mode="stretch_width", index_position=None
    )


class XDPage:
    """The page's Bokeh models and their refresh from an :class:`XDState`."""

    def __init__(self, state: XDState | None) -> None:
        self.state = state
        self._version = -1
        self._fit: str | None = None
        self._n_points = 0
        self.summary = Div(text=summary_html(None), name="xd-summary", sizing_mode="stretch_width")
        src = {
            "loglike": dict(iteration=[], mean_loglike=[], step=[], rows=[], seconds=[]),
            "heldout": dict(iteration=[], value=[]),
            "moves": dict(iteration=[], mean_loglike=[], verdict=[]),
            "weights": dict(xs=[], ys=[], component=[], color=[]),
            "workers": dict(worker=[], tasks=[], rows=[], rows_per_second=[], ns_per_pair=[]),
            "dropped": dict(reason=[], rows=[], last_pass=[]),
            "move-table": dict(
                iteration=[], merge=[], split=[], ll_before=[], ll_after=[], verdict=[]
            ),
            "select-curves": dict(xs=[], ys=[], K=[], color=[]),
            "select": dict(
                K=[], heldout=[], bic=[], n_iter=[], converged=[], seconds=[], chosen=[]
            ),
            "nightly": dict(
                run=[], finished=[], heldout=[], previous=[], status=[], latest=[], color=[]
            ),
        }
        self.sources = {k: ColumnDataSource(v, name=f"xd-{k}") for k, v in src.items()}
        self.root = Tabs(
            tabs=[
                TabPanel(title="Fit", child=self._fit_panel()),
                TabPanel(title="Select", child=self._select_panel()),
                TabPanel(title="Nightly", child=self._nightly_panel()),
            ],
            sizing_mode="stretch_both",
        )

    # ------------------------------------------------------------------ layout
    def _fit_panel(self):
        s = self.sources
        ll = _loglike_figure(s)
        step = _figure("Step size", "step", x_range=ll.x_range)
        step.line("iteration", "step", source=s["loglike"], line_width=2, color="#ff7f0e")
        weights = _figure("Component weights", "weight", x_range=ll.x_range)
        weights.multi_line("xs", "ys", source=s["weights"], color="color", line_width=1.5)
        weights.add_tools(HoverTool(tooltips=[("component", "@component")]))
        self._workers_fig = workers = _workers_figure(s)
        worker_table, dropped, moves = _fit_tables(s)
        return column(
            self.summary,
            row(ll, step, sizing_mode="stretch_width"),
            row(weights, workers, sizing_mode="stretch_width"),
            row(
                worker_table,
                column(dropped, moves, sizing_mode="stretch_width"),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )

    def _select_panel(self):
        s = self.sources
        fig = _figure("Mean log-likelihood per row, one curve per K", "nats / row")
        fig.xaxis.axis_label = "iteration / wave"
        fig.multi_line(
            "xs", "ys", source=s["select-curves"], color="color", line_width=2, legend_field="K"
        )
        fig.legend.location = "bottom_right"
        table = _table(
            s["select"],
            [
                ("K", "K"),
                ("heldout", "held-out mean ll"),
                ("bic", "BIC"),
                ("n_iter", "iterations"),
                ("converged", "converged"),
                ("seconds", "fit s"),
                ("chosen", "chosen"),
            ],
            height=220,
        )
        return column(fig, table, sizing_mode="stretch_width")

    def _nightly_panel(self):
        s = self.sources
        fig = figure(
            title="Nightly held-out mean log-likelihood per run",
            height=280,
            x_range=FactorRange(),
            sizing_mode="stretch_width",
            tools="save",
        )
        fig.scatter(
            "run", "heldout", source=s["nightly"], color="color", size=12, legend_field="status"
        )
        fig.xaxis.major_label_orientation = math.pi / 6
        fig.add_tools(
            HoverTool(
                tooltips=[
                    ("run", "@run"),
                    ("held-out", "@heldout{0.000000}"),
                    ("verdict", "@status"),
                    ("latest", "@latest"),
                ]
            )
        )
        self._nightly_fig = fig
        table = _table(
            s["nightly"],
            [
                ("run", "run"),
                ("finished", "finished (UTC)"),
                ("heldout", "held-out mean ll"),
                ("previous", "latest's score then"),
                ("status", "gate verdict"),
                ("latest", "latest"),
            ],
            height=260,
        )
        return column(fig, table, sizing_mode="stretch_width")

    # ------------------------------------------------------------------ refresh
    def update(self) -> None:
        state = self.state
        if state is None or state.version == self._version:
            return
        with state.lock:
            self._version = state.version
            fit = state.current()
            self.summary.text = summary_html(fit)
            self._update_fit(fit)
            self._update_select(state)
            self._update_nightly(state)

    def _update_fit(self, fit: FitRecord | None) -> None:
        s = self.sources
        points = fit.points if fit is not None else []
        cols = ("iteration", "mean_loglike", "step", "rows", "seconds")
        steps = fit.iterations if fit is not None else 0
        new = steps - self._n_points
        if fit is not None and fit.fit == self._fit and 0 <= new < len(points):
            if new:  # the common case: a few more steps of the same fit
                s["loglike"].stream(
                    {c: [p.get(c) for p in points[-new:]] for c in cols}, len(points)
                )
        else:
            s["loglike"].data = {c: [p.get(c) for p in points] for c in cols}
        self._fit, self._n_points = (fit.fit if fit else None), steps
        if fit is None:
            return
        end = fit.end or {}
        held = end.get("heldout_mean_loglike")
        at = points[-1]["iteration"] if points else 0
        s["heldout"].data = {
            "iteration": [at] if held is not None else [],
            "value": [held] if held is not None else [],
        }
        ll_at = {p.get("iteration"): p.get("mean_loglike") for p in points}
        moves = fit.moves()
        s["moves"].data = {
            "iteration": [m.get("iteration") for m in moves],
            "mean_loglike": [ll_at.get(m.get("iteration")) for m in moves],
            "verdict": [_verdict(m) for m in moves],
        }
        s["move-table"].data = {
            "iteration": [m.get("iteration") for m in moves],
            "merge": [str(m.get("merge", "-")) for m in moves],
            "split": [str(m.get("split", "-")) for m in moves],
            "ll_before": [m.get("ll_before") for m in moves],
            "ll_after": [m.get("ll_after") for m in moves],
            "verdict": [_verdict(m) for m in moves],
        }
        self._update_weights(fit)
        names = sorted(fit.workers)
        meters = [fit.workers[w] for w in names]
        s["workers"].data = {
            "worker": names,
            "tasks": [m.tasks for m in meters],
            "rows": [m.rows for m in meters],
            "rows_per_second": [m.rows_per_second for m in meters],
            "ns_per_pair": [m.ns_per_pair(fit.n_components) for m in meters],
        }
        self._workers_fig.x_range.factors = names
        last_pass = dict(end.get("dropped") or {})
        reasons = sorted(
            r for r in set(fit.dropped) | set(last_pass) if fit.dropped.get(r) or last_pass.get(r)
        )
        s["dropped"].data = {
            "reason": reasons,
            "rows": [fit.dropped.get(r, 0) for r in reasons],
            "last_pass": [last_pass.get(r, "-" if fit.end is None else 0) for r in reasons],
        }

    def _update_weights(self, fit: FitRecord) -> None:
        drawn = thin(fit.weights, MAX_WEIGHT_DRAWN)
        K = max((len(w) for _, w in drawn), default=0)
        its = [it for it, _ in drawn]
        palette = Category20_20
        self.sources["weights"].data = {
            "xs": [its] * K,
            "ys": [[float(w[k]) if k < len(w) else None for _, w in drawn] for k in range(K)],
            "component": list(range(K)),
            "color": [palette[k % len(palette)] for k in range(K)],
        }

    def _update_select(self, state: XDState) -> None:
        sel = state.latest_select()
        if sel is None:
            return
        curves = [(k, state.fits[f]) for f, k in sel["fits"].items() if f in state.fits]
        self.sources["select-curves"].data = {
            "xs": [[p.get("iteration") for p in fit.points] for _, fit in curves],
            "ys": [[p.get("mean_loglike") for p in fit.points] for _, fit in curves],
            "K": [f"K = {k}" for k, _ in curves],
            "color": [Category10_10[i % 10] for i in range(len(curves))],
        }
        rows = [sel["rows"][k] for k in sorted(sel["rows"])]
        self.sources["select"].data = {
            "K": [r.get("n_components") for r in rows],
            "heldout": [r.get("heldout_mean_loglike") for r in rows],
            "bic": [r.get("bic") for r in rows],
            "n_iter": [r.get("n_iter") for r in rows],
            "converged": [str(r.get("converged")) for r in rows],
            "seconds": [r.get("fit_seconds") for r in rows],
            "chosen": ["chosen" if r.get("n_components") == sel["chosen"] else "" for r in rows],
        }

    def _update_nightly(self, state: XDState) -> None:
        runs = list(state.runs.values())
        if not runs:
            return
        self.sources["nightly"].data = {
            "run": [str(r.get("run")) for r in runs],
            "finished": [str(r.get("finished_utc") or "-") for r in runs],
            "heldout": [r.get("heldout_mean_loglike") for r in runs],
            "previous": [r.get("previous_heldout_mean_loglike") for r in runs],
            "status": [str(r.get("status")) for r in runs],
            "latest": ["latest" if r.get("latest") else "" for r in runs],
            "color": [VERDICT_COLOURS.get(str(r.get("status")), "#7f7f7f") for r in runs],
        }
        self._nightly_fig.x_range.factors = [str(r.get("run")) for r in runs]


def _loglike_figure(s: dict[str, ColumnDataSource]):
    """Mean log-likelihood per row against iteration / wave, held-out scores and moves marked."""
    ll = _figure("Mean log-likelihood per row", "nats / row", name="xd-loglike-figure")
    ll.xaxis.axis_label = "iteration / wave"
    ll.line("iteration", "mean_loglike", source=s["loglike"], line_width=2)
    ll.scatter("iteration", "mean_loglike", source=s["loglike"], size=4)
    ll.scatter(
        "iteration",
        "value",
        source=s["heldout"],
        marker="star",
        size=14,
        color="#d62728",
        legend_label="held-out",
    )
    ll.scatter(
        "iteration",
        "mean_loglike",
        source=s["moves"],
        marker="triangle",
        size=11,
        color="#9467bd",
        legend_label="split-and-merge move",
    )
    ll.legend.location = "bottom_right"
    ll.add_tools(
        HoverTool(
            tooltips=[
                ("step", "@iteration"),
                ("ll", "@mean_loglike{0.000000}"),
                ("rows", "@rows"),
                ("seconds", "@seconds{0.00}"),
            ]
        )
    )
    return ll


def _workers_figure(s: dict[str, ColumnDataSource]):
    """Rows per task second of each worker (bars)."""
    workers = figure(
        title="Rows per task second, per worker",
        height=260,
        x_range=FactorRange(),
        sizing_mode="stretch_width",
        tools="save",
    )
    workers.vbar(x="worker", top="rows_per_second", source=s["workers"], width=0.8)
    workers.xaxis.major_label_orientation = math.pi / 8
    workers.add_tools(
        HoverTool(
            tooltips=[
                ("worker", "@worker"),
                ("rows/s", "@rows_per_second{0,0}"),
                ("ns per pair", "@ns_per_pair{0.0}"),
            ]
        )
    )
    return workers


def _fit_tables(s: dict[str, ColumnDataSource]) -> tuple[Any, Any, Any]:
    """(per-worker throughput, rows dropped by reason, split-and-merge moves) tables."""
    worker_table = _table(
        s["workers"],
        [
            ("worker", "worker"),
            ("tasks", "xd-estep tasks"),
            ("rows", "rows"),
            ("rows_per_second", "rows / task s"),
            ("ns_per_pair", "ns / (row, component)"),
        ],
    )
    dropped = _table(
        s["dropped"],
        [
            ("reason", "rows dropped: reason"),
            ("rows", "in all passes so far"),
            ("last_pass", "in the last full pass"),
        ],
        height=120,
    )
    moves = _table(
        s["move-table"],
        [
            ("iteration", "iteration"),
            ("merge", "merge"),
            ("split", "split"),
            ("ll_before", "ll before"),
            ("ll_after", "ll after"),
            ("verdict", "verdict"),
        ],
        height=140,
    )
    return worker_table, dropped, moves


def _verdict(move: dict[str, Any]) -> str:
    accepted = move.get("accepted")
    if accepted is None:
        return str(move.get("action") or "moved")
    return "accepted" if accepted else "rejected"


def xd_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """The Bokeh document of ``/xd`` (a Dask dashboard application function)."""
    page = XDPage(plugin_state(scheduler))
    page.update()
    add_periodic_callback(doc, page, REFRESH_MS)
    doc.title = "Dask: XD fit"
    doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME
