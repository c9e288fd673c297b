"""Run an xd-dask job on Slurm workers started by dask-jobqueue (see jobqueue.yaml beside this).

    python deploy/slurm/jobqueue_fit.py JOB.toml [--gpu] [--set KEY=VALUE ...]

The job file is read exactly as `xd-dask fit` reads it (defaults < file < XD_DASK_* environment <
--set); its [deploy] section sizes the worker jobs as `xd-dask render-job` does: n_workers (or
gpu_workers) jobs of worker_cores threads and worker_memory, walltime, [deploy.slurm] partition
(gpu_partition), account, interface and dashboard_address; the site settings come from the
jobqueue.xd-dask-cpu (xd-dask-gpu) section of the Dask configuration. When the fit ends, the
workers are stopped through their nannies, so that each worker job ends COMPLETED rather than
being cancelled. Exit codes as `xd-dask fit`: 0 success, 1 fit failure, 2 configuration error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

from xd_dask.jobs.config import ConfigError, JobConfig, load_config, parse_assignment
from xd_dask.jobs.render import stop_workers
from xd_dask.jobs.runner import run_fit


def cluster_options(cfg: JobConfig, gpu: bool) -> dict[str, Any]:
    """SLURMCluster keyword arguments from the job's [deploy] section (the rest: jobqueue.yaml)."""
    import dask

    dep = cfg["deploy"]
    slurm = dep["slurm"]
    name = "xd-dask-gpu" if gpu else "xd-dask-cpu"
    scheduler = dict(dask.config.get(f"jobqueue.{name}.scheduler-options", {}) or {})
    dash = slurm["dashboard_address"]
    scheduler |= {"dashboard": False} if dash == "none" else {"dashboard_address": dash}
    # the XD fit page (/xd) and the xd_dask_* metrics (/metrics) on the scheduler
    scheduler["preload"] = [*scheduler.get("preload", []), "xd_dask.dashboard.preload"]
    options: dict[str, Any] = {
        "config_name": name,
        "cores": dep["worker_cores"],
        "memory": dep["worker_memory"],
        "walltime": dep["walltime"],
        "scheduler_options": scheduler,
    }
    partition = (slurm["gpu_partition"] or slurm["partition"]) if gpu else slurm["partition"]
    for key, value in [
        ("queue", partition),
        ("account", slurm["account"]),
        ("interface", slurm["interface"]),
    ]:
        if value:  # empty: the site's value from jobqueue.yaml
            options[key] = value
    return options


def wait_for_jobs_to_end(cluster: Any, timeout: float = 60) -> None:
    """Until none of ``cluster``'s worker jobs is in the Slurm queue (at most ``timeout`` s):
    stopped workers end their jobs by themselves, so the cluster's ``scancel`` finds none."""
    ids = [job.job_id for job in cluster.workers.values() if getattr(job, "job_id", None)]
    deadline = time.monotonic() + timeout
    while ids and time.monotonic() < deadline:
        queued = subprocess.run(
            ["squeue", "--noheader", "--format=%i", f"--jobs={','.join(ids)}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if not queued:
            return
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job")
    ap.add_argument("--gpu", action="store_true", help="GPU workers (jobqueue.xd-dask-gpu)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    try:
        over = dict(parse_assignment(s) for s in args.set)
        if args.gpu:
            over["cluster.gpu"] = True
        cfg = load_config(args.job, over)
        cfg.check_inputs()
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    from dask_jobqueue import SLURMCluster  # pip install dask-jobqueue
    from distributed import Client

    n = cfg.get("deploy.gpu_workers") if args.gpu else cfg.get("deploy.n_workers")
    with SLURMCluster(**cluster_options(cfg, args.gpu)) as cluster, Client(cluster) as client:
        cluster.scale(jobs=n)
        client.wait_for_workers(max(1, n), timeout=3600)
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        try:
            outcome = run_fit(cfg, client)
        except Exception as exc:  # the fit failed: one line, exit code 1
            print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            # the worker jobs end by themselves (COMPLETED) before the cluster cancels them
            stop_workers(client)
            wait_for_jobs_to_end(cluster)
    print(f"model: {outcome.files['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
