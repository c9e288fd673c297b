#!/usr/bin/env bash
# Run a job file on a Dask cluster started on this host, then stop the cluster.
#
#   deploy/local/run-job.sh JOB.toml [N_WORKERS] [-- extra `xd-dask fit` arguments]
#   e.g. deploy/local/run-job.sh jobs/demo.toml 2 -- --out demo-out
#
# The cluster is the one deploy/local/cluster.sh starts (same settings via the environment).
# The exit code is the fit's (0 success, 1 fit failure, 2 configuration error); the job is
# checked (`xd-dask fit --check`) before the cluster starts.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
job="${1:?usage: $0 JOB.toml [N_WORKERS] [-- xd-dask fit arguments]}"
shift
n=2
if [ $# -gt 0 ] && [ "$1" != "--" ]; then n="$1"; shift; fi
[ "${1:-}" = "--" ] && shift
export CLUSTER_DIR="${CLUSTER_DIR:-./dask-local}"
# the job is checked before any process starts: a configuration error costs no cluster
xd-dask fit "$job" --check "$@" >/dev/null
"$here/cluster.sh" start "$n" 1
trap '"$here/cluster.sh" stop' EXIT
xd-dask fit "$job" --scheduler-file "$CLUSTER_DIR/scheduler.json" "$@"
