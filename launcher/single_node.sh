#!/usr/bin/env bash
# One node, N GPUs (or N CPU ranks with DS_ACCELERATOR=cpu), through the deepspeed launcher.
#   NUM_GPUS=8 launcher/single_node.sh train --model meta-llama/Llama-3.1-8B-Instruct \
#       --triaged runs/triaged.jsonl --scores runs/scores.jsonl --out runs/train \
#       --deepspeed ds_configs/zero3.json --dtype bfloat16
set -euo pipefail
VENV="${TRACE_DS_VENV:-$(dirname "$0")/../.venv}"
exec "$VENV/bin/deepspeed" --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" \
  "$VENV/bin/trace-ds" "$@"
