"""Model selection (``xd-dask select``): fit the job for each K, score, choose, write.

For each K the job is fitted as ``xd-dask fit`` would fit it (:func:`xd_dask.jobs.runner.run_fit`,
into ``<out>/k<K>/`` with its model, history, report and checkpoints; no plots), on the same
client and the same catalogue listing rules, sharing the persisted partitions and the k-means
sample (:func:`xd_dask.distributed.passes.shared_reads`: each is read once for all K). Then per K:

- the held-out mean log-likelihood per row (the job's held-out rows; a job without any held-out
  set gets ``catalog.holdout_rows = DEFAULT_HOLDOUT_ROWS``, recorded in the outputs);
- BIC = -2 ln L + p ln N on the TRAINING rows (one scoring pass at the final parameters), with
  p = (K - 1) + K D + K D (D + 1) / 2 free parameters of a mixture of K full-covariance
  Gaussians in D features (+ 1 for a background component's weight; its box is fixed);
- iterations and fit time.

The chosen K maximises the held-out log-likelihood (``criterion="heldout"``) or minimises BIC
(``"bic"``). Its model is written to ``<out>/model.npz`` (metadata ``select``: the table), the
table to ``<out>/select.json`` and both curves against K to ``<out>/select.png``, atomically.
Each K's row records the rows its fit dropped (``--on-bad drop``), per reason, on both sides.

Before a cluster starts, :func:`prepare_select` checks the whole run (every refusal a usage
error): the catalogue is listed once (:func:`xd_dask.jobs.prepare.prepare_fit`), then for each K
the model size against the training rows, ``<out>/k<K>``'s checkpoints and lock
(:func:`xd_dask.jobs.prepare.replan`), and ``<out>``'s lock. :func:`select_output` holds ``<out>``
for the run; after a failure it removes the ``k<K>/`` directories this run created (and ``<out>``
when the run created it), so a failed select leaves no part of a table behind. (An interrupted
run, Ctrl-C or a kill, keeps them: ``xd-dask resume <out>/k<K>`` continues a K's fit.)
Public: :func:`run_select`, :func:`prepare_select`, :func:`select_output`, :func:`n_parameters`,
:func:`bic`, :func:`parse_ks`, :class:`SelectOutcome`, :class:`SelectPlan`.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xd_dask.dashboard.events import selection
from xd_dask.distributed.passes import shared_reads
from xd_dask.jobs.config import ConfigError, JobConfig
from xd_dask.jobs.prepare import FitPlan, check_unlocked, fit_output, prepare_fit, replan
from xd_dask.jobs.runner import heldout_split, run_fit, score_sources, split_catalog, write_json
from xd_dask.locks import OUTPUT_LOCK, output_lock
from xd_dask.model import XDModel
from xd_dask.utils import get_logger, remove_stale_temporaries

log = get_logger(__name__)

__all__ = [
    "CRITERIA",
    "DEFAULT_HOLDOUT_ROWS",
    "SelectOutcome",
    "SelectPlan",
    "SelectRow",
    "bic",
    "n_parameters",
    "parse_ks",
    "prepare_select",
    "run_select",
    "select_output",
    "select_plot",
]

#: Row fraction held out when the job holds out nothing.
DEFAULT_HOLDOUT_ROWS = 0.1
CRITERIA = ("heldout", "bic")


def parse_ks(text: str) -> list[int]:
    """``"8,16,32"`` -> [8, 16, 32]; ValueError for a value that is not a positive integer, a
    duplicate or an empty list."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"expected a comma-separated list of K such as 8,16,32, got {text!r}")
    ks = []
    for p in parts:
        try:
            k = int(p)
        except ValueError:
            raise ValueError(f"K must be a positive integer, got {p!r}") from None
        if k < 1:
            raise ValueError(f"K must be a positive integer, got {k}")
        if k in ks:
            raise ValueError(f"K = {k} is listed twice")
        ks.append(k)
    return ks


def n_parameters(K: int, D: int, background: bool = False) -> int:
    """Free parameters of K full-covariance Gaussians in D dimensions (+ a background weight)."""
    return (K - 1) + K * D + K * D * (D + 1) // 2 + (1 if background else 0)


def bic(total_loglike: float, n_params: int, n_rows: int) -> float:
    """Schwarz's criterion -2 ln L + p ln N (lower is better)."""
    return -2.0 * float(total_loglike) + n_params * math.log(n_rows)


@dataclass
class SelectRow:
    """One K's results. dropped : bad rows the fit left out (``--on-bad drop``) per reason;
    rows are dropped as they are read, so with ``catalog.holdout_rows`` these are the bad rows
    of both sides of the split. heldout_dropped : those of a held-out set read apart from the
    catalogue (``catalog.holdout``, or ``holdout_fraction``'s files); empty otherwise."""

    n_components: int
    heldout_mean_loglike: float
    heldout_rows: int
    train_mean_loglike: float
    train_rows: int
    n_parameters: int
    bic: float
    n_iter: int
    converged: bool
    fit_seconds: float
    out_dir: str
    dropped: dict[str, int] = field(default_factory=dict)
    heldout_dropped: dict[str, int] = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        """Rows dropped, training and held-out."""
        return int(sum(self.dropped.values()) + sum(self.heldout_dropped.values()))


@dataclass
class SelectOutcome:
    """What :func:`run_select` produced: the table, the chosen K, the files written."""

    rows: list[SelectRow]
    chosen: int
    criterion: str
    out_dir: Path
    heldout: str
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "chosen": self.chosen,
            "heldout": self.heldout,
            "rows": [asdict(r) for r in self.rows],
            "files": dict(self.files),
        }


def _with_holdout(cfg: JobConfig) -> tuple[JobConfig, str]:
    """The job with a held-out set (a row holdout added when it has none) and its description."""
    cat = cfg.catalog
    if cat.holdout:
        return cfg, f"catalogue {cat.holdout}"
    if cat.holdout_fraction > 0:
        return cfg, f"catalog.holdout_fraction = {cat.holdout_fraction:g} of the files"
    if cat.holdout_rows > 0:
        return cfg, f"catalog.holdout_rows = {cat.holdout_rows:g} of the rows"
    log.info("no held-out set in the job: holding out %g of the rows", DEFAULT_HOLDOUT_ROWS)
    cfg = cfg.replace({"catalog.holdout_rows": DEFAULT_HOLDOUT_ROWS}, source="xd-dask select")
    return cfg, f"catalog.holdout_rows = {DEFAULT_HOLDOUT_ROWS:g} of the rows (select's default)"


def _train_side(cfg: JobConfig) -> tuple[Any, tuple[float, str] | None]:
    """The training sources and row split the fit read (scored for BIC)."""
    train, _ = split_catalog(cfg)
    split = heldout_split(cfg)
    return train, None if split is None else (split[0], "train")


def select_plot(rows: Sequence[SelectRow], chosen: int, criterion: str, path: Any, dpi=110):
    """Held-out mean log-likelihood and BIC against K (two panels, the chosen K marked),
    written atomically to ``path`` (PNG)."""
    from xd_dask.jobs import canvas  # noqa: PLC0415 - matplotlib: a heavy import for the CLI

    plt = canvas.pyplot()
    ks = [r.n_components for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    panels = (
        (axes[0], [r.heldout_mean_loglike for r in rows], "held-out mean log-likelihood per row"),
        (axes[1], [r.bic for r in rows], "BIC on the training rows (lower is better)"),
    )
    for ax, values, label in panels:
        ax.plot(ks, values, "o-", color="C0")
        ax.axvline(chosen, color="C3", ls="--", lw=1, label=f"chosen K = {chosen} ({criterion})")
        ax.set_xlabel("K (components)")
        ax.set_ylabel(label)
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
    return canvas.save(fig, path, dpi)


@dataclass
class SelectPlan:
    """A checked select run (:func:`prepare_select`): the job with its held-out set, its
    description, the output directory and one fit plan per K (into ``<out>/k<K>``)."""

    cfg: JobConfig
    heldout: str
    out: Path
    plans: dict[int, FitPlan]
    overwrite: bool = False

    @property
    def ks(self) -> list[int]:
        return list(self.plans)


def _checked_ks(ks: Sequence[int], criterion: str) -> list[int]:
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ConfigError(f"K values must be distinct positive integers, got {ks}")
    return ks


def prepare_select(
    cfg: JobConfig,
    ks: Sequence[int],
    *,
    criterion: str = "heldout",
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> SelectPlan:
    """Check a select run before a cluster starts (module docstring); returns its plan."""
    ks = _checked_ks(ks, criterion)
    out = Path(out_dir if out_dir is not None else cfg.output.dir)
    check_unlocked(out / OUTPUT_LOCK, f"output directory {out}")
    cfg, heldout = _with_holdout(cfg)
    plans: dict[int, FitPlan] = {}
    for K in sorted(ks, reverse=True):  # the largest K first: the likeliest to be refused
        cfg_k = cfg.replace({"fit.n_components": K}, source="xd-dask select -k")
        sub = out / f"k{K}"
        if not plans:
            first = prepare_fit(cfg_k, sub, overwrite=overwrite)  # lists the catalogue once
        plans[K] = replan(first, cfg_k, sub, overwrite=overwrite)
    return SelectPlan(cfg, heldout, out, {K: plans[K] for K in ks}, overwrite)


@contextlib.contextmanager
def select_output(plan: SelectPlan) -> Iterator[Path]:
    """Hold ``plan.out`` for the run (module docstring): its lock, stale temporaries removed,
    and after a failure the ``k<K>/`` directories this run made (and ``out``, if it made it)
    removed."""
    out = plan.out
    created = not out.exists()
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()
    try:
        with output_lock(out):
            remove_stale_temporaries(out)
            yield out
    except Exception:
        for K in plan.ks:
            sub = out / f"k{K}"
            if sub.name not in before and sub.exists():
                shutil.rmtree(sub, ignore_errors=True)
        if created:
            _remove_if_empty(out)
        raise


def _remove_if_empty(out: Path) -> None:
    """Remove ``out`` when it holds nothing but the (released) lock."""
    with contextlib.suppress(OSError):
        if {p.name for p in out.iterdir()} <= {OUTPUT_LOCK}:
            (out / OUTPUT_LOCK).unlink(missing_ok=True)
            out.rmdir()


def run_select(
    cfg: JobConfig,
    client: Any,
    ks: Sequence[int],
    *,
    criterion: str = "heldout",
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_k: Callable[[SelectRow], None] | None = None,
    on_start: Callable[[int, int, Path], None] | None = None,
    plan: SelectPlan | None = None,
) -> SelectOutcome:
    """Fit the job for each K in ``ks`` on ``client``, score, choose by ``criterion`` and write
    the outputs into ``out_dir`` (default ``output.dir``; module docstring).

    progress : the fits' per-iteration callback.  on_k : called with each K's row when done.
    on_start : called with (K, its position from 1, its directory) before each fit.
    overwrite : start afresh where ``<out>/k<K>`` holds a checkpoint.
    plan : the run checked by :func:`prepare_select` (the caller holds
        :func:`select_output`); without it the run is checked and held here.
    """
    if plan is None:
        plan = prepare_select(cfg, ks, criterion=criterion, out_dir=out_dir, overwrite=overwrite)
        with select_output(plan):
            return run_select(
                cfg,
                client,
                ks,
                criterion=criterion,
                progress=progress,
                on_k=on_k,
                on_start=on_start,
                plan=plan,
            )
    _checked_ks(plan.ks, criterion)
    train, train_split = _train_side(plan.cfg)
    rows: list[SelectRow] = []
    with (
        shared_reads(),  # every K reads the same persisted blocks and sample
        selection(client, plan.ks, criterion, plan.heldout) as published,  # the Select tab
    ):
        for i, (K, fit_plan) in enumerate(plan.plans.items(), start=1):
            if on_start is not None:
                on_start(K, i, fit_plan.out)
            row = _fit_k(fit_plan, client, train, train_split, progress, plan.overwrite)
            log.info("K = %d: %s", K, row)
            rows.append(row)
            published.k(asdict(row))
            if on_k is not None:
                on_k(row)
        if criterion == "heldout":
            best = max(rows, key=lambda r: (r.heldout_mean_loglike, -r.n_components))
        else:
            best = min(rows, key=lambda r: (r.bic, r.n_components))
        outcome = SelectOutcome(rows, best.n_components, criterion, plan.out, plan.heldout)
        published.chosen(best.n_components)
        outcome.files = _write_outputs(outcome, best, plan.cfg.plots.dpi)
    return outcome


def _fit_k(
    plan: FitPlan,
    client: Any,
    train: Any,
    train_split: tuple[float, str] | None,
    progress: Callable[[dict[str, Any]], None] | None,
    overwrite: bool,
) -> SelectRow:
    """Fit one K as ``plan`` says, score its training rows; its row of the table."""
    cfg_k, K = plan.cfg, int(plan.cfg.fit.n_components)
    with fit_output(plan, overwrite):
        fit = run_fit(cfg_k, client, progress=progress, plots=False, plan=plan)
    model, rep = fit.model, fit.report
    res = score_sources(model, train, cfg_k, client, split=train_split)
    p = n_parameters(K, model.n_features, model.background is not None)
    return SelectRow(
        n_components=K,
        heldout_mean_loglike=float(rep["heldout_mean_loglike"]),
        heldout_rows=int(rep["heldout_rows"]),
        train_mean_loglike=float(res.mean_loglike),
        train_rows=int(res.n_rows),
        n_parameters=p,
        bic=bic(res.mean_loglike * res.n_rows, p, int(res.n_rows)),
        n_iter=int(rep["n_iter"]),
        converged=bool(rep["converged"]),
        fit_seconds=float(rep["fit_seconds"]),
        out_dir=str(plan.out),
        dropped=_counts(rep.get("dropped")),
        heldout_dropped={} if plan.split is not None else _counts(rep.get("heldout_dropped")),
    )


def _counts(dropped: dict[str, int] | None) -> dict[str, int]:
    return {k: int(v) for k, v in (dropped or {}).items() if v}


def _write_outputs(outcome: SelectOutcome, best: SelectRow, dpi: int) -> dict[str, str]:
    """The chosen model, the plot and the table, atomically; {name: path}."""
    out = outcome.out_dir
    chosen = XDModel.load(Path(best.out_dir) / "model.npz")
    chosen.metadata["select"] = outcome.to_dict()
    files = {"model": str(chosen.save(out / "model.npz"))}
    files["select_plot"] = str(
        select_plot(outcome.rows, best.n_components, outcome.criterion, out / "select.png", dpi)
    )
    files["select"] = str(out / "select.json")
    outcome.files = files
    write_json(out / "select.json", outcome.to_dict())
    return files
