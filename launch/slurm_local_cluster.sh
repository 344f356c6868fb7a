#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, to try the launch scripts (and to test them:
# tests/slurm/): munge, slurmctld, and two slurmd daemons as nodes n1 and n2, both on
# 127.0.0.1. Each node has 64 CPUs, 256 GiB and 8 GPUs on paper (stand-in device files), so
# launch/slurm.sbatch's header fits; on a CPU machine ask for one process per node with
# --gpus-per-node=1 (torchrun starts one worker per GPU) and few CPUs.
#
# Usage (as root; Debian/Ubuntu packages:
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge):
#   launch/slurm_local_cluster.sh start     # prints the cluster's state and SLURM_CONF
#   export SLURM_CONF=/tmp/moetrain-slurm/slurm.conf      # (start links /etc/slurm/slurm.conf
#                                                         #  to it when that file is absent)
#   sbatch --gpus-per-node=1 --cpus-per-task=1 launch/slurm.sbatch parallel.ep=2 \
#       run.dir=runs/slurm
#   launch/slurm_local_cluster.sh status
#   launch/slurm_local_cluster.sh stop      # cancels the jobs, stops what start started
#
# Environment:
#   MOETRAIN_SLURM_DIR   configuration, state and logs (default /tmp/moetrain-slurm)
#   MOETRAIN_SLURM_PORT  slurmctld's port; n1 and n2 listen on the next two (default 6817)
#
# The nodes share this machine's file system, so a run.dir is seen by both. Jobs run as
# root (SlurmUser and SlurmdUser are root); process tracking is proctrack/linuxproc (the
# process tree), which needs no cgroup setup. Daemon logs: $MOETRAIN_SLURM_DIR/*.log.
set -euo pipefail

DIR="${MOETRAIN_SLURM_DIR:-/tmp/moetrain-slurm}"
PORT="${MOETRAIN_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
NODES=(n1 n2)
HOSTS_TAG="# moetrain local SLURM cluster"
export SLURM_CONF="$CONF"

say() { echo "slurm_local_cluster: $*"; }
die() { echo "slurm_local_cluster: error: $*" >&2; exit 1; }

alive() {  # a pid file's process is running
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2> /dev/null
}

write_config() {
  mkdir -p "$DIR/state" "$DIR/spool/n1" "$DIR/spool/n2"
  cat > "$CONF" <<EOF
# Written by launch/slurm_local_cluster.sh: a two-node test cluster on 127.0.0.1.
ClusterName=moetrain
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The nodes' CPUs and GPUs are declared here, not detected.
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
# Seconds between a job's SIGTERM (time limit, cancel) and its SIGKILL: the checkpoint's
# window. SLURM's default.
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName=n1 NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=64 RealMemory=262144 Gres=gpu:8 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=64 RealMemory=262144 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  # Stand-in GPU device files: SLURM counts and assigns them; nothing opens them.
  mkdir -p "$DIR/dev"
  for i in 0 1 2 3 4 5 6 7; do : > "$DIR/dev/gpu$i"; done
  printf 'NodeName=n[1-2] Name=gpu File=%s\n' "$DIR/dev/gpu[0-7]" > "$DIR/gres.conf"
}

add_hosts() {
  local missing=()
  for n in "${NODES[@]}"; do
    getent hosts "$n" > /dev/null || missing+=("$n")
  done
  if ((${#missing[@]})); then
    echo "127.0.0.1 ${missing[*]} $HOSTS_TAG" >> /etc/hosts
    say "/etc/hosts: 127.0.0.1 ${missing[*]}"
  fi
}

start_munge() {
  if munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
    say "munge: running"
    return
  fi
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key 2> /dev/null || true
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2> /dev/null || true
  if id munge > /dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
  else
    /usr/sbin/munged --force
  fi
  touch "$DIR/munged.ours"
  for _ in $(seq 50); do
    munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && { say "munge: started"; return; }
    sleep 0.1
  done
  die "munged did not start (see /var/log/munge/munged.log)"
}

node_states() { sinfo -h -N -o '%N %T' 2> /dev/null | sort -u; }

cmd_start() {
  [[ "$(id -u)" == 0 ]] || die "run as root (the daemons and /etc/hosts need it)"
  for c in munged slurmctld slurmd sbatch; do
    command -v "$c" > /dev/null || die "$c not found; install: apt-get install -y" \
      "--no-install-recommends slurmctld slurmd slurm-client munge"
  done
  mkdir -p "$DIR"
  if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd-n1.pid" && alive "$DIR/slurmd-n2.pid"
  then
    say "already running (SLURM_CONF=$CONF)"
    node_states | sed 's/^/slurm_local_cluster: node /'
    return
  fi
  cmd_stop quiet
  write_config
  add_hosts
  start_munge
  if [[ ! -e /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -s "$CONF" /etc/slurm/slurm.conf
    say "/etc/slurm/slurm.conf -> $CONF"
  fi
  slurmctld -c -f "$CONF"  # -c: no jobs from an earlier cluster
  for n in "${NODES[@]}"; do
    slurmd -N "$n" -f "$CONF"
  done
  say "slurmctld on 127.0.0.1:$PORT; slurmd n1 on :$((PORT + 1)), n2 on :$((PORT + 2))"
  local states=""
  for _ in $(seq 150); do
    states="$(node_states)"
    if [[ "$(grep -c ' idle$' <<< "$states")" == 2 ]]; then
      node_states | sed 's/^/slurm_local_cluster: node /'
      say "ready: export SLURM_CONF=$CONF"
      return
    fi
    sleep 0.2
  done
  die "the nodes did not become idle in 30 s: ${states:-no answer from slurmctld}" \
      "(logs: $DIR/slurmctld.log, $DIR/slurmd-n1.log)"
}

stop_pid() {  # stop the daemon of a pid file, SIGKILL after 10 s
  local file="$1" pid
  [[ -s "$file" ]] || return 0
  pid="$(cat "$file")"
  if kill -0 "$pid" 2> /dev/null; then
    kill "$pid" 2> /dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2> /dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2> /dev/null || true
  fi
  rm -f "$file"
}

cmd_stop() {
  local quiet="${1:-}"
  if alive "$DIR/slurmctld.pid"; then
    mapfile -t jobs < <(squeue -h -o %i 2> /dev/null || true)
    if ((${#jobs[@]})); then
      scancel "${jobs[@]}" 2> /dev/null || true
      for _ in $(seq 100); do  # their steps end before the daemons go
        [[ -z "$(squeue -h -o %i 2> /dev/null)" ]] && break
        sleep 0.1
      done
    fi
  fi
  for n in "${NODES[@]}"; do stop_pid "$DIR/slurmd-$n.pid"; done
  stop_pid "$DIR/slurmctld.pid"
  if [[ "$(readlink /etc/slurm/slurm.conf 2> /dev/null)" == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
  fi
  if [[ -e "$DIR/munged.ours" ]]; then
    stop_pid /run/munge/munged.pid
    rm -f "$DIR/munged.ours"
  fi
  if grep -q "$HOSTS_TAG" /etc/hosts 2> /dev/null; then
    # In place: /etc/hosts may be a mount point that cannot be replaced by a rename.
    local kept
    kept="$(grep -v "$HOSTS_TAG" /etc/hosts)"
    printf '%s\n' "$kept" > /etc/hosts
  fi
  [[ -n "$quiet" ]] || say "stopped"
}

cmd_status() {
  local ok=0
  for f in slurmctld slurmd-n1 slurmd-n2; do
    if alive "$DIR/$f.pid"; then
      say "$f: running (pid $(cat "$DIR/$f.pid"))"
    else
      say "$f: not running"
      ok=1
    fi
  done
  if ((ok == 0)); then
    node_states | sed 's/^/slurm_local_cluster: node /'
    squeue 2> /dev/null || true
  fi
  return "$ok"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
