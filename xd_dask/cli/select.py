"""Model selection command: select."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xd_dask.cli.app import CLUSTER_KEYS, FIT_KEYS, command, key_options, load_job, set_option
from xd_dask.cli.progress import Progress, compile_note, connected, jsonable

#: The fit's key options without -k/--n-components (select's -k takes a list).
SELECT_KEYS = tuple(k for k in FIT_KEYS if k != "fit.n_components")


def _ks(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    from xd_dask.jobs.select import parse_ks  # noqa: PLC0415

    try:
        return parse_ks(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _dropped(counts: dict[str, int]) -> str:
    """'0', or the count and the reasons: '12 (negative_error 10, not_positive_definite 2)'."""
    bad = {k: v for k, v in (counts or {}).items() if v}
    if not bad:
        return "0"
    return f"{sum(bad.values())} (" + ", ".join(f"{k} {v}" for k, v in bad.items()) + ")"


def _table(rows: list[Any], chosen: int) -> str:
    head = (
        f"{'K':>5}  {'held-out ll/row':>15}  {'train ll/row':>13}  {'params':>7}  "
        f"{'BIC':>14}  {'iter':>5}  {'conv':>4}  {'time [s]':>8}  {'dropped':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = "  <- chosen" if r.n_components == chosen else ""
        lines.append(
            f"{r.n_components:>5}  {r.heldout_mean_loglike:>15.6f}  {r.train_mean_loglike:>13.6f}"
            f"  {r.n_parameters:>7}  {r.bic:>14.2f}  {r.n_iter:>5}  "
            f"{'yes' if r.converged else 'no':>4}  {r.fit_seconds:>8.2f}  {r.n_dropped:>7}{mark}"
        )
    dropped = [r for r in rows if r.n_dropped]
    if dropped:  # --on-bad drop: say which rows each K left out
        lines.append("rows dropped (--on-bad drop), per K:")
        lines += [f"  K = {r.n_components}: {_dropped_text(r)}" for r in dropped]
    return "\n".join(lines)


def _k_line(row: Any) -> str:
    """The line printed when a K's fit and scores are done."""
    conv = "converged" if row.converged else "not converged"
    return (
        f"K = {row.n_components}: held-out {row.heldout_mean_loglike:.6f}/row, training "
        f"{row.train_mean_loglike:.6f}/row, BIC {row.bic:.2f}, {row.n_iter} iterations "
        f"({conv}), {row.fit_seconds:.1f} s, rows dropped {_dropped_text(row)}"
    )


def _dropped_text(row: Any) -> str:
    """The rows a K dropped: the catalogue's, and a separate held-out set's when it has any."""
    text = _dropped(row.dropped)
    if row.heldout_dropped:
        text += f"; held-out set {_dropped(row.heldout_dropped)}"
    return text


@command(json_output=True)
@click.argument("config", required=False, type=click.Path(dir_okay=False), metavar="[CONFIG.toml]")
@click.option(
    "-k",
    "--n-components",
    "ks",
    required=True,
    callback=_ks,
    metavar="K1,K2,...",
    help="Numbers of components to compare, e.g. -k 8,16,32 (distinct positive integers).",
)
@click.option(
    "--criterion",
    type=click.Choice(["heldout", "bic"]),
    default="heldout",
    show_default=True,
    help="Choose K by the held-out mean log-likelihood (highest) or by BIC (lowest).",
)
@key_options(*SELECT_KEYS, *CLUSTER_KEYS)
@set_option
@click.option(
    "--overwrite", is_flag=True, help="Start afresh where OUT/k<K> holds a fit's checkpoint."
)
def select(
    config: str | None,
    ks: list[int],
    criterion: str,
    overwrite: bool,
    log_format: str,
    verbose: int,
    **params: Any,
) -> None:
    """Fit CONFIG.toml for each K, compare them on held-out rows and by BIC, keep the best.

    \b
      xd-dask select job.toml -k 8,16,32 --out select-out
    Each fit goes to OUT/k<K>/ (model, history, report, checkpoints); the chosen model to
    OUT/model.npz, the table to OUT/select.json, both curves against K to OUT/select.png.
    A line per K as each finishes (with --log-format json: k_start and k_done events).
    A job without held-out rows holds out 10 % of the rows (catalog.holdout_rows = 0.1).
    BIC = -2 ln L + p ln N on the training rows, p = (K-1) + K D + K D (D+1) / 2.
    Everything that can be checked without a cluster is checked first (the output in use, a
    K's checkpoints, K against the rows, the catalogue's columns); a failed run removes the
    k<K>/ directories it made. Exit codes: 0 success, 1 a fit failed, 2 usage/config/input error.
    """
    from xd_dask.jobs.select import prepare_select, run_select, select_output  # noqa: PLC0415

    cfg = load_job(config, params)
    cfg.check_inputs()
    plan = prepare_select(cfg, ks, criterion=criterion, overwrite=overwrite)  # no cluster yet
    progress = Progress(log_format)
    progress.emit("start", command="select", ks=ks, criterion=criterion, config=cfg.non_default())
    progress.message(f"Held-out rows: {plan.heldout}")
    compile_note(cfg, progress, len(next(iter(plan.plans.values())).schema.features))

    def started(K: int, i: int, out: Path) -> None:
        progress.close()
        if progress.json:
            progress.emit("k_start", n_components=K, index=i, of=len(ks), out_dir=out)
        else:
            progress.message(f"Fitting K = {K} ({i} of {len(ks)}) into {out}")

    def done(row: Any) -> None:
        progress.close()
        if progress.json:
            progress.emit("k_done", **vars(row))
        else:
            progress.message(_k_line(row))

    with select_output(plan), connected(cfg, progress, verbose) as client:
        try:
            outcome = run_select(
                cfg,
                client,
                ks,
                criterion=criterion,
                progress=None if not verbose and not progress.json else progress,
                on_k=done,
                on_start=started,
                plan=plan,
            )
        finally:
            progress.close()
    if progress.json:
        progress.emit("select", **jsonable(outcome.to_dict()))
        return
    click.echo(_table(outcome.rows, outcome.chosen))
    click.echo(
        f"Chosen K = {outcome.chosen} (by {criterion}): {outcome.files['model']}\n"
        f"Table: {outcome.files['select']}  Plot: {outcome.files['select_plot']}"
    )
