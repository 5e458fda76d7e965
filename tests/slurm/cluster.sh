#!/usr/bin/env bash
# A single-node SLURM cluster for the integration test: munge, slurmctld and slurmd
# on this machine, one partition holding the node's real CPUs and memory.
#
#   tests/slurm/cluster.sh start    write /etc/slurm/slurm.conf, start the daemons, wait for the node
#   tests/slurm/cluster.sh stop     stop the daemons this script started (and only those) and
#                                   remove the slurm.conf it wrote: a config naming a controller
#                                   that no longer runs makes every `scontrol` wait ~10 s, and
#                                   the SLURM executor plugin calls `scontrol show config` each
#                                   time Snakemake starts
#   tests/slurm/cluster.sh status   sinfo
#
# Needs root and Debian's slurmctld, slurmd and munge packages
# (apt-get install -y slurmd slurmctld munge). Exit status 3 means "SLURM cannot run
# here" (the message says why); any other non-zero status is a real failure.
set -euo pipefail

STATE=${RANKBIAS_SLURM_STATE:-/run/rankbias-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by rankbias tests/slurm/cluster.sh"
PARTITION=${RANKBIAS_SLURM_PARTITION:-rankbias}

cannot() { echo "cluster.sh: SLURM cannot run here: $*" >&2; exit 3; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

require() {
    [[ $(id -u) -eq 0 ]] || cannot "starting slurmctld/slurmd/munged needs root (running as $(id -un))"
    local b
    for b in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
        command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 \
            || cannot "'$b' is not installed (apt-get install -y slurmd slurmctld munge)"
    done
    export PATH=$PATH:/usr/sbin:/sbin
}

# Start a daemon unless one is already running; remember the pid if we started it.
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        echo "munge: already running"
        return
    fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        echo "munge: creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do
        pid_alive /run/munge/munged.pid && break
        sleep 0.1
    done
    pid_alive /run/munge/munged.pid || die "munged did not start (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$STATE/munged.pid"
    echo "munge: started (pid $(cat /run/munge/munged.pid))"
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        cannot "$CONF exists and was not written by this script; refusing to overwrite a real cluster's configuration"
    fi
    local node host
    # slurmd -C prints this node's real hardware: NodeName=... CPUs=... RealMemory=...
    node=$(slurmd -C | head -n1)
    host=$(hostname -s)
    [[ $node == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    install -d -m 0755 /etc/slurm "$STATE/ctld" "$STATE/d"
    local tmp="$CONF.tmp.$$"
    cat >"$tmp" <<EOF
$MARKER: a single-node test cluster.
ClusterName=rankbias
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups in a test container: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
# No accounting database; squeue answers status queries, so keep finished jobs
# visible long enough (the executor's squeue status needs MinJobAge >= 120 s).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$tmp" "$CONF"
    echo "slurm: wrote $CONF ($node)"
}

start() {
    require
    install -d -m 0755 "$STATE"
    if sinfo -h >/dev/null 2>&1 && [[ ! -f $STATE/slurmctld.pid ]]; then
        echo "slurm: a cluster is already answering; using it"
        return
    fi
    start_munge
    write_conf
    if ! pid_alive "$STATE/slurmctld.pid"; then
        slurmctld -i || die "slurmctld did not start; log: $(tail -n 20 "$STATE/slurmctld.log" 2>/dev/null)"
        touch "$STATE/started-slurmctld"
    fi
    if ! pid_alive "$STATE/slurmd.pid"; then
        slurmd || die "slurmd did not start; log: $(tail -n 20 "$STATE/slurmd.log" 2>/dev/null)"
        touch "$STATE/started-slurmd"
    fi
    local state=""
    for _ in $(seq 120); do
        state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true)
        [[ $state == idle || $state == mix || $state == alloc ]] && break
        sleep 0.5
    done
    if [[ $state != idle && $state != mix && $state != alloc ]]; then
        die "the node did not become idle (state '${state:-none}'); slurmctld log:
$(tail -n 20 "$STATE/slurmctld.log" 2>/dev/null)
slurmd log:
$(tail -n 20 "$STATE/slurmd.log" 2>/dev/null)"
    fi
    echo "slurm: node $(hostname -s) is $state in partition $PARTITION"
}

stop_pidfile() {  # name pidfile
    local name=$1 pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        echo "$name: stopped (pid $pid)"
    fi
}

stop() {
    [[ -d $STATE ]] || { echo "cluster.sh: nothing to stop ($STATE does not exist)"; return 0; }
    # Cancel whatever the test left queued, then stop only the daemons started here.
    if [[ -f $STATE/started-slurmctld ]]; then
        scancel --partition "$PARTITION" 2>/dev/null || true
    fi
    [[ -f $STATE/started-slurmd ]] && stop_pidfile slurmd "$STATE/slurmd.pid"
    [[ -f $STATE/started-slurmctld ]] && stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile munged "$STATE/munged.pid"
    if [[ -f $STATE/started-slurmctld ]] && [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF"; then
        rm -f "$CONF"
        echo "slurm: removed $CONF"
    fi
    rm -f "$STATE"/started-* "$STATE/munged.pid"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
