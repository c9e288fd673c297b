"""Configuration of a distributed fit: :class:`FitConfig` and schema specs.

FitConfig's fields, defaults and checks come from the key table :data:`xd_dask.config.KEYS`:
every ``fit.*`` key is a field of the same name (``fit.step.*`` make up ``step``, a
:class:`~xd_dask.em.StepSchedule`), and ``catalog.path`` -> ``catalog``, ``catalog.schema`` ->
``schema``, ``catalog.on_bad`` -> ``on_bad``, ``catalog.holdout_rows``,
``catalog.max_rows_per_partition`` and ``cluster.gpu`` -> ``gpu``. A key's "not set" value (0 or
"") is None here. Adding a ``fit.*`` key to the table adds the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from xd_dask.config import cross_key_errors, fit_keys, key
from xd_dask.em import StepSchedule

__all__ = ["METHODS", "WAVES", "FitConfig", "resolve_schema"]

METHODS = key("fit.method").choices
WAVES = key("fit.waves").choices
_KEYS = {k.field: k for k in fit_keys()}  # {field: Key}
_STEP_KEYS = [f"fit.step.{f.name}" for f in dataclasses.fields(StepSchedule)]
_RUN_FIELDS = ("checkpoint_dir", "performance_report")  # paths of one run, not settings


def _default(k: Any) -> Any:
    return None if k.has_unset and k.default == k.unset else k.default


def _step_default() -> StepSchedule:
    return StepSchedule(**{n.rsplit(".", 1)[1]: key(n).default for n in _STEP_KEYS})


def _fields() -> list[tuple[str, Any, Any]]:
    required = [("catalog", "str | list[str]")]
    keyed = [
        (name, Any, field(default=_default(k))) for name, k in _KEYS.items() if name != "catalog"
    ]
    extra = [
        ("step", StepSchedule, field(default_factory=_step_default)),
        ("checkpoint_dir", "str | None", field(default=None)),
        ("performance_report", "str | None", field(default=None)),
    ]
    return required + keyed + extra


def _post_init(self: Any) -> None:
    """Normalise (step dict, paths, "not set" values -> None) and check every field against its
    key and the cross-key rules (the same checks as a job file)."""
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
        object.__setattr__(self, name, None if k.has_unset and value == k.unset else value)
    for name in _STEP_KEYS:
        err = key(name).validate(getattr(self.step, name.rsplit(".", 1)[1]))
        if err:
            raise ValueError(f"FitConfig: {name} {err} (field step)")
    by_key = {k.name: getattr(self, name) for name, k in _KEYS.items()}
    for _, err in cross_key_errors(by_key.get, by_key):
        raise ValueError(f"FitConfig: {err}")


def _split(self: Any) -> tuple[float, str] | None:
    """The row split the fit reads (``(holdout_rows, "train")``), or None."""
    return (float(self.holdout_rows), "train") if self.holdout_rows else None


def _to_dict(self: Any) -> dict[str, Any]:
    """A JSON-serialisable dict (the checkpoint's copy of the config)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["step"] = dataclasses.asdict(self.step)
    d["schema"] = _schema_spec(self.schema)
    return d


@classmethod
def _from_dict(cls: Any, d: Mapping[str, Any]) -> Any:
    """The inverse of :meth:`to_dict`; keys missing from an older checkpoint take defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"FitConfig: unknown fields {sorted(unknown)}")
    return cls(**d)


@classmethod
def _from_values(cls: Any, values: Mapping[str, Any], **run: Any) -> Any:
    """The FitConfig of a job: ``values`` maps dotted keys to values (``JobConfig.flat()``);
    ``run`` sets fields of one run (catalog, checkpoint_dir, performance_report)."""
    kw: dict[str, Any] = {name: values[k.name] for name, k in _KEYS.items() if k.name in values}
    kw["step"] = StepSchedule(**{n.rsplit(".", 1)[1]: values[n] for n in _STEP_KEYS if n in values})
    return cls(**(kw | run))


_DOC = """Everything that defines a distributed fit (JSON-serialisable via :meth:`to_dict`).

Fields (type, range and default from :data:`xd_dask.config.KEYS`; None = the key's "not set")
------------------------------------------------------------------------------------------------
catalog : directory, glob, file, fsspec URL, or list of them (Parquet); required.
schema : schema spec for :func:`xd_dask.io.load_schema` (name, TOML path, dict) or a
    ``CatalogSchema``.
step : online-EM step-size schedule (:class:`xd_dask.em.StepSchedule`).
checkpoint_dir : write a checkpoint after every iteration / wave here (None: no checkpoints).
performance_report : write a Dask performance report (HTML) of the whole fit here.
"""
_DOC += "".join(f"{name} : {k.help} ({k.allowed()}).\n" for name, k in _KEYS.items())

FitConfig = dataclasses.make_dataclass(
    "FitConfig",
    _fields(),
    namespace={
        "__post_init__": _post_init,
        "split": property(_split),
        "to_dict": _to_dict,
        "from_dict": _from_dict,
        "from_values": _from_values,
        "__doc__": _DOC,
        "__module__": __name__,
    },
)


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
    from xd_dask.io import load_schema  # noqa: PLC0415 - layering: distributed -> io

    return load_schema(str(spec) if isinstance(spec, Path) else spec)
