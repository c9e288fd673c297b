"""What every deployment (:mod:`xd_dask.jobs.render`) shares: the configuration the
cluster-side runner reads, the memory each process is granted, and a provenance line.

Memory: each worker's ``--memory-limit`` is :data:`MEMORY_LIMIT_FRACTION` (90 %) of the memory
Slurm or Kubernetes grants it, so that Dask spills, pauses and restarts a worker before the
kernel's OOM killer ends it.
"""

from __future__ import annotations

import math

from dask.utils import parse_bytes

from xd_dask.jobs.config import ConfigError, JobConfig

__all__ = [
    "MEMORY_LIMIT_FRACTION",
    "dask_limit",
    "mib",
    "provenance",
    "runner_mib",
    "runtime_config",
]

#: Dask's ``--memory-limit`` as a fraction of the memory the scheduler of the cluster grants.
MEMORY_LIMIT_FRACTION = 0.9
#: The runner pod's memory request: a base plus bytes per plotted sample and per shown row,
#: per feature (measured: ~80 B per sample per feature for the plots at D = 7; 2x margin).
RUNNER_BASE_MIB, SAMPLE_BYTES, ROW_BYTES = 1024, 160, 32


def mib(text: str) -> int:
    """A size ("12GiB", "4 GB") in MiB, rounded up."""
    return math.ceil(int(parse_bytes(text)) / 2**20)


def dask_limit(text: str) -> str:
    """``--memory-limit`` for a worker granted ``text``: 90 % of it, in MiB."""
    return f"{math.floor(mib(text) * MEMORY_LIMIT_FRACTION)}MiB"


def runner_mib(cfg: JobConfig) -> int:
    """Memory of the fit process (MiB, a multiple of 256): it draws ``plots.n_samples`` model
    samples and shows ``plots.max_rows`` catalogue rows (see :data:`SAMPLE_BYTES`)."""
    # the job scripts' stop step imports render (and so this module): keep its imports light
    from xd_dask.jobs.prepare import load_schema_checked  # noqa: PLC0415 - heavy, see above

    d = len(load_schema_checked(cfg.get("catalog.schema")).features)
    plots = cfg["plots"]
    extra = d * (SAMPLE_BYTES * plots["n_samples"] + ROW_BYTES * plots["max_rows"]) / 2**20
    if not cfg.get("output.plots"):
        extra = 0
    return 256 * math.ceil((RUNNER_BASE_MIB + extra) / 256)


def provenance(cfg: JobConfig) -> str:
    """'from FILE' plus the overrides that did not come from the job file (one line)."""
    over = [
        f"{k}={cfg.get(k)!r}" for k, src in sorted(cfg.sources.items()) if "job file" not in src
    ]
    text = f"from {cfg.job_file or 'the packaged defaults'}"
    text += f" with {' '.join(over)}" if over else ""
    return "".join(c if c.isprintable() else "?" for c in text)


def runtime_config(cfg: JobConfig) -> JobConfig:
    """The config the cluster-side runner reads: the scheduler comes from the deployment."""
    cfg.validate()  # the character sets of names and the absence of control characters
    dep = cfg["deploy"]
    if dep["n_workers"] + dep["gpu_workers"] < 1:
        raise ConfigError("deploy.n_workers + deploy.gpu_workers must be >= 1 to render a job")
    gpu = cfg.get("cluster.gpu") or (dep["gpu_workers"] > 0 and dep["n_workers"] == 0)
    if gpu and dep["n_workers"] > 0:
        raise ConfigError(
            "cluster.gpu = true runs every partition on CuPy, so every worker needs a GPU: "
            "set deploy.n_workers = 0 (GPU workers only) or cluster.gpu = false"
        )
    if not cfg.get("catalog.path"):
        raise ConfigError("catalog.path is not set: the deployed job needs a catalogue")
    return cfg.replace(
        {"cluster.scheduler_address": "", "cluster.scheduler_file": "", "cluster.gpu": gpu},
        source="render-job",
    )
