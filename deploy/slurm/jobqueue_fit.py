"""Run an xd-dask job on Slurm workers started by dask-jobqueue (see jobqueue.yaml beside this).

    python deploy/slurm/jobqueue_fit.py JOB.toml [--gpu] [--set KEY=VALUE ...]

The job file is read exactly as `xd-dask fit` reads it (defaults < file < XD_DASK_* environment <
--set); [deploy] n_workers / gpu_workers say how many Slurm jobs (= workers) to ask for. Exit
codes as `xd-dask fit`: 0 success, 1 fit failure, 2 configuration error.
"""

from __future__ import annotations

import argparse
import sys

from xd_dask.jobs.config import ConfigError, load_config, parse_assignment
from xd_dask.jobs.runner import run_fit


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
    name = "xd-dask-gpu" if args.gpu else "xd-dask-cpu"
    with SLURMCluster(config_name=name) as cluster, Client(cluster) as client:
        cluster.scale(jobs=n)
        client.wait_for_workers(max(1, n), timeout=3600)
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        try:
            outcome = run_fit(cfg, client)
        except Exception as exc:  # the fit failed: one line, exit code 1
            print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(f"model: {outcome.files['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
