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
Slurm or Kubernetes grants it, so that Dask spills, pauses and restarts a worker before the
kernel's OOM killer ends it.
"""

from __future__ import annotations

import asyncio
import math
import posixpath
import re
import shlex
from typing import Any

from xd_dask.jobs.config import ConfigError, JobConfig

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
#: Dask's ``--memory-limit`` as a fraction of the memory the scheduler of the cluster grants.
MEMORY_LIMIT_FRACTION = 0.9
#: The runner pod's memory request: a base plus bytes per plotted sample and per shown row,
#: per feature (measured: ~80 B per sample per feature for the plots at D = 7; 2x margin).
RUNNER_BASE_MIB, SAMPLE_BYTES, ROW_BYTES = 1024, 160, 32


def _bytes(text: str) -> int:
    from dask.utils import parse_bytes  # noqa: PLC0415

    return int(parse_bytes(text))


def _mib(text: str) -> int:
    return math.ceil(_bytes(text) / 2**20)


def _dask_limit(text: str) -> str:
    """``--memory-limit`` for a worker granted ``text``: 90 % of it, in MiB."""
    return f"{math.floor(_mib(text) * MEMORY_LIMIT_FRACTION)}MiB"


def _runner_mib(cfg: JobConfig) -> int:
    """Memory of the fit process (MiB, a multiple of 256): it draws ``plots.n_samples`` model
    samples and shows ``plots.max_rows`` catalogue rows (see :data:`SAMPLE_BYTES`)."""
    from xd_dask.jobs.runner import load_schema_checked  # noqa: PLC0415

    d = len(load_schema_checked(cfg.get("catalog.schema")).features)
    plots = cfg["plots"]
    extra = d * (SAMPLE_BYTES * plots["n_samples"] + ROW_BYTES * plots["max_rows"]) / 2**20
    if not cfg.get("output.plots"):
        extra = 0
    return 256 * math.ceil((RUNNER_BASE_MIB + extra) / 256)


def _provenance(cfg: JobConfig) -> str:
    """'from FILE' plus the overrides that did not come from the job file (one line)."""
    over = [
        f"{k}={cfg.get(k)!r}" for k, src in sorted(cfg.sources.items()) if "job file" not in src
    ]
    text = f"from {cfg.job_file or 'the packaged defaults'}"
    text += f" with {' '.join(over)}" if over else ""
    return "".join(c if c.isprintable() else "?" for c in text)


def _runtime_config(cfg: JobConfig) -> JobConfig:
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
    run_cfg = _runtime_config(cfg)
    dep = cfg["deploy"]
    slurm = dep["slurm"]
    cores = dep["worker_cores"]
    mem_per_cpu = math.ceil(_mib(dep["worker_memory"]) / cores)
    comps: list[dict[str, Any]] = []
    if dep["n_workers"] > 0:
        comps.append({"kind": "cpu", "n": dep["n_workers"], "partition": slurm["partition"]})
    if dep["gpu_workers"] > 0:
        partition = slurm["gpu_partition"] or slurm["partition"]
        comps.append({"kind": "gpu", "n": dep["gpu_workers"], "partition": partition})
    name = dep["name"]
    lines = [
        "#!/bin/bash",
        f"# Generated by `xd-dask render-job --target slurm` {_provenance(cfg)}.",
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
    sched_mib = _mib(dep["scheduler_memory"]) + _runner_mib(run_cfg)
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
    toml = run_cfg.to_toml().rstrip()
    if _HEREDOC in toml.splitlines():  # cannot happen with TOML text; never end the document
        raise ConfigError(f"the job configuration holds a line {_HEREDOC!r}")
    if shlex.quote(name) != name:  # the configuration's character set guarantees it
        raise ConfigError(f"deploy.name {name!r} is not safe in a shell script")
    dash = slurm["dashboard_address"]
    dashboard = "--no-dashboard" if dash == "none" else f"--dashboard-address {shlex.quote(dash)}"
    # the scheduler and the workers listen on this interface (dask --interface), e.g. ib0
    interface = f" --interface {shlex.quote(slurm['interface'])}" if slurm["interface"] else ""
    stop = f'timeout {STOP_TIMEOUT + 30} python -c {shlex.quote(_STOP_CLUSTER)} "$SCHED_FILE"'
    lines += [
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
        f'    for _ in $(seq {STOP_TIMEOUT}); do [ -z "$(jobs -pr)" ] && break; sleep 1; done',
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
        'for _ in $(seq 120); do [ -f "$SCHED_FILE" ] && break; sleep 1; done',
        '[ -f "$SCHED_FILE" ] || { echo "dask scheduler did not start" >&2; exit 1; }',
        "",
    ]
    limit = shlex.quote(_dask_limit(dep["worker_memory"]))
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
    n_total = dep["n_workers"] + dep["gpu_workers"]
    lines += [
        "",
        f"# Run the fit once the {n_total} worker(s) have joined; its exit code is the job's.",
        f'python -c {shlex.quote(_WAIT_FOR_WORKERS)} "$SCHED_FILE" {n_total}',
        'xd-dask fit "$JOB_TOML" --scheduler-file "$SCHED_FILE"',
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Kubernetes
def _k8s_mem(text: str) -> str:
    return f"{_mib(text)}Mi"


_K8S_JOB_NAME = re.compile(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?")


def _check_kubernetes(cfg: JobConfig) -> None:
    dep = cfg["deploy"]
    if not _K8S_JOB_NAME.fullmatch(dep["name"]):
        raise ConfigError(
            f"deploy.name must be a Kubernetes name for --target kubernetes: a-z 0-9 -, starting "
            f"with a letter, at most 40 characters (the operator derives longer names from it), "
            f"got {dep['name']!r}"
        )
    for key in ("deploy.config_path", "deploy.kubernetes.mount_path"):
        if not posixpath.isabs(cfg.get(key)):
            raise ConfigError(f"{key} must be an absolute path, got {cfg.get(key)!r}")


def _volumes(cfg: JobConfig) -> tuple[list[dict], list[dict]]:
    """(volumes, volumeMounts) for the data volume claim, if configured."""
    k8s = cfg["deploy"]["kubernetes"]
    if not k8s["volume_claim"]:
        return [], []
    return (
        [{"name": "data", "persistentVolumeClaim": {"claimName": k8s["volume_claim"]}}],
        [{"name": "data", "mountPath": k8s["mount_path"]}],
    )


def _worker_container(cfg: JobConfig, gpu: bool) -> dict[str, Any]:
    dep = cfg["deploy"]
    cores, mem = dep["worker_cores"], _k8s_mem(dep["worker_memory"])
    args = ["dask", "cuda", "worker"] if gpu else ["dask", "worker"]
    args += [
        "--name", "$(DASK_WORKER_NAME)",
        "--nthreads", str(cores),
        "--memory-limit", _dask_limit(dep["worker_memory"]),
        "--dashboard-address", "8788",
    ]  # fmt: skip
    limits: dict[str, Any] = {"cpu": str(cores), "memory": mem}
    if gpu:
        args += ["--resources", "GPU=1"]
        # a string: dask-kubernetes' CRDs type every resource quantity as a string, and the API
        # server refuses the integer 1 there (tests/test_deploy_kubernetes.py)
        limits["nvidia.com/gpu"] = "1"
    container: dict[str, Any] = {
        "name": "worker",
        "image": dep["gpu_image"] if gpu else dep["image"],
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "resources": {"requests": {"cpu": str(cores), "memory": mem}, "limits": limits},
        "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
    }
    _, mounts = _volumes(cfg)
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _yaml_dump_all(docs: list[dict[str, Any]]) -> str:
    """YAML without anchors/aliases, multi-line strings as literal blocks (readable TOML)."""
    import yaml  # noqa: PLC0415

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    def str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, str_presenter)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False)


def render_kubernetes(cfg: JobConfig) -> str:
    """ConfigMap + DaskJob (+ GPU DaskWorkerGroup) as a multi-document YAML string."""
    run_cfg = _runtime_config(cfg)
    _check_kubernetes(cfg)
    dep = cfg["deploy"]
    name = dep["name"]
    ns = dep["kubernetes"]["namespace"]
    cfg_dir, cfg_file = posixpath.split(dep["config_path"])
    if not cfg_dir or not cfg_file:
        raise ConfigError(
            f"deploy.config_path must be an absolute file path, got {dep['config_path']!r}"
        )
    volumes, mounts = _volumes(cfg)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": ns},
        "data": {cfg_file: run_cfg.to_toml()},
    }
    job_container = {
        "name": "job",
        "image": dep["gpu_image"] if run_cfg.get("cluster.gpu") else dep["image"],
        "imagePullPolicy": "IfNotPresent",
        # DASK_SCHEDULER_ADDRESS is injected by the operator; xd-dask connects to it.
        "args": ["xd-dask", "fit", dep["config_path"], "--log-format", "json"],
        "volumeMounts": [{"name": "job-config", "mountPath": cfg_dir, "readOnly": True}, *mounts],
        # plots.n_samples model samples are drawn here (see _runner_mib)
        "resources": {"requests": {"cpu": "1", "memory": f"{_runner_mib(run_cfg)}Mi"}},
    }
    scheduler_container = {
        "name": "scheduler",
        "image": dep["image"],
        "imagePullPolicy": "IfNotPresent",
        # the preload serves the XD fit page (/xd) and the xd_dask_* metrics (/metrics)
        "args": ["dask", "scheduler", "--preload", "xd_dask.dashboard.preload"],
        "ports": [
            {"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
        "livenessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 15,
            "periodSeconds": 20,
        },
        "resources": {
            "requests": {
                "cpu": str(dep["scheduler_cores"]),
                "memory": _k8s_mem(dep["scheduler_memory"]),
            },
            "limits": {
                "cpu": str(dep["scheduler_cores"]),
                "memory": _k8s_mem(dep["scheduler_memory"]),
            },
        },
    }
    worker_spec: dict[str, Any] = {"containers": [_worker_container(cfg, gpu=False)]}
    if volumes:
        worker_spec["volumes"] = volumes
    dask_job = {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "job": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [job_container],
                    "volumes": [
                        {"name": "job-config", "configMap": {"name": f"{name}-config"}},
                        *volumes,
                    ],
                }
            },
            "cluster": {
                "spec": {
                    "worker": {"replicas": dep["n_workers"], "spec": worker_spec},
                    "scheduler": {
                        "spec": {"containers": [scheduler_container]},
                        "service": {
                            "type": "ClusterIP",
                            "selector": {
                                "dask.org/cluster-name": name,
                                "dask.org/component": "scheduler",
                            },
                            "ports": [
                                {
                                    "name": "tcp-comm",
                                    "protocol": "TCP",
                                    "port": 8786,
                                    "targetPort": "tcp-comm",
                                },
                                {
                                    "name": "http-dashboard",
                                    "protocol": "TCP",
                                    "port": 8787,
                                    "targetPort": "http-dashboard",
                                },
                            ],
                        },
                    },
                }
            },
        },
    }
    docs: list[dict[str, Any]] = [config_map, dask_job]
    if dep["gpu_workers"] > 0:
        gpu_spec: dict[str, Any] = {"containers": [_worker_container(cfg, gpu=True)]}
        if volumes:
            gpu_spec["volumes"] = volumes
        docs.append(
            {
                "apiVersion": "kubernetes.dask.org/v1",
                "kind": "DaskWorkerGroup",
                # The DaskJob's cluster is named after the job; this group joins it.
                "metadata": {"name": f"{name}-gpu", "namespace": ns},
                "spec": {
                    "cluster": name,
                    "worker": {"replicas": dep["gpu_workers"], "spec": gpu_spec},
                },
            }
        )
    claim = dep["kubernetes"]["volume_claim"]
    storage = (
        f"# The PersistentVolumeClaim {claim!r} is mounted by the runner and every worker pod at\n"
        "# once, on any node: it must be ReadWriteMany (e.g. NFS, CephFS, a cloud file store).\n"
        if claim
        else "# No volume claim (deploy.kubernetes.volume_claim): catalog.path and output.dir\n"
        "# must be object-store URLs every pod can reach, or the outputs are lost with the pods.\n"
    )
    header = (
        f"# Generated by `xd-dask render-job --target kubernetes` {_provenance(cfg)}.\n"
        "# Apply with: kubectl apply -f <this file> (needs the dask-kubernetes operator)\n"
        + storage
        + f"# Workers: --memory-limit {_dask_limit(dep['worker_memory'])} = 90 % of their "
        f"{_k8s_mem(dep['worker_memory'])} limit.\n"
    )
    return header + _yaml_dump_all(docs)


def render_job(cfg: JobConfig, target: str) -> str:
    """The deployment for ``target`` ("slurm" or "kubernetes") as text."""
    if target == "slurm":
        return render_slurm(cfg)
    if target == "kubernetes":
        return render_kubernetes(cfg)
    raise ConfigError(f"--target must be one of {TARGETS}, got {target!r}")
