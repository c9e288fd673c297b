"""Where a client finds the XD page of its scheduler."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from xd_dask.dashboard.plugin import page_route
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["page_link"]


def page_link(client: Any) -> str | None:
    """The XD page's URL on ``client``'s scheduler, or None when the scheduler does not serve it
    (started without the preload, without a dashboard, or without xd-dask installed)."""
    try:
        route = client.run_on_scheduler(page_route)
    except Exception as exc:  # noqa: BLE001 - an old or foreign scheduler: no page
        log.debug("no XD page on the scheduler: %s", exc)
        return None
    link = getattr(client, "dashboard_link", None)
    if not route or not link:
        return None
    parts = urlsplit(link)  # the dashboard's host as the client sees it, the page's own path
    return urlunsplit((parts.scheme, parts.netloc, route, "", ""))
