#!/usr/bin/env bash
# The README's test command: set up, lint, then run the whole suite (slow and distributed tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
VENV="${TRACE_DS_VENV:-.venv}"
"$VENV/bin/ruff" check trace_ds kernels tests
export TRITON_INTERPRET=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec "$VENV/bin/python" -m pytest "$@"
