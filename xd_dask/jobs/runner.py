"""A fit as a job: config -> cluster -> fit -> outputs.

:func:`run_fit` turns a validated :class:`~xd_dask.jobs.config.JobConfig` into a
:class:`~xd_dask.distributed.FitConfig`, runs it on a connected client and writes, into the output
directory, atomically:

- ``job.toml``: the effective configuration (what `xd-dask fit job.toml` would reproduce);
- ``model.npz``: the fitted model (its metadata holds the fit history and the fit config);
- ``history.json``: one entry per iteration (batch EM) or wave (online EM);
- ``report.json``: what was fitted, how long it took, final and held-out log-likelihoods, files;
- ``training_curve.png``, ``corner.png``, ``sky.png`` (``[output] plots``);
- ``checkpoints/`` (``[output] checkpoint``; continue with ``xd-dask resume``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.jobs.config import ConfigError, JobConfig
from xd_dask.model import XDModel
from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = [
    "FitOutcome",
    "cluster_client",
    "fit_config",
    "heldout_split",
    "run_fit",
    "sample_rows",
    "split_catalog",
    "write_json",
]

ProgressCallback = Callable[[dict[str, Any]], None]
CHECKPOINT_DIR = "checkpoints"


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
    cat = cfg["catalog"]
    if cat["holdout"]:
        return cat["path"], cat["holdout"]
    if cat["holdout_rows"] > 0:
        return cat["path"], cat["path"]
    if cat["holdout_fraction"] <= 0:
        return cat["path"], None
    from xd_dask.distributed import build_manifest  # noqa: PLC0415

    files = sorted({p.path for p in build_manifest(cat["path"])})
    if len(files) < 2:
        raise ConfigError(
            f"catalog.holdout_fraction = {cat['holdout_fraction']} needs at least 2 files in "
            f"{cat['path']!r} (found {len(files)}); set catalog.holdout instead"
        )
    n_hold = min(len(files) - 1, max(1, round(cat["holdout_fraction"] * len(files))))
    rng = np.random.default_rng([int(cfg.get("fit.seed")), 7])
    held = set(rng.choice(len(files), size=n_hold, replace=False).tolist())
    train = [f for i, f in enumerate(files) if i not in held]
    hold = [f for i, f in enumerate(files) if i in held]
    log.info("holding out %d of %d files for scoring", len(hold), len(files))
    return train, hold


def heldout_split(cfg: JobConfig) -> tuple[float, str] | None:
    """The row split the held-out score reads (``(catalog.holdout_rows, "holdout")``), or None.

    Pass it to :func:`score_sources` whenever the held-out sources of :func:`split_catalog` are
    scored, so that only the rows the fit left out are scored.
    """
    frac = float(cfg.get("catalog.holdout_rows"))
    return (frac, "holdout") if frac > 0 else None


def fit_config(
    cfg: JobConfig,
    *,
    catalog: str | Sequence[str] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    performance_report: str | os.PathLike | None = None,
):
    """The :class:`xd_dask.distributed.FitConfig` for a job config."""
    from xd_dask.distributed import FitConfig  # noqa: PLC0415
    from xd_dask.em import StepSchedule  # noqa: PLC0415

    fit, cat = cfg["fit"], cfg["catalog"]
    try:
        step = StepSchedule(**fit["step"])
    except ValueError as exc:
        raise ConfigError(f"fit.step: {exc}") from None
    return FitConfig(
        catalog=catalog if catalog is not None else cat["path"],
        n_components=fit["n_components"],
        schema=cat["schema"],
        method=fit["method"],
        max_iter=fit["max_iter"],
        tol=float(fit["tol"]),
        epochs=fit["epochs"],
        wave_size=fit["wave_size"] or None,
        waves=fit["waves"],
        waves_per_epoch=fit["waves_per_epoch"] or None,
        step=step,
        learning_rate=float(fit["learning_rate"]),
        reg_covar=float(fit["reg_covar"]),
        seed=fit["seed"],
        init=fit["init"] or "kmeans",
        kmeans_sample=fit["kmeans_sample"] or None,
        persist=fit["persist"],
        on_bad=cat["on_bad"],
        backend=fit["backend"],
        dtype=fit["dtype"],
        checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        fan_in=fit["fan_in"],
        subsample=float(fit["subsample"]) or None,
        gpu=cfg.get("cluster.gpu"),
        performance_report=None if performance_report is None else str(performance_report),
        max_rows_per_partition=cat["max_rows_per_partition"] or None,
        holdout_rows=float(cat["holdout_rows"]),
        background=fit["background"],
        background_weight=float(fit["background_weight"]),
        max_ll_drop=float(fit["max_ll_drop"]),
    )


def load_schema_checked(spec: str):
    """The catalogue schema for ``catalog.schema``; a bad schema is a config error (exit 2)."""
    from xd_dask.io.schema import SchemaError, load_schema  # noqa: PLC0415

    try:
        return load_schema(spec or None)
    except SchemaError as exc:
        raise ConfigError(f"catalog.schema: {exc}") from None


@contextlib.contextmanager
def cluster_client(cfg: JobConfig) -> Iterator[Any]:
    """Connect as ``[cluster]`` says (address > scheduler file > DASK_SCHEDULER_ADDRESS > a new
    local cluster); close the client and any local cluster afterwards."""
    from xd_dask.distributed import connect  # noqa: PLC0415

    cl = cfg["cluster"]
    client, cluster = connect(
        scheduler_address=cl["scheduler_address"] or None,
        scheduler_file=cl["scheduler_file"] or None,
        n_workers=cl["n_workers"] or None,
        threads_per_worker=cl["threads_per_worker"],
        gpu=cl["gpu"],
        dashboard_address=cl["dashboard_address"],
        memory_limit=cl["memory_limit"],
    )
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------- data for plots
def _read_rows(path: str, row_groups: Any, schema: Any, n: int, seed: int, on_bad: str):
    """(m, D) rows of one partition, m <= n, seeded choice (runs on a worker)."""
    from xd_dask.io import read_partition  # noqa: PLC0415

    blk = read_partition(path, schema, on_bad=on_bad, row_groups=row_groups)
    X = np.asarray(blk.X, dtype=np.float64)
    if X.shape[0] > n:
        X = X[np.sort(np.random.default_rng(seed).choice(X.shape[0], n, replace=False))]
    return X


def sample_rows(
    client: Any,
    sources: str | Sequence[str],
    schema: Any,
    max_rows: int,
    *,
    seed: int = 0,
    on_bad: str = "drop",
    max_partitions: int = 32,
) -> np.ndarray:
    """Up to ``max_rows`` catalogue rows (n, D) from a few seeded partitions, read by workers.

    Only the sampled feature values travel to the client (for plots), never whole partitions.
    With ``client=None`` the partitions are read in this process.
    """
    from xd_dask.distributed import build_manifest  # noqa: PLC0415

    manifest = build_manifest(sources)
    if max_rows <= 0:
        return np.zeros((0, len(schema.features)))
    rng = np.random.default_rng([seed, 5])
    k = min(max_partitions, len(manifest))
    chosen = sorted(rng.choice(len(manifest), size=k, replace=False).tolist())
    per = -(-max_rows // k)
    if client is None:  # no cluster (e.g. `xd-dask plot`): read the few partitions here
        parts = [
            _read_rows(manifest[i].path, manifest[i].row_groups, schema, per, seed + i, on_bad)
            for i in chosen
        ]
        return np.concatenate(parts, axis=0)[:max_rows]
    futures = [
        client.submit(
            _read_rows,
            manifest[i].path,
            manifest[i].row_groups,
            schema,
            per,
            seed + i,
            on_bad,
            key=f"xd-plot-rows-{i}-{seed}-{per}",
            pure=False,
        )
        for i in chosen
    ]
    try:
        return np.concatenate(client.gather(futures), axis=0)[:max_rows]
    finally:
        for f in futures:
            f.release()


# --------------------------------------------------------------------------- outputs
def write_plots(
    model: XDModel,
    history: Sequence[dict[str, Any]],
    out_dir: Path,
    cfg: JobConfig,
    data: np.ndarray | None,
) -> dict[str, str]:
    """The training curve, corner plot and (for ra/dec models) sky plot; returns {name: path}."""
    from xd_dask.jobs import plots  # noqa: PLC0415

    pc = cfg["plots"]
    files: dict[str, str] = {}
    if history:
        files["training_curve"] = str(
            plots.training_curve(history, out_dir / "training_curve.png", dpi=pc["dpi"])
        )
    features = pc["features"] or plots.default_features(model)
    if len(features) >= 2:
        files["corner"] = str(
            plots.corner_plot(
                model,
                out_dir / "corner.png",
                features=features,
                data=data,
                n_samples=pc["n_samples"],
                random_state=cfg.get("fit.seed"),
                dpi=pc["dpi"],
            )
        )
    if pc["sky"] and {"ra", "dec"} <= set(model.feature_names):
        files["sky"] = str(
            plots.sky_plot(
                model,
                out_dir / "sky.png",
                n_samples=pc["n_samples"],
                random_state=cfg.get("fit.seed"),
                dpi=pc["dpi"],
            )
        )
    return files


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
    sources: str | Sequence[str],
    cfg: JobConfig,
    client: Any,
    *,
    split: tuple[float, str] | None = None,
) -> Any:
    """:func:`xd_dask.distributed.score_catalog` with the job's schema and worker settings.

    split : score only one side of the row-level split (see :func:`heldout_split`).
    """
    from xd_dask.distributed import score_catalog  # noqa: PLC0415

    return score_catalog(
        model,
        sources,
        cfg.get("catalog.schema"),
        client,
        on_bad=cfg.get("catalog.on_bad"),
        backend=cfg.get("fit.backend"),
        gpu=cfg.get("cluster.gpu"),
        dtype=cfg.get("fit.dtype"),
        fan_in=cfg.get("fit.fan_in"),
        split=split,
    )


def run_fit(
    cfg: JobConfig,
    client: Any,
    *,
    progress: ProgressCallback | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    plots: bool | None = None,
) -> FitOutcome:
    """Run the job's fit on ``client`` and write its outputs (see the module docstring).

    The output directory is locked for the whole run (:func:`xd_dask.locks.output_lock`: a
    second fit or resume into it raises LockError naming this one); temporaries left there by
    an interrupted run are removed first.

    Parameters
    ----------
    cfg : validated job configuration.
    client : connected ``distributed.Client``.
    progress : called with one event dict per iteration / wave.
    out_dir : output directory (default ``output.dir``).
    resume : continue from ``<out_dir>/checkpoints`` instead of starting a new fit.
    plots : write plots (default ``output.plots``).
    """
    from xd_dask.locks import output_lock  # noqa: PLC0415
    from xd_dask.utils import remove_stale_temporaries  # noqa: PLC0415

    out = Path(out_dir if out_dir is not None else cfg.get("output.dir"))
    with output_lock(out):
        for directory in (out, out / CHECKPOINT_DIR):
            remove_stale_temporaries(directory)
        return _run_fit(cfg, client, out, progress, resume, plots)


def _run_fit(
    cfg: JobConfig,
    client: Any,
    out: Path,
    progress: ProgressCallback | None,
    resume: bool,
    plots: bool | None,
) -> FitOutcome:
    from xd_dask.distributed import fit_catalog, resume_fit  # noqa: PLC0415

    schema = load_schema_checked(cfg.get("catalog.schema"))
    train, holdout = split_catalog(cfg)
    ckpt = out / CHECKPOINT_DIR if (cfg.get("output.checkpoint") or resume) else None
    report_html = out / "dask-report.html" if cfg.get("output.performance_report") else None
    fc = fit_config(cfg, catalog=train, checkpoint_dir=ckpt, performance_report=report_html)
    with atomic_path(out / "job.toml") as tmp:
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
        "heldout": holdout,
        "heldout_split": heldout_split(cfg),
    }
    files = {"model": str(model.save(out / "model.npz"))}
    history = list(meta.get("history", []))
    files["history"] = str(write_json(out / "history.json", history))
    heldout = None
    if holdout is not None:
        res = score_sources(model, holdout, cfg, client, split=heldout_split(cfg))
        heldout = {"mean_loglike": res.mean_loglike, "n_rows": res.n_rows}
    if plots if plots is not None else cfg.get("output.plots"):
        data = sample_rows(
            client,
            train,
            schema,
            cfg.get("plots.max_rows"),
            seed=cfg.get("fit.seed"),
            on_bad="drop",
        )
        files.update(write_plots(model, history, out, cfg, data))
    if report_html is not None:
        files["performance_report"] = str(report_html)
    if ckpt is not None:
        files["checkpoints"] = str(ckpt)
    report = {
        "status": "ok",
        "started_utc": started.isoformat(timespec="seconds"),
        "fit_seconds": fit_seconds,
        "method": meta.get("method"),
        "n_components": model.n_components,
        "features": model.feature_names,
        "n_iter": meta.get("n_iter"),
        "converged": meta.get("converged"),
        "final_mean_loglike": meta.get("final_mean_loglike"),
        "heldout_mean_loglike": None if heldout is None else heldout["mean_loglike"],
        "heldout_rows": None if heldout is None else heldout["n_rows"],
        "rows_used": meta.get("rows_used"),
        "rows_read": meta.get("rows_read"),
        "dropped": meta.get("dropped"),
        "partitions": meta.get("manifest", {}).get("n_partitions"),
        "init": meta.get("init"),
        "dashboard": getattr(client, "dashboard_link", None),
        "job_file": str(cfg.job_file) if cfg.job_file else None,
        "files": files,
        "versions": meta.get("versions"),
    }
    files["report"] = str(out / "report.json")
    write_json(out / "report.json", report)
    return FitOutcome(model, out, report, files)
