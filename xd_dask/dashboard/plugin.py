"""The XD scheduler plugin: collects the published events and serves them.

On start, :class:`XDDashboardPlugin`

- replaces the Groups page's layout with one that works on any graph (:mod:`.groups`);
- adds the ``xd_dask_*`` collector to ``/metrics`` (:mod:`.metrics`; needs ``prometheus_client``
  on the scheduler, as Dask's own metrics do);
- registers :class:`~xd_dask.dashboard.worker.TaskMeter` on every worker, present and future;
- serves the XD page (:mod:`.page`) at ``<dashboard prefix>/xd`` as a second Bokeh application
  beside Dask's own on the scheduler's HTTP server, listed as "XD fit" in the dashboard's
  "More..." menu (skipped when the scheduler runs without a dashboard).

Then every structured event on the ``xd-dask`` topics is folded into its
:class:`~xd_dask.dashboard.state.XDState`. Load it with the preload
:mod:`xd_dask.dashboard.preload`.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from tornado.ioloop import IOLoop

from xd_dask.dashboard import groups, metrics
from xd_dask.dashboard.state import PLUGIN_NAME, XDState, plugin_state
from xd_dask.dashboard.worker import TaskMeter
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["PAGE", "PLUGIN_NAME", "XDDashboardPlugin", "page_route", "plugin_state"]

#: Path of the XD page under the dashboard's prefix.
PAGE = "xd"
#: Entry of the dashboard's "More..." menu.
MENU_ENTRY = {"url": PAGE, "name": "XD fit"}


class XDDashboardPlugin(SchedulerPlugin):
    """Collect the XD events of this scheduler and serve the XD page and metrics."""

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.state = XDState()
        self.route: str | None = None

    async def start(self, scheduler: Any) -> None:
        groups.install()
        if not metrics.register(self.state):
            log.info("prometheus_client is not installed: no xd_dask_* metrics on /metrics")
        await scheduler.register_worker_plugin(
            None, dumps(TaskMeter()), name=TaskMeter.name, idempotent=True
        )
        self.route = serve_page(scheduler)
        if self.route:
            log.info("XD page at %s on the dashboard", self.route)

    def log_event(self, topic: str, msg: Any) -> None:
        self.state.handle(topic, msg)


def _dask_bokeh_app(scheduler: Any) -> Any:
    """The Bokeh application of the scheduler's dashboard, or None (no dashboard)."""
    try:
        from bokeh.server.server import BokehTornado  # noqa: PLC0415 - optional at run time
    except ImportError:
        return None
    apps = getattr(getattr(scheduler, "http_application", None), "applications", [])
    return next((a for a in apps if isinstance(a, BokehTornado)), None)


def serves_dashboard(dask_scheduler: Any) -> bool:
    """Whether this scheduler serves Dask's dashboard pages (``Client.run_on_scheduler``): a
    scheduler started without one still has an HTTP server (/health, /metrics) that Dask's
    client takes for a dashboard."""
    return _dask_bokeh_app(dask_scheduler) is not None


def serve_page(scheduler: Any) -> str | None:
    """Serve the XD page beside the dashboard's pages; its path, or None without a dashboard."""
    dask_app = _dask_bokeh_app(scheduler)
    if dask_app is None:
        return None
    from distributed.dashboard.core import BokehApplication  # noqa: PLC0415 - needs bokeh
    from distributed.dashboard.scheduler import template_variables  # noqa: PLC0415 - bokeh

    from xd_dask.dashboard.page import xd_doc  # noqa: PLC0415 - bokeh only with a dashboard

    variables = template_variables(scheduler)  # the dashboard's menus (one dict per scheduler)
    if MENU_ENTRY not in variables.get("plots", [MENU_ENTRY]):
        variables["plots"].append(MENU_ENTRY)
    prefix = dask_app.prefix or ""
    app = BokehApplication(
        {f"/{PAGE}": xd_doc}, scheduler, prefix=prefix, template_variables=variables
    )
    scheduler.http_application.add_application(app)  # stopped with the scheduler's services
    app.initialize(IOLoop.current())
    app.start()
    return f"{prefix}/{PAGE}"


def page_route(dask_scheduler: Any) -> str | None:
    """The XD page's path on this scheduler, or None (run with ``Client.run_on_scheduler``)."""
    plugin = dask_scheduler.plugins.get(PLUGIN_NAME)
    return getattr(plugin, "route", None)
