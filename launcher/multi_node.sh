#!/usr/bin/env bash
# Several nodes through the deepspeed launcher (pdsh/ssh to every host in the hostfile). Run on the first
# node; trace-ds, the data and the model must be at the same paths on every node (shared filesystem).
#   HOSTFILE=launcher/hostfile.example MASTER_ADDR=node-1 launcher/multi_node.sh score --model ... --deepspeed ds_configs/zero3.json --dtype bfloat16
set -euo pipefail
VENV="${TRACE_DS_VENV:-$(dirname "$0")/../.venv}"
: "${HOSTFILE:?set HOSTFILE (see launcher/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first host of the hostfile}"
exec "$VENV/bin/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  "$VENV/bin/trace-ds" "$@"
