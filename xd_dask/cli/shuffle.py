"""``xd-dask shuffle IN OUT --partitions P``: a catalogue whose files are random samples
(:mod:`xd_dask.distributed.shuffle`), so that online EM and Adam can take waves of files.

Its cluster is chosen as for every command (``--scheduler-address``, ``--scheduler-file``,
``--n-workers``, ``--threads-per-worker``, ``--config JOB.toml``'s ``[cluster]``, ``--set``);
what needs no cluster (OUT present without ``--overwrite``, inputs of different schemas, an id
column that is not an integer, OUT holding inputs) is refused before one starts.

Exit codes (the one handler, :mod:`xd_dask.cli.app`): 0 success; 2 usage error (bad option, OUT
exists or is being written, input not a catalogue of one schema, id column not an integer); 1 the
shuffle failed (I/O or cluster error).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from xd_dask.cli.app import CLUSTER_KEYS, command, key_options, load_job, set_option
from xd_dask.cli.progress import Progress, connected
from xd_dask.distributed.shuffle import ShuffleError

#: The cluster keys that apply to a shuffle (it runs on CPU workers).
SHUFFLE_CLUSTER_KEYS = tuple(k for k in CLUSTER_KEYS if k != "cluster.gpu")


def _preflight(source: str, out: str, id_column: str | None, overwrite: bool) -> None:
    """The checks :func:`xd_dask.distributed.shuffle.shuffle_catalog` makes before it uses
    the cluster, made before one starts (ShuffleError, ManifestError: exit 2)."""
    from xd_dask.distributed.manifest import build_manifest  # noqa: PLC0415
    from xd_dask.distributed.shuffle import (  # noqa: PLC0415 - its own checks, made early
        CHUNK_ROWS,
        _id_column,
        _input_schema,
        _out_dir,
    )

    target = Path(out).absolute()
    _out_dir(target, overwrite)
    manifest = build_manifest(source, max_rows_per_partition=CHUNK_ROWS, id_column=id_column)
    inside = [p.path for p in manifest if Path(p.path).absolute().is_relative_to(target)]
    if inside:
        raise ShuffleError(f"OUT {target} holds input files ({inside[0]}); choose another OUT")
    _id_column(manifest, _input_schema(manifest)[0], id_column)


@contextlib.contextmanager
def _quiet_shuffle_logs(verbose: int) -> Iterator[None]:
    """The P2P extension logs every shuffle's start and end as warnings: shown with -vv only."""
    logger = logging.getLogger("distributed.shuffle")
    saved = logger.level
    if verbose < 2:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


@command("shuffle", json_output=True, usage=(ShuffleError,))
@click.argument("source", metavar="IN")
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False))
@click.option(
    "--partitions", "-p", type=click.IntRange(min=1), required=True, help="Output files P."
)
@click.option(
    "--seed", "-s", type=click.IntRange(min=0), default=0, show_default=True, help="Row seed."
)
@click.option(
    "--id-column",
    default="source_id",
    show_default=True,
    help="Integer row-id column to hash ('' or a column the files lack: row positions).",
)
@click.option(
    "--row-group-size",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per output row group (default: the input's largest row group).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--config",
    "job",
    default=None,
    type=click.Path(dir_okay=False),
    help="Job file for the cluster settings ([cluster]).",
)
@key_options(*SHUFFLE_CLUSTER_KEYS)
@set_option
def shuffle_cmd(
    source: str,
    out: str,
    partitions: int,
    seed: int,
    id_column: str,
    row_group_size: int | None,
    overwrite: bool,
    job: str | None,
    log_format: str,
    verbose: int,
    **params: Any,
) -> None:
    """Rewrite the Parquet catalogue IN into P files of randomly assigned rows in OUT.

    Rows go to files by a hash of their id and the seed (the same rows land together every
    time), through Dask's shuffle on the cluster, with bounded memory per worker. The files keep
    the input's columns, types and row-group size and record the shuffle in their Parquet
    metadata, which `xd-dask fit` reads: online EM and Adam then take waves of files (and of
    row groups), each a random sample of the catalogue. OUT is written atomically.
    """
    from xd_dask.distributed.shuffle import shuffle_catalog  # noqa: PLC0415

    cfg = load_job(job, params)
    cfg.check_inputs(require_catalog=False)
    _preflight(source, out, id_column or None, overwrite)
    progress = Progress(log_format)
    with _quiet_shuffle_logs(verbose), connected(cfg, progress, verbose) as client:
        res = shuffle_catalog(
            source,
            out,
            partitions,
            client,
            seed=seed,
            id_column=id_column or None,
            row_group_size=row_group_size,
            overwrite=overwrite,
        )
    progress.emit(
        "shuffle",
        out=res.out,
        files=[str(f) for f in res.files],
        rows=res.rows,
        key=res.key,
        token=res.token,
        seconds=res.seconds,
    )
    if not progress.json:
        progress.message(
            f"Shuffled {sum(res.rows)} rows into {len(res.files)} files in {res.out} by "
            f"{res.key} ({res.seconds:.1f} s); rows per file {min(res.rows)}..{max(res.rows)}"
        )
