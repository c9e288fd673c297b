"""``xd-dask shuffle IN OUT --partitions P``: a catalogue whose files are random samples
(:mod:`xd_dask.distributed.shuffle`), so that online EM and Adam can take waves of files.

Exit codes (the one handler, :mod:`xd_dask.cli.app`): 0 success; 2 usage error (bad option, OUT
exists or is being written, input not a catalogue of one schema, id column not an integer); 1 the
shuffle failed (I/O or cluster error).
"""

from __future__ import annotations

import logging

import click

from xd_dask.cli.app import command
from xd_dask.distributed.shuffle import ShuffleError


@command("shuffle", usage=(ShuffleError,))
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
@click.option("--scheduler-address", default=None, metavar="ADDR", help="Use this scheduler.")
@click.option("--scheduler-file", default=None, metavar="FILE", help="Use this scheduler file.")
@click.option("--n-workers", type=int, default=None, help="Workers of a new local cluster.")
def shuffle_cmd(
    source: str,
    out: str,
    partitions: int,
    seed: int,
    id_column: str,
    row_group_size: int | None,
    overwrite: bool,
    scheduler_address: str | None,
    scheduler_file: str | None,
    n_workers: int | None,
    verbose: int,
) -> None:
    """Rewrite the Parquet catalogue IN into P files of randomly assigned rows in OUT.

    Rows go to files by a hash of their id and the seed (the same rows land together every
    time), through Dask's shuffle on the cluster, with bounded memory per worker. The files keep
    the input's columns, types and row-group size and record the shuffle in their Parquet
    metadata, which `xd-dask fit` reads: online EM and Adam then take waves of files (and of
    row groups), each a random sample of the catalogue. OUT is written atomically.
    """
    from xd_dask.distributed import connect  # noqa: PLC0415
    from xd_dask.distributed.shuffle import shuffle_catalog  # noqa: PLC0415

    if verbose < 2:  # the P2P extension logs every shuffle's start and end as warnings
        logging.getLogger("distributed.shuffle").setLevel(logging.ERROR)
    client, cluster = connect(scheduler_address, scheduler_file, n_workers)
    try:
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
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    click.echo(
        f"Shuffled {sum(res.rows)} rows into {len(res.files)} files in {res.out} by "
        f"{res.key} ({res.seconds:.1f} s); rows per file {min(res.rows)}..{max(res.rows)}"
    )
