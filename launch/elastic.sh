#!/usr/bin/env bash
# Elastic, fault-tolerant training: torchrun restarts the workers when a process or a
# node fails, and admits or drops nodes between MIN_NODES and MAX_NODES.
#
# Usage (run the same line on every node; MASTER_ADDR is a host that stays up):
#   MIN_NODES=2 MAX_NODES=4 NPROC=8 MASTER_ADDR=node0 launch/elastic.sh run.dir=runs/elastic \
#       train.micro_batch_size=1 train.global_batch_size=96   # divides by dp = 16, 24, 32
#
# How training survives a restart: every restart relaunches all workers, and the trainer
# resumes from the latest complete checkpoint in run.dir (checkpoint.resume=auto, set
# below; an override of yours comes later and wins). The world size may differ after a
# restart: keep parallel.dp=-1 so dp is inferred from it; the checkpoint is resharded
# (torch.distributed.checkpoint), and the global batch stays fixed (gradient accumulation
# is derived), so train.global_batch_size must divide by micro_batch_size * dp for every
# world size in [MIN_NODES, MAX_NODES] * NPROC. Save often (checkpoint.every) because work
# since the last checkpoint is redone. Keep run.dir fixed and shared by the nodes.
#
# Environment:
#   MIN_NODES, MAX_NODES  node range (default 1:NNODES or 1:1)
#   NPROC                 processes per node (default: visible GPUs, else 1)
#   MAX_RESTARTS          worker-group restarts before giving up (default 3)
#   MASTER_ADDR           rendezvous host (default 127.0.0.1)   MASTER_PORT (default 29500)
#   RDZV_ID               rendezvous id of the job (default moetrain-elastic)
#   TORCHRUN              the launcher command (default "torchrun")
#   RDZV_CONF             extra --rdzv-conf (default: dead nodes detected in ~15 s, and a
#                         round closes 10 s after MIN_NODES joined)
#
# On SLURM: one task per node running this script, MASTER_ADDR the first host of the
# allocation, in a job that outlives a lost node (sbatch --no-kill, and srun without
# --kill-on-bad-exit). In the batch script:
#   mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
#   MASTER_ADDR=${hosts[0]} MIN_NODES=1 MAX_NODES=$SLURM_NNODES \
#     srun --kill-on-bad-exit=0 --ntasks-per-node=1 launch/elastic.sh ...
# Nodes added later (another srun step, or a new job with the same RDZV_ID and
# MASTER_ADDR) join at the next rendezvous; the running workers are stopped with a
# checkpoint (SIGTERM) and restarted with the larger world. Under srun the agent ignores
# SIGTERM, SIGUSR1 and SIGUSR2: SLURM signals the workers too (they stop with a
# checkpoint), and the agent must outlive their save (see launch/slurm.sbatch).
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
  NPROC=0
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
    NPROC="${#ids[@]}"
  elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    NPROC="$(nvidia-smi -L | grep -c '^GPU' || true)"
  fi
  if [[ "$NPROC" -lt 1 ]]; then NPROC=1; fi
fi
MIN_NODES="${MIN_NODES:-1}"
MAX_NODES="${MAX_NODES:-${NNODES:-1}}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-moetrain-elastic}"
RDZV_CONF="${RDZV_CONF:-keep_alive_interval=5,keep_alive_max_attempt=3,last_call_timeout=10}"
read -r -a LAUNCHER <<< "${TORCHRUN:-torchrun}"

if [[ -n "${SLURM_STEP_ID:-}" ]]; then
  trap '' TERM USR1 USR2  # inherited by torchrun, which then handles only INT, HUP, QUIT
  LAUNCHER+=(--signals-to-handle=SIGINT,SIGHUP,SIGQUIT)
  # The allocation's first node hosts the rendezvous store when MASTER_ADDR names it.
  # Said explicitly: where the nodes share an address (one machine, containers) every
  # node would take MASTER_ADDR for itself, and the first to bind the port would host.
  if [[ "$RDZV_CONF" != *is_host=* && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    if [[ "$MASTER_ADDR" == "${hosts[0]:-}" ]]; then
      if [[ "${SLURM_NODEID:-}" == 0 ]]; then host=true; else host=false; fi
      RDZV_CONF+=",is_host=$host"
    fi
  fi
fi

# A fresh worker store for every rendezvous round: with the agent's shared store
# (torch's default), a node joining a running job waits forever for bootstrap keys
# that the first node published only in its first round.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

exec "${LAUNCHER[@]}" \
  --nnodes="$MIN_NODES:$MAX_NODES" \
  --nproc-per-node="$NPROC" \
  --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$RDZV_ID" \
  --rdzv-conf="$RDZV_CONF" \
  -m moetrain.train checkpoint.resume=auto "$@"
