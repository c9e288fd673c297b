"""Fitting commands: fit, resume, score, posterior, sample, info, plot, demo, nightly, render-job.

Exit codes: 0 success; 2 usage or configuration error (bad key or value, missing catalogue or
model file); 1 the fit (or scoring, or the nightly gate) failed. Each failure prints one line
``Error: ...`` on stderr (``-v`` adds the traceback).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from xd_dask.cli import main
from xd_dask.jobs.config import ConfigError, JobConfig, load_config, parse_assignment

log = logging.getLogger("xd_dask.cli")

EXIT_FAILURE, EXIT_USAGE = 1, 2


# --------------------------------------------------------------------------- errors and logging
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "event": "log",
                "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _setup_logging(log_format: str, verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if log_format == "json" else logging.Formatter("%(levelname)s %(message)s")
    )
    pkg = logging.getLogger("xd_dask")
    for h in list(pkg.handlers):
        if getattr(h, "_xd_dask_cli", False):
            pkg.removeHandler(h)
    handler._xd_dask_cli = True  # type: ignore[attr-defined]
    pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = False


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Errors in what was asked for (exit 2), as opposed to failures while running (exit 1)."""
    from xd_dask.distributed import GPUUnavailableError  # noqa: PLC0415
    from xd_dask.io.schema import SchemaError  # noqa: PLC0415
    from xd_dask.model import ModelFileError  # noqa: PLC0415

    return (ConfigError, SchemaError, ModelFileError, GPUUnavailableError)


def _fail(message: str, code: int) -> None:
    message = " ".join(str(message).split())  # one line
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    seen = set()
    for w in caught:
        if issubclass(w.category, ResourceWarning | DeprecationWarning):
            continue
        text = f"Warning: {w.category.__name__}: {' '.join(str(w.message).split())}"
        if text not in seen:
            seen.add(text)
            click.echo(text, err=True)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map exceptions to exit codes: config/usage errors -> 2, everything else -> 1, one line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        pkg = logging.getLogger("xd_dask")
        saved = (list(pkg.handlers), pkg.level, pkg.propagate)
        try:
            # Warnings (e.g. non-convergence) are shown as one line each, after the command.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return fn(*args, **kwargs)
                finally:
                    _show_warnings(caught)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except _usage_errors() as exc:
            log.debug("usage error", exc_info=True)
            _fail(str(exc), EXIT_USAGE)
        except Exception as exc:
            log.debug("failure", exc_info=True)
            if pkg.isEnabledFor(logging.INFO):
                import traceback  # noqa: PLC0415

                traceback.print_exc(file=sys.stderr)
            _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
        finally:  # leave the process's logging as it was (the CLI may run inside a test)
            pkg.handlers[:] = saved[0]
            pkg.setLevel(saved[1])
            pkg.propagate = saved[2]

    return wrapper


# --------------------------------------------------------------------------- shared options
def _compose(*decorators: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


#: Flags that override one config key each (flag value None = not given).
_OVERRIDE_FLAGS: dict[str, str] = {
    "catalog": "catalog.path",
    "schema": "catalog.schema",
    "n_components": "fit.n_components",
    "method": "fit.method",
    "max_iter": "fit.max_iter",
    "epochs": "fit.epochs",
    "wave_size": "fit.wave_size",
    "seed": "fit.seed",
    "init": "fit.init",
    "out": "output.dir",
    "scheduler_address": "cluster.scheduler_address",
    "scheduler_file": "cluster.scheduler_file",
    "n_workers": "cluster.n_workers",
    "threads_per_worker": "cluster.threads_per_worker",
    "gpu": "cluster.gpu",
}

cluster_options = _compose(
    click.option(
        "--scheduler-address",
        default=None,
        metavar="ADDR",
        help="Connect to this scheduler (tcp://host:8786).",
    ),
    click.option(
        "--scheduler-file",
        default=None,
        metavar="FILE",
        help="Connect via the file written by `dask scheduler --scheduler-file`.",
    ),
    click.option(
        "--n-workers",
        type=int,
        default=None,
        help="Workers of a new local cluster (default: one per core).",
    ),
    click.option("--threads-per-worker", type=int, default=None, help="Threads per local worker."),
    click.option("--gpu/--no-gpu", default=None, help="CuPy kernels on GPU workers."),
)

fit_options = _compose(
    click.option(
        "--catalog",
        default=None,
        metavar="PATH",
        help="Parquet catalogue: directory, glob, file or URL.",
    ),
    click.option("--schema", default=None, help="Schema name (gaia_dr3) or TOML path."),
    click.option("-k", "--n-components", type=int, default=None, help="Number of components K."),
    click.option("--method", type=click.Choice(["em", "online"]), default=None),
    click.option("--max-iter", type=int, default=None, help="Batch EM iterations."),
    click.option("--epochs", type=int, default=None, help="Online EM passes."),
    click.option("--wave-size", type=int, default=None, help="Online EM partitions per wave."),
    click.option("--seed", type=int, default=None),
    click.option("--init", default=None, help="'kmeans' or a model file to start from."),
    click.option("-o", "--out", default=None, metavar="DIR", help="Output directory."),
)

config_options = _compose(
    click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="KEY=VALUE",
        help="Set any config key, e.g. --set fit.step.kappa=0.7 (repeatable).",
    ),
)

log_options = _compose(
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="json: one JSON object per event on stdout.",
    ),
    click.option("-v", "--verbose", count=True, help="Log progress (-v) or debug (-vv)."),
)


def _overrides(params: dict[str, Any]) -> dict[str, Any]:
    """{config key: value} from the flags that were given, then the --set assignments."""
    out = {}
    for flag, key in _OVERRIDE_FLAGS.items():
        if params.get(flag) is not None:
            out[key] = params[flag]
    for text in params.get("assignments") or ():
        key, value = parse_assignment(text)
        out[key] = value
    return out


def _config(job_file: str | None, params: dict[str, Any]) -> JobConfig:
    return load_config(job_file, _overrides(params))


# --------------------------------------------------------------------------- progress output
class Progress:
    """Renders fit events: a progress bar on a terminal, plain lines otherwise, or JSON lines."""

    def __init__(self, log_format: str) -> None:
        self.json = log_format == "json"
        self.tty = sys.stdout.isatty() and not self.json
        self.bar: Any = None
        self.t0 = time.perf_counter()

    def emit(self, event: str, **fields: Any) -> None:
        """One JSON object (json mode) for ``event``; text mode prints nothing here."""
        if self.json:
            click.echo(json.dumps({"event": event, **_jsonable(fields)}))

    def message(self, text: str, **fields: Any) -> None:
        if self.json:
            self.emit("message", text=text, **fields)
        else:
            self._close_bar()
            click.echo(text)

    def __call__(self, ev: dict[str, Any]) -> None:
        if self.json:
            self.emit("progress", **ev)
            return
        online = ev.get("method") == "online"
        where = (
            f"epoch {ev['epoch']} wave {ev['wave']} (t={ev['iteration']})"
            if online
            else f"iteration {ev['iteration']}"
        )
        label = f"{where}  mean log-likelihood {ev['mean_loglike']:.6f}"
        if self.tty:
            if self.bar is None:
                self.bar = click.progressbar(
                    length=int(ev.get("total") or 1), label=label, show_pos=True, width=30
                )
                self.bar.__enter__()
            self.bar.label = label
            self.bar.update(1)
        else:
            total = ev.get("total")
            n = f"[{ev['iteration']}/{total}] " if total else ""
            step = f"  step {ev['step']:.4g}" if online else ""
            click.echo(f"{n}{label}{step}  rows {ev['rows']}  {ev['seconds']:.2f} s")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 1e6 else f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items() if x) or "none"
    if isinstance(v, list | tuple):
        return ", ".join(str(x) for x in v)
    return "-" if v is None else str(v)


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + min(60, max(len(_fmt(v)) for _, v in rows)))
    return "\n".join([line, *(f"{k.ljust(width)}  {_fmt(v)}" for k, v in rows), line])


def _summary(progress: Progress, report: dict[str, Any], title: str) -> None:
    if progress.json:
        progress.emit("summary", **report)
        return
    rows = [
        ("method", report.get("method")),
        ("components (K)", report.get("n_components")),
        ("features", report.get("features")),
        ("iterations / waves", report.get("n_iter")),
        ("converged", report.get("converged")),
        ("mean log-likelihood", report.get("final_mean_loglike")),
        ("held-out mean log-lik.", report.get("heldout_mean_loglike")),
        ("rows used", report.get("rows_used")),
        ("rows dropped", report.get("dropped")),
        ("partitions", report.get("partitions")),
        ("fit time [s]", report.get("fit_seconds")),
    ]
    rows += [(name, path) for name, path in (report.get("files") or {}).items()]
    progress.message(f"{title}\n{_table(rows)}")


def _dashboard(client: Any) -> str | None:
    """The dashboard link, or None when the scheduler runs without a dashboard."""
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # an old or unusual scheduler: trust the client's guess
        return client.dashboard_link
    return client.dashboard_link if "dashboard" in services else None


def _show_dashboard(client: Any, progress: Progress) -> None:
    link = _dashboard(client)
    progress.message(
        f"Dask dashboard: {link or 'none (the scheduler runs without a dashboard)'}",
        dashboard=link,
    )


def _with_client(cfg: JobConfig, progress: Progress):
    from xd_dask.jobs.runner import cluster_client  # noqa: PLC0415

    class _Ctx:
        def __enter__(self) -> Any:
            self.cm = cluster_client(cfg)
            client = self.cm.__enter__()
            _show_dashboard(client, progress)
            return client

        def __exit__(self, *exc: Any) -> Any:
            return self.cm.__exit__(*exc)

    return _Ctx()


# --------------------------------------------------------------------------- fit, resume
@main.command()
@click.argument("config", type=click.Path(dir_okay=False), metavar="CONFIG.toml")
@fit_options
@cluster_options
@config_options
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh even if the output directory holds a checkpoint.",
)
@log_options
@handle_errors
def fit(config: str, overwrite: bool, log_format: str, verbose: int, **params: Any) -> None:
    """Fit an XD mixture to a catalogue as CONFIG.toml says (flags override the file).

    \b
    Precedence: flags > environment XD_DASK_<SECTION>__<KEY> > CONFIG.toml > packaged
    defaults (xd_dask/defaults/job.toml lists and explains every key).
    Writes model.npz, history.json, report.json, job.toml, plots and checkpoints/ into
    the output directory. Exit codes: 0 success, 1 fit failed, 2 usage/config error.
    """
    from xd_dask.jobs.runner import CHECKPOINT_DIR, run_fit  # noqa: PLC0415

    _setup_logging(log_format, verbose)
    cfg = _config(config, params)
    cfg.check_inputs()
    out = Path(cfg.get("output.dir"))
    ckpt = out / CHECKPOINT_DIR
    if ckpt.exists():
        if not overwrite:
            raise ConfigError(
                f"{out} already holds the checkpoints of a fit: continue it with "
                f"`xd-dask resume {out}`, or pass --overwrite, or choose another --out"
            )
        shutil.rmtree(ckpt)
    progress = Progress(log_format)
    progress.emit("start", command="fit", config=cfg.non_default())
    with _with_client(cfg, progress) as client:
        try:
            outcome = run_fit(cfg, client, progress=progress)
        finally:
            progress.close()
    _summary(progress, outcome.report, f"Fit finished: {out}")


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False, exists=True))
@cluster_options
@log_options
@handle_errors
def resume(outdir: str, log_format: str, verbose: int, **params: Any) -> None:
    """Continue an interrupted fit from OUTDIR/checkpoints (OUTDIR/job.toml holds its config)."""
    from xd_dask.jobs.runner import CHECKPOINT_DIR, run_fit  # noqa: PLC0415

    _setup_logging(log_format, verbose)
    job = Path(outdir) / "job.toml"
    if not job.is_file() or not (Path(outdir) / CHECKPOINT_DIR).is_dir():
        raise ConfigError(f"{outdir} is not the output directory of a checkpointed fit")
    cfg = load_config(job, dict(_overrides(params), **{"output.dir": outdir}))
    progress = Progress(log_format)
    with _with_client(cfg, progress) as client:
        try:
            outcome = run_fit(cfg, client, progress=progress, out_dir=outdir, resume=True)
        finally:
            progress.close()
    _summary(progress, outcome.report, f"Fit finished: {outdir}")


# --------------------------------------------------------------------------- using a model
def _load_model(path: str):
    from xd_dask.model import XDModel  # noqa: PLC0415

    return XDModel.load(path)


def _model_schema(model: Any, schema: str | None) -> str | None:
    """--schema, else the schema the model was fitted with (if recorded by name or path)."""
    if schema:
        return schema
    spec = (model.metadata.get("config") or {}).get("schema")
    return spec if isinstance(spec, str) else None


def _apply_config(model_path: str, catalogue: str, params: dict[str, Any], job: str | None):
    model = _load_model(model_path)
    over = _overrides(params)
    over["catalog.path"] = catalogue
    schema = _model_schema(model, params.get("schema"))
    if schema:
        over["catalog.schema"] = schema
    cfg = load_config(job, over)
    cfg.check_inputs()
    return model, cfg


_job_option = click.option(
    "--config",
    "job",
    default=None,
    type=click.Path(dir_okay=False),
    help="Job file for cluster and worker settings.",
)
_schema_option = click.option(
    "--schema", default=None, help="Schema (default: the one the model was fitted with)."
)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("catalogue")
@_schema_option
@click.option(
    "--per-row",
    default=None,
    metavar="DIR",
    help="Also write per-row log-likelihoods (Parquet, one file per partition).",
)
@click.option(
    "--holdout-rows",
    type=click.FloatRange(0.0, 0.5, min_open=True),
    default=None,
    metavar="FRACTION",
    help="Score one side of the row-level split by source_id hash (catalog.holdout_rows of the "
    "fit); default: every row.",
)
@click.option(
    "--side",
    type=click.Choice(["holdout", "train"]),
    default="holdout",
    show_default=True,
    help="With --holdout-rows: which side of the split to score.",
)
@_job_option
@cluster_options
@log_options
@handle_errors
def score(
    model: str,
    catalogue: str,
    per_row: str | None,
    holdout_rows: float | None,
    side: str,
    job: str | None,
    log_format: str,
    verbose: int,
    **params: Any,
) -> None:
    """Mean log-likelihood per row of CATALOGUE under MODEL (held-out score)."""
    from xd_dask.distributed import score_catalog  # noqa: PLC0415

    _setup_logging(log_format, verbose)
    mdl, cfg = _apply_config(model, catalogue, params, job)
    progress = Progress(log_format)
    with _with_client(cfg, progress) as client:
        res = score_catalog(
            mdl,
            catalogue,
            cfg.get("catalog.schema"),
            client,
            out_dir=per_row,
            on_bad=cfg.get("catalog.on_bad"),
            backend=cfg.get("fit.backend"),
            gpu=cfg.get("cluster.gpu"),
            dtype=cfg.get("fit.dtype"),
            split=None if holdout_rows is None else (holdout_rows, side),
        )
    out = {
        "mean_loglike": res.mean_loglike,
        "total_loglike": res.total_loglike,
        "n_rows": res.n_rows,
        "rows_read": res.n_read,
        "dropped": res.dropped,
    }
    if holdout_rows is not None:
        out["split"] = f"{side} side of holdout_rows = {holdout_rows:g}"
    if per_row:
        out["per_row_dir"] = per_row
    if progress.json:
        progress.emit("score", **out)
    else:
        progress.message(_table(list(out.items())))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("catalogue")
@click.argument("out", type=click.Path(file_okay=False))
@_schema_option
@click.option(
    "--columns",
    default="mean,cov,map",
    show_default=True,
    metavar="GROUPS",
    help="Comma-separated column groups: mean (mean_<f>), cov (cov_<f>_<g>), map (component, "
    "component_prob), resp (resp_<j> per component). A model with a background component adds "
    "background_resp.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also write the K most probable components' own posteriors (the posterior is a "
    "mixture): top<t>_component, top<t>_resp, top<t>_mean_<f>, top<t>_cov_<f>_<g>.",
)
@_job_option
@cluster_options
@log_options
@handle_errors
def posterior(
    model: str,
    catalogue: str,
    out: str,
    columns: str,
    top_k: int,
    job: str | None,
    log_format: str,
    verbose: int,
    **params: Any,
) -> None:
    """Per-star deconvolved means and covariances (moment-matched: each star's posterior is a
    mixture over the components) and most probable component -> OUT/*.parquet."""
    from xd_dask.distributed import posterior_catalog  # noqa: PLC0415

    groups = tuple(g.strip() for g in columns.split(",") if g.strip())
    unknown = sorted(set(groups) - {"mean", "cov", "map", "resp"})
    if unknown:
        raise click.BadParameter(f"unknown column group(s) {unknown}", param_hint="--columns")
    _setup_logging(log_format, verbose)
    mdl, cfg = _apply_config(model, catalogue, params, job)
    progress = Progress(log_format)
    with _with_client(cfg, progress) as client:
        files = posterior_catalog(
            mdl,
            catalogue,
            cfg.get("catalog.schema"),
            client,
            out,
            on_bad=cfg.get("catalog.on_bad"),
            gpu=cfg.get("cluster.gpu"),
            dtype=cfg.get("fit.dtype"),
            columns=groups,
            top_k=top_k,
            backend=cfg.get("fit.backend"),
        )
    progress.emit("posterior", out=out, files=files)
    if not progress.json:
        progress.message(f"Wrote {len(files)} posterior file(s) to {out}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("n", type=click.IntRange(min=1))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def sample(model: str, n: int, out: str, seed: int) -> None:
    """Draw N true values from MODEL into OUT (Parquet: one column per feature + component)."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    from xd_dask.utils import atomic_path  # noqa: PLC0415

    mdl = _load_model(model)
    v, labels = mdl.sample(n, random_state=seed, return_labels=True)
    cols = {f: v[:, i] for i, f in enumerate(mdl.feature_names)}
    cols["component"] = labels.astype("int32")
    with atomic_path(out) as tmp:
        pq.write_table(pa.table(cols), tmp)
    click.echo(f"Wrote {n} samples to {out}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the model summary as JSON.")
@handle_errors
def info(model: str, as_json: bool) -> None:
    """Describe a model file: K, features, weights, how it was fitted."""
    import numpy as np  # noqa: PLC0415

    mdl = _load_model(model)
    meta = mdl.metadata
    summary = {
        "path": model,
        "n_components": mdl.n_components,
        "n_features": mdl.n_features,
        "features": mdl.feature_names,
        "weights_min": float(mdl.weights.min()),
        "weights_max": float(mdl.weights.max()),
        "method": meta.get("method"),
        "n_iter": meta.get("n_iter"),
        "converged": meta.get("converged"),
        "final_mean_loglike": meta.get("final_mean_loglike"),
        "rows_used": meta.get("rows_used"),
        "catalogue": (meta.get("manifest") or {}).get("source"),
    }
    if as_json:
        click.echo(json.dumps(_jsonable(summary)))
        return
    click.echo(_table(list(summary.items())))
    order = np.argsort(mdl.weights)[::-1][:10]
    click.echo("largest components (weight: mean):")
    for j in order:
        mean = ", ".join(f"{x:.4g}" for x in mdl.means[j])
        click.echo(f"  {j:4d}  {mdl.weights[j]:.4f}: [{mean}]")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--catalog",
    default=None,
    metavar="PATH",
    help="Catalogue to draw against the model (a few partitions are read).",
)
@_schema_option
@click.option(
    "-o",
    "--out",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for corner.png, sky.png, training_curve.png.",
)
@click.option("--features", default=None, help="Comma-separated corner-plot features.")
@click.option("--n-samples", type=int, default=None, help="Model samples drawn.")
@handle_errors
def plot(
    model: str,
    catalog: str | None,
    schema: str | None,
    out: str,
    features: str | None,
    n_samples: int | None,
) -> None:
    """Plot MODEL: corner density vs data, sky density (ra/dec), training curve."""
    from xd_dask.jobs.runner import load_schema_checked, sample_rows, write_plots  # noqa: PLC0415

    mdl = _load_model(model)
    over: dict[str, Any] = {}
    if features:
        over["plots.features"] = [f.strip() for f in features.split(",") if f.strip()]
    if n_samples:
        over["plots.n_samples"] = n_samples
    if catalog:
        over["catalog.path"] = catalog
    spec = _model_schema(mdl, schema)
    if spec:
        over["catalog.schema"] = spec
    cfg = load_config(None, over)
    cfg.check_inputs(require_catalog=False)
    data = None
    if catalog:
        sch = load_schema_checked(cfg.get("catalog.schema"))
        data = sample_rows(None, catalog, sch, cfg.get("plots.max_rows"), seed=0)
    files = write_plots(mdl, mdl.metadata.get("history") or [], Path(out), cfg, data)
    for name, path in files.items():
        click.echo(f"{name}: {path}")


# --------------------------------------------------------------------------- nightly, render
@main.command()
@click.argument("config", type=click.Path(dir_okay=False), metavar="CONFIG.toml")
@fit_options
@cluster_options
@config_options
@click.option("--store", default=None, help="Model store directory (nightly.store).")
@log_options
@handle_errors
def nightly(config: str, store: str | None, log_format: str, verbose: int, **params: Any) -> None:
    """One nightly run: warm-start from latest, fit, gate on held-out log-likelihood, promote.

    Exits 0 when the new model became `latest`, 1 when the run failed or was rejected (the
    message says why; `latest` is unchanged).
    """
    from xd_dask.jobs.nightly import run_nightly  # noqa: PLC0415

    _setup_logging(log_format, verbose)
    over = _overrides(params)
    if store:
        over["nightly.store"] = store
    cfg = load_config(config, over)
    progress = Progress(log_format)

    try:
        result = run_nightly(
            cfg, progress=progress, on_client=lambda c: _show_dashboard(c, progress)
        )
    finally:
        progress.close()
    result.pop("traceback", None)
    if progress.json:
        progress.emit("nightly", **result)
    else:
        progress.message(
            f"Nightly run {result['run']}: {result['status']}\n"
            + _table([(k, v) for k, v in result.items() if k not in ("run_dir",)])
        )
    if not result.promoted:
        _fail(f"nightly run {result['run']} {result['status']}: {result['reason']}", EXIT_FAILURE)


@main.command("render-job")
@click.option("--target", type=click.Choice(["slurm", "kubernetes"]), required=True)
@click.argument("config", type=click.Path(dir_okay=False), metavar="CONFIG.toml")
@fit_options
@config_options
@click.option(
    "--output",
    "output_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write to this file instead of stdout.",
)
@handle_errors
def render_job_cmd(target: str, config: str, output_file: str | None, **params: Any) -> None:
    """Print the Slurm script or Kubernetes manifest for CONFIG.toml (a dry run)."""
    from xd_dask.jobs.render import render_job  # noqa: PLC0415
    from xd_dask.utils import atomic_path  # noqa: PLC0415

    cfg = _config(config, params)
    text = render_job(cfg, target)
    if output_file:
        with atomic_path(output_file) as tmp:
            tmp.write_text(text)
    else:
        click.echo(text, nl=not text.endswith("\n"))


# --------------------------------------------------------------------------- demo
@main.command()
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
    type=click.IntRange(min=1000),
    default=100_000,
    show_default=True,
    help="Catalogue rows (the held-out sample has a tenth as many).",
)
@click.option("-k", "--n-components", type=int, default=None, help="Components K.")
@click.option("--max-iter", type=int, default=None, help="Batch EM iterations.")
@click.option("--seed", type=int, default=None)
@cluster_options
@config_options
@log_options
@handle_errors
def demo(out: str, rows: int, log_format: str, verbose: int, **params: Any) -> None:
    """Make a small synthetic Gaia-like catalogue, fit it on a local cluster, write model + plots.

    The job is the packaged demo job (the same as jobs/demo.toml); flags override it. The
    catalogue and an independent held-out sample go to OUT/catalog and OUT/holdout (kept and
    reused by later runs); the summary compares the fitted and the generating model on the
    held-out rows.
    """
    from importlib import resources  # noqa: PLC0415

    from xd_dask.jobs.runner import run_fit, score_sources  # noqa: PLC0415

    _setup_logging(log_format, verbose)
    t0 = time.perf_counter()
    out_dir = Path(out)
    over = {
        "output.dir": str(out_dir),
        "catalog.path": str(out_dir / "catalog"),
        "catalog.holdout": str(out_dir / "holdout"),
    }
    over.update(_overrides(params))
    with resources.as_file(resources.files("xd_dask") / "defaults" / "demo.toml") as job_path:
        cfg = load_config(job_path, over)
    progress = Progress(log_format)
    seed = cfg.get("fit.seed")
    samples = [(Path(cfg.get("catalog.path")), rows, 8, seed)]
    if cfg.get("catalog.holdout"):
        samples.append((Path(cfg.get("catalog.holdout")), max(1000, rows // 10), 2, seed + 1))
    for directory, n, parts, s in samples:
        if any(directory.glob("*.parquet")):
            progress.message(f"Using the existing catalogue in {directory}")
            continue
        from xd_dask.io import make_catalog  # noqa: PLC0415

        progress.message(f"Making a synthetic Gaia-like catalogue of {n} rows in {directory}")
        make_catalog(directory, n_rows=n, n_partitions=parts, seed=s)
    with _with_client(cfg, progress) as client:
        try:
            outcome = run_fit(cfg, client, progress=progress)
        finally:
            progress.close()
        report = dict(outcome.report)
        truth = Path(cfg.get("catalog.path")) / "true_model.npz"
        if truth.is_file() and cfg.get("catalog.holdout"):
            report["true_model_heldout_mean_loglike"] = score_sources(
                _load_model(str(truth)), cfg.get("catalog.holdout"), cfg, client
            ).mean_loglike
    report["demo_seconds"] = time.perf_counter() - t0
    _summary(progress, report, f"Demo finished in {report['demo_seconds']:.1f} s: {out_dir}")
    if "true_model_heldout_mean_loglike" in report and not progress.json:
        progress.message(
            "held-out mean log-likelihood per row: fitted model "
            f"{report['heldout_mean_loglike']:.4f}, generating model "
            f"{report['true_model_heldout_mean_loglike']:.4f}"
        )
