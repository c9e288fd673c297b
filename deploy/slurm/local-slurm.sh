#!/usr/bin/env bash
# A two-node Slurm on this machine, to try a rendered job before a real cluster sees it (and the
# Slurm tests' fixture: tests/test_deploy_slurm.py, started by .ci/run).
#
#   apt-get install slurm-wlm munge              # Debian 12: Slurm 22.05
#   deploy/slurm/local-slurm.sh start            # munged, slurmctld, slurmd n1 and n2
#   eval "$(deploy/slurm/local-slurm.sh env)"    # export SLURM_CONF for sbatch, squeue, ...
#   sbatch fit.sbatch; squeue; scontrol show job <id>
#   deploy/slurm/local-slurm.sh stop             # end the daemons (and any job still running)
#   deploy/slurm/local-slurm.sh status           # exit 0 when all four daemons are up
#
# Two nodes, because a rendered job is heterogeneous (the scheduler and the fit in component 0,
# the workers in component 1, on the other node): n1 and n2, 1 CPU and 8000 MB each, both
# 127.0.0.1 (`slurmd -N n1`, `slurmd -N n2`), in the default partition `debug` and in `gpu`,
# whose nodes declare one `gpu` GRES with /dev/null for its device (enough for `sbatch
# --test-only` of a GPU script; a job given that GPU runs, without a device). Memory is a consumable resource, as on production
# clusters (CR_Core_Memory), so the scheduler refuses requests that could not run there; it is
# not enforced (no cgroups here: proctrack/linuxproc, task/none).
#
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/xd-dask-slurm): slurm.conf, a munge key
# and socket of its own (the system's munged and /etc/slurm are not touched), logs, spool. The
# ports are free ones chosen when the daemons start (nothing listens on a fixed port). `start`
# is idempotent: when all four daemons run it does nothing; otherwise it stops what is left and
# starts afresh (new ports, no jobs). Run as root (slurmd starts jobs as their user) or as the
# only user who submits (SlurmUser = you). `stop` ends only the daemons named in $DIR/*.pid.
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-/tmp/xd-dask-slurm}"
CONF="$DIR/slurm.conf"
NODES=(n1 n2)

die() { echo "local-slurm: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the daemon of PIDFILE (munged.pid, slurmd-n1.pid, ...) runs
    local pid name
    [ -s "$1" ] || return 1
    pid="$(cat "$1")"
    name="$(basename "$1" .pid)"
    # the process must be that daemon: a stale pid file may name an unrelated process now
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ]
}

pidfiles() {
    echo "$DIR/munged.pid" "$DIR/slurmctld.pid"
    for n in "${NODES[@]}"; do echo "$DIR/slurmd-$n.pid"; done
}

all_alive() {
    for f in $(pidfiles); do alive "$f" || return 1; done
}

free_ports() {  # free_ports N: N TCP ports nothing listens on now
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_conf() {
    local user host ctld p1 p2
    user="$(id -un)"
    host="$(hostname -s)"
    read -r ctld p1 p2 < <(free_ports 3)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
    cat > "$CONF" <<EOF
# Written by deploy/slurm/local-slurm.sh: a two-node Slurm on one machine (rewritten on start).
ClusterName=xdlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# heterogeneous jobs are started by the backfill scheduler only: every second, not every 30 s
SchedulerParameters=bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
ReturnToService=2
MinJobAge=3600
KillWait=10
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$p1 CPUs=1 RealMemory=8000 Gres=gpu:1
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$p2 CPUs=1 RealMemory=8000 Gres=gpu:1
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=n1,n2 MaxTime=INFINITE State=UP
EOF
    # one GPU per node, /dev/null standing in for its device file (slurmd drops a GPU without
    # a character device): the scheduler sees a GPU node; a job that gets it has no device
    printf 'Name=gpu File=/dev/null\n' > "$DIR/gres.conf"
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
}

start_munged() {
    alive "$DIR/munged.pid" && return 0
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    # --force: a socket directory of our own instead of /run/munge (munged would refuse it)
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
}

wait_idle() {  # until both nodes take jobs (slurmd registered with slurmctld)
    local state=""
    for _ in $(seq 60); do
        state="$(SLURM_CONF="$CONF" sinfo -h -N -p debug -o '%N %t' 2>/dev/null || true)"
        if [ "$(grep -cE ' (idle|mix|alloc)$' <<<"$state")" = "${#NODES[@]}" ]; then
            return 0
        fi
        sleep 1
    done
    die "the nodes did not come up: $(tr '\n' ' ' <<<"$state"); see $DIR/*.log"
}

cmd_start() {
    for exe in munged slurmctld slurmd sbatch python3; do
        command -v "$exe" >/dev/null || die "$exe not found: apt-get install slurm-wlm munge"
    done
    local fresh=""
    if ! all_alive; then
        # nothing of ours runs (or a part of it died): start again from a clean state
        cmd_stop >/dev/null
        write_conf
        fresh="-c"  # slurmctld: forget the jobs of an earlier run
    fi
    export SLURM_CONF="$CONF"
    start_munged
    alive "$DIR/slurmctld.pid" || slurmctld $fresh -f "$CONF"
    for n in "${NODES[@]}"; do
        alive "$DIR/slurmd-$n.pid" || slurmd -N "$n" -f "$CONF"
    done
    wait_idle
    echo "local Slurm is up ($(sinfo -V)): nodes ${NODES[*]}; logs in $DIR"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    if [ -f "$CONF" ] && alive "$DIR/slurmctld.pid"; then
        SLURM_CONF="$CONF" scancel --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local f pid
    for f in $(pidfiles | tr ' ' '\n' | tac); do  # the slurmds first, munged last
        alive "$f" || continue
        pid="$(cat "$f")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    done
    echo "local Slurm stopped (state and logs kept in $DIR)"
}

cmd_status() {
    local ok=0 f
    for f in $(pidfiles); do
        if alive "$f"; then echo "running  $(basename "$f" .pid)"; else echo "stopped  $(basename "$f" .pid)"; ok=1; fi
    done
    [ "$ok" = 0 ] && SLURM_CONF="$CONF" sinfo -N
    return "$ok"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state in \$LOCAL_SLURM_DIR, default $DIR)" >&2
       exit 2 ;;
esac
