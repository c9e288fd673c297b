"""The ``xd-dask`` command-line tool, one module per command group:

- :mod:`.app`: the ``main`` group, the one error handler and exit codes, options made from the
  configuration's key table;
- :mod:`.fit`: fit, resume, demo;  :mod:`.model`: score, posterior, sample, info, plot;
- :mod:`.select`: select;  :mod:`.shuffle`: shuffle;
- :mod:`.ops`: nightly, store repair, render-job;  :mod:`.catalog`: make-catalog, ingest, schema
  init;
- :mod:`.progress`: progress bars, summary tables, JSON events;  :mod:`.logs`: log records,
  warnings and errors as text or JSON lines.
"""

from __future__ import annotations

# Command modules register their commands on ``main`` when imported.
from xd_dask.cli import catalog as _catalog  # noqa: E402,F401,I001
from xd_dask.cli import fit as _fit  # noqa: E402,F401
from xd_dask.cli import model as _model  # noqa: E402,F401
from xd_dask.cli import ops as _ops  # noqa: E402,F401
from xd_dask.cli import select as _select  # noqa: E402,F401
from xd_dask.cli import shuffle as _shuffle  # noqa: E402,F401
from xd_dask.cli.app import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main"]
