#!/usr/bin/env bash
# The README's test command: set up, lint, then run the whole suite (slow and distributed tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
VENV="${TRACE_DS_VENV:-.venv}"
"$VENV/bin/ruff" check trace_ds kernels tests
export TRITON_INTERPRET=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed's JIT ops built against this venv's torch, kept beside it: a shared ~/.cache/torch_extensions is
# rebuilt (40-80 s per launch) whenever another checkout or venv used it last
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}"
exec "$VENV/bin/python" -m pytest "$@"
