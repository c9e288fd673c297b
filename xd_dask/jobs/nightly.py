"""The nightly job: warm-start from ``latest``, fit, gate on held-out log-likelihood, promote.

One run (``xd-dask nightly jobs/nightly.toml``):

1. make ``<store>/<UTC date>/`` and hold its run lock (:class:`~xd_dask.jobs.store.ModelStore`);
2. warm-start from the model ``latest`` points to when its K and features match the job (else
   k-means, and the report says why);
3. fit and write the usual outputs into the run directory (:func:`~xd_dask.jobs.runner.run_fit`);
4. under the store lock: score the new model and the model ``latest`` points to NOW (another
   nightly may have moved it since step 2) on the same held-out rows (a separate catalogue, the
   ``catalog.holdout_rows`` side of the catalogue, or held-out files); move ``latest`` to the new
   run only if the fit succeeded and ``new >= current - nightly.margin`` (mean log-likelihood
   per held-out row);
5. write ``report.json`` (with a ``nightly`` section: status, reason, numbers) and
   ``training_curve.png``, record the run's final status in ``run.json`` and release it;
6. prune: keep the last ``nightly.keep`` finished runs, ``latest``, every running run and every
   run newer than ``latest``.

A failed or rejected run never touches ``latest``; its report says why. A ``latest`` that cannot
be used (its model does not load, ...) stops the nightly before a run is made
(:class:`~xd_dask.jobs.store.CorruptLatestError`, naming the repair command ``xd-dask store
repair``); met at the gate, it fails the run and leaves ``latest`` alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from xd_dask.dashboard.events import nightly_run
from xd_dask.jobs.config import JobConfig
from xd_dask.jobs.plots import training_curve
from xd_dask.jobs.runner import (
    cluster_client,
    heldout_split,
    load_schema_checked,
    run_fit,
    score_sources,
    split_catalog,
    write_json,
)
from xd_dask.jobs.store import ModelStore, StoreError
from xd_dask.model import XDModel
from xd_dask.utils import get_logger

log = get_logger(__name__)

#: Row fraction the nightly gate holds out when the job holds out nothing (by id hash).
DEFAULT_HOLDOUT_ROWS = 0.05

__all__ = ["NightlyResult", "run_nightly"]

PROMOTED, REJECTED, FAILED = "promoted", "rejected", "failed"


class NightlyResult(dict):
    """The ``nightly`` section of the run report (a dict) with convenience accessors."""

    @property
    def status(self) -> str:
        return self["status"]

    @property
    def promoted(self) -> bool:
        return self["status"] == PROMOTED

    @property
    def run_dir(self) -> Path:
        return Path(self["run_dir"])


def _warm_start(cfg: JobConfig, prev: XDModel | None, prev_path: Path | None) -> tuple[str, str]:
    """(init for the fit, a sentence explaining it)."""
    if not cfg.get("nightly.warm_start"):
        return cfg.get("fit.init") or "kmeans", "warm start disabled (nightly.warm_start = false)"
    if prev is None:
        return cfg.get("fit.init") or "kmeans", "no previous model: cold start"
    features = list(load_schema_checked(cfg.get("catalog.schema")).features)
    K = cfg.get("fit.n_components")
    if prev.n_components != K or prev.feature_names != features:
        return "kmeans", (
            f"previous model has K={prev.n_components}, features {prev.feature_names}; the job "
            f"asks for K={K}, features {features}: cold start"
        )
    return str(prev_path), f"warm start from {prev_path.parent.name}"


def _gate(
    store: ModelStore,
    run: Path,
    new_ll: float,
    margin: float,
    score: Callable[[XDModel], float],
) -> dict[str, Any]:
    """Compare the new run with the CURRENT ``latest``, scored now with ``score(model)`` on the
    new run's held-out rows (call under the store lock); CorruptLatestError when ``latest``
    cannot be read."""
    current = store.latest_model_path()
    if current is None:
        return {"status": PROMOTED, "reason": "first model in the store", "previous": None}
    name = current.parent.name
    old_ll = score(store.read_latest_model(current))
    out: dict[str, Any] = {"previous": name, "previous_heldout_mean_loglike": old_ll}
    if new_ll >= old_ll - margin:
        out["status"] = PROMOTED
        out["reason"] = (
            f"held-out mean log-likelihood {new_ll:.6f} vs {old_ll:.6f} of latest ({name}) "
            f"(change {new_ll - old_ll:+.6f}, allowed drop {margin:g})"
        )
    else:
        out["status"] = REJECTED
        out["reason"] = (
            f"held-out mean log-likelihood {new_ll:.6f} is worse than the previous model's "
            f"{old_ll:.6f} (latest = {name}) by {old_ll - new_ll:.6f} > margin {margin:g}; "
            "latest unchanged"
        )
    return out


def _write_report(run: Path, report: dict[str, Any], result: NightlyResult) -> None:
    result["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(run / "report.json", dict(report, nightly=dict(result)))


def _training_curve(run: Path) -> None:
    history_path = run / "history.json"
    if history_path.is_file() and not (run / "training_curve.png").is_file():
        training_curve(json.loads(history_path.read_text()), run / "training_curve.png")


def run_nightly(
    cfg: JobConfig,
    *,
    client: Any = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_client: Callable[[Any], None] | None = None,
    now: _dt.datetime | None = None,
) -> NightlyResult:
    """Run one nightly fit (see the module docstring); never raises for a failed fit.

    Other nightlies may run on the same store at the same time: the gate compares the new model
    with the model ``latest`` points to when the gate runs (under the store lock, which is held
    until ``latest`` has moved), and pruning spares running runs (:class:`ModelStore`).

    Parameters
    ----------
    cfg : the job configuration (``[nightly]``; a job that holds out nothing gets
        ``catalog.holdout_rows = DEFAULT_HOLDOUT_ROWS``: rows by id hash, from every file).
    client : a connected client; default: connect as ``[cluster]`` says.
    progress : per-iteration / per-wave callback (as :func:`run_fit`).
    on_client : called with the client once connected (e.g. to show the dashboard link).
    now : the run's time (default: now, UTC); names the run directory.

    Returns
    -------
    NightlyResult with status "promoted", "rejected" or "failed", the reason and the numbers.

    Raises
    ------
    ConfigError
        The configuration cannot work (missing catalogue, whole held-out files of a sky-ordered
        catalogue); nothing is run.
    CorruptLatestError
        ``latest`` cannot be used (its model does not load, ...); nothing is run. The message
        names the repair command.
    """
    if (
        not cfg.get("catalog.holdout")
        and cfg.get("catalog.holdout_rows") <= 0
        and cfg.get("catalog.holdout_fraction") <= 0
    ):  # the gate needs held-out rows: by default a sample of rows by id hash, from every file
        cfg = cfg.replace(
            {"catalog.holdout_rows": DEFAULT_HOLDOUT_ROWS},
            source="nightly default (no held-out set)",
        )
    cfg.check_inputs()
    store = ModelStore(cfg.get("nightly.store"))
    prev_path = store.latest_model_path()
    prev = store.read_latest_model(prev_path) if prev_path is not None else None
    run = store.new_run(now)
    try:
        result = _run(cfg, store, run, prev, prev_path, client, progress, on_client)
        store.finish_run(run, result.status)
    finally:
        store.release_run(run)  # a no-op after finish_run; else the run counts as interrupted
    result["pruned"] = [p.name for p in store.prune(cfg.get("nightly.keep"))]
    log.info("nightly run %s: %s (%s)", run.name, result["status"], result["reason"])
    return result


def _run(
    cfg: JobConfig,
    store: ModelStore,
    run: Path,
    prev: XDModel | None,
    prev_path: Path | None,
    client: Any,
    progress: Callable[[dict[str, Any]], None] | None,
    on_client: Callable[[Any], None] | None,
) -> NightlyResult:
    """Fit into ``run``, gate and promote; the result (report.json is written)."""
    init, init_note = _warm_start(cfg, prev, prev_path)
    started = _dt.datetime.now(_dt.timezone.utc)
    margin = cfg.get("nightly.margin")
    result = NightlyResult(
        run=run.name,
        run_dir=str(run),
        status=FAILED,
        reason="",
        started_utc=started.isoformat(timespec="seconds"),
        previous=None,
        warm_start_from=prev_path.parent.name if init == str(prev_path) else None,
        init=init_note,
        heldout_mean_loglike=None,
        previous_heldout_mean_loglike=None,
        margin=margin,
    )
    log.info("nightly run %s: %s", run.name, init_note)
    report: dict[str, Any] = {"status": "failed"}
    run_cfg = cfg.replace({"fit.init": init, "output.dir": str(run)}, source="nightly")
    ctx: AbstractContextManager[Any] = (
        nullcontext(client) if client is not None else cluster_client(run_cfg)
    )
    try:
        with ctx as cl, nightly_run(cl, store, run, result):  # publishes the verdict at the end
            if on_client is not None:
                on_client(cl)
            outcome = run_fit(run_cfg, cl, progress=progress, out_dir=run)
            report = outcome.report
            result["heldout_mean_loglike"] = new_ll = outcome.heldout_mean_loglike
            _training_curve(run)
            _, holdout = split_catalog(run_cfg)

            def score(model: XDModel) -> float:
                return score_sources(
                    model, holdout, run_cfg, cl, split=heldout_split(run_cfg)
                ).mean_loglike

            with store.lock():  # held until latest has moved: no other run gates in between
                result.update(_gate(store, run, new_ll, margin, score))
                _write_report(run, report, result)
                if result.status == PROMOTED:
                    store.promote(run)
    except Exception as exc:  # a failed night is recorded, never raised past the report
        what = "store" if isinstance(exc, StoreError) else "fit failed"
        result.update(status=FAILED, reason=f"{what}: {type(exc).__name__}: {exc}")
        result["traceback"] = traceback.format_exc(limit=20)
        log.error("nightly run %s failed: %s", run.name, exc)
        _write_report(run, report, result)
        _training_curve(run)
    return result
