"""Configuration of a distributed fit: :class:`FitConfig` and schema specs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xd_dask.em import StepSchedule
from xd_dask.optim.robust import MAX_LL_DROP

__all__ = ["METHODS", "WAVES", "FitConfig", "resolve_schema"]

METHODS = ("em", "online", "adam")
WAVES = ("auto", "files", "strata")


@dataclass
class FitConfig:
    """Everything that defines a distributed fit (JSON-serialisable via :meth:`to_dict`).

    Parameters
    ----------
    catalog : directory, glob, file, fsspec URL, or list of them (Parquet).
    n_components : K.
    schema : schema spec for :func:`xd_dask.io.load_schema` (None: packaged Gaia DR3; a name; a
        TOML path; a dict) or a ``CatalogSchema``.
    method : "em" (batch EM), "online" (online EM in waves) or "adam" (Adam on the mean
        log-likelihood in waves, :mod:`xd_dask.optim.adam`).
    max_iter, tol : batch EM stops after ``max_iter`` iterations or when the mean log-likelihood
        per row changes by less than ``tol`` between iterations (``tol=0``: always ``max_iter``).
    epochs : online EM / Adam passes over the catalogue.
    waves : how waves are drawn (online EM / Adam; :mod:`xd_dask.distributed.layout`): "strata"
        (hash strata of every partition's rows: a sample whatever the file layout), "files"
        (waves of partitions: a sample only for shuffled files) or "auto" (strata when the
        catalogue is, or can be, held in worker memory; else files).
    waves_per_epoch : updates per epoch (default: 64, fewer when a wave would hold under 100 rows
        per component); strata per epoch, or the target for waves of files.
    wave_size : partitions per wave of files (default: enough for ``waves_per_epoch``, at least
        the cluster's worker threads); setting it asks for waves of files.
    step : online-EM step-size schedule.
    learning_rate : Adam's learning rate in (0, 1] (in units of the data's spread); constant for
        the first half of the planned waves, then halved every tenth of them.
    reg_covar : added to the covariance diagonals (``em`` module, ``reg_form="add"``).
    seed : all randomness (k-means, wave order, subsampling) derives from it.
    init : "kmeans" or the path of a saved model file (warm start).
    kmeans_iter, kmeans_tol, kmeans_sample : Lloyd passes over the whole catalogue after k-means
        on the sample (:mod:`xd_dask.distributed.kmeans`; default 1, 0: the sample's clusters),
        centre-shift tolerance (robust standardised units) and sample size (default
        :func:`~xd_dask.distributed.kmeans.default_sample_size`).
    persist : keep every partition's validated arrays in worker memory between passes.
    on_bad : "error" (stop naming file and row) or "drop" (skip bad rows, counted per reason).
    backend : kernel backend "auto" | "numba" | "reference" (GPU workers use "reference").
    dtype : "float64" or "float32" for the rows (statistics are always summed in float64).
    checkpoint_dir : write a checkpoint after every iteration / wave here (None: no checkpoints).
    fan_in : reduction-tree fan-in (>= 2).
    subsample : online EM only, keep this fraction of each partition's rows (seeded per epoch).
    gpu : partitions go to CuPy on the workers (needs GPU workers; see :func:`connect`).
    performance_report : write a Dask performance report (HTML) of the whole fit here.
    numba_threads : Numba threads per task (1: parallelism comes from the worker threads).
    max_rows_per_partition : split large files into runs of row groups (manifest).
    max_retries : re-runs of a pass after the cluster lost its tasks.
    holdout_rows : fit on the "train" side of the row-level split by source-id hash
        (:mod:`xd_dask.distributed.split`): rows with ``splitmix64(source_id) / 2**64 <
        holdout_rows`` are held out and never read into the fit (score them with
        ``score_catalog(..., split=(holdout_rows, "holdout"))``); 0: fit every row.
    background : add a uniform background (outlier) component over the padded bounding box of
        the k-means sample (:mod:`xd_dask.optim.background`); its weight is fitted. It absorbs a
        few absurd rows instead of letting them take or drag a component.
    background_weight : its starting weight, in (0, 0.5].
    max_ll_drop : batch EM: largest accepted decrease of the mean log-likelihood per iteration
        (nats per row); a larger one rolls back and stops naming the rows
        (:mod:`xd_dask.optim.robust`).
    """

    catalog: str | list[str]
    n_components: int
    schema: Any = None
    method: str = "em"
    max_iter: int = 100
    tol: float = 1e-6
    epochs: int = 3
    waves: str = "auto"
    waves_per_epoch: int | None = None
    wave_size: int | None = None
    step: StepSchedule = field(default_factory=StepSchedule)
    learning_rate: float = 0.05
    reg_covar: float = 1e-6
    seed: int = 0
    init: str = "kmeans"
    kmeans_iter: int = 1
    kmeans_tol: float = 1e-4
    kmeans_sample: int | None = None
    persist: bool = False
    on_bad: str = "error"
    backend: str = "auto"
    dtype: str = "float64"
    checkpoint_dir: str | None = None
    fan_in: int = 8
    subsample: float | None = None
    gpu: bool = False
    performance_report: str | None = None
    numba_threads: int = 1
    max_rows_per_partition: int | None = None
    max_retries: int = 3
    holdout_rows: float = 0.0
    background: bool = False
    background_weight: float = 1e-3
    max_ll_drop: float = MAX_LL_DROP

    def __post_init__(self) -> None:
        if isinstance(self.step, dict):
            try:
                self.step = StepSchedule(**self.step)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"FitConfig: step: {exc}") from None
        if not isinstance(self.catalog, (str, Path)):
            self.catalog = [str(c) for c in self.catalog]
        elif isinstance(self.catalog, Path):
            self.catalog = str(self.catalog)
        checks = [
            (int(self.n_components) >= 1, "n_components must be >= 1"),
            (self.method in METHODS, f"method must be one of {METHODS}"),
            (int(self.max_iter) >= 1, "max_iter must be >= 1"),
            (self.tol >= 0 and math.isfinite(self.tol), "tol must be finite and >= 0"),
            (int(self.epochs) >= 1, "epochs must be >= 1"),
            (self.wave_size is None or int(self.wave_size) >= 1, "wave_size must be >= 1"),
            (self.waves in WAVES, f"waves must be one of {WAVES}, got {self.waves!r}"),
            (
                self.waves_per_epoch is None or int(self.waves_per_epoch) >= 1,
                "waves_per_epoch must be >= 1",
            ),
            (
                math.isfinite(self.learning_rate) and 0.0 < float(self.learning_rate) <= 1.0,
                f"learning_rate must be in (0, 1], got {self.learning_rate!r}",
            ),
            (self.reg_covar >= 0, "reg_covar must be >= 0"),
            (self.on_bad in ("error", "drop"), "on_bad must be 'error' or 'drop'"),
            (
                self.backend in ("auto", "numba", "reference"),
                "backend must be auto|numba|reference",
            ),
            (self.dtype in ("float64", "float32"), "dtype must be 'float64' or 'float32'"),
            (int(self.fan_in) >= 2, "fan_in must be >= 2"),
            (int(self.kmeans_iter) >= 0, "kmeans_iter must be >= 0"),
            (int(self.numba_threads) >= 1, "numba_threads must be >= 1"),
            (int(self.max_retries) >= 0, "max_retries must be >= 0"),
            (
                self.subsample is None or 0.0 < float(self.subsample) <= 1.0,
                "subsample must be in (0, 1]",
            ),
            (
                self.subsample is None or self.method in ("online", "adam"),
                "subsample applies to methods 'online' and 'adam' only",
            ),
            (
                0.0 <= float(self.holdout_rows) < 1.0,
                "holdout_rows must be in [0, 1)",
            ),
            (isinstance(self.init, str) and bool(self.init), "init must be 'kmeans' or a path"),
            (isinstance(self.background, bool), "background must be true or false"),
            (
                0.0 < float(self.background_weight) <= 0.5,
                "background_weight must be in (0, 0.5]",
            ),
            (
                float(self.max_ll_drop) > 0 and math.isfinite(self.max_ll_drop),
                "max_ll_drop must be finite and > 0",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"FitConfig: {msg}")

    @property
    def split(self) -> tuple[float, str] | None:
        """The row split the fit reads (``(holdout_rows, "train")``), or None."""
        return (float(self.holdout_rows), "train") if self.holdout_rows > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["step"] = dataclasses.asdict(self.step)
        d["schema"] = _schema_spec(self.schema)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"FitConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def _schema_spec(schema: Any) -> Any:
    """A JSON-serialisable spec of ``schema`` that :func:`xd_dask.io.load_schema` accepts."""
    if schema is None or isinstance(schema, (str, dict)):
        return schema
    if isinstance(schema, Path):
        return str(schema)
    if dataclasses.is_dataclass(schema):
        to_dict = getattr(schema, "to_dict", None)
        return to_dict() if callable(to_dict) else dataclasses.asdict(schema)
    raise TypeError(f"cannot serialise schema of type {type(schema).__name__}")


def resolve_schema(spec: Any) -> Any:
    """A ``CatalogSchema`` from a spec (None, name, TOML path, dict) or the schema itself."""
    if spec is not None and not isinstance(spec, (str, dict, Path)):
        return spec
    if spec == "":
        spec = None
    from xd_dask.io import load_schema  # noqa: PLC0415 - layering: distributed -> io

    return load_schema(str(spec) if isinstance(spec, Path) else spec)
