"""Scheduler preload that adds the XD page and metrics to a Dask scheduler.

Use it wherever a scheduler starts::

    dask scheduler --preload xd_dask.dashboard.preload ...
    LocalCluster(..., scheduler_kwargs={"preload": ["xd_dask.dashboard.preload"]})
    DASK_DISTRIBUTED__SCHEDULER__PRELOAD='["xd_dask.dashboard.preload"]' dask scheduler ...

(:func:`xd_dask.distributed.connect` does the second for the local clusters it starts). The
scheduler then runs :class:`~xd_dask.dashboard.plugin.XDDashboardPlugin`: the XD page at
``/xd`` on its dashboard and the ``xd_dask_*`` metrics on its ``/metrics``. Loading it twice, or
into a worker, does nothing more.
"""

from __future__ import annotations

from typing import Any

from distributed import Scheduler

from xd_dask.dashboard.plugin import PLUGIN_NAME, XDDashboardPlugin
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["dask_setup"]


def dask_setup(server: Any) -> None:
    """Add the XD plugin to ``server`` (a scheduler; other servers are left alone)."""
    if not isinstance(server, Scheduler):
        log.warning("xd_dask.dashboard.preload is a scheduler preload; ignored on %s", server)
        return
    if PLUGIN_NAME not in server.plugins:
        server.add_plugin(XDDashboardPlugin())
