#!/usr/bin/env bash
# torchrun, one call per node (or under SLURM, see slurm.sbatch). Every rank runs `python -m trace_ds.cli`.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-1 NPROC_PER_NODE=8 launcher/torchrun.sh train ... --deepspeed ds_configs/zero3.json
set -euo pipefail
VENV="${TRACE_DS_VENV:-$(dirname "$0")/../.venv}"
exec "$VENV/bin/torchrun" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${NPROC_PER_NODE:-8}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m trace_ds.cli "$@"
