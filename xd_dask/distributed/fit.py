"""Fitting XD to a partitioned catalogue on a Dask cluster: batch EM and online EM.

The client holds only parameters and statistics. Each iteration (batch EM) or wave (online EM):

1. scatter the current parameters to the workers once;
2. one ``xd-estep`` task per partition: read + validate + build X, S + kernel (or reuse the
   partition's arrays held in worker memory when ``persist``);
3. tree-reduce the statistics on the cluster (``xd-reduce``, fan-in ``fan_in``);
4. gather the single reduced result (O(K D^2)) and apply the update (:mod:`xd_dask.em`);
5. write a checkpoint, log a line, call ``progress_callback``.

Public entry points: :class:`FitConfig`, :func:`fit_catalog`, :func:`resume_fit`.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, performance_report

from xd_dask.distributed.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    FitState,
    load_checkpoint,
    save_checkpoint,
)
from xd_dask.distributed.cluster import check_gpu_workers, worker_threads
from xd_dask.distributed.config import FitConfig, resolve_schema
from xd_dask.distributed.kmeans import kmeans_init
from xd_dask.distributed.manifest import Manifest, build_manifest, check_unchanged
from xd_dask.distributed.passes import PassRunner
from xd_dask.distributed.tasks import Params, Partial, TaskOptions, estep
from xd_dask.em import OnlineState, batch_update, online_update
from xd_dask.estimator import ConvergenceWarning
from xd_dask.model import XDModel
from xd_dask.utils import atomic_path, get_logger

log = get_logger(__name__)

__all__ = ["FitConfig", "ProgressCallback", "fit_catalog", "resolve_schema", "resume_fit"]

ProgressCallback = Callable[[dict[str, Any]], None]


def _versions() -> dict[str, str]:
    import dask  # noqa: PLC0415
    import distributed  # noqa: PLC0415
    import pyarrow  # noqa: PLC0415

    import xd_dask  # noqa: PLC0415

    out = {
        "xd_dask": xd_dask.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }
    try:
        import numba  # noqa: PLC0415

        out["numba"] = numba.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _add_counts(acc: dict, part: Partial) -> dict:
    dropped = dict(acc.get("dropped", {}))
    for k, v in part.dropped.items():
        dropped[k] = dropped.get(k, 0) + int(v)
    return {
        "read": int(acc.get("read", 0)) + part.n_read,
        "used": int(acc.get("used", 0)) + part.n_used,
        "dropped": dropped,
    }


def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """Seeded partition order of an online-EM epoch (depends on seed and epoch only)."""
    return [int(i) for i in np.random.default_rng([int(seed), 3, int(epoch)]).permutation(n)]


class _Fit:
    """One fit in progress (batch or online EM) on a client."""

    def __init__(
        self,
        config: FitConfig,
        client: Client,
        manifest: Manifest,
        schema: Any,
        progress_callback: ProgressCallback | None,
    ) -> None:
        self.cfg = config
        self.client = client
        self.manifest = manifest
        self.schema = schema
        self.callback = progress_callback
        self.opts = TaskOptions(
            schema,
            config.on_bad,
            config.dtype,
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
            persist=config.persist,
            max_retries=config.max_retries,
        )
        self.state: FitState | None = None
        if config.gpu:
            check_gpu_workers(client)

    # ------------------------------------------------------------------ set-up
    def initialise(self) -> None:
        cfg = self.cfg
        K = int(cfg.n_components)
        D = len(self.schema.features)
        if cfg.init == "kmeans":
            t0 = time.perf_counter()
            init = kmeans_init(
                self.runner,
                K,
                cfg.seed,
                max_iter=cfg.kmeans_iter,
                tol=cfg.kmeans_tol,
                sample_size=cfg.kmeans_sample,
                reg_covar=cfg.reg_covar,
            )
            params, info = init.params, init.info
            info["seconds"] = time.perf_counter() - t0
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
            params = Params(model.weights, model.means, model.covariances)
            info = {"method": "model", "path": str(cfg.init)}
        wave_size = 0
        if cfg.method == "online":
            wave_size = int(cfg.wave_size or 2 * worker_threads(self.client))
            wave_size = min(wave_size, len(self.manifest))
        self.state = FitState(
            params=params,
            online=(
                OnlineState.from_params(params.weights, params.means, params.covariances)
                if cfg.method == "online"
                else None
            ),
            wave_size=wave_size,
            order=_epoch_order(cfg.seed, 0, len(self.manifest)) if cfg.method == "online" else [],
            init_info=info,
        )
        self._checkpoint()

    def restore(self, state: FitState) -> None:
        self.state = state

    # ------------------------------------------------------------------ bookkeeping
    def _checkpoint(self) -> None:
        if self.cfg.checkpoint_dir is None:
            return
        st = self.state
        st.retries = self.runner.n_retries
        st.max_gathered_bytes = max(st.max_gathered_bytes, self.runner.max_gathered_bytes)
        save_checkpoint(self.cfg.checkpoint_dir, st, self.cfg.to_dict(), self.manifest.to_dict())

    def _record(self, entry: dict[str, Any], total: int) -> None:
        st = self.state
        st.history.append(entry)
        self._checkpoint()
        prev = st.history[-2]["mean_loglike"] if len(st.history) > 1 else float("nan")
        where = (
            f"iteration {entry['iteration']}"
            if self.cfg.method == "em"
            else f"epoch {entry['epoch']} wave {entry['wave']} (t={entry['iteration']})"
        )
        log.info(
            "%s: mean log-likelihood %.10g (change %.3g), step %.4g, rows %d, %.3f s",
            where,
            entry["mean_loglike"],
            entry["mean_loglike"] - prev,
            entry["step"],
            entry["rows"],
            entry["seconds"],
        )
        if self.callback is not None:
            self.callback(dict(entry, method=self.cfg.method, total=total))

    def _update_params(self, upd) -> None:
        self.state.params = Params(upd.weights, upd.means, upd.covariances)
        if upd.reseeded:
            self.state.reseeded.append(
                {"iteration": self.state.iteration, "components": list(upd.reseeded)}
            )

    # ------------------------------------------------------------------ loops
    def _batch(self) -> None:
        """Batch EM. As in :class:`xd_dask.estimator.XDGMM`: each iteration computes the
        statistics at the current parameters; if the mean log-likelihood changed by less than
        ``tol`` since the previous iteration the fit has converged and stops with these
        parameters, else the M-step gives the next parameters."""
        cfg, st = self.cfg, self.state
        while st.iteration < cfg.max_iter and not st.converged:
            t0 = time.perf_counter()
            p = st.params
            part = self.runner.run(
                "estep", (st.iteration + 1,), estep, shared=(p,), extra=(self.opts,)
            )
            stats = part.payload
            if stats.W <= 0:
                raise ValueError("no valid rows in the catalogue (every row was dropped)")
            ll = stats.ll / stats.W
            if not math.isfinite(ll):
                raise FloatingPointError(
                    f"mean log-likelihood is {ll} at iteration {st.iteration + 1}"
                )
            prev = st.history[-1]["mean_loglike"] if st.history else None
            st.converged = prev is not None and abs(ll - prev) < cfg.tol
            st.iteration += 1
            reseeded: list[int] = []
            if not st.converged:
                upd = batch_update(
                    stats, p.weights, p.means, p.covariances, reg_covar=cfg.reg_covar
                )
                self._update_params(upd)
                reseeded = list(upd.reseeded)
            st.counts = _add_counts({}, part)
            self._record(
                {
                    "iteration": st.iteration,
                    "epoch": st.iteration,
                    "wave": 1,
                    "mean_loglike": ll,
                    "step": 1.0,
                    "rows": part.n_used,
                    "seconds": time.perf_counter() - t0,
                    "task_seconds": part.seconds,
                    "reseeded": reseeded,
                },
                cfg.max_iter,
            )
        if not st.converged and cfg.tol > 0:
            warnings.warn(
                f"batch EM did not converge in {cfg.max_iter} iterations (tol={cfg.tol}); "
                "raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=3,
            )

    def _online(self) -> None:
        cfg, st = self.cfg, self.state
        n_parts = len(self.manifest)
        P = st.wave_size
        n_waves = -(-n_parts // P)
        total = cfg.epochs * n_waves
        while st.epoch < cfg.epochs:
            t0 = time.perf_counter()
            if not st.order:
                st.order = _epoch_order(cfg.seed, st.epoch, n_parts)
            pids = st.order[st.wave * P : (st.wave + 1) * P]
            step = cfg.step(st.iteration)
            p = st.params
            sub = None if cfg.subsample is None else (float(cfg.subsample), cfg.seed, st.epoch)
            part = self.runner.run(
                "estep",
                (st.epoch + 1, st.wave + 1),
                estep,
                pids=pids,
                shared=(p,),
                extra=(self.opts, sub),
            )
            stats = part.payload
            entry = {
                "iteration": st.iteration + 1,
                "epoch": st.epoch + 1,
                "wave": st.wave + 1,
                "mean_loglike": stats.ll / stats.W if stats.W > 0 else float("nan"),
                "step": step,
                "rows": part.n_used,
                "partitions": [int(i) for i in pids],
                "task_seconds": part.seconds,
                "reseeded": [],
            }
            st.iteration += 1
            if stats.W > 0:  # a wave whose rows were all dropped changes nothing
                st.online, upd = online_update(
                    st.online,
                    stats,
                    p.weights,
                    p.means,
                    p.covariances,
                    step,
                    reg_covar=cfg.reg_covar,
                )
                entry["reseeded"] = list(upd.reseeded)
                self._update_params(upd)
            st.epoch_counts = _add_counts(st.epoch_counts, part)
            st.wave += 1
            if st.wave == n_waves:  # epoch complete: next epoch, new seeded order
                st.counts, st.epoch_counts = st.epoch_counts, {}
                st.epoch, st.wave, st.order = st.epoch + 1, 0, []
            entry["seconds"] = time.perf_counter() - t0
            self._record(entry, total)

    def run(self) -> XDModel:
        st = self.state
        if not st.finished:
            if self.cfg.method == "em":
                self._batch()
            else:
                self._online()
            st.finished = True
            self._checkpoint()
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
            "init": st.init_info,
            "manifest": {
                "source": self.manifest.source,
                "n_partitions": len(self.manifest),
                "n_rows": self.manifest.n_rows,
                "fingerprint": self.manifest.fingerprint,
            },
            "wave_size": st.wave_size,
            "max_gathered_bytes": max(st.max_gathered_bytes, self.runner.max_gathered_bytes),
            "retries": st.retries + self.runner.n_retries,
            "schema": getattr(self.schema, "name", None),
            "versions": _versions(),
        }
        return XDModel(p.weights, p.means, p.covariances, list(self.schema.features), metadata)


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
    manifest = build_manifest(config.catalog, max_rows_per_partition=config.max_rows_per_partition)
    fit = _Fit(config, client, manifest, schema, progress_callback)
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
    current = build_manifest(config.catalog, max_rows_per_partition=config.max_rows_per_partition)
    check_unchanged(manifest, current, f"the checkpoint in {checkpoint_dir}")
    schema = resolve_schema(config.schema)
    fit = _Fit(config, client, manifest, schema, progress_callback)
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
