"""Fitting XD to a partitioned catalogue on a Dask cluster: batch EM, online EM and Adam.

The fit runs the one fitting loop of :mod:`xd_dask.optim` (the same loop as the in-memory
:class:`xd_dask.estimator.XDGMM`) with a statistics source backed by the pass runner. The client
holds only parameters and statistics. Online EM and Adam draw their waves as planned by
:mod:`xd_dask.distributed.layout` (hash strata of every partition, or waves of partitions).
Each iteration (batch EM) or wave (online EM, Adam):

1. send the current parameters to the workers once (inside the tasks when small);
2. one ``xd-estep`` task per partition: read + validate + build X, S + kernel (or reuse the
   partition's arrays held in worker memory when ``persist``);
3. tree-reduce the statistics on the cluster (``xd-reduce``, fan-in ``fan_in``);
4. gather the single reduced result (O(K D^2)); the loop checks it, applies the update rule and
   checks the new parameters (:mod:`xd_dask.optim.robust`);
5. write a checkpoint, log a line, call ``progress_callback``.

Public entry points: :class:`FitConfig`, :func:`fit_catalog`, :func:`resume_fit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client, performance_report
from distributed.versions import get_versions

from xd_dask.config import row_dtype
from xd_dask.distributed.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from xd_dask.distributed.cluster import check_gpu_workers, worker_threads
from xd_dask.distributed.config import FitConfig, resolve_schema
from xd_dask.distributed.kmeans import default_sample_size, kmeans_init, moment_init, sample_pass
from xd_dask.distributed.layout import WavePlan, detect_layout, plan_waves
from xd_dask.distributed.manifest import Manifest, build_manifest, check_unchanged
from xd_dask.distributed.passes import PassRunner, PassStatistics
from xd_dask.distributed.splitmerge import pass_moves
from xd_dask.distributed.tasks import Partial, TaskOptions
from xd_dask.model import XDModel
from xd_dask.optim import (
    ConvergenceWarning,
    FitLoop,
    LoopSettings,
    LoopState,
    Method,
    bounding_box,
    method,
)
from xd_dask.optim.background import confine
from xd_dask.optim.kmeans import BACKGROUND_TRIM
from xd_dask.params import Background, Params
from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = [
    "ConvergenceWarning",
    "FitConfig",
    "ProgressCallback",
    "fit_catalog",
    "resolve_schema",
    "resume_fit",
]

ProgressCallback = Callable[[dict[str, Any]], None]


def _versions() -> dict[str, str]:
    """Versions of Python and the packages a fit depends on (``distributed.versions``)."""
    info = get_versions(["xd_dask", "numba", "pyarrow", "scipy"])
    out = {k: v for k, v in info["packages"].items() if v is not None}
    out["python"] = str(info["host"].get("python", "")).split()[0]
    return out


class _Fit:
    """One fit in progress (batch EM, online EM or Adam) on a client; ``plan`` the waves of an
    online EM / Adam fit (None for batch EM)."""

    def __init__(
        self,
        config: FitConfig,
        client: Client,
        manifest: Manifest,
        schema: Any,
        progress_callback: ProgressCallback | None,
        plan: WavePlan | None = None,
    ) -> None:
        self.cfg = config
        self.client = client
        self.manifest = manifest
        self.schema = schema
        self.callback = progress_callback
        self.plan = plan
        self.method: Method = method(config.method)
        self.opts = TaskOptions(
            schema,
            config.on_bad,
            row_dtype(config.dtype, config.gpu),
            config.backend,
            config.gpu,
            int(config.numba_threads),
            config.split,
        )
        self.runner = PassRunner(
            client,
            manifest,
            self.opts,
            fan_in=config.fan_in,
            persist=config.persist or (plan is not None and plan.persist),
            max_retries=config.max_retries,
            group_size=None if plan is None else plan.group_size,
        )
        self.state: LoopState | None = None
        self._retries0 = 0
        if config.gpu:
            check_gpu_workers(client)

    # ------------------------------------------------------------------ set-up
    def _loop(self) -> FitLoop:
        cfg, plan, entry = self.cfg, self.plan, self.method
        sub = None
        if entry.full_batch:
            settings = LoopSettings(
                max_steps=int(cfg.max_iter),
                tol=float(cfg.tol),
                seed=int(cfg.seed),
                max_ll_drop=float(cfg.max_ll_drop),
            )
            n_waves = 1
        else:
            strata = plan.waves_per_epoch if plan.mode == "strata" else None
            wave_size = None if strata is not None else max(int(plan.wave_size), 1)
            settings = LoopSettings(
                epochs=int(cfg.epochs),
                wave_size=wave_size,
                strata=strata,
                seed=int(cfg.seed),
                tol=float(cfg.tol),
                max_ll_drop=float(cfg.max_ll_drop),
            )
            n_waves = strata or -(-len(self.manifest) // wave_size)
            sub = None if cfg.subsample is None else (float(cfg.subsample), int(cfg.seed))
        planned = int(cfg.max_iter) if entry.full_batch else int(cfg.epochs) * n_waves
        moves = None
        if cfg.split_merge:  # split-and-merge moves (xd_dask.distributed.splitmerge)
            moves = pass_moves(self.runner, cfg, entry.full_batch, n_waves)
        return FitLoop(
            entry.rule(cfg.settings(), planned),
            PassStatistics(self.runner, sub, cfg.seed),
            settings,
            checkpoint=self._checkpoint,
            progress=self._progress,
            moves=moves,
        )

    def _background(self, sample: Partial | None) -> Background:
        """The background's box: the padded bounding box of the k-means sample (its pass is run
        here only when k-means did not run it)."""
        cfg = self.cfg
        if sample is None:
            size = cfg.kmeans_sample or default_sample_size(int(cfg.n_components))
            fraction = min(1.0, size / max(self.manifest.n_rows, 1))
            sample = sample_pass(self.runner, cfg.seed, fraction)
        lo, hi = bounding_box(sample.payload.sample)
        return Background(float(cfg.background_weight), lo, hi)

    def initialise(self) -> None:
        cfg = self.cfg
        K = int(cfg.n_components)
        D = len(self.schema.features)
        sample = None
        background = None
        projected = getattr(self.schema, "projection", None) is not None
        if cfg.background and projected:
            raise ValueError(
                f"fit.background = true cannot be used with the projection of schema "
                f"{getattr(self.schema, 'name', None)!r} ([projection] kind = "
                f"{self.schema.projection.kind!r}): the background's box lies in the observed "
                "space, the model in the true features'; set fit.background = false"
            )
        if cfg.init == "kmeans" and projected:
            # k-means cannot run on d-dimensional projections of D-dimensional vectors
            init = moment_init(self.runner, K, cfg.seed, cfg.reg_covar)
            start, info = init.params, init.info
        elif cfg.init == "kmeans":
            init, sample = kmeans_init(
                self.runner,
                K,
                cfg.seed,
                max_iter=cfg.kmeans_iter,
                tol=cfg.kmeans_tol,
                sample_size=cfg.kmeans_sample,
                reg_covar=cfg.reg_covar,
                trim=BACKGROUND_TRIM if cfg.background else 0.0,
            )
            start, info = init.params, init.info
        else:
            model = XDModel.load(cfg.init)
            if model.n_components != K or model.n_features != D:
                raise ValueError(
                    f"{cfg.init}: the model has K={model.n_components}, D={model.n_features}; "
                    f"the fit asks for K={K} and the schema has D={D} features"
                )
            if list(model.feature_names) != list(self.schema.features):
                raise ValueError(
                    f"{cfg.init}: the model's features {model.feature_names} differ from the "
                    f"schema's {list(self.schema.features)}"
                )
            if model.background is not None and not cfg.background:
                raise ValueError(
                    f"{cfg.init}: the model has a background component; set background = true"
                )
            start = model.params
            background = model.background
            info = {"method": "model", "path": str(cfg.init)}
        if cfg.background and background is None:
            background = self._background(sample)
            m, V, confined = confine(start.means, start.covariances, background)
            start = Params(start.weights * (1.0 - background.weight), m, V, background)
            info["confined_to_background_box"] = confined
        info = {"init": info, "retries": 0, "max_gathered_bytes": 0}
        info["wave_size"] = 0 if self.plan is None else int(self.plan.wave_size)
        if self.plan is not None:
            info["waves"] = self.plan.to_dict()
        self.state = self._loop().start(start, info)

    def restore(self, state: LoopState) -> None:
        self.state = state
        self._retries0 = int(state.info.get("retries", 0))

    # ------------------------------------------------------------------ bookkeeping
    def _checkpoint(self, state: LoopState) -> None:
        self.state = state
        info = state.info
        info["retries"] = self._retries0 + self.runner.n_retries
        info["max_gathered_bytes"] = max(
            int(info.get("max_gathered_bytes", 0)), self.runner.max_gathered_bytes
        )
        if self.cfg.checkpoint_dir is None:
            return
        save_checkpoint(self.cfg.checkpoint_dir, state, self.cfg.to_dict(), self.manifest.to_dict())

    def _progress(self, event: dict[str, Any]) -> None:
        if self.callback is not None:
            entry = self.method
            self.callback(dict(event, method=entry.name, unit=entry.step_noun))

    def run(self) -> XDModel:
        st = self.state
        if not st.finished:
            self.state = self._loop().run(st)
        return self.model()

    # ------------------------------------------------------------------ result
    def model(self) -> XDModel:
        st, cfg = self.state, self.cfg
        p = st.params
        hist = st.history
        metadata = {
            "method": cfg.method,
            "config": cfg.to_dict(),
            "history": hist,
            "n_iter": st.iteration,
            "converged": bool(st.converged),
            "final_mean_loglike": hist[-1]["mean_loglike"] if hist else None,
            "dropped": st.counts.get("dropped", {}),
            "rows_read": st.counts.get("read", 0),
            "rows_used": st.counts.get("used", 0),
            "holdout_rows": float(cfg.holdout_rows),
            "reseeded": st.reseeded,
            "init": st.info.get("init", {}),
            "manifest": {
                "source": self.manifest.source,
                "n_partitions": len(self.manifest),
                "n_rows": self.manifest.n_rows,
                "fingerprint": self.manifest.fingerprint,
            },
            "wave_size": int(st.info.get("wave_size", 0)),
            "waves": st.info.get("waves"),
            "split_merge": st.info.get("split_merge", {}).get("moves"),
            "max_gathered_bytes": max(
                int(st.info.get("max_gathered_bytes", 0)), self.runner.max_gathered_bytes
            ),
            "retries": self._retries0 + self.runner.n_retries,
            "schema": getattr(self.schema, "name", None),
            "versions": _versions(),
        }
        return XDModel(p, list(self.schema.features), metadata)


def _cluster_memory(client: Client) -> int | None:
    """Summed memory limits of the workers (bytes), or None when any is unlimited / unknown."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    limits = [int(w.get("memory_limit") or 0) for w in workers.values()]
    return sum(limits) if limits and all(limits) else None


def _listing(config: FitConfig, schema: Any) -> Callable[[int | None], Manifest]:
    """``listing(max_rows_per_partition)`` -> the catalogue's manifest."""

    def listing(rows: int | None) -> Manifest:
        return build_manifest(
            config.catalog, max_rows_per_partition=rows, id_column=schema.id_column
        )

    return listing


def _manifest_and_plan(
    config: FitConfig, schema: Any, client: Client
) -> tuple[Manifest, WavePlan | None]:
    """The manifest and, for online EM / Adam, the plan of the waves (which may split files)."""
    listing = _listing(config, schema)
    manifest = listing(config.max_rows_per_partition)
    if method(config.method).full_batch:
        return manifest, None
    plan, manifest = plan_waves(
        config,
        manifest,
        detect_layout(manifest),
        len(schema.features),
        worker_threads(client),
        _cluster_memory(client),
        split=listing,
        workers=len(client.nthreads()),
        n_observed=None if getattr(schema, "projection", None) is None else len(schema.observed),
    )
    if plan.mode == "strata" and not schema.id_column:
        log.warning(
            "schema %r has no id column: the strata of %s are drawn by row position in each "
            "file (they change if the files are rewritten)",
            getattr(schema, "name", None),
            manifest.source,
        )
    return manifest, plan


@contextlib.contextmanager
def _observed(client: Client, report_path: str | None):
    """Log the dashboard; with ``report_path`` record a Dask performance report (atomically)."""
    log.info("dask dashboard: %s", client.dashboard_link)
    if report_path is None:
        yield
        return
    with atomic_path(report_path, suffix=".html") as tmp:
        with client.as_current(), performance_report(filename=str(tmp)):
            yield
    log.info("performance report written to %s", report_path)


def fit_catalog(
    config: FitConfig, client: Client, progress_callback: ProgressCallback | None = None
) -> XDModel:
    """Fit an XD mixture to a partitioned Parquet catalogue on a Dask cluster.

    Parameters
    ----------
    config : what to fit and how (:class:`FitConfig`).
    client : a connected ``distributed.Client`` (see :func:`xd_dask.distributed.connect`).
    progress_callback : called on the client after every iteration (batch EM) or wave (online
        EM) with a dict: iteration, epoch, wave, mean_loglike (at the parameters before the
        update, over the rows of the iteration / wave), step, rows, seconds, task_seconds,
        reseeded, method, total (planned iterations / waves).

    Returns
    -------
    XDModel with ``metadata``: method, config, history (one entry per iteration / wave), n_iter,
    converged, final_mean_loglike, dropped (rows dropped per reason in the last full pass),
    rows_read (all rows read, both sides of a ``holdout_rows`` split), rows_used (valid rows of
    the training side), holdout_rows, reseeded, init, manifest, max_gathered_bytes, retries,
    versions.
    """
    if (
        config.checkpoint_dir is not None
        and (Path(config.checkpoint_dir) / CHECKPOINT_NAME).exists()
    ):
        raise CheckpointError(
            f"{config.checkpoint_dir} already holds a checkpoint; continue it with resume_fit() "
            "or choose another checkpoint_dir"
        )
    schema = resolve_schema(config.schema)
    manifest, plan = _manifest_and_plan(config, schema, client)
    fit = _Fit(config, client, manifest, schema, progress_callback, plan)
    with _observed(client, config.performance_report):
        log.info(
            "fitting K=%d (%s) to %d rows in %d partitions",
            config.n_components,
            config.method,
            manifest.n_rows,
            len(manifest),
        )
        fit.initialise()
        return fit.run()


def resume_fit(
    checkpoint_dir: str | Path,
    client: Client,
    progress_callback: ProgressCallback | None = None,
) -> XDModel:
    """Continue a fit from its last checkpoint; ends with the model an uninterrupted run gives.

    The catalogue is listed again and must be unchanged (same files, row groups, row counts and
    Parquet footers): CatalogueChangedError names the files that changed.
    A finished fit's checkpoint returns its final model without running anything.
    """
    state, cfg_dict, manifest_dict = load_checkpoint(checkpoint_dir)
    cfg_dict = dict(cfg_dict, checkpoint_dir=str(checkpoint_dir))
    config = FitConfig.from_dict(cfg_dict)
    manifest = Manifest.from_dict(manifest_dict)
    schema = resolve_schema(config.schema)
    plan = None
    if not method(config.method).full_batch:
        plan = _resumed_plan(state, config, manifest)
    rows = config.max_rows_per_partition
    if plan is not None and plan.fragment_rows is not None:
        rows = plan.fragment_rows
    current = _listing(config, schema)(rows)
    check_unchanged(manifest, current, f"the checkpoint in {checkpoint_dir}")
    fit = _Fit(config, client, manifest, schema, progress_callback, plan)
    fit.restore(state)
    with _observed(client, config.performance_report):
        log.info(
            "resuming %s fit from %s at iteration %d (epoch %d, wave %d)",
            config.method,
            checkpoint_dir,
            state.iteration,
            state.epoch,
            state.wave,
        )
        return fit.run()


def _resumed_plan(state: LoopState, config: FitConfig, manifest: Manifest) -> WavePlan:
    """The waves of a checkpointed online fit (checkpoints written before wave plans: waves of
    ``info["wave_size"]`` partitions)."""
    saved = state.info.get("waves")
    if saved is not None:
        return WavePlan.from_dict(saved)
    wave_size = max(int(state.info.get("wave_size", 0)), 1)
    return WavePlan(
        "files",
        -(-len(manifest) // wave_size),
        wave_size,
        bool(config.persist),
        None,
        "unknown",
        "checkpoint without a wave plan",
        "resumed",
    )
