"""Job configuration: packaged defaults < job file < environment < command-line overrides.

The packaged defaults (``xd_dask/defaults/job.toml``) list every key and document it; this module
holds the type and range of each key (:data:`SPEC`) and merges the layers. Every key in a layer
must exist in the defaults and every value must pass its check; an error names the key, the layer
it came from and what is allowed (:class:`ConfigError`, exit code 2 in the CLI).

Environment variables are ``XD_DASK_<SECTION>__<KEY>`` (upper case, ``__`` between levels), e.g.
``XD_DASK_FIT__N_COMPONENTS=64``. Variables without ``__`` (``XD_DASK_BACKEND``) belong to other
parts of the package and are ignored here.
"""

from __future__ import annotations

import copy
import difflib
import glob as _glob
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w

__all__ = [
    "ENV_PREFIX",
    "SPEC",
    "ConfigError",
    "JobConfig",
    "load_config",
    "load_defaults",
    "parse_assignment",
]

ENV_PREFIX = "XD_DASK_"


class ConfigError(ValueError):
    """A job configuration is invalid; the message names the key and where it was set."""


# --------------------------------------------------------------------------- value checks
Check = Callable[[Any], str | None]  # returns an error text, or None when the value is fine


def _int(lo: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {v!r}"
        if lo is not None and v < lo:
            return f"must be >= {lo}, got {v}"
        return None

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}"
        if hi is not None and v > hi:
            return f"must be <= {hi:g}, got {v:g}"
        return None

    return check


def _str(choices: Iterable[str] | None = None) -> Check:
    allowed = tuple(choices) if choices is not None else None

    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a string, got {v!r}"
        if allowed is not None and v not in allowed:
            return f"must be one of {', '.join(repr(a) for a in allowed)}, got {v!r}"
        return None

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _str_list(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        return f"must be a list of names, got {v!r}"
    return None


def _walltime(v: Any) -> str | None:
    err = _str()(v)
    if err:
        return err
    parts = v.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[1]) > 59:
        return f"must be HH:MM:SS, got {v!r}"
    return None


def _memory(v: Any) -> str | None:
    err = _str()(v)
    if err:
        return err
    from dask.utils import parse_bytes  # noqa: PLC0415

    if v == "auto":
        return None
    try:
        if parse_bytes(v) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        return f"must be a memory size like '4GiB' (or 'auto'), got {v!r}"
    return None


def _chars(pattern: str, allowed: str, what: str, *, empty: bool = True) -> Check:
    """A string of ``pattern`` (a regex; ``allowed`` describes it) for values that reach
    generated scripts and manifests unquoted (#SBATCH lines, Kubernetes names)."""
    rx = re.compile(pattern)

    def check(v: Any) -> str | None:
        err = _str()(v)
        if err:
            return err
        if (v == "" and empty) or rx.fullmatch(v):
            return None
        return f"must be {allowed} ({what}), got {v!r}"

    return check


def _text(multiline: bool = False) -> Check:
    """A string without control characters (a newline is allowed when ``multiline``)."""
    ok = {"\n", "\t"} if multiline else set()

    def check(v: Any) -> str | None:
        err = _str()(v)
        if err:
            return err
        bad = [c for c in v if (ord(c) < 32 or ord(c) == 127) and c not in ok]
        if bad:
            return f"must not contain control characters (found {bad[0]!r}), got {v!r}"
        return None

    return check


_NAME = _chars(
    r"[A-Za-z][A-Za-z0-9._-]{0,62}",
    "a letter, then up to 62 of A-Z a-z 0-9 . _ -",
    "it names Slurm jobs, files and Kubernetes resources",
    empty=False,
)
_SLURM_WORD = _chars(
    r"[A-Za-z0-9._,-]+", "made of A-Z a-z 0-9 . _ , -", "it goes into an #SBATCH line"
)
_K8S_NAME = _chars(
    r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?",
    "a Kubernetes name: a-z 0-9 . - (lower case; starting and ending alphanumeric)",
    "it goes into the manifests",
)
_IMAGE = _chars(
    r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*", "an image reference", "A-Z a-z 0-9 . _ / : @ + -"
)
_ADDRESS = _chars(
    r"none|[A-Za-z0-9.\[\]:-]*:[0-9]{1,5}", "host:port, :port or 'none'", "a listening address"
)


#: Type and range of every key. The keys must equal those of the packaged defaults (tested).
SPEC: dict[str, Any] = {
    "catalog": {
        "path": _str(),
        "schema": _str(),
        "on_bad": _str(("error", "drop")),
        "max_rows_per_partition": _int(0),
        "holdout": _str(),
        "holdout_fraction": _float(0.0, 0.9),
        "holdout_rows": _float(0.0, 0.5),
    },
    "fit": {
        "n_components": _int(1),
        "method": _str(("em", "online", "adam")),
        "max_iter": _int(1),
        "tol": _float(0.0),
        "epochs": _int(1),
        "wave_size": _int(0),
        "waves": _str(("auto", "files", "strata")),
        "waves_per_epoch": _int(0),
        "learning_rate": _float(0.0, 1.0, lo_open=True),
        "reg_covar": _float(0.0),
        "seed": _int(0),
        "init": _str(),
        "persist": _bool,
        "subsample": _float(0.0, 1.0),
        "kmeans_sample": _int(0),
        "fan_in": _int(2),
        "backend": _str(("auto", "numba", "reference")),
        "dtype": _str(("float64", "float32")),
        "background": _bool,
        "background_weight": _float(0.0, 0.5, lo_open=True),
        "max_ll_drop": _float(0.0, lo_open=True),
        "step": {
            "kind": _str(("power", "halving")),
            "kappa": _float(0.5, 1.0, lo_open=True),
            "t0": _float(1.0),
            "lambda0": _float(0.0, 1.0, lo_open=True),
            "hold": _int(0),
            "every": _int(1),
            "floor": _float(0.0, 1.0, lo_open=True),
        },
    },
    "cluster": {
        "scheduler_address": _str(),
        "scheduler_file": _str(),
        "n_workers": _int(0),
        "threads_per_worker": _int(1),
        "memory_limit": _memory,
        "dashboard_address": _chars(
            r"[A-Za-z0-9.\[\]:-]*:[0-9]{1,5}", "host:port or :port, or empty", "the dashboard"
        ),
        "gpu": _bool,
    },
    "output": {
        "dir": _str(),
        "plots": _bool,
        "checkpoint": _bool,
        "performance_report": _bool,
    },
    "plots": {
        "features": _str_list,
        "n_samples": _int(100),
        "max_rows": _int(0),
        "sky": _bool,
        "dpi": _int(30),
    },
    "nightly": {
        "store": _str(),
        "keep": _int(1),
        "margin": _float(0.0),
        "warm_start": _bool,
    },
    "deploy": {
        "name": _NAME,
        "image": _IMAGE,
        "gpu_image": _IMAGE,
        "n_workers": _int(0),
        "gpu_workers": _int(0),
        "worker_cores": _int(1),
        "worker_memory": _memory,
        "scheduler_cores": _int(1),
        "scheduler_memory": _memory,
        "walltime": _walltime,
        "config_path": _text(),
        "slurm": {
            "partition": _SLURM_WORD,
            "gpu_partition": _SLURM_WORD,
            "account": _SLURM_WORD,
            "setup": _text(multiline=True),
            "dashboard_address": _ADDRESS,
        },
        "kubernetes": {
            "namespace": _K8S_NAME,
            "volume_claim": _K8S_NAME,
            "mount_path": _text(),
        },
    },
}


# --------------------------------------------------------------------------- helpers
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _spec_lookup(key: str) -> Check | dict | None:
    node: Any = SPEC
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _suggest(key: str) -> str:
    known = list(_flatten(SPEC))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    if not close:
        # a right key in the wrong section: compare the last part only
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == last][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(flat: Mapping[str, Any], source: str) -> None:
    for key in flat:
        node = _spec_lookup(key)
        if node is None:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key)}")
        if isinstance(node, dict):
            raise ConfigError(f"{source}: {key!r} is a section, not a value")


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _get(d: Mapping[str, Any], key: str) -> Any:
    for p in key.split("."):
        d = d[p]
    return d


def parse_value(text: str) -> Any:
    """A string from the environment or the command line as a TOML value, else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_for_key(key: str, text: str) -> Any:
    """Parse ``text`` for ``key``: verbatim for string keys (a path named ``2024`` stays a
    string), else as a TOML value (``64``, ``true``, ``["a", "b"]``)."""
    try:
        default = _get(load_defaults(), key)
    except (KeyError, TypeError):
        default = None
    return text if isinstance(default, str) else parse_value(text)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"fit.n_components=64"`` -> ``("fit.n_components", 64)``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. fit.n_components=64")
    return key, parse_for_key(key, value.strip())


def load_defaults() -> dict[str, Any]:
    """The packaged defaults (``xd_dask/defaults/job.toml``) as a nested dict."""
    text = (resources.files("xd_dask") / "defaults" / "job.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``XD_DASK_<SECTION>__<KEY>`` variables as a flat {dotted key: value} dict."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if _spec_lookup(key) is None or isinstance(_spec_lookup(key), dict):
            raise ConfigError(f"environment variable {name}: unknown key {key!r}{_suggest(key)}")
        out[key] = parse_for_key(key, value)
    return out


# --------------------------------------------------------------------------- the config
@dataclass
class JobConfig:
    """A validated job configuration.

    Attributes
    ----------
    data : nested dict, the same layout as the packaged defaults, every key present.
    sources : {dotted key: where the value came from} for keys not left at their default.
    job_file : the job file it was read from, if any.
    """

    data: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    job_file: Path | None = None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.data[section]

    def get(self, key: str) -> Any:
        """A value by dotted key, e.g. ``cfg.get("fit.step.kappa")``."""
        try:
            return _get(self.data, key)
        except (KeyError, TypeError):
            raise KeyError(f"no config key {key!r}") from None

    def replace(self, overrides: Mapping[str, Any], source: str = "override") -> JobConfig:
        """A new validated config with ``{dotted key: value}`` overrides applied."""
        flat = dict(overrides)
        _check_keys(flat, source)
        data = copy.deepcopy(self.data)
        sources = dict(self.sources)
        for k, v in flat.items():
            _set(data, k, v)
            sources[k] = source
        cfg = JobConfig(data, sources, self.job_file)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every value against :data:`SPEC`; raise ConfigError naming the first bad key."""
        for key, value in _flatten(self.data).items():
            check = _spec_lookup(key)
            if check is None or isinstance(check, dict):
                raise ConfigError(f"{self.sources.get(key, 'config')}: unknown key {key!r}")
            err = check(value)
            if err:
                where = self.sources.get(key, "packaged defaults")
                raise ConfigError(f"{key} {err} (set in {where})")
        fit = self.data["fit"]
        if fit["init"] not in ("kmeans", "") and not fit["init"].endswith(".npz"):
            raise ConfigError(
                f"fit.init must be 'kmeans' or a model file (.npz), got {fit['init']!r} "
                f"(set in {self.sources.get('fit.init', 'packaged defaults')})"
            )
        if fit["subsample"] > 0 and fit["method"] not in ("online", "adam"):
            raise ConfigError(
                "fit.subsample applies to fit.method = 'online' or 'adam' only "
                f"(set in {self.sources.get('fit.subsample', 'packaged defaults')})"
            )
        cat = self.data["catalog"]
        given = [
            k
            for k, on in (
                ("catalog.holdout", bool(cat["holdout"])),
                ("catalog.holdout_fraction", cat["holdout_fraction"] > 0),
                ("catalog.holdout_rows", cat["holdout_rows"] > 0),
            )
            if on
        ]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} are set together; give one of them")

    def check_inputs(self, require_catalog: bool = True) -> None:
        """Check that the catalogue (and held-out catalogue, init model) exist, for local paths.

        Raises ConfigError naming the key: a missing catalogue is a configuration error (exit 2),
        found before any cluster is started.
        """
        keys = ["catalog.path", "catalog.holdout"]
        if self.get("fit.init").endswith(".npz"):
            keys.append("fit.init")
        for key in keys:
            value = self.get(key)
            if not value:
                if key == "catalog.path" and require_catalog:
                    raise ConfigError(
                        "catalog.path is not set: give the catalogue in the job file "
                        "([catalog] path = ...) or with --catalog"
                    )
                continue
            if "://" in value:
                continue  # remote URL: checked when the manifest is built
            if any(c in value for c in "*?["):
                if not _glob.glob(value, recursive=True):
                    raise ConfigError(f"{key}: {value!r} matches no files")
            elif not Path(value).exists():
                raise ConfigError(f"{key}: {value!r}: no such file or directory")
        if (
            self.get("cluster.scheduler_file")
            and not Path(self.get("cluster.scheduler_file")).is_file()
        ):
            raise ConfigError(
                f"cluster.scheduler_file: {self.get('cluster.scheduler_file')!r}: no such file"
            )

    def to_toml(self) -> str:
        """The full effective configuration as TOML text (round-trips through load_config)."""
        return tomli_w.dumps(self.data)

    def non_default(self) -> dict[str, Any]:
        """{dotted key: value} of the keys that differ from the packaged defaults."""
        defaults = _flatten(load_defaults())
        return {k: v for k, v in _flatten(self.data).items() if defaults.get(k) != v}


def load_config(
    job_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> JobConfig:
    """Merge defaults < job file < environment < overrides and validate the result.

    Parameters
    ----------
    job_file : TOML job file, optional.
    overrides : {dotted key: value} from the command line (highest precedence).
    environ : environment mapping (default ``os.environ``).

    Raises
    ------
    ConfigError
        The job file is missing or not TOML, a key is unknown, or a value is invalid.
    """
    data = load_defaults()
    sources: dict[str, str] = {}
    path = None
    if job_file is not None:
        path = Path(job_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such job file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read job file ({exc})") from None
        try:
            file_data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        flat = _flatten(file_data)
        _check_keys(flat, str(path))
        for k, v in flat.items():
            _set(data, k, v)
            sources[k] = f"job file {path}"
    for k, v in env_overrides(environ).items():
        _set(data, k, v)
        sources[k] = f"environment {ENV_PREFIX}{k.upper().replace('.', '__')}"
    if overrides:
        flat = dict(overrides)
        _check_keys(flat, "command line")
        for k, v in flat.items():
            _set(data, k, v)
            sources[k] = "command line"
    cfg = JobConfig(data, sources, path)
    cfg.validate()
    return cfg
