#!/usr/bin/env bash
# Create or reuse the local virtual environment and install trace-ds into it (idempotent, quick when done).
#
# Every package is installed at the version CI last passed with (constraints.txt), so a fresh machine gets what
# was tested, whatever PyPI serves today. TRACE_DS_LATEST=1 installs the newest versions setup.cfg allows
# instead (into its own venv, .venv-latest, unless TRACE_DS_VENV says otherwise): docs/testing.md.
#
# torch is installed first when no torch is present, so nothing pulls a multi-GB CUDA build here; on a GPU
# cluster install your CUDA torch first and this script keeps it (torch and triton are then left out of the
# constraints: your torch decides its triton).
set -euo pipefail
cd "$(dirname "$0")/.."
LATEST="${TRACE_DS_LATEST:-0}"
source scripts/venv_path.sh
PYTHON="${PYTHON:-python3}"
CONSTRAINTS=constraints.txt
pinned() { sed -n "s/^$1==\([^ ]*\).*/\1/p" "$CONSTRAINTS"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  torch_version="$(pinned torch)"
  echo "setup: installing torch==$torch_version" >&2
  if [ "$LATEST" = 1 ]; then
    "${PIP[@]}" install --upgrade pip setuptools wheel
  else
    "${PIP[@]}" install -c "$CONSTRAINTS" pip setuptools wheel
  fi
  "${PIP[@]}" install "torch==$torch_version"
fi

# the constraints as this venv takes them: without torch and triton when its torch is not the pinned one
constraint_args=()
if [ "$LATEST" != 1 ]; then
  effective="$VENV/.trace-ds-constraints.txt"
  have_torch="$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")"
  if [ "$have_torch" = "$(pinned torch)" ]; then
    cp "$CONSTRAINTS" "$effective"
  else
    echo "setup: keeping this venv's torch $have_torch (constraints.txt pins $(pinned torch)): torch and triton unpinned" >&2
    grep -v -E '^(torch|triton)==' "$CONSTRAINTS" > "$effective"
  fi
  constraint_args=(-c "$effective")
fi

stamp="$VENV/.trace-ds-installed"
want="$(cat setup.cfg setup.py pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)-latest=$LATEST"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing trace-ds and its dependencies into $VENV" >&2
  "${PIP[@]}" install "${constraint_args[@]}" setuptools wheel
  # DeepSpeed builds against the installed torch: no build isolation, or pip would fetch another torch.
  if [ "$LATEST" = 1 ]; then
    "${PIP[@]}" install --upgrade --upgrade-strategy eager --no-build-isolation -e ".[test,real]"
  else
    "${PIP[@]}" install "${constraint_args[@]}" --no-build-isolation -e ".[test,real]"
  fi
  echo "$want" > "$stamp"
fi
