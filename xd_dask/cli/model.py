"""Commands that use a fitted model: score, posterior, sample, info, plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from xd_dask.cli.app import CLUSTER_KEYS, command, key_option, key_options, load_job
from xd_dask.cli.progress import Progress, connected, jsonable, table


def _load_model(path: str):
    from xd_dask.model import XDModel  # noqa: PLC0415

    return XDModel.load(path)


def _model_schema(model: Any) -> str | None:
    """The schema the model was fitted with (when recorded by name or path)."""
    spec = (model.metadata.get("config") or {}).get("schema")
    return spec if isinstance(spec, str) and spec else None


def _apply_config(model_path: str, catalogue: str | None, params: dict[str, Any], job: Any):
    """(model, job config): the catalogue argument, and the schema the model was fitted with
    unless --schema (or the job file, environment) says otherwise."""
    fixed = {} if catalogue is None else {"catalog.path": catalogue}
    cfg = load_job(job, params, fixed)
    model = _load_model(model_path)
    spec = _model_schema(model)
    if spec and cfg.source("catalog.schema") == "packaged defaults":
        cfg = cfg.replace({"catalog.schema": spec}, source=f"the model {model_path}")
    cfg.check_inputs(require_catalog=catalogue is not None)
    return model, cfg


def _preflight(model: Any, cfg: Any, catalogue: str, out: str | None, prefix: str) -> Any:
    """Everything ``score``/``posterior`` can check before a cluster starts
    (:func:`xd_dask.jobs.prepare.prepare_apply`): schema and model, the catalogue's listing,
    columns and units, the output directory ``out`` (free, holding only ``prefix`` parts)."""
    from xd_dask.distributed.score import _OWNED  # noqa: PLC0415 - the parts' one pattern
    from xd_dask.jobs.prepare import prepare_apply  # noqa: PLC0415

    return prepare_apply(model, cfg, catalogue, out, _OWNED.format(prefix=prefix))


def _dropped_text(dropped: dict[str, int]) -> str:
    bad = {k: v for k, v in (dropped or {}).items() if v}
    if not bad:
        return "0"
    return f"{sum(bad.values())} (" + ", ".join(f"{k} {v}" for k, v in bad.items()) + ")"


_job_option = click.option(
    "--config",
    "job",
    default=None,
    type=click.Path(dir_okay=False),
    help="Job file for cluster and worker settings.",
)
_schema_option = key_option(
    "catalog.schema", help="Schema name or TOML (default: the one the model was fitted with)."
)
_on_bad_option = key_option("catalog.on_bad")
_model_arg = click.argument("model", type=click.Path(dir_okay=False))


@command(json_output=True)
@_model_arg
@click.argument("catalogue")
@_schema_option
@_on_bad_option
@click.option(
    "--per-row",
    default=None,
    metavar="DIR",
    help="Also write per-row log-likelihoods (Parquet, one file per partition; valid rows).",
)
@key_option(
    "catalog.holdout_rows",
    help="Score one side of the row-level split by id hash (the fit's catalog.holdout_rows); "
    "default: every row.",
)
@click.option(
    "--side",
    type=click.Choice(["holdout", "train"]),
    default="holdout",
    show_default=True,
    help="With --holdout-rows: which side of the split to score.",
)
@_job_option
@key_options(*CLUSTER_KEYS)
def score(
    model: str,
    catalogue: str,
    per_row: str | None,
    side: str,
    job: str | None,
    log_format: str,
    verbose: int,
    **params: Any,
) -> None:
    """Mean log-likelihood per row of CATALOGUE under MODEL (held-out score).

    Bad rows stop the score naming file, row and column, or with --on-bad drop are left out
    and counted per reason in the output. The schema, the catalogue's columns and a --per-row
    directory in use or holding other files are refused before a cluster starts (exit 2).
    """
    from xd_dask.distributed import score_catalog  # noqa: PLC0415

    mdl, cfg = _apply_config(model, catalogue, params, job)
    given = cfg.source("catalog.holdout_rows").startswith("command line")
    frac = cfg.catalog.holdout_rows if given else 0.0
    plan = _preflight(mdl, cfg, catalogue, per_row, "score")
    progress = Progress(log_format)
    with connected(cfg, progress, verbose) as client:
        res = score_catalog(
            mdl,
            plan.manifest,
            plan.schema,
            client,
            out_dir=per_row,
            on_bad=cfg.catalog.on_bad,
            backend=cfg.fit.backend,
            gpu=cfg.cluster.gpu,
            dtype=cfg.fit.dtype,
            split=(frac, side) if frac else None,
        )
    out: dict[str, Any] = {
        "mean_loglike": res.mean_loglike,
        "total_loglike": res.total_loglike,
        "n_rows": res.n_rows,
        "rows_read": res.n_read,
        "dropped": res.dropped,
    }
    if frac:
        out["split"] = f"{side} side of holdout_rows = {frac:g}"
    if per_row:
        out["per_row_dir"] = per_row
    if progress.json:
        progress.emit("score", **out)
    else:
        out["dropped"] = _dropped_text(res.dropped)
        progress.message(table(list(out.items())))


@command(json_output=True)
@_model_arg
@click.argument("catalogue")
@click.argument("out", type=click.Path(file_okay=False))
@_schema_option
@_on_bad_option
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
@key_options(*CLUSTER_KEYS)
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
    """Per-row deconvolved means, covariances and most probable component -> OUT/*.parquet.

    Each star's posterior is a mixture over the components: mean and cov are its moment-matched
    mean and covariance; --top-k writes the leading components' own posteriors. One output row
    per input row, with the catalogue's id column under its own name and a status column: "ok",
    or (with --on-bad drop) the reason the row was dropped, its values null. The schema, the
    catalogue's columns and an OUT in use or holding other files are refused before a cluster
    starts (exit 2).
    """
    from xd_dask.distributed import posterior_catalog  # noqa: PLC0415

    groups = tuple(g.strip() for g in columns.split(",") if g.strip())
    unknown = sorted(set(groups) - {"mean", "cov", "map", "resp"})
    if unknown:
        raise click.BadParameter(f"unknown column group(s) {unknown}", param_hint="--columns")
    mdl, cfg = _apply_config(model, catalogue, params, job)
    plan = _preflight(mdl, cfg, catalogue, out, "posterior")
    progress = Progress(log_format)
    with connected(cfg, progress, verbose) as client:
        files = posterior_catalog(
            mdl,
            plan.manifest,
            plan.schema,
            client,
            out,
            on_bad=cfg.catalog.on_bad,
            gpu=cfg.cluster.gpu,
            dtype="float64" if cfg.fit.dtype == "auto" else cfg.fit.dtype,  # per-star precision
            columns=groups,
            top_k=top_k,
            backend=cfg.fit.backend,
        )
    done = json.loads((Path(out) / "_SUCCESS.json").read_text())
    progress.emit("posterior", out=out, **(done | {"files": files}))
    if not progress.json:
        progress.message(
            f"Wrote {done['rows']} rows ({done['rows_ok']} ok, dropped "
            f"{_dropped_text(done['dropped'])}: status column) in {len(files)} file(s) to {out}"
        )


@command()
@_model_arg
@click.argument("n", type=click.IntRange(min=1))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
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


@command(json_output=True)
@_model_arg
@click.option("--json", "as_json", is_flag=True, hidden=True, help="The same as --log-format json.")
def info(model: str, as_json: bool, log_format: str) -> None:
    """Describe a model file: K, features, weights, how it was fitted (--log-format json: one
    JSON object, as every command's events)."""
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
    if log_format == "json":  # an event, as every command's
        Progress(log_format).emit("info", **summary)
        return
    if as_json:  # the older flag: the bare summary
        click.echo(json.dumps(jsonable(summary)))
        return
    click.echo(table(list(summary.items())))
    order = np.argsort(mdl.weights)[::-1][:10]
    click.echo("largest components (weight: mean):")
    for j in order:
        mean = ", ".join(f"{x:.4g}" for x in mdl.means[j])
        click.echo(f"  {j:4d}  {mdl.weights[j]:.4f}: [{mean}]")


@command()
@_model_arg
@key_option("catalog.path", help="Catalogue to draw against the model (a few partitions are read).")
@_schema_option
@_on_bad_option
@click.option(
    "-o",
    "--out",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for corner.png, sky.png, training_curve.png.",
)
@click.option("--features", default=None, help="Comma-separated corner-plot features.")
@key_option("plots.n_samples", flag="--n-samples")
def plot(model: str, out: str, features: str | None, **params: Any) -> None:
    """Plot MODEL: the deconvolved model against the observed rows of --catalog (corner.png,
    axes in the schema's units), its density on the sky (sky.png, for RA and Dec features), the
    training curve; a figure not drawn is named with the reason."""
    from xd_dask.jobs.runner import load_schema_checked, sample_rows, write_plots  # noqa: PLC0415

    extra = []
    if features:
        names = [f.strip() for f in features.split(",") if f.strip()]
        extra.append(f"plots.features={json.dumps(names)}")
    params["assignments"] = extra
    catalogue = params.pop("catalog__path")
    mdl, cfg = _apply_config(model, catalogue, params, None)
    schema = load_schema_checked(cfg.catalog.schema)
    data = None
    if catalogue and schema.projection is not None:
        # the rows are d observed values, the model lives in the D true features
        click.echo(
            f"catalogue rows not shown: schema {schema.name!r} observes "
            f"{list(schema.observed)}, projections of the model's {list(schema.features)}"
        )
    elif catalogue:
        rows = sample_rows(None, catalogue, schema, cfg.plots.max_rows, on_bad=cfg.catalog.on_bad)
        data = rows.X
        click.echo(
            f"catalogue rows shown: {rows.X.shape[0]} (of {rows.n_read} read; dropped "
            f"{_dropped_text(rows.dropped)})"
        )
    units = schema.units if list(schema.features) == list(mdl.feature_names) else None
    projected = schema.projection is not None
    files = write_plots(
        mdl,
        mdl.metadata.get("history") or [],
        Path(out),
        cfg,
        data,
        units=units,
        projected=projected or None,
    )
    for name, path in files.items():
        click.echo(f"{name}: {path}")
    for name, why in getattr(files, "skipped", {}).items():
        click.echo(f"not drawn: {name}: {why}")
