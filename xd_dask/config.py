"""One typed configuration: every setting of a job in one table (:data:`KEYS`).

Each :class:`Key` has a dotted name (``fit.n_components``), a default (whose Python type is the
key's type), a one-line help, a range or a set of choices, and optionally a command-line flag.
Everything else is derived from the table:

- the packaged defaults and their documentation, ``xd_dask/defaults/job.toml``
  (:func:`defaults_toml`; regenerate it with ``python -m xd_dask.config >
  xd_dask/defaults/job.toml``, a test checks that it is current);
- the checks of job files, environment variables and flags (:mod:`xd_dask.jobs.config`);
- the fields, defaults and checks of :class:`xd_dask.distributed.FitConfig` (every ``fit.*`` key
  is a field of the same name; keys of other sections name their field with ``fit=``);
- the command-line options (:mod:`xd_dask.cli.app`: keys with a ``flag``);
- the README's table of [fit] keys (:func:`markdown_table`; ``python -m xd_dask.config
  --markdown fit``).

Adding a key is one :class:`Key` entry in its section below; then ``python -m xd_dask.config
--write README.md`` regenerates job.toml and the README's [fit] table (tests check both, and
the shipped deploy examples, which embed the defaults: ``xd-dask render-job``). A value
equal to a key's ``unset`` (``0``, ``0.0`` or ``""``: TOML has no null) means "not set /
automatic"; FitConfig sees None for it. Keys with ``job=False`` are FitConfig fields that a job
file cannot set (engine settings with a fixed default).

This module imports nothing from the package but :mod:`xd_dask.config_key` (the key type), so
every layer may use it; :mod:`xd_dask.config_docs` writes the generated files.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from xd_dask.config_key import Check, K, Key, Provided, row_dtype

__all__ = [
    "KEYS",
    "RULES",
    "Provided",
    "SECTIONS",
    "Key",
    "Section",
    "cross_key_errors",
    "defaults",
    "fit_keys",
    "key",
    "nest",
    "row_dtype",
]


# --------------------------------------------------------------------------- extra checks
def _chars(pattern: str, allowed: str, what: str, *, empty: bool = True) -> Check:
    """A string of ``pattern`` for values that reach generated scripts and manifests unquoted
    (#SBATCH lines, Kubernetes names)."""
    rx = re.compile(pattern)

    def check(v: str) -> str | None:
        if (v == "" and empty) or rx.fullmatch(v):
            return None
        return f"must be {allowed} ({what}), got {v!r}"

    return check


def _text(multiline: bool = False) -> Check:
    """A string without control characters (a newline is allowed when ``multiline``)."""
    ok = {"\n", "\t"} if multiline else set()

    def check(v: str) -> str | None:
        bad = [c for c in v if (ord(c) < 32 or ord(c) == 127) and c not in ok]
        if bad:
            return f"must not contain control characters (found {bad[0]!r}), got {v!r}"
        return None

    return check


def _walltime(v: str) -> str | None:
    parts = v.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[1]) > 59:
        return f"must be HH:MM:SS, got {v!r}"
    return None


def _memory(v: str) -> str | None:
    if v == "auto":
        return None
    from dask.utils import parse_bytes  # noqa: PLC0415

    try:
        if parse_bytes(v) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        return f"must be a memory size like '4GiB' (or 'auto'), got {v!r}"
    return None


def _init(v: str) -> str | None:
    if v == "kmeans" or v.endswith(".npz"):
        return None
    return f"must be 'kmeans' or a model file (.npz), got {v!r}"


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
_INTERFACE = _chars(
    r"[A-Za-z0-9._-]{1,15}", "a network interface name (A-Z a-z 0-9 . _ -)", "dask --interface"
)
_LISTEN = _chars(r"[A-Za-z0-9.\[\]:-]*:[0-9]{1,5}", "host:port or :port, or empty", "the dashboard")
_ADDRESS = _chars(
    r"none|[A-Za-z0-9.\[\]:-]*:[0-9]{1,5}", "host:port, :port or 'none'", "a listening address"
)


# --------------------------------------------------------------------------- the table
#: Section headers of job.toml: {section: comment}.
SECTIONS: dict[str, str] = {
    "catalog": "the catalogue and its held-out rows",
    "fit": "what to fit and how",
    "fit.step": "online EM step size lambda_t (xd_dask.optim.schedule.StepSchedule)",
    "cluster": "where the fit runs",
    "output": "what is written",
    "plots": "the plots written after a fit and by `xd-dask plot`",
    "nightly": "`xd-dask nightly`",
    "deploy": "read by `xd-dask render-job`",
    "deploy.slurm": "",
    "deploy.kubernetes": "",
}

KEYS: tuple[Key, ...] = (
    # [catalog] -----------------------------------------------------------------------------
    K("catalog.path", "", "Parquet catalogue: directory, glob, file or fsspec URL (required)",
      fit="catalog", flag="--catalog"),
    K("catalog.schema", "gaia_dr3", "packaged schema name or path to a schema TOML",
      fit="schema", flag="--schema"),
    K("catalog.on_bad", "error",
      "bad rows: 'error' (stop, naming file/row/column) or 'drop' (counted per reason)",
      choices=("error", "drop"), fit="on_bad", flag="--on-bad"),
    K("catalog.max_rows_per_partition", 0,
      "split big files into runs of row groups; 0 = one partition per file",
      lo=0, unset=0, fit="max_rows_per_partition"),
    K("catalog.holdout", "", "separate held-out catalogue (scored after the fit; nightly gate)",
      unset="", flag="--holdout",
      doc="it must have the catalogue's columns; a --catalog given without --holdout drops a "
      "held-out\ncatalogue set in a job file (with a warning)"),
    K("catalog.holdout_rows", 0.0, "or hold out this fraction of the ROWS (0 = none)",
      lo=0.0, hi=0.5, fit="holdout_rows", flag="--holdout-rows",
      doc="a row is held out when splitmix64(id) / 2^64 < fraction, so every file contributes "
      "both\nsides, independent of partitioning; the fit reads the rest, the held-out score "
      "these rows"),
    K("catalog.holdout_fraction", 0.0, "or hold out this fraction of WHOLE FILES (0 = none)",
      lo=0.0, hi=0.9,
      doc="only for files written by `xd-dask shuffle`: files are often sky regions (HEALPix "
      "order), and\nholding out regions is refused (use holdout_rows)"),
    # [fit] ---------------------------------------------------------------------------------
    K("fit.n_components", 16, "number of Gaussian components K", lo=1, flag="-k/--n-components"),
    K("fit.method", "em",
      "'em' (batch EM, a full pass per iteration), 'online' (online EM in waves) or 'adam' "
      "(Adam on the mean log-likelihood, in waves)",
      choices=Provided("xd_dask.optim.methods", "method_names"), flag="--method",
      doc="settings that apply to other methods only (e.g. fit.learning_rate with 'em') are "
      "named\nin a warning, or refused when given as flags"),
    K("fit.max_iter", 200, "batch EM: at most this many iterations", lo=1, flag="--max-iter"),
    K("fit.tol", 1e-4,
      "converged when the mean log-likelihood per row changes by less (nats): between two "
      "iterations (batch EM) or two epochs (online EM, Adam)",
      lo=0.0, flag="--tol",
      doc="on waves the epoch's mean (every row once, at its wave's parameters) is compared; "
      "0 = always\nmax_iter iterations / fit.epochs epochs; a fit stopped by its limit warns and "
      "says how far from\nconverged it is (its last change against tol)"),
    K("fit.epochs", 200,
      "online EM / Adam: at most this many passes over the catalogue (fewer when converged)",
      lo=1, flag="--epochs"),
    K("fit.waves", "auto",
      "online EM / Adam: how waves are drawn: 'strata', 'files' or 'auto'",
      choices=("auto", "files", "strata"), flag="--waves",
      doc="strata: a hash stratum of the rows of every partition, a sample whatever the file\n"
      "layout (streamed: each epoch reads the catalogue waves_per_epoch times); files: waves of\n"
      "partitions, a sample only after `xd-dask shuffle` (refused on sky-ordered files); auto:\n"
      "strata when the catalogue is or fits in cluster memory, else files when they are\n"
      "shuffled; a catalogue that fits in neither way is refused before a row is read, naming\n"
      "`xd-dask shuffle`"),
    K("fit.waves_per_epoch", 0,
      "online EM / Adam: updates per epoch; 0 = 64 (fewer when a wave would hold under 100 "
      "rows per component)",
      lo=0, unset=0, flag="--waves-per-epoch"),
    K("fit.wave_size", 0,
      "online EM / Adam: partitions per wave of files; 0 = enough for waves_per_epoch (at "
      "least one per worker thread); setting it asks for waves of files",
      lo=0, unset=0, flag="--wave-size"),
    K("fit.learning_rate", 0.05,
      "Adam: learning rate in (0, 1], in units of each component's spread at the start; "
      "constant for half the "
      "waves, then halved every tenth of them",
      lo=0.0, hi=1.0, lo_open=True, flag="--learning-rate"),
    K("fit.reg_covar", 1e-6, "added to the diagonal of every component covariance", lo=0.0),
    K("fit.seed", 0, "seeds the initialisation, wave order and subsampling", lo=0,
      flag="--seed"),
    K("fit.init", "kmeans",
      "'kmeans' (with a schema [projection]: the method of moments) or the path of a model "
      "(.npz) to start from",
      check=_init, flag="--init"),
    K("fit.persist", False, "keep the catalogue's arrays in cluster memory between passes"),
    K("fit.subsample", 0.0,
      "online EM / Adam: use this fraction of each partition's rows; 0 = all",
      lo=0.0, hi=1.0, unset=0.0),
    K("fit.kmeans_sample", 0,
      "rows sampled for k-means; 0 = max(200 K, 20000), at most 200000",
      lo=0, unset=0),
    K("fit.fan_in", 8, "fan-in of the reduction tree of partition statistics", lo=2),
    K("fit.backend", "auto", "kernel backend ('auto': compiled kernels for the workers' arrays)",
      choices=Provided("xd_dask.kernels.registry", "backend_choices")),
    K("fit.dtype", "auto",
      "row precision on the workers: 'auto' (float32 on GPU workers, float64 on CPU workers), "
      "'float64' or 'float32' (statistics are always summed in float64)",
      choices=("auto", "float64", "float32"),
      doc="float32 keeps ra/dec in degrees to ~1e-5 deg (~40 mas): harmless for a density\n"
      "model whose components are degrees wide, not for per-star posteriors (`posterior` reads\n"
      "rows in float64 unless fit.dtype is set to float32)"),
    K("fit.background", False,
      "add a uniform background (outlier) component over the box of the k-means sample's rows",
      doc="the box spans each column's values, at most 10 % beyond its 0.5-99.5 % range (a "
      "spread of outliers sets it, one absurd row does not); its weight is fitted, so "
      "outliers and a few absurd rows are absorbed instead of taking components of their own; "
      "k-means then starts from the dense rows"),
    K("fit.background_weight", 0.001, "the background's starting weight",
      lo=0.0, hi=0.5, lo_open=True),
    K("fit.max_ll_drop", 0.1,
      "batch EM: a larger fall of the mean log-likelihood per row (nats) in one iteration "
      "rolls back and stops, naming the rows (robust EM)",
      lo=0.0, lo_open=True),
    K("fit.split_merge", False,
      "split-and-merge moves (Ueda et al. 2000; Bovy et al. 2011): merge two, split a third",
      doc="after EM converges, merge two components and split a third (ranked by the merge and "
      "split\ncriteria of one pass), partial EM on the three, full EM; kept only if the "
      "log-likelihood rises.\nOnline EM / Adam: the stochastic variant (criteria from a wave, "
      "judged on a later wave)"),
    K("fit.split_merge_candidates", 5,
      "split-and-merge: candidate moves tried after each convergence before stopping", lo=1),
    K("fit.split_merge_partial_iter", 10,
      "split-and-merge: partial-EM iterations on the three components of a move", lo=1),
    K("fit.split_merge_max_moves", 20, "split-and-merge: stop after this many accepted moves",
      lo=1),
    K("fit.split_merge_every", 0,
      "split-and-merge on waves (online EM, Adam): waves between moves; 0 = once per epoch",
      lo=0),
    K("fit.split_merge_trial_waves", 2,
      "split-and-merge on waves: updates before a move is judged on the next wave", lo=1),
    K("fit.kmeans_iter", 1,
      "Lloyd passes over the catalogue after k-means on the sample (0: the sample's clusters)",
      lo=0, job=False),
    K("fit.kmeans_tol", 1e-4, "k-means centre-shift tolerance (robust standardised units)",
      lo=0.0,
      job=False),
    K("fit.numba_threads", 1, "Numba threads per task", lo=1, job=False),
    K("fit.max_retries", 3, "re-runs of a pass after the cluster lost its tasks", lo=0,
      job=False),
    # [fit.step] ----------------------------------------------------------------------------
    K("fit.step.kind", "incremental",
      "'incremental': each wave replaces its own share of the running estimate (Neal & Hinton "
      "1998); 'power': min(1, (t + t0)^-kappa); 'halving': lambda0, then halved",
      choices=("incremental", "power", "halving"),
      doc="incremental: the waves are the same every epoch (in a new order), so after the first "
      "epoch every\nupdate rests on every row (the newest statistics of each wave): no step "
      "size, converges like\nbatch EM with waves_per_epoch updates per pass; power / halving: "
      "stochastic approximation\n(Cappe & Moulines 2009), a fresh sample each wave"),
    K("fit.step.kappa", 0.6, "power: decay exponent", lo=0.5, hi=1.0, lo_open=True),
    K("fit.step.t0", 1.0, "power: offset of t", lo=1.0),
    K("fit.step.lambda0", 0.1, "halving: the constant step", lo=0.0, hi=1.0, lo_open=True),
    K("fit.step.hold", 100, "halving: waves at lambda0", lo=0),
    K("fit.step.every", 100, "halving: then halve every this many waves", lo=1),
    K("fit.step.floor", 1e-4, "halving: never below this", lo=0.0, hi=1.0, lo_open=True),
    # [cluster] -----------------------------------------------------------------------------
    K("cluster.scheduler_address", "", "tcp://host:8786 of a running scheduler", unset="",
      flag="--scheduler-address"),
    K("cluster.scheduler_file", "", "or the file written by `dask scheduler --scheduler-file`",
      unset="", flag="--scheduler-file"),
    K("cluster.n_workers", 0, "local cluster: worker processes; 0 = one per core",
      lo=0, unset=0, flag="--n-workers"),
    K("cluster.threads_per_worker", 1, "local cluster: threads per worker process", lo=1,
      flag="--threads-per-worker"),
    K("cluster.memory_limit", "auto", "local cluster: memory per worker ('auto', '4GiB', ...)",
      check=_memory),
    K("cluster.dashboard_address", "127.0.0.1:0",
      "local cluster: its dashboard, on loopback like its scheduler and workers, on a free port",
      check=_LISTEN,
      doc="the link printed when the cluster starts is the one it bound; '127.0.0.1:8787' asks "
      "for a\nfixed port; '0.0.0.0:8787' opens it to the network; '' = no dashboard"),
    K("cluster.gpu", False, "CuPy kernels on GPU workers (dask-cuda for a local cluster)",
      fit="gpu", flag="--gpu/--no-gpu"),
    # [output] ------------------------------------------------------------------------------
    K("output.dir", "xd-out",
      "model.npz, history.json, report.json, *.png and checkpoints/ are written here",
      flag="-o/--out"),
    K("output.plots", True, "write the corner, sky and training-curve plots"),
    K("output.checkpoint", True, "checkpoint the fit into <dir>/checkpoints (`xd-dask resume`)"),
    K("output.performance_report", False, "write <dir>/dask-report.html (a Dask report)"),
    # [plots] -------------------------------------------------------------------------------
    K("plots.features", [], "corner-plot features; [] = up to the first 5 of the model"),
    K("plots.n_samples", 50000, "model samples drawn for the plots", lo=100),
    K("plots.max_rows", 50000, "catalogue rows drawn against the model (from a few partitions)",
      lo=0),
    K("plots.sky", True,
      "the model's density per solid angle on the sky, if the features include RA and Dec"),
    K("plots.dpi", 110, "resolution of the PNG files", lo=30),
    # [nightly] -----------------------------------------------------------------------------
    K("nightly.store", "models",
      "model store: <store>/<UTC date>/ per run, <store>/latest -> best run"),
    K("nightly.keep", 7, "keep the last N finished runs", lo=1,
      doc="also kept: `latest`, running runs and runs newer than `latest`; killed runs do not "
      "count"),
    K("nightly.margin", 0.01, "a new model may be worse on the held-out set by at most this",
      lo=0.0,
      doc="(mean log-likelihood per row, nats) and still replace `latest`"),
    K("nightly.warm_start", True, "start from `latest` when its K and features match"),
    # [deploy] ------------------------------------------------------------------------------
    K("deploy.name", "xd-dask-fit", "job / cluster name", check=_NAME),
    K("deploy.image", "xd-dask:0.1.0", "CPU image (deploy/docker/Dockerfile)", check=_IMAGE),
    K("deploy.gpu_image", "xd-dask-gpu:0.1.0", "GPU image (deploy/docker/Dockerfile.gpu)",
      check=_IMAGE),
    K("deploy.n_workers", 4, "CPU worker processes (pods / Slurm tasks)", lo=0),
    K("deploy.gpu_workers", 0,
      "GPU workers, one GPU each (`dask cuda worker --resources GPU=1`)", lo=0),
    K("deploy.worker_cores", 4, "threads per CPU worker (and cores requested for it)", lo=1),
    K("deploy.worker_memory", "16GiB", "memory per worker", check=_memory),
    K("deploy.scheduler_cores", 1, "cores of the scheduler", lo=1),
    K("deploy.scheduler_memory", "4GiB", "memory of the scheduler", check=_memory),
    K("deploy.walltime", "04:00:00", "Slurm time limit (HH:MM:SS)", check=_walltime),
    K("deploy.config_path", "/etc/xd-dask/job.toml", "where the job file is placed for the runner",
      check=_text()),
    K("deploy.slurm.partition", "", "CPU partition (empty: cluster default)", check=_SLURM_WORD),
    K("deploy.slurm.gpu_partition", "", "GPU partition (empty: same as partition)",
      check=_SLURM_WORD),
    K("deploy.slurm.account", "", "Slurm account (empty: your default)", check=_SLURM_WORD),
    K("deploy.slurm.setup", "",
      "shell lines run first on every node (module load ..., source venv)",
      check=_text(multiline=True),
      doc="pasted into the script as they are: this is shell code"),
    K("deploy.slurm.dashboard_address", "127.0.0.1:0",
      "the scheduler's dashboard on the batch node (a free port: the job log names it)",
      check=_ADDRESS,
      doc="loopback: reach it with `ssh -L 8787:127.0.0.1:<port> <node>`; '0.0.0.0:8787' opens "
      "it to the\ncluster network; 'none' = no dashboard"),
    K("deploy.slurm.interface", "",
      "network interface of the scheduler and workers (empty: the node's address)",
      check=_INTERFACE,
      doc="dask's --interface, e.g. 'ib0' for InfiniBand; 'lo' keeps a one-machine test "
      "cluster\n(deploy/slurm/local-slurm.sh) on loopback"),
    K("deploy.kubernetes.namespace", "default", "Kubernetes namespace", check=_K8S_NAME),
    K("deploy.kubernetes.volume_claim", "",
      "PersistentVolumeClaim with the catalogue and outputs (empty: none)", check=_K8S_NAME),
    K("deploy.kubernetes.mount_path", "/data", "where volume_claim is mounted", check=_text()),
)  # fmt: skip

_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


def key(name: str) -> Key:
    """The key called ``name`` (KeyError if there is none)."""
    return _BY_NAME[name]


def job_keys() -> Iterator[Key]:
    """The keys a job file may set."""
    return (k for k in KEYS if k.job)


def fit_keys() -> Iterator[Key]:
    """The keys that are FitConfig fields, ``fit.step.*`` excluded (FitConfig.step)."""
    return (k for k in KEYS if k.field is not None and k.section != "fit.step")


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        d = out
        *parents, leaf = name.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    return out


def defaults() -> dict[str, Any]:
    """The job defaults as a nested dict (a fresh copy: lists are copied)."""
    return nest({k.name: list(k.default) if k.type is list else k.default for k in job_keys()})


# --------------------------------------------------------------------------- cross-key rules
def _one_holdout(get: Callable[[str], Any]) -> str | None:
    given = [
        name
        for name in ("catalog.holdout", "catalog.holdout_fraction", "catalog.holdout_rows")
        if get(name)
    ]
    return f"{' and '.join(given)} are set together; give one of them" if len(given) > 1 else None


def _floor_below_lambda0(get: Callable[[str], Any]) -> str | None:
    if get("fit.step.kind") == "halving" and get("fit.step.floor") > get("fit.step.lambda0"):
        return (
            f"fit.step.floor ({get('fit.step.floor'):g}) must be <= fit.step.lambda0 "
            f"({get('fit.step.lambda0'):g}): the halving schedule starts at lambda0 and never "
            "goes below floor"
        )
    return None


#: Checks between keys: (the keys involved, check(get) -> error text or None). ``get(name)``
#: returns a key's value; 0, 0.0, "" and None all mean "not set".
RULES: tuple[tuple[tuple[str, ...], Callable[[Callable[[str], Any]], str | None]], ...] = (
    (("catalog.holdout", "catalog.holdout_fraction", "catalog.holdout_rows"), _one_holdout),
    (("fit.step.kind", "fit.step.floor", "fit.step.lambda0"), _floor_below_lambda0),
)


def cross_key_errors(
    get: Callable[[str], Any], available: Iterable[str]
) -> Iterator[tuple[tuple[str, ...], str]]:
    """The rules whose keys are all ``available`` and that fail: (keys, error text)."""
    have = set(available)
    for names, rule in RULES:
        if set(names) <= have:
            err = rule(get)
            if err:
                yield names, err


# --------------------------------------------------------------------------- typed sections
class Section(Mapping[str, Any]):
    """A validated section with attribute access (``cfg.fit.n_components``, ``cfg.fit.step``).

    Values have their key's type (a float key's integer is a float); sub-sections are
    Sections. It is also a read-only mapping of the raw values (``section["key"]``).
    """

    def __init__(self, name: str, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_data", data)

    def __getattr__(self, leaf: str) -> Any:
        if leaf.startswith("_"):
            raise AttributeError(leaf)
        try:
            value = self._data[leaf]
        except KeyError:
            raise AttributeError(f"no config key {self._name}.{leaf}") from None
        if isinstance(value, Mapping):
            return Section(f"{self._name}.{leaf}", value)
        k = _BY_NAME.get(f"{self._name}.{leaf}")
        return k.typed(value) if k is not None else value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("configuration sections are read-only; use JobConfig.replace")

    def __getitem__(self, leaf: str) -> Any:
        return self._data[leaf]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Section({self._name!r}, {dict(self._data)!r})"


if __name__ == "__main__":
    # python -m xd_dask.config                    job.toml's text on stdout
    # python -m xd_dask.config --markdown fit     a section's keys as a Markdown table
    # python -m xd_dask.config --write README.md  rewrite job.toml and README's [fit] table
    from xd_dask.config_docs import defaults_toml, markdown_table, write_generated

    if sys.argv[1:2] == ["--markdown"]:
        sys.stdout.write(markdown_table(sys.argv[2]))
    elif sys.argv[1:2] == ["--write"]:
        print("\n".join(write_generated(sys.argv[2] if len(sys.argv) > 2 else None)))
    else:
        sys.stdout.write(defaults_toml())
