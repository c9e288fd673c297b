"""What a local cluster's fork server does once, before it forks workers
(:mod:`xd_dask.distributed.cluster`): imported by it, this module imports the modules a worker
needs at its first task and sets up Numba's CPU target (its typing and lowering registries,
~1 s of Python per process), so that every forked worker starts with both done instead of
paying them at its first task.

Importing it anywhere else costs the same second and changes nothing; nothing imports it but the
fork server. Nothing here starts a thread (the server runs with Dask's pre-spawn environment, one
BLAS thread; Numba compiles without its parallel pool), so forking stays safe; the fork server
that Dask itself uses imports the same libraries (pandas, hence pyarrow).
"""

from __future__ import annotations

import numba

import xd_dask.distributed.apply_tasks  # noqa: F401 - score and posterior tasks
import xd_dask.distributed.start_tasks  # noqa: F401 - the start's tasks (k-means, moments)
import xd_dask.distributed.tasks  # noqa: F401 - the worker's modules: I/O, kernels, tasks


def _numba_ready() -> None:
    """Compile one trivial function: Numba sets up its CPU target on the first compile."""
    numba.njit(lambda x: x + 1)(1)


_numba_ready()
