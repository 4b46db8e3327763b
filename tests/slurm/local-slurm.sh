#!/usr/bin/env bash
# A private single-node SLURM cluster for the integration tests (tests/e2e/test_slurm.py).
#
#   tests/slurm/local-slurm.sh install      apt-get install slurmctld slurmd slurm-client munge
#   tests/slurm/local-slurm.sh start DIR    start munged, slurmctld and slurmd; all state in DIR
#   tests/slurm/local-slurm.sh stop DIR     cancel its jobs, stop its daemons (by their pid files)
#
# Everything is private to DIR, so it neither reads nor changes a SLURM or munge the machine
# already has: its own slurm.conf (clients find it through SLURM_CONF=DIR/slurm.conf), its own
# munge key and socket, its own ports (SLURMCTLD_PORT, SLURMD_PORT; default 16817, 16818).
# SLURM_LOCAL_CPUS (default 4) is the CPU count the node advertises: more than the machine has
# is fine for tests, and lets `srun -n 2` start while another job finishes on a 2-core machine.
# Needs root (slurmd starts job steps as their user) and Debian's slurm-wlm 22.05 or later.
set -euo pipefail

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || { echo "installing SLURM needs root" >&2; exit 1; }
    apt-get update -qq
    # The packages' init scripts do not start anything in a container (policy-rc.d); with
    # systemd they would start the system's own slurmctld/munged, which this script ignores.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

start() {
    local dir=$1
    [ "$(id -u)" = 0 ] || { echo "a local SLURM node needs root (slurmd)" >&2; exit 1; }
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "$tool not found: run '$0 install'" >&2; exit 1; }
    done
    mkdir -p "$dir/munge" "$dir/ctld" "$dir/d" "$dir/log"
    chmod 0700 "$dir/munge"
    local host
    host=$(hostname -s)

    # munge: a key and a socket of our own (munged insists on a private key directory).
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 0600 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    for _ in $(seq 1 50); do [ -S "$dir/munge/munge.socket" ] && break; sleep 0.1; done
    [ -S "$dir/munge/munge.socket" ] || { tail "$dir/log/munged.log" >&2; exit 1; }

    # Job ids start at a random number: the ranks of an srun job derive their rendezvous port
    # from the job id, so two test clusters on one machine should not share ids.
    cat >"$dir/slurm.conf" <<EOF
ClusterName=mergecli-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
FirstJobId=$((1000 + RANDOM % 30000))
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
NodeName=$host CPUs=${SLURM_LOCAL_CPUS:-4} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"   # both daemonize and write their pid files
    slurmd -f "$SLURM_CONF"
    local state=""
    for _ in $(seq 1 120); do
        state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.25
    done
    if [ "$state" != idle ]; then
        echo "the local SLURM node is '${state:-unreachable}', not idle" >&2
        tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
        exit 1
    fi
    echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
    local dir=$1
    export SLURM_CONF=$dir/slurm.conf
    if [ -s "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        # shellcheck disable=SC2086 # one argument per job id
        [ -z "$jobs" ] || scancel $jobs || true
        for _ in $(seq 1 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -s "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
