#!/usr/bin/env bash
# scripts/device_gpu_check.sh: ON the lent GPU machine, one command: a venv over the image's CUDA torch, the
# carried wheels (scripts/device_wheels.sh, run here first) and trace-ds itself, then scripts/gpu_check.sh,
# writing its results file straight into $OUT (section by section, so a run cut short still brings back what
# finished), with the logs beside it.
#
#   device tool: run(command="scripts/device_gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Not yet run on a GPU machine (none has been lent to this project so far): the first session with one should
# expect to fix a version here (the image's own packages are listed in .library/device/KINDS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
BASE="${DEVICE_BASE_PYTHON:-/opt/torch/.venv/bin/python3}"   # the image's Python with CUDA torch
VENV="${DEVICE_VENV:-/tmp/trace_ds_venv}"
WHEELS="${DEVICE_WHEELS:-.whl}"   # scripts/device_wheels.sh's folder
OUT="${OUT:-/tmp/device_out}"
mkdir -p "$OUT"
log() { printf '[%s] device_gpu_check: %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/setup.log"; }
[[ -x $BASE ]] || BASE="$(command -v python3)"
[[ -d $WHEELS ]] || { log "no $WHEELS/ here: run scripts/device_wheels.sh on the CPU machine and carry .whl"; exit 2; }
log "base python $BASE: $("$BASE" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1)"
"$BASE" -m venv --without-pip "$VENV" || exit 2
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The new venv sees the image's packages (CUDA torch first) through a .pth; the carried wheels go in front.
"$BASE" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$site/zz_image.pth"
"$BASE" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --no-compile "$WHEELS"/*.whl \
  >>"$OUT/setup.log" 2>&1 || { log "installing $WHEELS failed (see setup.log)"; exit 2; }
"$BASE" -m pip --python "$VENV/bin/python" install -q --no-index --no-deps --no-build-isolation -e . \
  >>"$OUT/setup.log" 2>&1 || { log "installing trace-ds failed (see setup.log)"; exit 2; }
log "venv ready: $("$VENV/bin/python" -c 'import deepspeed, transformers, trace_ds, torch; print("deepspeed", deepspeed.__version__, "transformers", transformers.__version__, "torch", torch.__version__)' 2>&1 | tail -n 1)"
VENV="$VENV" scripts/gpu_check.sh --out "$OUT/gpu_results.md" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
log "gpu_check.sh exit $rc; results in \$OUT/gpu_results.md (commit it as docs/gpu_results.md)"
exit "$rc"
