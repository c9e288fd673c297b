"""Operations commands: nightly, render-job."""

from __future__ import annotations

from typing import Any

import click

from xd_dask.cli.app import (
    CLUSTER_KEYS,
    EXIT_FAILURE,
    FIT_KEYS,
    command,
    fail,
    key_option,
    key_options,
    load_job,
    set_option,
)
from xd_dask.cli.fit import catalogue_override
from xd_dask.cli.progress import Progress, show_dashboard, table


@command(json_output=True)
@click.argument("config", type=click.Path(dir_okay=False), metavar="CONFIG.toml")
@key_options(*FIT_KEYS, *CLUSTER_KEYS)
@set_option
@key_option("nightly.store", flag="--store")
def nightly(config: str, log_format: str, **params: Any) -> None:
    """One nightly run: warm-start from latest, fit, gate on held-out log-likelihood, promote.

    Exits 0 when the new model became `latest`, 1 when the run failed or was rejected (the
    message says why; `latest` is unchanged).
    """
    from xd_dask.jobs.nightly import run_nightly  # noqa: PLC0415

    cfg = catalogue_override(load_job(config, params))
    progress = Progress(log_format)
    try:
        result = run_nightly(
            cfg, progress=progress, on_client=lambda c: show_dashboard(c, progress)
        )
    finally:
        progress.close()
    result.pop("traceback", None)
    if progress.json:
        progress.emit("nightly", **result)
    else:
        progress.message(
            f"Nightly run {result['run']}: {result['status']}\n"
            + table([(k, v) for k, v in result.items() if k not in ("run_dir",)])
        )
    if not result.promoted:
        fail(f"nightly run {result['run']} {result['status']}: {result['reason']}", EXIT_FAILURE)


@command("render-job")
@click.option("--target", type=click.Choice(["slurm", "kubernetes"]), required=True)
@click.argument("config", type=click.Path(dir_okay=False), metavar="CONFIG.toml")
@key_options(*FIT_KEYS)
@set_option
@click.option(
    "--output",
    "output_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write to this file instead of stdout.",
)
def render_job_cmd(target: str, config: str, output_file: str | None, **params: Any) -> None:
    """Print the Slurm script or Kubernetes manifest for CONFIG.toml (a dry run)."""
    from xd_dask.jobs.render import render_job  # noqa: PLC0415
    from xd_dask.utils import atomic_path  # noqa: PLC0415

    text = render_job(load_job(config, params), target)
    if output_file:
        with atomic_path(output_file) as tmp:
            tmp.write_text(text)
    else:
        click.echo(text, nl=not text.endswith("\n"))
