"""The ``xd-dask`` command-line tool.

Command modules register their sub-commands on :data:`main` when imported below.
"""

from __future__ import annotations

import click

from xd_dask import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xd-dask")
def main() -> None:
    """Extreme Deconvolution Gaussian mixtures for partitioned catalogues on Dask."""


# Sub-command modules (imported for their side effect of registering commands on ``main``).
from xd_dask.cli import catalog as _catalog  # noqa: E402,F401
from xd_dask.cli import fit as _fit  # noqa: E402,F401
from xd_dask.cli import shuffle as _shuffle  # noqa: E402,F401
