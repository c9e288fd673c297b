"""Deployment scripts and manifests generated from a job configuration (``xd-dask render-job``).

What runs on a cluster is generated from the same job file as a local run: the effective
configuration (defaults < job file < environment < flags) is embedded verbatim in the Slurm
script (a here-document) or the Kubernetes ConfigMap, and the ``[deploy]`` section sizes the
scheduler and the workers.

- Slurm: one ``sbatch`` script for a heterogeneous job. Component 0 (``deploy.scheduler_cores``,
  ``deploy.scheduler_memory``) runs the batch step: ``dask scheduler`` with a scheduler file and
  the client (``xd-dask fit``); the workers have their own components, started with ``srun
  --het-group=N``: CPU workers (``dask worker``) and GPU workers (``dask cuda worker --resources
  GPU=1``). Every component asks ``--mem-per-cpu`` (sbatch refuses ``--mem`` beside it). When
  the fit ends, :func:`stop_workers` stops the workers through their nannies and the scheduler
  shuts down, so every step ends COMPLETED; the script's exit code is the fit's. Tested on a
  real two-node Slurm (``deploy/slurm/local-slurm.sh``, ``tests/test_deploy_slurm.py``).
- Kubernetes (dask-kubernetes operator): a ConfigMap holding the job file, a ``DaskJob`` whose
  runner pod runs ``xd-dask fit`` (the operator injects ``DASK_SCHEDULER_ADDRESS``) and whose
  cluster has the CPU worker group, and a ``DaskWorkerGroup`` of GPU workers joined to it.

Safety: values that reach the script unquoted (names, account, partitions, image, walltime) are
checked against a character set by the configuration (:mod:`xd_dask.jobs.config`); every other
value is quoted with ``shlex.quote``; no value may hold a control character (a newline cannot
start a new shell line or end the #SBATCH block). Paths known only at run time (the submit
directory) reach Python as arguments, never inside Python source. ``deploy.slurm.setup`` is shell
code by design and is pasted as it is.

Memory: each worker's ``--memory-limit`` is :data:`MEMORY_LIMIT_FRACTION` (90 %) of the memory
Slurm or Kubernetes grants it (:mod:`xd_dask.jobs.deploy`, shared by both targets; the
Kubernetes manifests are built in :mod:`xd_dask.jobs.k8s`).
"""

from __future__ import annotations

import asyncio
import math
import shlex
from typing import Any

from xd_dask.jobs.config import ConfigError, JobConfig
from xd_dask.jobs.deploy import (
    MEMORY_LIMIT_FRACTION,
    dask_limit,
    mib,
    provenance,
    runner_mib,
    runtime_config,
)
from xd_dask.jobs.k8s import render_kubernetes

__all__ = [
    "MEMORY_LIMIT_FRACTION",
    "TARGETS",
    "render_job",
    "render_kubernetes",
    "render_slurm",
    "stop_workers",
]

TARGETS = ("slurm", "kubernetes")
_HEREDOC = "XD_DASK_JOB_TOML"


# --------------------------------------------------------------------------- Slurm
_WAIT_FOR_WORKERS = (
    "import sys; from distributed import Client; "
    'c = Client(scheduler_file=sys.argv[1], timeout="120s"); '
    "c.wait_for_workers(int(sys.argv[2]), timeout=600)"
)
_STOP_CLUSTER = (
    "import sys; from distributed import Client; from xd_dask.jobs.render import stop_workers; "
    'c = Client(scheduler_file=sys.argv[1], timeout="30s"); stop_workers(c); c.shutdown()'
)
#: Seconds the script waits for the scheduler and the worker steps to end before killing them
#: (the stop itself may take 30 s more: :func:`stop_workers`).
STOP_TIMEOUT = 60


async def _stop_heartbeat(dask_worker: Any) -> None:
    """Run on a worker: no more heartbeats, and the one in flight (if any) has its answer."""
    dask_worker.periodic_callbacks["heartbeat"].stop()
    for _ in range(50):  # a heartbeat already sent ends within a round trip
        if not dask_worker.rpc.active:
            return
        await asyncio.sleep(0.1)


async def _terminate_nannies(dask_scheduler: Any, timeout: float) -> None:
    """Run on the scheduler: each nanny stops its worker process and exits; wait until every
    worker has left."""
    # reply=False: the nanny closes the connection as it exits, before it could answer
    msg = {"op": "terminate", "reason": "job-end", "timeout": timeout, "reply": False}
    await dask_scheduler.broadcast(msg=msg, nanny=True)
    for _ in range(int(timeout * 10)):
        if not dask_scheduler.workers:
            return
        await asyncio.sleep(0.1)


def stop_workers(client: Any, timeout: float = 30) -> None:
    """Stop every worker of ``client``'s cluster so that each exits 0 and logs no error.

    The Slurm job scripts call this when the fit has ended, and then ``client.shutdown()``
    (``dask scheduler`` exits 0 with no worker left to lose); ``deploy/slurm/jobqueue_fit.py``
    calls it before its cluster cancels the worker jobs, which have ended by then.

    1. Each worker stops its heartbeat and waits for the one in flight: a worker that closes
       while a heartbeat is under way logs a ``CommClosedError`` traceback.
    2. Each *nanny* is told to terminate: it stops its worker process through its stop queue
       and exits, so ``dask worker`` returns 0 and its ``srun`` step completes. A worker told
       to close by the scheduler instead (``retire_workers``, ``Client.shutdown``) closes
       itself first and its process can race its nanny's stop queue ("Worker process died
       unexpectedly"); killing ``srun`` ends the step as ``task 0: Killed``.

    ``client`` is a :class:`distributed.Client`; ``timeout`` (seconds) bounds each nanny's wait
    for its worker process and the wait for the workers to leave.
    """
    client.run(_stop_heartbeat)
    client.run_on_scheduler(_terminate_nannies, timeout=timeout)


def _sbatch_component(lines: list[str], n: int, cores: int, partition: str) -> None:
    lines.append(f"#SBATCH --ntasks={n}")
    lines.append(f"#SBATCH --cpus-per-task={cores}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")


def render_slurm(cfg: JobConfig) -> str:
    """An sbatch script that starts a Dask cluster inside the allocation and runs the fit."""
    run_cfg = runtime_config(cfg)
    dep = cfg["deploy"]
    slurm = dep["slurm"]
    comps = _slurm_components(dep)
    lines = _sbatch_header(cfg, run_cfg, comps)
    toml = run_cfg.to_toml().rstrip()
    if _HEREDOC in toml.splitlines():  # cannot happen with TOML text; never end the document
        raise ConfigError(f"the job configuration holds a line {_HEREDOC!r}")
    if shlex.quote(dep["name"]) != dep["name"]:  # the configuration's character set guarantees it
        raise ConfigError(f"deploy.name {dep['name']!r} is not safe in a shell script")
    # the scheduler and the workers listen on this interface (dask --interface), e.g. ib0
    interface = f" --interface {shlex.quote(slurm['interface'])}" if slurm["interface"] else ""
    lines += _scheduler_lines(dep["name"], toml, slurm["dashboard_address"], interface)
    lines += _worker_lines(dep, comps, interface)
    n_total = dep["n_workers"] + dep["gpu_workers"]
    lines += [
        "",
        f"# Run the fit once the {n_total} worker(s) have joined; its exit code is the job's.",
        f'python -c {shlex.quote(_WAIT_FOR_WORKERS)} "$SCHED_FILE" {n_total}',
        'xd-dask fit "$JOB_TOML" --scheduler-file "$SCHED_FILE"',
        "",
    ]
    return "\n".join(lines)


def _slurm_components(dep: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker components of the heterogeneous job: kind ("cpu", "gpu"), tasks, partition."""
    slurm = dep["slurm"]
    comps: list[dict[str, Any]] = []
    if dep["n_workers"] > 0:
        comps.append({"kind": "cpu", "n": dep["n_workers"], "partition": slurm["partition"]})
    if dep["gpu_workers"] > 0:
        partition = slurm["gpu_partition"] or slurm["partition"]
        comps.append({"kind": "gpu", "n": dep["gpu_workers"], "partition": partition})
    return comps


def _sbatch_header(cfg: JobConfig, run_cfg: JobConfig, comps: list[dict[str, Any]]) -> list[str]:
    """The #SBATCH lines of every component, ``set -euo pipefail`` and the site set-up."""
    dep = cfg["deploy"]
    slurm = dep["slurm"]
    cores = dep["worker_cores"]
    mem_per_cpu = math.ceil(mib(dep["worker_memory"]) / cores)
    name = dep["name"]
    lines = [
        "#!/bin/bash",
        f"# Generated by `xd-dask render-job --target slurm` {provenance(cfg)}.",
        "# Submit with: sbatch <this file>",
        "# A heterogeneous job: component 0 runs the scheduler and the fit (this script), the",
        "# others the workers (srun --het-group=N).",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --time={dep['walltime']}",
        f"#SBATCH --output={name}-%j.log",
    ]
    if slurm["account"]:
        lines.append(f"#SBATCH --account={slurm['account']}")
    _sbatch_component(lines, 1, dep["scheduler_cores"], slurm["partition"])
    # component 0 holds the scheduler and the fit process (which draws the plots' samples).
    # Memory per CPU in every component: sbatch refuses --mem beside --mem-per-cpu (--mem would
    # reach the later components of the job), and per node would be wrong for worker tasks that
    # Slurm packs several to a node.
    sched_mib = mib(dep["scheduler_memory"]) + runner_mib(run_cfg)
    lines.append(f"#SBATCH --mem-per-cpu={math.ceil(sched_mib / dep['scheduler_cores'])}M")
    for comp in comps:
        lines.append("#SBATCH hetjob")
        _sbatch_component(lines, comp["n"], cores, comp["partition"])
        lines.append(f"#SBATCH --mem-per-cpu={mem_per_cpu}M")
        if comp["kind"] == "gpu":
            lines.append("#SBATCH --gpus-per-task=1")
    lines += ["", "set -euo pipefail"]
    if slurm["setup"]:
        lines += ["", "# site set-up (deploy.slurm.setup)", slurm["setup"].rstrip()]
    return lines


def _scheduler_lines(name: str, toml: str, dash: str, interface: str) -> list[str]:
    """The job file written out, the stop-on-exit trap, and the scheduler started in
    component 0 (``dash``: deploy.slurm.dashboard_address)."""
    # without a dashboard the scheduler still serves /health and /metrics: on loopback, on a
    # free port (Dask's default would be port 8787 on every interface)
    dashboard = (
        "--no-dashboard --dashboard-address 127.0.0.1:0"
        if dash == "none"
        else f"--dashboard-address {shlex.quote(dash)}"
    )
    stop = f'timeout {STOP_TIMEOUT + 30} python -c {shlex.quote(_STOP_CLUSTER)} "$SCHED_FILE"'
    return [
        "",
        'RUN_DIR="${SLURM_SUBMIT_DIR:-$PWD}"',
        f'JOB_TOML="$RUN_DIR/{name}-${{SLURM_JOB_ID}}.toml"',
        f'SCHED_FILE="$RUN_DIR/{name}-${{SLURM_JOB_ID}}-scheduler.json"',
        'LOCAL_DIR="${TMPDIR:-/tmp}/xd-dask-${SLURM_JOB_ID}"',
        "",
        "# The effective job configuration (xd-dask render-job resolved it; edit the job file,",
        "# not this copy).",
        f"cat > \"$JOB_TOML\" <<'{_HEREDOC}'",
        toml,
        _HEREDOC,
        "",
        "# The job is checked before any cluster process starts: a configuration, catalogue or",
        "# output-directory error ends the job here with exit 2, costing no worker time.",
        'xd-dask fit "$JOB_TOML" --check',
        "",
        "# However this script ends, stop the cluster and keep the exit code (the fit's): each",
        "# worker's nanny stops it (`dask worker` exits 0, so its srun step completes), then the",
        "# scheduler shuts down (xd_dask.jobs.render.stop_workers says why in this order); what",
        f"# has not ended {STOP_TIMEOUT} s later is killed.",
        "stop_cluster() {",
        "    local status=$?",
        "    trap - EXIT",
        "    set +e",
        '    if [ -f "$SCHED_FILE" ]; then',
        f"        {stop}",
        "    fi",
        f'    for _ in $(seq {5 * STOP_TIMEOUT}); do [ -z "$(jobs -pr)" ] && break; '
        "sleep 0.2; done",
        "    kill $(jobs -pr) 2>/dev/null",
        "    wait",
        '    exit "$status"',
        "}",
        "trap stop_cluster EXIT",
        "",
        "# The scheduler runs here, in component 0, beside the fit, on a free port (the workers",
        "# and the fit find it in the scheduler file); its dashboard address is",
        "# deploy.slurm.dashboard_address. The workers' own HTTP servers listen on loopback.",
        "# The preload serves the XD fit page (/xd) and the xd_dask_* metrics (/metrics).",
        f'dask scheduler --scheduler-file "$SCHED_FILE" --port 0{interface} {dashboard} '
        "--preload xd_dask.dashboard.preload &",
        "SCHED_PID=$!",
        "# up to 120 s, looked at 5 times a second; a scheduler that exits ends the wait",
        'for _ in $(seq 600); do [ -f "$SCHED_FILE" ] && break; kill -0 "$SCHED_PID" 2>/dev/null '
        "|| break; sleep 0.2; done",
        '[ -f "$SCHED_FILE" ] || { echo "dask scheduler did not start" >&2; exit 1; }',
        "",
    ]


def _worker_lines(dep: dict[str, Any], comps: list[dict[str, Any]], interface: str) -> list[str]:
    """One ``srun --het-group=N`` line per worker component (CPU or GPU workers)."""
    cores = dep["worker_cores"]
    lines = []
    limit = shlex.quote(dask_limit(dep["worker_memory"]))
    for group, comp in enumerate(comps, start=1):
        common = (
            f'--scheduler-file "$SCHED_FILE"{interface} --memory-limit {limit} '
            '--local-directory "$LOCAL_DIR" --dashboard-address 127.0.0.1:0'
        )
        if comp["kind"] == "cpu":
            cmd = f"dask worker {common} --nworkers 1 --nthreads {cores}"
        else:
            cmd = f"dask cuda worker {common} --nthreads {cores} --resources GPU=1"
        lines.append(f"# {comp['n']} {comp['kind'].upper()} worker(s), memory limit {limit} (90 %)")
        lines.append(
            f"srun --het-group={group} --ntasks={comp['n']} --cpus-per-task={cores} {cmd} &"
        )
    return lines


def render_job(cfg: JobConfig, target: str) -> str:
    """The deployment for ``target`` ("slurm" or "kubernetes") as text."""
    if target == "slurm":
        return render_slurm(cfg)
    if target == "kubernetes":
        return render_kubernetes(cfg)
    raise ConfigError(f"--target must be one of {TARGETS}, got {target!r}")
