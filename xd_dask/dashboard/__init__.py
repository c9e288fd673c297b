"""Watching fits on the Dask dashboard: the XD page and ``xd_dask_*`` Prometheus metrics.

The client side publishes what a job knows as Dask structured events (:mod:`.events`); the
scheduler side -- loaded with the preload :mod:`xd_dask.dashboard.preload` -- collects them
(:mod:`.plugin`, :mod:`.state`, with per-task row counts from the workers, :mod:`.worker`) and
serves them as the page ``/xd`` of the dashboard (:mod:`.page`) and on ``/metrics``
(:mod:`.metrics`). It also repairs the dashboard's Groups page (:mod:`.groups`). The page lives
as long as the scheduler; no second process is needed.

Importing this package (and :mod:`.events`) loads neither Dask nor Bokeh; lower layers
(kernels, optim, io) never import it.
"""

from xd_dask.dashboard.events import TOPIC, publish

#: The scheduler preload module (``dask scheduler --preload xd_dask.dashboard.preload``).
PRELOAD = "xd_dask.dashboard.preload"

__all__ = ["PRELOAD", "TOPIC", "publish"]
