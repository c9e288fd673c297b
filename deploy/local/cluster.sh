#!/usr/bin/env bash
# Start or stop a Dask cluster on this host: one `dask scheduler` and N `dask worker` processes.
#
#   deploy/local/cluster.sh start [N_WORKERS] [THREADS_PER_WORKER]   (default 2 workers x 1 thread)
#   deploy/local/cluster.sh stop
#   deploy/local/cluster.sh status
#
# The scheduler writes $CLUSTER_DIR/scheduler.json; jobs connect with
#   xd-dask fit JOB.toml --scheduler-file $CLUSTER_DIR/scheduler.json
# Settings (environment): CLUSTER_DIR (default ./dask-local), SCHEDULER_HOST (127.0.0.1: the
# scheduler, the workers and the dashboard listen on loopback only; 0.0.0.0 or the host's
# address opens them to the network), SCHEDULER_PORT (8786; 0 = any free port),
# DASHBOARD_ADDRESS (:8787 = port 8787 on SCHEDULER_HOST; host:port; "none" = no dashboard),
# WORKER_MEMORY (memory limit per worker, default "auto").
# The scheduler runs the preload xd_dask.dashboard.preload: the XD fit page at /xd on its
# dashboard and the xd_dask_* metrics on /metrics (with prometheus_client installed).
# Values are passed to the commands as arguments, never inside code: any CLUSTER_DIR works.
set -euo pipefail

CLUSTER_DIR="${CLUSTER_DIR:-./dask-local}"
SCHEDULER_HOST="${SCHEDULER_HOST:-127.0.0.1}"
SCHEDULER_PORT="${SCHEDULER_PORT:-8786}"
DASHBOARD_ADDRESS="${DASHBOARD_ADDRESS:-:8787}"
case "$DASHBOARD_ADDRESS" in
    :*) DASHBOARD_ADDRESS="$SCHEDULER_HOST$DASHBOARD_ADDRESS" ;;  # a port alone: on the host
esac
WORKER_MEMORY="${WORKER_MEMORY:-auto}"
DASK="${DASK:-dask}"
PYTHON="${PYTHON:-$(dirname "$(command -v "$DASK")")/python}"
SCHED_FILE="$CLUSTER_DIR/scheduler.json"

alive() {  # a process that exited but was not reaped yet (a zombie) counts as gone
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] || return 0
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ]  # empty: it ended between the two looks
}

start() {
    local n="${1:-2}" threads="${2:-1}"
    mkdir -p "$CLUSTER_DIR"
    if [ -f "$CLUSTER_DIR/scheduler.pid" ] && alive "$(cat "$CLUSTER_DIR/scheduler.pid")"; then
        echo "a cluster is already running from $CLUSTER_DIR (stop it first)" >&2
        exit 1
    fi
    rm -f "$SCHED_FILE" "$CLUSTER_DIR"/*.pid
    local dash=(--dashboard-address "$DASHBOARD_ADDRESS")
    # without a dashboard the scheduler still serves /health and /metrics: on SCHEDULER_HOST,
    # on a free port (Dask's default would be port 8787 on every interface)
    [ "$DASHBOARD_ADDRESS" = "none" ] && dash=(--no-dashboard --dashboard-address "$SCHEDULER_HOST:0")
    nohup "$DASK" scheduler --host "$SCHEDULER_HOST" --port "$SCHEDULER_PORT" \
        --scheduler-file "$SCHED_FILE" "${dash[@]}" --preload xd_dask.dashboard.preload \
        >"$CLUSTER_DIR/scheduler.log" 2>&1 &
    echo $! >"$CLUSTER_DIR/scheduler.pid"
    # The workers start at once: each waits for the scheduler file (Dask polls for it; the old
    # one was removed above), so their start overlaps the scheduler's instead of following it.
    for i in $(seq "$n"); do
        nohup "$DASK" worker --scheduler-file "$SCHED_FILE" --host "$SCHEDULER_HOST" \
            --nworkers 1 --nthreads "$threads" --memory-limit "$WORKER_MEMORY" \
            --name "local-$i" --local-directory "$CLUSTER_DIR/worker-$i" \
            --no-dashboard --dashboard-address "$SCHEDULER_HOST:0" \
            >"$CLUSTER_DIR/worker-$i.log" 2>&1 &
        echo $! >>"$CLUSTER_DIR/workers.pid"
    done
    local spid
    spid="$(cat "$CLUSTER_DIR/scheduler.pid")"
    for _ in $(seq 600); do  # up to 60 s, less if the scheduler exits (e.g. its port is taken)
        [ -s "$SCHED_FILE" ] && break
        alive "$spid" || break
        sleep 0.1
    done
    if [ ! -s "$SCHED_FILE" ]; then
        echo "dask scheduler did not start; see $CLUSTER_DIR/scheduler.log" >&2
        stop
        exit 1
    fi
    if ! "$PYTHON" -c '
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="30s") as c:
    c.wait_for_workers(int(sys.argv[2]), timeout=120)
' "$SCHED_FILE" "$n"; then
        echo "the $n workers did not join; see $CLUSTER_DIR/worker-*.log" >&2
        stop
        exit 1
    fi
    echo "scheduler file: $SCHED_FILE ($n workers x $threads threads)"
}

# Each of the processes $@ asked to end (TERM), then waited for (10 s), then killed.
end() {
    [ $# -gt 0 ] || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 40); do
        local alive=0
        for pid in "$@"; do alive "$pid" && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.25
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# The workers first, then the scheduler: a worker whose scheduler vanished first waits 8 s
# for its process before its nanny kills it (the Slurm script stops them in this order too).
stop() {
    local workers=()
    [ -f "$CLUSTER_DIR/workers.pid" ] && mapfile -t workers <"$CLUSTER_DIR/workers.pid"
    end "${workers[@]}"
    [ -f "$CLUSTER_DIR/scheduler.pid" ] && end "$(cat "$CLUSTER_DIR/scheduler.pid")"
    rm -f "$CLUSTER_DIR/workers.pid" "$CLUSTER_DIR/scheduler.pid" "$SCHED_FILE"
}

status() {
    [ -s "$SCHED_FILE" ] || { echo "no cluster in $CLUSTER_DIR"; exit 1; }
    "$PYTHON" -c '
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="10s") as c:
    print(c)
' "$SCHED_FILE"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start [N_WORKERS] [THREADS] | stop | status" >&2; exit 2 ;;
esac
