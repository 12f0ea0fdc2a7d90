#!/usr/bin/env bash
# The README's main command: set up, then run the built-in default job (trace-ds demo).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(.venv/bin/python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "${TRACE_DS_VENV:-.venv}" && pwd)/torch_extensions}"  # DeepSpeed ops, per venv
exec "${TRACE_DS_VENV:-.venv}/bin/trace-ds" demo "$@"
