"""A fit as a job: config -> cluster -> fit -> outputs.

:func:`run_fit` turns a validated :class:`~xd_dask.jobs.config.JobConfig` into a
:class:`~xd_dask.distributed.FitConfig`, runs it on a connected client and writes, into the output
directory, atomically:

- ``job.toml``: the effective configuration (what `xd-dask fit job.toml` would reproduce);
- ``model.npz``: the fitted model (its metadata holds the fit history and the fit config);
- ``history.json``: one entry per iteration (batch EM) or wave (online EM);
- ``report.json``: what was fitted, how long it took, final and held-out log-likelihoods, files;
- ``training_curve.png``, ``corner.png``, ``sky.png`` (``[output] plots``);
- ``checkpoints/`` (``[output] checkpoint``; the checkpoint ``checkpoint.npz``, its history
  ``history.jsonl`` (appended to, step by step) and the job's configuration,
  ``checkpoints/job.toml``; continue with ``xd-dask resume``).

The fit is checked and listed first (:mod:`xd_dask.jobs.prepare`, before a cluster starts); a
failed fit leaves none of these behind (an interrupted one keeps its checkpoints).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.dashboard.events import fit_run
from xd_dask.jobs.config import ConfigError, JobConfig
from xd_dask.jobs.prepare import (
    CHECKPOINT_DIR,
    FitPlan,
    HoldoutMismatchWarning,
    _held_out_files,
    check_holdout,
    fit_output,
    load_schema_checked,
    manifest_of,
    prepare_fit,
)
from xd_dask.model import XDModel
from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = [
    "FitOutcome",
    "HoldoutMismatchWarning",
    "SampledRows",
    "check_holdout",
    "cluster_client",
    "convergence",
    "fit_config",
    "heldout_split",
    "run_fit",
    "sample_rows",
    "split_catalog",
    "write_json",
]

ProgressCallback = Callable[[dict[str, Any]], None]


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (non-finite floats become null)."""

    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            return clean(o.item())
        return o

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(clean(obj), indent=1, default=str) + "\n")
    return path


# --------------------------------------------------------------------------- config -> engine
def split_catalog(cfg: JobConfig) -> tuple[str | list[str], str | list[str] | None]:
    """(training sources, held-out sources or None) from ``[catalog]``.

    With ``holdout`` the held-out sources are that catalogue. With ``holdout_rows`` both are
    ``catalog.path``: the fit reads its "train" side and the held-out score its "holdout" side
    (:func:`heldout_split`). With ``holdout_fraction`` a seeded choice of whole files is held out
    (at least one, and at least one left for training); the choice depends only on the file list
    and ``fit.seed``.
    """
    cat = cfg.catalog
    if cat.holdout:
        return cat.path, cat.holdout
    if cat.holdout_rows > 0:
        return cat.path, cat.path
    if cat.holdout_fraction <= 0:
        return cat.path, None
    schema = load_schema_checked(cat.schema)
    return _held_out_files(cfg, manifest_of(cat.path, cfg, schema))


def heldout_split(cfg: JobConfig) -> tuple[float, str] | None:
    """The row split the held-out score reads (``(catalog.holdout_rows, "holdout")``), or None.

    Pass it to :func:`score_sources` whenever the held-out sources of :func:`split_catalog` are
    scored, so that only the rows the fit left out are scored.
    """
    frac = cfg.catalog.holdout_rows
    return (frac, "holdout") if frac > 0 else None


def fit_config(
    cfg: JobConfig,
    *,
    catalog: str | Sequence[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    performance_report: str | os.PathLike | None = None,
):
    """The :class:`xd_dask.distributed.FitConfig` of a job (the same key table: no re-checks
    with other ranges; run fields as given)."""
    from xd_dask.distributed import FitConfig  # noqa: PLC0415

    run: dict[str, Any] = {
        "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
        "performance_report": None if performance_report is None else str(performance_report),
    }
    if catalog is not None:
        run["catalog"] = catalog
    try:
        return FitConfig.from_values(cfg.flat(), **run)
    except ValueError as exc:  # a StepSchedule rule the table cannot state (floor <= lambda0)
        raise ConfigError(str(exc)) from None


@contextlib.contextmanager
def cluster_client(cfg: JobConfig, *, quiet: bool = False) -> Iterator[Any]:
    """Connect as ``[cluster]`` says (address > scheduler file > DASK_SCHEDULER_ADDRESS > a new
    local cluster); close the client and any local cluster afterwards.

    quiet : a new local cluster's workers log only critical messages (a failed task's "Compute
    Failed" block and traceback are not printed; the error reaches the client anyway).
    """
    from xd_dask.distributed import connect  # noqa: PLC0415

    cl = cfg.cluster
    extra = {"silence_logs": logging.CRITICAL} if quiet else {}
    client, cluster = connect(
        scheduler_address=cl.scheduler_address or None,
        scheduler_file=cl.scheduler_file or None,
        n_workers=cl.n_workers or None,
        threads_per_worker=cl.threads_per_worker,
        gpu=cl.gpu,
        dashboard_address=cl.dashboard_address,
        memory_limit=cl.memory_limit,
        **extra,
    )
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------- data for plots
@dataclass
class SampledRows:
    """Catalogue rows drawn for plots: X (n, D); rows read and dropped (per reason) in the
    partitions they came from."""

    X: np.ndarray
    n_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        return int(sum(self.dropped.values()))


def _read_rows(path: str, row_groups: Any, schema: Any, n: int, seed: int, on_bad: str):
    """(X (m, D) with m <= n by a seeded choice, rows read, dropped) of one partition (runs on
    a worker)."""
    from xd_dask.io import read_partition  # noqa: PLC0415

    blk = read_partition(path, schema, on_bad=on_bad, row_groups=row_groups)
    X = np.asarray(blk.X, dtype=np.float64)
    if X.shape[0] > n:
        X = X[np.sort(np.random.default_rng(seed).choice(X.shape[0], n, replace=False))]
    return X, blk.n_read, {k: v for k, v in blk.dropped.items() if v}


def sample_rows(
    client: Any,
    sources: Any,
    schema: Any,
    max_rows: int,
    *,
    seed: int = 0,
    on_bad: str = "drop",
    max_partitions: int = 32,
) -> SampledRows:
    """Up to ``max_rows`` catalogue rows from a few seeded partitions, read by workers.

    sources : catalogue sources, or their manifest (not listed again).
    Only the sampled feature values travel to the client (for plots), never whole partitions.
    With ``client=None`` the partitions are read in this process.
    """
    from xd_dask.distributed import Manifest, build_manifest  # noqa: PLC0415

    manifest = (
        sources
        if isinstance(sources, Manifest)
        else build_manifest(sources, id_column=schema.id_column)
    )
    if max_rows <= 0:
        return SampledRows(np.zeros((0, len(schema.features))))
    rng = np.random.default_rng([seed, 5])
    k = min(max_partitions, len(manifest))
    chosen = sorted(rng.choice(len(manifest), size=k, replace=False).tolist())
    per = -(-max_rows // k)
    args = [
        (manifest[i].path, manifest[i].row_groups, schema, per, seed + i, on_bad) for i in chosen
    ]
    if client is None:  # no cluster (e.g. `xd-dask plot`): read the few partitions here
        parts = [_read_rows(*a) for a in args]
    else:
        futures = [
            client.submit(_read_rows, *a, key=f"xd-plot-rows-{i}-{seed}-{per}", pure=False)
            for i, a in zip(chosen, args, strict=True)
        ]
        try:
            parts = client.gather(futures)
        finally:
            for f in futures:
                f.release()
    dropped: dict[str, int] = {}
    for _, _, d in parts:
        for reason, n in d.items():
            dropped[reason] = dropped.get(reason, 0) + n
    X = np.concatenate([p[0] for p in parts], axis=0)[:max_rows]
    return SampledRows(X, sum(p[1] for p in parts), dropped)


# --------------------------------------------------------------------------- outputs
def write_plots(
    model: XDModel,
    history: Sequence[dict[str, Any]],
    out_dir: Path,
    cfg: JobConfig,
    data: np.ndarray | None,
    *,
    units: Sequence[str] | None = None,
    projected: bool | None = None,
) -> dict[str, str]:
    """The figures of a fit, {name: path}; ``.skipped`` names each figure not drawn and why
    (:func:`xd_dask.jobs.plots.write_figures`)."""
    from xd_dask.jobs.plots import write_figures  # noqa: PLC0415

    return write_figures(model, history, out_dir, cfg, data, units=units, projected=projected)


@dataclass
class FitOutcome:
    """What :func:`run_fit` produced."""

    model: XDModel
    out_dir: Path
    report: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def heldout_mean_loglike(self) -> float | None:
        return self.report.get("heldout_mean_loglike")


def score_sources(
    model: XDModel,
    sources: Any,
    cfg: JobConfig,
    client: Any,
    *,
    split: tuple[float, str] | None = None,
) -> Any:
    """:func:`xd_dask.distributed.score_catalog` with the job's schema and worker settings.

    sources : catalogue sources or their manifest.
    split : score only one side of the row-level split (see :func:`heldout_split`).
    """
    from xd_dask.distributed import score_catalog  # noqa: PLC0415

    return score_catalog(
        model,
        sources,
        cfg.catalog.schema,
        client,
        on_bad=cfg.catalog.on_bad,
        backend=cfg.fit.backend,
        gpu=cfg.cluster.gpu,
        dtype=cfg.fit.dtype,
        fan_in=cfg.fit.fan_in,
        split=split,
    )


def convergence(history: Sequence[dict[str, Any]], tol: float, converged: bool) -> dict:
    """How far from converged a fit stopped: the last change of the mean log-likelihood per row
    (nats; between iterations, or between epochs on waves) against ``tol``."""
    epochs = [h["epoch_mean_loglike"] for h in history if "epoch_mean_loglike" in h]
    ll = epochs or [
        h["mean_loglike"] for h in history if h.get("mean_loglike") is not None and "final" not in h
    ]
    last = ll[-1] - ll[-2] if len(ll) >= 2 else None
    return {"converged": bool(converged), "last_change": last, "tol": tol}


def run_fit(
    cfg: JobConfig,
    client: Any,
    *,
    progress: ProgressCallback | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    plots: bool | None = None,
    overwrite: bool = False,
    plan: FitPlan | None = None,
) -> FitOutcome:
    """Run the job's fit on ``client`` and write its outputs (see the module docstring).

    Without ``plan`` the fit is checked first (:func:`xd_dask.jobs.prepare.prepare_fit`) and
    its output directory held for the run (:func:`xd_dask.jobs.prepare.fit_output`: locked, a
    second fit or resume into it raises LockError naming this one; checkpoints of an earlier fit
    refused unless ``overwrite``; nothing of a failed run left behind). With ``plan`` (the CLI
    checks before it starts a cluster) the caller holds ``fit_output(plan)``.

    Parameters
    ----------
    cfg : validated job configuration.
    client : connected ``distributed.Client``.
    progress : called with one event dict per iteration / wave.
    out_dir : output directory (default ``output.dir``).
    resume : continue from ``<out_dir>/checkpoints`` instead of starting a new fit.
    plots : write plots (default ``output.plots``).
    overwrite : start afresh even if ``<out_dir>/checkpoints`` exists.
    """
    if plan is None:
        plan = prepare_fit(cfg, out_dir, resume=resume, overwrite=overwrite)
        with fit_output(plan, overwrite):
            return run_fit(cfg, client, progress=progress, plots=plots, plan=plan)
    ckpt = plan.checkpoint_dir if (cfg.output.checkpoint or plan.resume) else None
    with fit_run(client, cfg.flat(), plan.out, checkpoint=ckpt, resume=plan.resume) as pub:
        outcome = _run_fit(plan, client, pub.wrap(progress), plots)
        pub.finished(outcome.report, outcome.model.metadata)
    return outcome


def _run_fit(
    plan: FitPlan, client: Any, progress: ProgressCallback | None, plots: bool | None
) -> FitOutcome:
    from xd_dask.distributed import fit_catalog, resume_fit  # noqa: PLC0415

    cfg, out, resume, schema = plan.cfg, plan.out, plan.resume, plan.schema
    manifest, holdout, split, held_desc = plan.manifest, plan.holdout, plan.split, plan.held_desc
    ckpt = out / CHECKPOINT_DIR if (cfg.output.checkpoint or resume) else None
    report_html = out / "dask-report.html" if cfg.output.performance_report else None
    fc = fit_config(cfg, catalog=plan.train, checkpoint_dir=ckpt, performance_report=report_html)
    if ckpt is not None and not resume:  # what `xd-dask resume` reads back
        ckpt.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt / "job.toml") as tmp:
            tmp.write_text(cfg.to_toml())
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    if resume:
        model = resume_fit(out / CHECKPOINT_DIR, client, progress)
    else:
        model = fit_catalog(fc, client, progress)
    fit_seconds = time.perf_counter() - t0
    meta = model.metadata
    model.metadata["job"] = {
        "job_file": str(cfg.job_file) if cfg.job_file else None,
        "overrides": {k: v for k, v in cfg.sources.items() if "job file" not in v},
        "heldout": held_desc,
        "heldout_split": split,
    }
    files = {"model": str(model.save(out / "model.npz"))}
    with atomic_path(out / "job.toml") as tmp:
        tmp.write_text(cfg.to_toml())
    files["job"] = str(out / "job.toml")
    history = list(meta.get("history", []))
    files["history"] = str(write_json(out / "history.json", history))
    heldout, skipped = None, {}
    if holdout is not None:
        res = score_sources(model, holdout, cfg, client, split=split)
        heldout = {"mean_loglike": res.mean_loglike, "n_rows": res.n_rows, "dropped": res.dropped}
    if plots if plots is not None else cfg.output.plots:
        data = sample_rows(
            client, manifest, schema, cfg.plots.max_rows, seed=cfg.fit.seed, on_bad="drop"
        )
        figures = write_plots(
            model, history, out, cfg, data.X, units=schema.units,
            projected=schema.projection is not None,
        )  # fmt: skip
        files.update(figures)
        skipped = dict(getattr(figures, "skipped", {}))
    if report_html is not None:
        files["performance_report"] = str(report_html)
    if ckpt is not None:
        files["checkpoints"] = str(ckpt)
    conv = convergence(history, fc.tol, meta.get("converged"))
    report = _fit_report(
        model, cfg, client, started=started, fit_seconds=fit_seconds, conv=conv,
        heldout=heldout, files=files, skipped=skipped,
    )  # fmt: skip
    files["report"] = str(out / "report.json")
    write_json(out / "report.json", report)
    return FitOutcome(model, out, report, files)


def _fit_report(
    model: Any,
    cfg: Any,
    client: Any,
    *,
    started: _dt.datetime,
    fit_seconds: float,
    conv: dict,
    heldout: dict | None,
    files: dict,
    skipped: dict,
) -> dict:
    """report.json of a finished fit: what ran, how it converged, the held-out score, files."""
    meta = model.metadata
    return {
        "status": "ok",
        "started_utc": started.isoformat(timespec="seconds"),
        "fit_seconds": fit_seconds,
        "method": meta.get("method"),
        "n_components": model.n_components,
        "features": model.feature_names,
        "n_iter": meta.get("n_iter"),
        "converged": meta.get("converged"),
        "last_change": conv.get("last_change"),
        "tol": conv.get("tol"),
        "final_mean_loglike": meta.get("final_mean_loglike"),
        "heldout_mean_loglike": None if heldout is None else heldout["mean_loglike"],
        "heldout_rows": None if heldout is None else heldout["n_rows"],
        "heldout_dropped": None if heldout is None else heldout["dropped"],
        "rows_used": meta.get("rows_used"),
        "rows_read": meta.get("rows_read"),
        "dropped": meta.get("dropped"),
        "partitions": meta.get("manifest", {}).get("n_partitions"),
        "init": meta.get("init"),
        "dashboard": getattr(client, "dashboard_link", None),
        "job_file": str(cfg.job_file) if cfg.job_file else None,
        "files": files,
        "figures_skipped": skipped,
        "versions": meta.get("versions"),
    }
