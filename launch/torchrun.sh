#!/usr/bin/env bash
# Launch moetrain under torchrun. Every argument is passed on as a Hydra override.
#
# Usage:
#   launch/torchrun.sh [OVERRIDE ...]
#
#   # one node, one process per visible GPU (or 1 process on a CPU-only machine):
#   launch/torchrun.sh model=small parallel.ep=4 train.steps=1000 train.global_batch_size=64
#   # one node, 4 CPU processes (gloo); the default batch sizes fit (see below):
#   NPROC=4 launch/torchrun.sh parallel.ep=2
#   # two nodes: run the same line on both; MASTER_ADDR is a host of the first node.
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh parallel.ep=8 \
#       train.global_batch_size=128
#
# train.micro_batch_size=auto (the default) takes the largest micro-batch, up to
# train.max_micro_batch_size=8, that divides train.global_batch_size / dp: the default 16
# sequences run 8 per forward on 1-2 data-parallel ranks, 4 on 4, 2 on 8 (rank 0 logs the
# choice). train.global_batch_size must divide by dp; an explicit train.micro_batch_size
# must make it a multiple of train.micro_batch_size * dp.
#
# A config error is printed once (rank 0) and every rank exits with status 2; torchrun's
# failure summary repeats it as the root cause.
#
# Environment:
#   NPROC        processes per node (default: number of visible GPUs, else 1)
#   NNODES       nodes (default 1). With 1 node and no MASTER_ADDR torchrun runs
#                --standalone (a private rendezvous on a free port).
#   MASTER_ADDR  rendezvous host (multi-node: required)      MASTER_PORT (default 29500)
#   RDZV_ID      rendezvous id shared by the nodes of one job (default moetrain)
#   RDZV_BACKEND c10d (default) assigns node ranks itself; "static" uses NODE_RANK
#   NODE_RANK    this node's rank, for RDZV_BACKEND=static only
#   TORCHRUN     the launcher command (default "torchrun"; e.g. "python -m torch.distributed.run")
set -euo pipefail

gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local ids
    IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    echo 0
  fi
}

NPROC="${NPROC:-$(gpu_count)}"
if [[ "$NPROC" -lt 1 ]]; then NPROC=1; fi
NNODES="${NNODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-moetrain}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
read -r -a LAUNCHER <<< "${TORCHRUN:-torchrun}"

args=(--nnodes="$NNODES" --nproc-per-node="$NPROC")
if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
  args+=(--standalone)
else
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (a host of the first node)" >&2
    exit 2
  fi
  args+=(--rdzv-backend="$RDZV_BACKEND" --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
         --rdzv-id="$RDZV_ID")
  if [[ "$RDZV_BACKEND" == static ]]; then
    args+=(--node-rank="${NODE_RANK:?RDZV_BACKEND=static needs NODE_RANK}")
  fi
fi

exec "${LAUNCHER[@]}" "${args[@]}" -m moetrain.train "$@"
