"""Operations commands: nightly, store repair, render-job."""

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
    main,
    set_option,
)
from xd_dask.cli.fit import catalogue_override
from xd_dask.cli.progress import Progress, show_dashboard, table
from xd_dask.jobs.store import StoreError


@command(json_output=True, usage=(StoreError,))
@click.argument("config", type=click.Path(dir_okay=False), metavar="CONFIG.toml")
@key_options(*FIT_KEYS, *CLUSTER_KEYS)
@set_option
@key_option("nightly.store", flag="--store")
def nightly(config: str, log_format: str, **params: Any) -> None:
    """One nightly run: warm-start from latest, fit, gate on held-out log-likelihood, promote.

    Exits 0 when the new model became `latest`, 1 when the run failed or was rejected (the
    message says why; `latest` is unchanged), 2 when `latest` cannot be used (repair the store
    with `xd-dask store repair STORE`).
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


@main.group("store")
def store_group() -> None:
    """The nightly model store (runs and the `latest` link)."""


@command("repair", group=store_group, json_output=True, usage=(StoreError,))
@click.argument("store", type=click.Path(file_okay=False))
@click.option(
    "--to",
    "to_run",
    default=None,
    metavar="RUN",
    help="Point latest at this run (its model must load), e.g. to roll back.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def store_repair(store: str, to_run: str | None, dry_run: bool, log_format: str) -> None:
    """Repair STORE's `latest` link without hand edits.

    When `latest` cannot be used (not a link, dangling, or its run's model is missing or does
    not load) it is pointed at the newest promoted run whose model loads (without one, it is
    removed and the next nightly starts afresh). --to RUN points it at RUN instead. Exits 0
    when `latest` is usable afterwards (or was already), 2 when the store or RUN cannot be used.
    """
    from xd_dask.jobs.store import ModelStore  # noqa: PLC0415

    out = ModelStore(store).repair(to_run, dry_run=dry_run)
    progress = Progress(log_format)
    if progress.json:
        progress.emit("store_repair", store=store, dry_run=dry_run, **out)
        return
    would = "would be " if dry_run else ""
    text = {
        "none": f"latest -> {out['latest']} is usable; nothing to repair",
        "repointed": f"latest {would}pointed at {out['latest']} (was {out['previous']})",
        "removed": f"latest {would}removed (no promoted run with a model that loads); the next "
        "nightly starts cold",
    }[out["action"]]
    rows = [("store", store), ("problem", out["problem"] or "none")]
    rows += [(f"skipped {run}", why) for run, why in out["skipped"].items()]
    progress.message(text + "\n" + table(rows))


#: render-job's key options: a fit's, the fit's output directory as --out only (-o/--output is
#: the file render-job itself writes, as -o is every command's own output).
RENDER_KEYS = tuple(k for k in FIT_KEYS if k != "output.dir")


@command("render-job")
@click.option("--target", type=click.Choice(["slurm", "kubernetes"]), required=True)
@click.argument("config", type=click.Path(dir_okay=False), metavar="CONFIG.toml")
@key_options(*RENDER_KEYS)
@key_option("output.dir", flag="--out")
@set_option
@click.option(
    "-o",
    "--output",
    "output_file",
    default=None,
    type=click.Path(),
    help="Write the script (Slurm) or manifests (Kubernetes) to this file instead of stdout "
    "(the fit's own output directory is --out).",
)
def render_job_cmd(target: str, config: str, output_file: str | None, **params: Any) -> None:
    """Print the Slurm script or Kubernetes manifest for CONFIG.toml (a dry run)."""
    from pathlib import Path  # noqa: PLC0415

    from xd_dask.jobs.config import ConfigError  # noqa: PLC0415
    from xd_dask.jobs.render import render_job  # noqa: PLC0415
    from xd_dask.utils import atomic_path  # noqa: PLC0415

    if output_file and (Path(output_file).is_dir() or output_file.endswith("/")):
        raise ConfigError(
            f"-o/--output {output_file!r} is a directory: -o names the file render-job writes "
            "(the script or manifests); give the fit's output directory with --out"
        )
    text = render_job(load_job(config, params), target)
    if output_file:
        with atomic_path(output_file) as tmp:
            tmp.write_text(text)
    else:
        click.echo(text, nl=not text.endswith("\n"))
