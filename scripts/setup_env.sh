#!/usr/bin/env bash
# Create or reuse the local virtual environment and install trace-ds into it (idempotent, quick when done).
# torch==2.13.0 is installed first when no torch is present, so nothing pulls a multi-GB CUDA build here;
# on a GPU cluster install your CUDA torch first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TRACE_DS_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0" >&2
  "${PIP[@]}" install --upgrade pip setuptools wheel
  "${PIP[@]}" install "torch==2.13.0"
fi

stamp="$VENV/.trace-ds-installed"
want="$(cat setup.cfg setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing trace-ds and its dependencies into $VENV" >&2
  "${PIP[@]}" install setuptools wheel
  # DeepSpeed builds against the installed torch: no build isolation, or pip would fetch another torch.
  "${PIP[@]}" install --no-build-isolation -e ".[test,real]"
  echo "$want" > "$stamp"
fi
