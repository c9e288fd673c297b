"""Configuration of a distributed fit: :class:`FitConfig` and schema specs.

FitConfig is a plain dataclass whose fields are the key table's (:data:`xd_dask.config.KEYS`):
every ``fit.*`` key is a field of the same name (``fit.step.*`` make up ``step``, a
:class:`~xd_dask.optim.schedule.StepSchedule`), and ``catalog.path`` -> ``catalog``,
``catalog.schema`` -> ``schema``, ``catalog.on_bad`` -> ``on_bad``, ``catalog.holdout_rows``,
``catalog.max_rows_per_partition`` and ``cluster.gpu`` -> ``gpu``. Defaults, types and ranges are
the table's (a test checks the fields against it); a key's "not set" value (0 or "") is None
here. Settings that do not apply to the chosen method (the method table,
:mod:`xd_dask.optim.methods`) are an error naming them, except in a config built from a job's
layers (:meth:`FitConfig.from_values`, which named them with where they were set) or read back
from a checkpoint (:meth:`FitConfig.from_dict`).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xd_dask.config import cross_key_errors, fit_keys, key
from xd_dask.io import load_schema
from xd_dask.optim.methods import STEP_KEYS, Settings, inapplicable, method
from xd_dask.optim.schedule import StepSchedule

__all__ = ["FitConfig", "resolve_schema"]

_KEYS = {k.field: k for k in fit_keys()}  # {field: Key}
_RUN_FIELDS = ("checkpoint_dir", "performance_report")  # paths of one run, not settings
#: True while a FitConfig is built from checked layers (a job, a checkpoint).
_CHECKED_LAYERS = contextvars.ContextVar("xd_dask_fitconfig_checked_layers", default=False)


def _d(name: str) -> Any:
    """The table's default of ``name`` (None for a "not set" default)."""
    k = key(name)
    return None if k.has_unset and k.default == k.unset else k.default


@dataclass
class FitConfig:
    """Everything that defines a distributed fit (JSON-serialisable via :meth:`to_dict`).

    catalog : directory, glob, file, fsspec URL, or list of them (Parquet); required.
    schema : schema spec for :func:`xd_dask.io.load_schema` (name, TOML path, dict) or a
        ``CatalogSchema``.
    step : online-EM step-size schedule (:class:`~xd_dask.optim.schedule.StepSchedule`).
    checkpoint_dir : write a checkpoint after every iteration / wave here (None: none).
    performance_report : write a Dask performance report (HTML) of the whole fit here.
    Every other field is the key of the same name in the table (``xd-dask fit --help``,
    README's [fit] table): its help, range and default are there.
    """

    catalog: str | list[str]
    schema: Any = _d("catalog.schema")
    on_bad: str = _d("catalog.on_bad")
    max_rows_per_partition: int | None = _d("catalog.max_rows_per_partition")
    holdout_rows: float = _d("catalog.holdout_rows")
    n_components: int = _d("fit.n_components")
    method: str = _d("fit.method")
    max_iter: int = _d("fit.max_iter")
    tol: float = _d("fit.tol")
    epochs: int = _d("fit.epochs")
    waves: str = _d("fit.waves")
    waves_per_epoch: int | None = _d("fit.waves_per_epoch")
    wave_size: int | None = _d("fit.wave_size")
    learning_rate: float = _d("fit.learning_rate")
    reg_covar: float = _d("fit.reg_covar")
    seed: int = _d("fit.seed")
    init: str = _d("fit.init")
    persist: bool = _d("fit.persist")
    subsample: float | None = _d("fit.subsample")
    kmeans_sample: int | None = _d("fit.kmeans_sample")
    fan_in: int = _d("fit.fan_in")
    backend: str = _d("fit.backend")
    dtype: str = _d("fit.dtype")
    background: bool = _d("fit.background")
    background_weight: float = _d("fit.background_weight")
    max_ll_drop: float = _d("fit.max_ll_drop")
    split_merge: bool = _d("fit.split_merge")
    split_merge_candidates: int = _d("fit.split_merge_candidates")
    split_merge_partial_iter: int = _d("fit.split_merge_partial_iter")
    split_merge_max_moves: int = _d("fit.split_merge_max_moves")
    split_merge_every: int = _d("fit.split_merge_every")
    split_merge_trial_waves: int = _d("fit.split_merge_trial_waves")
    kmeans_iter: int = _d("fit.kmeans_iter")
    kmeans_tol: float = _d("fit.kmeans_tol")
    numba_threads: int = _d("fit.numba_threads")
    max_retries: int = _d("fit.max_retries")
    gpu: bool = _d("cluster.gpu")
    step: StepSchedule = field(default_factory=StepSchedule)
    checkpoint_dir: str | None = None
    performance_report: str | None = None

    def __post_init__(self) -> None:
        """Normalise (step dict, paths, "not set" values -> None) and check every field against
        its key and the cross-key rules (the same checks as a job file)."""
        if isinstance(self.step, Mapping):
            try:
                self.step = StepSchedule(**self.step)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"FitConfig: fit.step: {exc} (field step)") from None
        if not isinstance(self.catalog, str | Path):
            self.catalog = [str(c) for c in self.catalog]
        elif isinstance(self.catalog, Path):
            self.catalog = str(self.catalog)
        for name, k in _KEYS.items():
            value = getattr(self, name)
            if name == "schema" and not isinstance(value, str):
                continue  # a CatalogSchema, a dict or None (the packaged Gaia DR3 schema)
            if name == "catalog" and isinstance(value, list):
                continue
            if value is None and k.has_unset:
                continue
            err = k.validate(value)
            if err:
                raise ValueError(f"FitConfig: {k.name} {err} (field {name})")
            value = k.typed(value)
            setattr(self, name, None if k.has_unset and value == k.unset else value)
        values = self.settings()
        for _, err in cross_key_errors(values.get, values):
            raise ValueError(f"FitConfig: {err}")
        unused = inapplicable(self.method, self.changed())
        if unused and not _CHECKED_LAYERS.get():
            raise ValueError(
                f"FitConfig: fit.method = {self.method!r} ({method(self.method).summary}) does "
                f"not use {', '.join(unused)}; leave them at their defaults"
            )

    # ------------------------------------------------------------------ views
    @property
    def split(self) -> tuple[float, str] | None:
        """The row split the fit reads (``(holdout_rows, "train")``), or None."""
        return (float(self.holdout_rows), "train") if self.holdout_rows else None

    def settings(self) -> Settings:
        """Dotted key -> value of every keyed field ("not set" as the key's unset value) and the
        step schedule: what the method table's rule factories read."""
        values = {}
        for name, k in _KEYS.items():
            v = getattr(self, name)
            values[k.name] = k.unset if v is None and k.has_unset else v
        values |= {n: getattr(self.step, n.rsplit(".", 1)[1]) for n in STEP_KEYS}
        return Settings(values)

    def changed(self) -> list[str]:
        """The keys whose values differ from the table's defaults."""
        return [n for n, v in self.settings().items() if v != key(n).default]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the checkpoint's copy of the config)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["step"] = dataclasses.asdict(self.step)
        d["schema"] = _schema_spec(self.schema)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitConfig:
        """The inverse of :meth:`to_dict`; keys missing from an older checkpoint take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"FitConfig: unknown fields {sorted(unknown)}")
        return cls._from_checked(d)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], **run: Any) -> FitConfig:
        """The FitConfig of a job: ``values`` maps dotted keys to values (``JobConfig.flat()``);
        ``run`` sets fields of one run (catalog, checkpoint_dir, performance_report)."""
        kw: dict[str, Any] = {n: values[k.name] for n, k in _KEYS.items() if k.name in values}
        kw["step"] = StepSchedule(
            **{n.rsplit(".", 1)[1]: values[n] for n in STEP_KEYS if n in values}
        )
        return cls._from_checked(kw | run)

    @classmethod
    def _from_checked(cls, kw: Mapping[str, Any]) -> FitConfig:
        """A config from layers already checked for settings the method does not use."""
        token = _CHECKED_LAYERS.set(True)
        try:
            return cls(**kw)
        finally:
            _CHECKED_LAYERS.reset(token)


def _schema_spec(schema: Any) -> Any:
    """A JSON-serialisable spec of ``schema`` that :func:`xd_dask.io.load_schema` accepts."""
    if schema is None or isinstance(schema, str | dict):
        return schema
    if isinstance(schema, Path):
        return str(schema)
    if dataclasses.is_dataclass(schema):
        to_dict = getattr(schema, "to_dict", None)
        return to_dict() if callable(to_dict) else dataclasses.asdict(schema)
    raise TypeError(f"cannot serialise schema of type {type(schema).__name__}")


def resolve_schema(spec: Any) -> Any:
    """A ``CatalogSchema`` from a spec (None, name, TOML path, dict) or the schema itself."""
    if spec is not None and not isinstance(spec, str | dict | Path):
        return spec
    if spec == "":
        spec = None
    return load_schema(str(spec) if isinstance(spec, Path) else spec)
