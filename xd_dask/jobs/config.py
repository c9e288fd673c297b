"""Job configuration: packaged defaults < job file < environment < command-line overrides.

Every key, its type, range, default and help are in one table, :data:`xd_dask.config.KEYS`
(``xd_dask/defaults/job.toml`` is generated from it). This module merges the layers and checks
them against the table: every key in a layer must exist and every value must pass its key's check
and the cross-key rules; an error names the key, the layer it came from and what is allowed
(:class:`ConfigError`, exit code 2 in the CLI).

Environment variables are ``XD_DASK_<SECTION>__<KEY>`` (upper case, ``__`` between levels), e.g.
``XD_DASK_FIT__N_COMPONENTS=64``. Variables without ``__`` (``XD_DASK_BACKEND``) belong to other
parts of the package and are ignored here.
"""

from __future__ import annotations

import copy
import difflib
import glob as _glob
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w

from xd_dask.config import SECTIONS, Section, cross_key_errors, defaults, job_keys, key
from xd_dask.optim.methods import InapplicableSettingWarning, inapplicable, method

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "JobConfig",
    "env_overrides",
    "load_config",
    "load_defaults",
    "parse_assignment",
    "read_job_file",
]

ENV_PREFIX = "XD_DASK_"
DEFAULT_SOURCE = "packaged defaults"


class ConfigError(ValueError):
    """A job configuration is invalid; the message names the key and where it was set."""


# --------------------------------------------------------------------------- helpers
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


_JOB_KEYS = {k.name for k in job_keys()}


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(_JOB_KEYS), n=1, cutoff=0.7)
    if not close:  # a right key in the wrong section: compare the last part only
        last = name.rsplit(".", 1)[-1]
        close = sorted(k for k in _JOB_KEYS if k.rsplit(".", 1)[-1] == last)[:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_names(flat: Mapping[str, Any], source: str) -> None:
    for name in flat:
        if name in SECTIONS:
            raise ConfigError(f"{source}: {name!r} is a section, not a value")
        if name not in _JOB_KEYS:
            raise ConfigError(f"{source}: unknown key {name!r}{_suggest(name)}")


def _set(d: dict[str, Any], name: str, value: Any) -> None:
    *parents, leaf = name.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _get(d: Mapping[str, Any], name: str) -> Any:
    for p in name.split("."):
        d = d[p]
    return d


def parse_value(text: str) -> Any:
    """A string from the environment or the command line as a TOML value, else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_for_key(name: str, text: str) -> Any:
    """Parse ``text`` for key ``name``: verbatim for string keys (a path named ``2024`` stays a
    string), else as a TOML value (``64``, ``true``, ``["a", "b"]``)."""
    if name in _JOB_KEYS and key(name).type is str:
        return text
    return parse_value(text)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"fit.n_components=64"`` -> ``("fit.n_components", 64)``."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. fit.n_components=64")
    return name, parse_for_key(name, value.strip())


def load_defaults() -> dict[str, Any]:
    """The packaged defaults as a nested dict (from the key table)."""
    return defaults()


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``XD_DASK_<SECTION>__<KEY>`` variables as a flat {dotted key: value} dict."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var[len(ENV_PREFIX) :]:
            continue
        name = var[len(ENV_PREFIX) :].lower().replace("__", ".")
        if name not in _JOB_KEYS:
            raise ConfigError(f"environment variable {var}: unknown key {name!r}{_suggest(name)}")
        out[name] = parse_for_key(name, value)
    return out


def env_source(name: str) -> str:
    return f"environment {ENV_PREFIX}{name.upper().replace('.', '__')}"


# --------------------------------------------------------------------------- the config
@dataclass
class JobConfig:
    """A validated job configuration.

    Sections are typed, read-only views: ``cfg.fit.n_components``, ``cfg.fit.step.kappa``,
    ``cfg.catalog.path`` (:class:`xd_dask.config.Section`); ``cfg.get("fit.step.kappa")`` reads a
    dotted key and ``cfg["fit"]`` is the raw section dict.

    Attributes
    ----------
    data : nested dict, the layout of job.toml, every job key present.
    sources : {dotted key: where the value came from} for keys not left at their default.
    job_file : the job file it was read from, if any.
    """

    data: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    job_file: Path | None = None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.data[section]

    def __getattr__(self, name: str) -> Section:
        if name in SECTIONS and "." not in name and name in self.__dict__.get("data", {}):
            return Section(name, self.data[name])
        raise AttributeError(name)

    def get(self, name: str) -> Any:
        """A value by dotted key, e.g. ``cfg.get("fit.step.kappa")``."""
        try:
            value = _get(self.data, name)
        except (KeyError, TypeError):
            raise KeyError(f"no config key {name!r}") from None
        return key(name).typed(value) if name in _JOB_KEYS else value

    def source(self, name: str) -> str:
        """Where key ``name`` was set (the packaged defaults unless a layer set it)."""
        return self.sources.get(name, DEFAULT_SOURCE)

    def flat(self) -> dict[str, Any]:
        """{dotted key: typed value} of every key."""
        return {name: self.get(name) for name in _flatten(self.data)}

    def replace(self, overrides: Mapping[str, Any], source: str = "override") -> JobConfig:
        """A new validated config with ``{dotted key: value}`` overrides applied."""
        flat = dict(overrides)
        _check_names(flat, source)
        data = copy.deepcopy(self.data)
        sources = dict(self.sources)
        for k, v in flat.items():
            _set(data, k, v)
            sources[k] = source
        cfg = JobConfig(data, sources, self.job_file)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every value against its key and the cross-key rules; raise ConfigError naming
        the first bad key and where it was set."""
        flat = _flatten(self.data)
        _check_names(flat, "config")
        for name, value in flat.items():
            err = key(name).validate(value)
            if err:
                raise ConfigError(f"{name} {err} (set in {self.source(name)})")
        for names, err in cross_key_errors(self.get, flat):
            where = sorted({self.source(n) for n in names if n in self.sources})
            raise ConfigError(f"{err} (set in {' and '.join(where) or DEFAULT_SOURCE})")
        self._check_method()

    def _check_method(self) -> None:
        """Settings that the chosen fit.method does not use (the method table), set to another
        value than their default: an error when given on the command line, a warning naming
        them when a job file or the environment set them (a job file may be run with another
        --method)."""
        name = self.get("fit.method")
        given = [n for n in self.sources if n in _JOB_KEYS and self.get(n) != key(n).default]
        unused = inapplicable(name, given)
        if not unused:
            return
        entry = method(name)
        flags = [n for n in unused if not self.source(n).startswith(("job file", "environment"))]
        what = f"fit.method = {name!r} ({entry.summary}) does not use"
        if flags:
            raise ConfigError(f"{what} {', '.join(flags)} (set in {self.source(flags[0])})")
        where = "; ".join(f"{n} (set in {self.source(n)})" for n in unused)
        warnings.warn(f"{what} {where}", InapplicableSettingWarning, stacklevel=4)

    def check_inputs(self, require_catalog: bool = True) -> None:
        """Check that the catalogue (and held-out catalogue, init model) exist, for local paths.

        Raises ConfigError naming the key: a missing catalogue is a configuration error (exit 2),
        found before any cluster is started.
        """
        names = ["catalog.path", "catalog.holdout"]
        if self.get("fit.init").endswith(".npz"):
            names.append("fit.init")
        for name in names:
            value = self.get(name)
            if not value:
                if name == "catalog.path" and require_catalog:
                    raise ConfigError(
                        "catalog.path is not set: give the catalogue in the job file "
                        "([catalog] path = ...) or with --catalog"
                    )
                continue
            if "://" in value:
                continue  # remote URL: checked when the manifest is built
            if any(c in value for c in "*?["):
                if not _glob.glob(value, recursive=True):
                    raise ConfigError(f"{name}: {value!r} matches no files")
            elif not Path(value).exists():
                raise ConfigError(f"{name}: {value!r}: no such file or directory")
        sched = self.get("cluster.scheduler_file")
        if sched and not Path(sched).is_file():
            raise ConfigError(f"cluster.scheduler_file: {sched!r}: no such file")

    def to_toml(self) -> str:
        """The full effective configuration as TOML text (round-trips through load_config)."""
        return tomli_w.dumps(self.data)

    def non_default(self) -> dict[str, Any]:
        """{dotted key: value} of the keys that differ from the packaged defaults."""
        base = _flatten(defaults())
        return {k: v for k, v in _flatten(self.data).items() if base.get(k) != v}


def read_job_file(path: Path) -> dict[str, Any]:
    """A job file's keys and values, flat ({dotted key: value}), unchecked."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read job file ({exc})") from None
    try:
        return _flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def load_config(
    job_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    override_sources: Mapping[str, str] | None = None,
) -> JobConfig:
    """Merge defaults < job file < environment < overrides and validate the result.

    Parameters
    ----------
    job_file : TOML job file, optional.
    overrides : {dotted key: value} from the command line (highest precedence).
    environ : environment mapping (default ``os.environ``).
    override_sources : {dotted key: where} for overrides (default "command line").

    Raises
    ------
    ConfigError
        The job file is missing or not TOML, a key is unknown, or a value is invalid.
    """
    data = defaults()
    sources: dict[str, str] = {}
    path = None
    layers: list[tuple[dict[str, Any], Any]] = []
    if job_file is not None:
        path = Path(job_file)
        flat = read_job_file(path)
        _check_names(flat, str(path))
        layers.append((flat, f"job file {path}"))
    layers.append((env_overrides(environ), env_source))
    if overrides:
        flat = dict(overrides)
        _check_names(flat, "command line")
        where = dict(override_sources or {})
        layers.append((flat, lambda n: where.get(n, "command line")))
    for flat, source in layers:
        for k, v in flat.items():
            _set(data, k, v)
            sources[k] = source(k) if callable(source) else source
    cfg = JobConfig(data, sources, path)
    cfg.validate()
    return cfg
