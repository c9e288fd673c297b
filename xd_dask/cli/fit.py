"""Fitting commands: fit, resume, demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from xd_dask.cli.app import (
    CLUSTER_KEYS,
    FIT_KEYS,
    command,
    key_options,
    load_job,
    set_option,
    warn,
)
from xd_dask.cli.progress import Progress, compile_note, connected, summary
from xd_dask.jobs.prepare import CHECKPOINT_DIR, fit_output, prepare_fit
from xd_dask.jobs.runner import run_fit


def catalogue_override(cfg: Any) -> Any:
    """``--catalog`` replaces the catalogue of a job file; a held-out catalogue that the job
    file (or the environment) set for ITS catalogue is dropped, with a warning, unless
    ``--holdout`` names one for the new catalogue."""
    from_cli = cfg.source("catalog.path").startswith("command line")
    if not (from_cli and cfg.catalog.holdout):
        return cfg
    held_from = cfg.source("catalog.holdout")
    if held_from.startswith("command line") or _same_as_job_files(cfg):
        return cfg
    warn(
        f"--catalog replaces the catalogue, so the held-out catalogue {cfg.catalog.holdout!r} "
        f"({held_from}), chosen for the job's catalogue, is not scored; give --holdout PATH (a "
        "sample of the new catalogue) or --holdout-rows FRACTION for a held-out score"
    )
    return cfg.replace({"catalog.holdout": ""}, source="command line --catalog")


def _same_as_job_files(cfg: Any) -> bool:
    """True when --catalog names the catalogue the job file names anyway."""
    from xd_dask.jobs.config import read_job_file  # noqa: PLC0415

    if cfg.job_file is None:
        return False
    own = read_job_file(cfg.job_file).get("catalog.path")
    return bool(own) and Path(own).resolve() == Path(cfg.catalog.path).resolve()


@command(json_output=True)
@click.argument("config", required=False, type=click.Path(dir_okay=False), metavar="[CONFIG.toml]")
@key_options(*FIT_KEYS, *CLUSTER_KEYS)
@set_option
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh even if the output directory holds a checkpoint.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Check the job (configuration, catalogue, output directory) and exit without "
    "starting or joining a cluster: 0 when the fit would start, 2 with the reason when not.",
)
def fit(
    config: str | None, overwrite: bool, check: bool, log_format: str, verbose: int, **params: Any
) -> None:
    """Fit an XD mixture to a catalogue, as CONFIG.toml and the flags say.

    \b
    Without CONFIG.toml every key not given as a flag keeps its default:
      xd-dask fit --catalog gaia/ -k 8 --out fit-k8
    Precedence: flags > environment XD_DASK_<SECTION>__<KEY> > CONFIG.toml > packaged
    defaults (xd_dask/defaults/job.toml lists and explains every key).
    Writes model.npz, history.json, report.json, job.toml, plots and checkpoints/ into
    the output directory. Exit codes: 0 success, 1 fit failed, 2 usage/config/input error.
    """
    cfg = catalogue_override(load_job(config, params))
    cfg.check_inputs()
    plan = prepare_fit(cfg, overwrite=overwrite)  # every refusal before a cluster starts
    progress = Progress(log_format)
    if check:
        _checked(plan, progress)
        return
    progress.emit("start", command="fit", config=cfg.non_default())
    compile_note(cfg, progress, len(plan.schema.features))
    with fit_output(plan, overwrite), connected(cfg, progress, verbose) as client:
        try:
            outcome = run_fit(cfg, client, progress=progress, plan=plan)
        finally:
            progress.close()
    summary(progress, outcome.report, f"Fit finished: {outcome.out_dir}")


def _checked(plan: Any, progress: Progress) -> None:
    """What ``fit --check`` reports: the fit that would run; nothing was started."""
    fit_cfg, rows, parts = plan.cfg.fit, plan.manifest.n_rows, len(plan.manifest)
    held = plan.held_desc or "none"
    if progress.json:
        progress.emit(
            "checked",
            command="fit",
            method=fit_cfg.method,
            n_components=fit_cfg.n_components,
            features=list(plan.schema.features),
            rows=rows,
            partitions=parts,
            holdout=held,
            out_dir=str(plan.out),
        )
        return
    progress.message(
        f"Job checked: {fit_cfg.method} fit, K = {fit_cfg.n_components}, "
        f"{len(plan.schema.features)} features, {rows} rows in {parts} partitions, held out: "
        f"{held}, output {plan.out}. No cluster was started."
    )


@command(json_output=True)
@click.argument("outdir", type=click.Path(file_okay=False, exists=True))
@key_options(*CLUSTER_KEYS)
def resume(outdir: str, log_format: str, verbose: int, **params: Any) -> None:
    """Continue an interrupted fit from OUTDIR/checkpoints (OUTDIR/job.toml holds its config).

    The catalogue, its bad-row policy and every fit setting are the checkpoint's; only the
    cluster can be chosen anew.
    """
    from xd_dask.jobs.config import ConfigError  # noqa: PLC0415

    job = Path(outdir) / CHECKPOINT_DIR / "job.toml"
    if not job.is_file():
        job = Path(outdir) / "job.toml"  # written by xd-dask before the checkpoint held it
    if not job.is_file() or not (Path(outdir) / CHECKPOINT_DIR).is_dir():
        raise ConfigError(f"{outdir} is not the output directory of a checkpointed fit")
    cfg = load_job(job, params, {"output.dir": outdir})
    plan = prepare_fit(cfg, outdir, resume=True)
    progress = Progress(log_format)
    with fit_output(plan), connected(cfg, progress, verbose) as client:
        try:
            outcome = run_fit(cfg, client, progress=progress, plan=plan)
        finally:
            progress.close()
    summary(progress, outcome.report, f"Fit finished: {outdir}")


@command(json_output=True)
@click.option(
    "-o",
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output directory.",
)
@click.option(
    "--rows",
    "-n",
    type=click.IntRange(min=1000),
    default=100_000,
    show_default=True,
    help="Catalogue rows (the held-out sample has a tenth as many).",
)
@key_options("fit.n_components", "fit.max_iter", "fit.seed", *CLUSTER_KEYS)
@set_option
def demo(out: str, rows: int, log_format: str, verbose: int, **params: Any) -> None:
    """Make a small synthetic Gaia-like catalogue, fit it on a local cluster, write model + plots.

    The job is the packaged demo job (the same as jobs/demo.toml); flags override it. The
    catalogue and an independent held-out sample go to OUT/catalog and OUT/holdout (kept and
    reused by later runs); the summary compares the fitted and the generating model on the
    held-out rows. The first run on a machine also compiles the numerical kernels (about a
    minute; they are cached).
    """
    from importlib import resources  # noqa: PLC0415

    from xd_dask.jobs.runner import score_sources  # noqa: PLC0415
    from xd_dask.model import XDModel  # noqa: PLC0415

    t0 = time.perf_counter()
    out_dir = Path(out)
    fixed = {
        "output.dir": str(out_dir),
        "catalog.path": str(out_dir / "catalog"),
        "catalog.holdout": str(out_dir / "holdout"),
    }
    with resources.as_file(resources.files("xd_dask") / "defaults" / "demo.toml") as job_path:
        cfg = load_job(job_path, params, fixed)
    progress = Progress(log_format)
    seed = cfg.fit.seed
    samples = [(Path(cfg.catalog.path), rows, 8, seed)]
    if cfg.catalog.holdout:
        samples.append((Path(cfg.catalog.holdout), max(1000, rows // 10), 2, seed + 1))
    for directory, n, parts, s in samples:
        if any(directory.glob("*.parquet")):
            progress.message(f"Using the existing catalogue in {directory}")
            continue
        from xd_dask.io import make_catalog  # noqa: PLC0415

        progress.message(f"Making a synthetic Gaia-like catalogue of {n} rows in {directory}")
        make_catalog(directory, n_rows=n, n_partitions=parts, seed=s)
    plan = prepare_fit(cfg, overwrite=True)
    compile_note(cfg, progress, len(plan.schema.features))
    with fit_output(plan, overwrite=True), connected(cfg, progress, verbose) as client:
        try:
            outcome = run_fit(cfg, client, progress=progress, plan=plan)
        finally:
            progress.close()
        report = dict(outcome.report)
        truth = Path(cfg.catalog.path) / "true_model.npz"
        if truth.is_file() and cfg.catalog.holdout:
            report["true_model_heldout_mean_loglike"] = score_sources(
                XDModel.load(truth), cfg.catalog.holdout, cfg, client
            ).mean_loglike
    report["demo_seconds"] = time.perf_counter() - t0
    summary(progress, report, f"Demo finished in {report['demo_seconds']:.1f} s: {out_dir}")
    if "true_model_heldout_mean_loglike" in report and not progress.json:
        progress.message(
            "held-out mean log-likelihood per row: fitted model "
            f"{report['heldout_mean_loglike']:.4f}, generating model "
            f"{report['true_model_heldout_mean_loglike']:.4f}"
        )
