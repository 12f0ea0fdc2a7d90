#!/usr/bin/env bash
# scripts/device_wheels.sh: on this (CPU) machine, put into .whl/ the wheels that a lent GPU machine lacks
# for scripts/device_gpu_check.sh. Its image (.library/device/KINDS.md) has CUDA torch, triton, transformers,
# accelerate, peft, sentencepiece, safetensors, rich, click, matplotlib and pyyaml, but no deepspeed,
# datasets or trl, and no network. The versions are the ones CI tests with (this repo's .venv).
#
#   scripts/device_wheels.sh [--python-version 3.12] [--dest .whl]   # 3.12: the GPU image's Python (KINDS.md)
#
# .whl/ is git-ignored; name it in the device call's `carry`. About 20 MB. trl is the optional `bench` extra:
# when this venv has none, $TRL_VERSION (default 1.16.0) is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) PYVER="${2:?--python-version needs a version}"; shift ;;
    --dest) DEST="${2:?--dest needs a folder}"; shift ;;
    *) echo "device_wheels: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY="${VENV:-.venv}/bin/python"
[[ -x $PY ]] || { echo "device_wheels: no python in ${VENV:-.venv}: run scripts/setup_env.sh first" >&2; exit 2; }
version() {
  "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null ||
    { [[ $1 == trl ]] && echo "${TRL_VERSION:-1.16.0}"; }
}
rm -rf "$DEST" && mkdir -p "$DEST"
# DeepSpeed publishes only a source archive: build a pure-Python wheel of it with no op compiled (DS_BUILD_OPS=0;
# the GPU check builds none at run time either).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$(version deepspeed)" -w "$DEST"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for name in transformers datasets trl hjson pydantic pydantic_core annotated-types typing-inspection dill \
  multiprocess; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$DEST" "$name==$(version "$name")"
done
ls -1 "$DEST"
du -sh "$DEST"
