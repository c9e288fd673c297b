"""The Dask dashboard's Groups page on a scheduler that runs this package's preload.

Why the page fails
------------------
``TaskGroupGraph.update_layout`` (``distributed/dashboard/components/scheduler.py``) places each
task group to the right of its dependencies, visiting the groups in the order that
``dask.order.order(dsk={name: 1, ...}, dependencies=...)`` gives. Since dask 2024.10 (dask PR
#11347, "Full support for task spec in dask.order") ``order`` ignores its ``dependencies``
argument and derives the dependencies from the graph's values; the values here are the literal
``1``, so every group looks independent and the visit order is arbitrary. As soon as one group
depends on another -- ``xd-reduce-<token>`` on ``xd-estep-<token>`` in every pass of a fit, but
equally ``sum-aggregate`` on ``sum-partial`` in a dask array sum -- a dependent is often visited
first, ``xs[dep]`` raises ``KeyError: 'xd-estep-<token>'`` on every refresh and the page stays
empty. The task keys are not at fault: any graph with two dependent groups fails the same way.
A group can also list a dependency that the scheduler has already forgotten (a group's
dependencies are never pruned), which fails the same lookup.

The fix
-------
:func:`install` replaces that one method with :func:`update_layout`: the same placement, visiting
the groups in a topological order of the dependencies among the groups that still exist
(:func:`ordered_groups`; a cycle between groups, possible when keys of one group depend on each
other through another group, is broken instead of raising). It is installed by the XD scheduler
plugin, in the scheduler process only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["UPSTREAM", "group_dependencies", "install", "ordered_groups", "update_layout"]

#: The method :func:`install` replaced (None before), kept to show the failure it fixes.
UPSTREAM: Any = None


def group_dependencies(task_groups: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each group's dependencies among the groups in ``task_groups`` (itself excluded), in the
    mapping's order (the order the scheduler created them)."""
    out: dict[str, list[str]] = {}
    for name, tg in task_groups.items():
        deps = {d.name for d in tg.dependencies} - {name}
        out[name] = [d for d in task_groups if d in deps]
    return out


def ordered_groups(dependencies: Mapping[str, list[str]]) -> list[str]:
    """Every name of ``dependencies`` after all of its dependencies (Kahn's algorithm; ties in
    the mapping's order). A cycle is broken at its first member in that order."""
    remaining = {k: set(v) & set(dependencies) for k, v in dependencies.items()}
    out: list[str] = []
    while remaining:
        ready = [k for k, deps in remaining.items() if not deps]
        if not ready:  # a cycle: place its first member as if it had no pending dependencies
            ready = [next(iter(remaining))]
        for k in ready:
            del remaining[k]
        for deps in remaining.values():
            deps.difference_update(ready)
        out.extend(ready)
    return out


def layout(dependencies: Mapping[str, list[str]]) -> tuple[dict, dict]:
    """(nodes_layout, arrows_layout) of ``TaskGroupGraph``: a group one column right of its
    rightmost dependency, at the height of the highest one (one up when it joins several at one
    height), roots stacked in column 0; a taken place moves the group up."""
    xs: dict[str, int] = {}
    ys: dict[str, int] = {}
    taken: set[tuple[int, int]] = set()
    nodes: dict[str, dict[str, int]] = {}
    arrows: dict[str, dict[str, list[str]]] = {}
    for name in ordered_groups(dependencies):
        deps = [d for d in dependencies[name] if d in xs]  # a cycle's back edge is dropped
        if deps:
            x = max(xs[d] for d in deps) + 1
            y = max(ys[d] for d in deps)
            if len(deps) > 1 and len({ys[d] for d in deps}) == 1:
                y += 1
        else:
            x, y = 0, (max(ys.values()) + 1 if ys else 0)
        while (x, y) in taken:
            y += 1
        taken.add((x, y))
        xs[name], ys[name] = x, y
        nodes[name] = {"x": x, "y": y}
        arrows[name] = {"nstart": deps, "nend": [name] * len(deps)}
    return nodes, arrows


def update_layout(self: Any) -> tuple[dict, dict]:
    """``TaskGroupGraph.update_layout`` that works on any graph (module docstring)."""
    return layout(group_dependencies(self.scheduler.task_groups))


def install() -> bool:
    """Replace ``TaskGroupGraph.update_layout`` in this process (idempotent); False when the
    dashboard (bokeh) is not importable."""
    try:
        from distributed.dashboard.components.scheduler import (  # noqa: PLC0415 - needs bokeh
            TaskGroupGraph,
        )
    except ImportError:
        return False
    global UPSTREAM
    if TaskGroupGraph.update_layout is not update_layout:
        UPSTREAM = TaskGroupGraph.update_layout
        TaskGroupGraph.update_layout = update_layout
        log.debug("the Groups page lays out task groups in dependency order")
    return True
