#!/usr/bin/env bash
# scripts/gpu_check.sh: one command that fills every GPU table of trace-ds, written to docs/gpu_results.md.
#
#   scripts/gpu_check.sh [--out FILE] [--budget S] [--section-timeout S] [--only a,b,...] [--keep-work]
#   scripts/gpu_check.sh --cpu-smoke [--out FILE] ...   # the same script end to end on tiny shapes, CPU only (CI)
#
# Sections (each in its own process under its own `timeout`; a failed one is recorded and the next one runs;
# they run in the order a, b, e, c, d, GPU measurements first, and the file lists them a to e):
#   a. kernel     kernels/bench_ghost_dot.py --short-sweep: the fused Triton ghost-dot kernel against the cuBLAS
#                 floor and the torch reference at Llama-8B layer shapes and the lm_head (4096 -> 128256),
#                 8192 and 16384 tokens, bf16 and fp32, then a short block-size sweep.
#   b. exactness  a random Llama of ~100M parameters scored by GhostScorer in fp32 and in bf16 (the Triton kernel
#                 on CUDA) against an fp64 per-pair autograd reference (tests/helpers.py): max error in cosine
#                 units, Spearman rank correlation and sign agreement.
#   c. scoring    `trace-ds bench scoring --arms floor,ghost` for --family llama and --family mixtral.
#   d. train      `trace-ds bench train --arms trace-ds,trl` on the GPU (DS_ACCELERATOR=cuda: both arms, fp32,
#                 torch AdamW, a live reference; tokens/s, step losses, peak CUDA memory per rank). The TRL arm is
#                 skipped, and the section says so, when `import trl` fails: trl is the optional `bench` extra.
#   e. memory     TRACE_DS_MEMORY_REPORT peaks of a short `trace-ds score` and `trace-ds train` next to
#                 `trace-ds plan` for the same settings (trace_ds/bench/memory.py compare_plan).
#
# The GPU machine this is sized for: one NVIDIA H200, 16 cores, no network, about 5 minutes of wall time in all.
# The per-section timeouts below add up to the default --budget of 285 s; every section's timeout is also
# capped by what is left of --budget, so a whole run ends within it (plus a few seconds of start-up).
#
# The results file is rewritten (temp file, then rename) after every section with all the sections finished so
# far, so a run cut off at any point leaves every finished section in it. Each section records its exact
# commands, wall time, the machine (GPU, driver, CUDA, torch/triton/deepspeed versions) and what it measured;
# a failed section says "failed" with the last lines of its error. Nothing is ever estimated or filled in.
# Exit status: 0 when every section finished (a skipped TRL arm counts as finished), 1 when one failed,
# 2 for a usage or set-up error, 128+N when interrupted by signal N.
#
# Environment and set-up (nothing here needs the network):
#   - Python: $VENV (default: the repo's .venv, made by scripts/setup_env.sh). On a GPU machine torch in that
#     venv MUST be a CUDA build (install it before scripts/setup_env.sh, which keeps an installed torch);
#     without --cpu-smoke the script stops at once if torch.cuda.is_available() is false.
#   - Offline: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE are set; every model is built here
#     with random weights and every data set is generated.
#   - No DeepSpeed op is built at run time. DS_BUILD_OPS=0 only affects installs, so what matters is what the
#     configs ask for: every DeepSpeed config used here (trace_ds.runtime.engine.cpu_ds_config, i.e. ds_configs/cpu.json
#     at a ZeRO stage, and the benchmarks' own) has no "optimizer" section, so trace-ds hands DeepSpeed its own
#     torch.optim.AdamW (engine.Strategy.prepare_train: "optimizer" passed as a client optimizer, with
#     zero_allow_untested_optimizer) and DeepSpeed never builds FusedAdam; none offloads (DeepSpeedCPUAdam) or
#     quantizes ZeRO++ weights (QuantizerBuilder). Never point a section at ds_configs/recipe_*.json: their
#     "optimizer" section builds FusedAdam (or CPUAdam with offload) on first use.
#   - CPU only (--cpu-smoke): DeepSpeed's CPU accelerator JIT-builds its
#     shared-memory allreduce op (deepspeed_shm_comm) when a process group starts; it is cached in
#     $VENV/torch_extensions (as scripts/test.sh does), so only the first use in a venv pays for it.
#
# Options:
#   --cpu-smoke          tiny shapes on the CPU (TRITON_INTERPRET=1, DS_ACCELERATOR=cpu, no CUDA device used);
#                        default --out runs/gpu_check_smoke/gpu_results.md
#   --out FILE           results file (default docs/gpu_results.md)
#   --budget S           wall-time budget of the sections together (default 285; --cpu-smoke 1500)
#   --section-timeout S  the same timeout for every section, overriding the defaults (also
#                        $GPU_CHECK_SECTION_TIMEOUT); still capped by --budget
#   --only LIST          run only these sections, by letter or name (e.g. --only a,b or --only kernel)
#   --keep-work          keep the scratch folder (models, logs, JSON reports) and print where it is
# Environment overrides for the benchmark sizes of sections c and d (both on the GPU):
#   GPU_CHECK_SCORING_ARGS="--layers 8 --hidden 2048 --vocab 32000 --tokens 512 ..."  (trace-ds bench scoring)
#   GPU_CHECK_TRAIN_ARGS="..."                                                          (trace-ds bench train)
set -euo pipefail

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
cd "$ROOT"

# Run order: the measurements the benchmarks' tables build on first (a, b, e), then the benchmarks (c, d), so that
# a run cut short loses the least. The file lists them a to e whatever the order.
SECTIONS=(kernel exactness memory scoring train)
declare -A LETTER=([kernel]=a [exactness]=b [scoring]=c [train]=d [memory]=e)
declare -A TITLE=(
  [kernel]="Kernel sweep: fused ghost-dot vs cuBLAS and the torch reference"
  [exactness]="Exactness: fp32 and bf16 ghost scores vs fp64 per-pair autograd"
  [scoring]="trace-ds bench scoring: floor and ghost arms, Llama and Mixtral"
  [train]="trace-ds bench train: trace-ds vs TRL"
  [memory]="Memory: measured peaks of trace-ds score and train vs trace-ds plan"
)
# GPU timeouts (s): 80 + 40 + 70 + 50 + 45 = 285 = the default budget.
declare -A GPU_TIMEOUT=([kernel]=80 [exactness]=40 [memory]=70 [scoring]=50 [train]=45)
SMOKE_TIMEOUT=300
MIN_SECTION_S=5

progress() { printf '[%s] gpu_check: %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
  printf 'gpu_check: error: %s\n' "$*" >&2
  exit 2
}

# Markdown line recording one command exactly as it is run (each argument shell-quoted where it needs it).
command_line() {
  local arg words=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  # shellcheck disable=SC2016  # the backquotes are Markdown
  printf -- '- command: `%s`\n' "${words[*]}"
}

# ------------------------------------------------------------------------------------------------ sections
# Each runs as `bash gpu_check.sh __section NAME` under `timeout`, in the repo root, with the environment the
# main script exported. It prints its Markdown (command lines first, then the figures) on stdout as it goes and
# its logs on stderr; a non-zero exit or a timeout marks it failed.

section_kernel() {
  local args=(--short-sweep)
  if [[ $GPU_CHECK_MODE == smoke ]]; then
    args=(--tiny --quick)  # TRITON_INTERPRET=1 is exported: the CPU path, torch reference vs matmul
  fi
  command_line "$PY" kernels/bench_ghost_dot.py "${args[@]}" --out "$WORK/kernel_report.md"
  echo
  # The benchmark prints each table row as soon as it is measured: a timeout keeps the rows done so far.
  "$PY" kernels/bench_ghost_dot.py "${args[@]}" --out "$WORK/kernel_report.md" | sed -u -e '/^wrote /d' -e 's/^## /### /'
}

section_exactness() {
  local args
  if [[ $GPU_CHECK_MODE == smoke ]]; then
    args=(--device cpu --kernel triton --layers 2 --hidden 32 --heads 4 --kv-heads 2 --intermediate 48
      --vocab 97 --pairs 8 --probe 4 --prompt-tokens 6 --response-tokens 6)
  else  # 12 x 6.3 M + 2 x 12.6 M (untied embeddings and lm_head) = 100.7 M parameters
    args=(--device cuda --kernel auto --layers 12 --hidden 768 --heads 12 --kv-heads 4 --intermediate 2048
      --vocab 16384 --pairs 16 --probe 4 --prompt-tokens 64 --response-tokens 64)
  fi
  command_line "$PY" - "${args[@]}"
  echo "  (the Python program is the heredoc of section_exactness in scripts/gpu_check.sh)"
  echo
  "$PY" - "${args[@]}" <<'PY'
"""fp32 and bf16 ghost scores of a random Llama against an fp64 per-pair autograd reference (tests/helpers.py)."""
import argparse
import copy
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.environ["GPU_CHECK_ROOT"])
from tests.helpers import cosine_errors, ghost_scores, reference_scores, score_config  # noqa: E402
from trace_ds.data.tokenize import TokenizedPair  # noqa: E402
from trace_ds.models.tiny import tiny_llama_config  # noqa: E402

p = argparse.ArgumentParser()
for name in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab", "pairs", "probe",
             "prompt-tokens", "response-tokens"):
    p.add_argument(f"--{name}", type=int, required=True)
p.add_argument("--device", required=True)
p.add_argument("--kernel", required=True)
args = p.parse_args()
device = torch.device(args.device)


def log(msg):
    print(f"exactness: {msg}", file=sys.stderr, flush=True)


def pairs_of(n, seed, prefix):
    """BOS + a random prompt, two random responses ending with EOS; each length +-25% of the given one."""
    rng = random.Random(seed)

    def ids(k):
        k = max(1, k + rng.randint(-k // 4, k // 4))
        return [rng.randrange(4, args.vocab) for _ in range(k)]

    return [
        TokenizedPair(f"{prefix}{i}", [1, *ids(args.prompt_tokens)], [*ids(args.response_tokens), 2],
                      [*ids(args.response_tokens), 2])
        for i in range(n)
    ]


def ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    for r, i in enumerate(order):
        out[i] = float(r)
    return torch.tensor(out, dtype=torch.float64)


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def sign_agreement(a, b):
    return sum((x > 0) == (y > 0) for x, y in zip(a, b)), len(a)


torch.manual_seed(0)
from transformers import LlamaForCausalLM  # noqa: E402

config = tiny_llama_config(
    args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
    num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
    max_position_embeddings=max(512, 2 * (args.prompt_tokens + args.response_tokens)),
)
model = LlamaForCausalLM(config)
with torch.no_grad():  # random norm weights, as tests/test_scoring.py: the RMSNorm path away from w = 1
    for name, param in model.named_parameters():
        if "norm" in name:
            param.uniform_(0.5, 1.5)
model = model.eval().to(device)
n_params = sum(p.numel() for p in model.parameters())
probe = pairs_of(args.probe, 10, "probe")
pairs = pairs_of(args.pairs, 11, "p")
categories = [("suppression", "inversion", "unlearning")[i % 3] for i in range(len(pairs))]
cfg = score_config(kernel=args.kernel, micro_batch=8)
log(f"model {n_params / 1e6:.1f} M parameters on {device}; fp64 reference")
t0 = time.perf_counter()
with torch.device(device):  # tests.helpers builds its inputs on the default device
    want, norms, g_norm = reference_scores(model, probe, pairs, categories, cfg)
t_ref = time.perf_counter() - t0
rows = []
results = {}
for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    net = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    log(f"ghost scores in {label}")
    t0 = time.perf_counter()
    got = ghost_scores(net, probe, pairs, categories, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    from trace_ds.scoring.scorer import resolve_kernel

    errors = cosine_errors(got, want, norms, g_norm)
    agree, total = sign_agreement(got, want)
    results[label] = got
    rows.append(
        f"| {label} | {resolve_kernel(args.kernel, device)} | {max(errors):.2e} | {sorted(errors)[len(errors) // 2]:.2e} "
        f"| {spearman(got, want):.4f} | {agree}/{total} | {seconds:.2f} |"
    )
    del net
cos_max = max(abs(w) / (n * g_norm) for w, n in zip(want, norms))
agree, total = sign_agreement(results["bf16"], results["fp32"])
tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else "n/a"
print(f"Model: random Llama (tiny_llama_config), {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
      f"({args.kv_heads} KV), intermediate {args.intermediate}, vocab {args.vocab} (untied), "
      f"{n_params:,} parameters ({n_params / 1e6:.1f} M), norm weights uniform in [0.5, 1.5]; device {device}.")
print(f"Pairs: {len(pairs)} scored (suppression, inversion, unlearning in turn), probe of {len(probe)}; prompts about "
      f"{args.prompt_tokens} tokens and responses about {args.response_tokens} (+-25%); micro-batch "
      f"{cfg.micro_batch}; IPO beta {cfg.beta}. TF32 matmul allowed: {tf32}.")
print(f"Reference: fp64 per-pair autograd (tests/helpers.py reference_scores) on {device}, {t_ref:.1f} s; "
      f"||G|| = {g_norm:.3e}; largest |cos(g_i, G)| among the pairs = {cos_max:.3e}.")
print("Error in cosine units: |s - s_ref| / (||g_i|| ||G||) per pair. The bf16 row scores the bf16-rounded "
      "model (its G in bf16 for the Triton kernel) against the reference of the fp32 weights.")
print()
print("| precision | kernel | max error (cosine units) | median error | Spearman vs fp64 ref | sign agreement vs fp64 ref | seconds (incl. probe, first-call compile) |")
print("|---|---|---|---|---|---|---|")
print("\n".join(rows))
print()
print(f"bf16 vs fp32 scores: Spearman rank correlation {spearman(results['bf16'], results['fp32']):.4f}, "
      f"sign agreement {agree}/{total}.")
PY
}

section_scoring() {
  local size
  if [[ $GPU_CHECK_MODE == smoke ]]; then
    size=(--layers 1 --hidden 64 --vocab 512 --pairs 4 --tokens 32 --batch 2 --probe 2 --threads 2)
  else
    # on the GPU (trace_ds/bench/scoring.py moves every arm to CUDA, the Triton kernel, CUDA's peak memory)
    read -r -a size <<<"${GPU_CHECK_SCORING_ARGS:---layers 4 --hidden 1024 --vocab 32000 --pairs 64 --tokens 512 --batch 16 --probe 16 --threads 16}"
  fi
  local family
  for family in llama mixtral; do
    local work="$WORK/bench_scoring_$family"
    echo "### --family $family"
    echo
    command_line "$TRACE_DS" bench scoring --family "$family" --arms floor,ghost "${size[@]}" \
      --workdir "$work" --out "$work.json"
    "$TRACE_DS" bench scoring --family "$family" --arms floor,ghost "${size[@]}" \
      --workdir "$work" --out "$work.json" >&2
    echo
    "$PY" - "$work.json" <<'PY'
import json
import sys

from trace_ds.bench.scoring import markdown_table

report = json.load(open(sys.argv[1]))
print(markdown_table(report))
print()
print(f"Probe gradient (shared by the arms): {report['probe_gradient_seconds']:.2f} s. "
      f"Settings: {json.dumps(report['settings'])}")
PY
    echo
  done
}

section_train() {
  local size
  if [[ $GPU_CHECK_MODE == smoke ]]; then
    size=(--layers 1 --hidden 64 --vocab 512 --pairs 4 --tokens 32 --micro-batch 2 --steps 2 --threads 2)
  else
    # on the GPU (bench train runs on DeepSpeed's cuda accelerator, DS_ACCELERATOR=cuda exported above):
    # 4 x 12.6 M + 2 x 32.8 M (untied embedding and lm_head) = 116 M parameters, fp32, a 32k vocabulary
    read -r -a size <<<"${GPU_CHECK_TRAIN_ARGS:---layers 4 --hidden 1024 --vocab 32000 --pairs 48 --tokens 512 --micro-batch 8 --steps 5 --threads 16}"
  fi
  local arms=trace-ds,trl why
  if ! why="$("$PY" -c 'import trl' 2>&1)"; then
    arms=trace-ds
    echo "**TRL arm skipped**: \`import trl\` raised \`$(printf '%s' "$why" | tail -n 1)\`. trl is the optional"
    echo "\`bench\` extra (\`pip install 'trace-ds[bench]'\`) and is not installed in this venv, so only the"
    echo "trace-ds arm ran and there is no trace-ds / TRL ratio."
    echo
  fi
  local work="$WORK/bench_train"
  command_line "$TRACE_DS" bench train --arms "$arms" --no-memory "${size[@]}" --workdir "$work" --out "$work.json"
  "$TRACE_DS" bench train --arms "$arms" --no-memory "${size[@]}" --workdir "$work" --out "$work.json" >&2
  echo
  "$PY" - "$work.json" <<'PY'
import json
import sys

from trace_ds.bench.train import markdown_tables

report = json.load(open(sys.argv[1]))
print(markdown_tables(report))
print()
print("Versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()) + ".")
PY
}

section_memory() {
  local args
  if [[ $GPU_CHECK_MODE == smoke ]]; then
    args=(--layers 2 --hidden 64 --vocab 512 --zero 3 --ranks 1 --micro-batch 4 --seq-len 32)
  else
    args=(--layers 8 --hidden 1024 --vocab 32000 --zero 3 --ranks 1 --micro-batch 4 --seq-len 512)
  fi
  command_line "$PY" - --workdir "$WORK/memory" "${args[@]}"
  echo "  (the Python program is the heredoc of section_memory in scripts/gpu_check.sh; it runs the commands below)"
  "$PY" - --workdir "$WORK/memory" "${args[@]}" <<'PY'
"""trace_ds.bench.memory.compare_plan (the `trace-ds bench memory` plan rows) on this machine's device.

compare_plan runs `trace-ds score` and `trace-ds train` with TRACE_DS_MEMORY_REPORT through the module's
launch(), which pins DS_ACCELERATOR=cpu (bench/memory.py); it is replaced here by one that leaves the accelerator
to this script (cuda on a GPU run), runs in this process group (so the section's timeout reaches it) and
records each command. The plan side is bench.memory.planned_mib: trace_ds.runtime.plan.plan(), what `trace-ds plan`
prints, for the same model, ranks, ZeRO stage, fp32, micro-batch and sequence length.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import trace_ds.bench.memory as bench_memory
from trace_ds.io import TraceError, trace_ds_command
from trace_ds.models.tiny import build_tiny_llama

p = argparse.ArgumentParser()
p.add_argument("--workdir", required=True)
for name in ("layers", "hidden", "vocab", "zero", "ranks", "micro-batch", "seq-len"):
    p.add_argument(f"--{name}", type=int, required=True)
args = p.parse_args()
workdir = Path(args.workdir)
cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
commands = []


def launch(argv, ranks, env, log, timeout_s=900):
    command = trace_ds_command(ranks, *argv)
    full_env = {**os.environ, **(bench_memory.MALLOC_ENV if cpu else {}), **env}
    commands.append(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command))
    print(f"memory: {commands[-1]}", file=sys.stderr, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.run(command, env=full_env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise TraceError(f"{' '.join(argv[:2])} exited with {proc.returncode}; log: {log}\n{tail}")


bench_memory.launch = launch
heads = max(args.hidden // 64, 1)
model_dir = workdir / "model"
build_tiny_llama(  # the model `trace-ds bench memory` builds, at this depth and width
    model_dir, args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
    num_kv_heads=heads, intermediate_size=3 * args.hidden, seed=0,
)
rows = bench_memory.compare_plan(
    str(model_dir), workdir / "run", args.zero, args.ranks, args.micro_batch, args.seq_len
)
kinds = {json.loads(line)["memory"] for line in (workdir / "run" / "memory.jsonl").read_text().splitlines()}
for c in commands:
    print(f"- command: `{c.strip()}`")
plan_cmd = (f"trace-ds plan --model {shlex.quote(str(model_dir))} --ranks {args.ranks} --zero {args.zero} "
            f"--micro-batch {args.micro_batch} --seq-len {args.seq_len} --dtype float32")
print(f"- plan: `{plan_cmd}` (the same numbers, from bench.memory.planned_mib)")
print()
print(f"Model: random Llama, {args.layers} layers, hidden {args.hidden}, {heads} heads, intermediate "
      f"{3 * args.hidden}, vocab {args.vocab} (untied), fp32, {bench_memory.checkpoint_mib(model_dir):.0f} MiB "
      f"of safetensors. ZeRO-{args.zero}, {args.ranks} rank(s) ({'CPU' if cpu else 'CUDA'}), micro-batch "
      f"{args.micro_batch} pairs of exactly {args.seq_len} tokens per sequence; score with a probe of "
      f"{args.micro_batch * args.ranks}, train 2 optimizer steps with alpha_kl 1 (a live reference).")
print(f"Measured: {', '.join(sorted(kinds))} (peak growth per rank over the stage's baseline; the larger rank).")
print()
print(bench_memory.markdown_tables({"load": [], "plan": rows}))
PY
}

# ------------------------------------------------------------------------------------------------ internal

if [[ ${1:-} == __section ]]; then
  "section_$2"
  exit 0
fi

# ------------------------------------------------------------------------------------------------ options

MODE=gpu
OUT=""
BUDGET=""
SECTION_TIMEOUT="${GPU_CHECK_SECTION_TIMEOUT:-}"
ONLY=""
KEEP_WORK=0
INVOCATION="scripts/gpu_check.sh${*:+ $*}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) MODE=smoke ;;
    --out) OUT="${2:?--out needs a file}"; shift ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --section-timeout) SECTION_TIMEOUT="${2:?--section-timeout needs seconds}"; shift ;;
    --only) ONLY="${2:?--only needs a list}"; shift ;;
    --keep-work) KEEP_WORK=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$SCRIPT" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[[ -z $BUDGET || $BUDGET =~ ^[0-9]+$ ]] || die "--budget: whole seconds, got $BUDGET"
[[ -z $SECTION_TIMEOUT || $SECTION_TIMEOUT =~ ^[0-9]+$ ]] || die "--section-timeout: whole seconds, got $SECTION_TIMEOUT"
if [[ $MODE == smoke ]]; then
  OUT="${OUT:-runs/gpu_check_smoke/gpu_results.md}"
  BUDGET="${BUDGET:-1500}"
else
  OUT="${OUT:-docs/gpu_results.md}"
  BUDGET="${BUDGET:-285}"
fi
SELECTED=()
for id in "${SECTIONS[@]}"; do
  if [[ -z $ONLY || ",$ONLY," == *",$id,"* || ",$ONLY," == *",${LETTER[$id]},"* ]]; then
    SELECTED+=("$id")
  fi
done
[[ ${#SELECTED[@]} -gt 0 ]] || die "--only $ONLY selects no section (choose from a-e or ${SECTIONS[*]})"

# ------------------------------------------------------------------------------------------------ environment

VENV="${VENV:-$ROOT/.venv}"
# resolved into its own variable: on failure the message still names the folder that was asked for
venv_abs="$(cd "$VENV" 2>/dev/null && pwd)" || die "no virtual environment at ${VENV}: run scripts/setup_env.sh (or set VENV)"
VENV="$venv_abs"
PY="$VENV/bin/python"
TRACE_DS="$VENV/bin/trace-ds"
[[ -x $PY && -x $TRACE_DS ]] || die "$VENV has no python or trace-ds: run scripts/setup_env.sh (or set VENV)"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
# one machine, each launch on its own: never join a process group of an enclosing job (SLURM, a test runner)
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
if [[ $MODE == smoke ]]; then
  export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
else
  unset TRITON_INTERPRET  # the benchmark times the compiled kernel
  export DS_ACCELERATOR=cuda
  if ! cuda_check="$("$PY" -c 'import torch, sys
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, torch.cuda.is_available() = {ok}")
sys.exit(0 if ok else 1)' 2>&1)"; then
    die "no CUDA device for torch in $VENV ($(printf '%s' "$cuda_check" | tail -n 1)). On a GPU machine install a CUDA build of torch into the venv; to check the script on a CPU, run it with --cpu-smoke."
  fi
fi

mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$WORK/done"
export GPU_CHECK_MODE="$MODE" GPU_CHECK_ROOT="$ROOT" WORK PY TRACE_DS
CHILD=""
CURRENT=""
STATE="running"
# The handlers below act in this shell only. A subshell forked for a command substitution that the signal
# reaches before it has reset the inherited traps would otherwise run them too: its exit would delete $WORK
# (the finished sections) before this shell writes the results file. That is the likely cause of an
# interrupted run's file seen once in CI without the section that had finished (not reproduced here).
MAIN_PID=$$

cleanup() {
  [[ $BASHPID == "$MAIN_PID" ]] || return 0
  if [[ $KEEP_WORK == 1 ]]; then
    progress "scratch folder kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------ the file

STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
START_S="$(date +%s)"
DEADLINE=$((START_S + BUDGET))
COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  COMMIT="$COMMIT, with uncommitted changes"
fi

MACHINE="$("$PY" - <<'PY' 2>/dev/null || echo "unknown (the machine probe failed)"
import importlib.metadata as md
import os
import platform
import subprocess

import torch


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()[0]
    except Exception as err:  # no nvidia-smi in the image: say so rather than guess
        driver = f"unknown ({type(err).__name__})"
    gpu = (f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
           f"{props.multi_processor_count} SMs) x {torch.cuda.device_count()}, driver {driver}, "
           f"CUDA {torch.version.cuda} (torch's)")
else:
    gpu = "none (CPU smoke run)"
cpu = platform.processor() or platform.machine()
try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
except (OSError, StopIteration):
    pass
print(f"GPU: {gpu}; CPU: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}, "
      f"torch {torch.__version__}, triton {version('triton')}, deepspeed {version('deepspeed')}, "
      f"transformers {version('transformers')}")
PY
)"

render() {
  local tmp done_files
  tmp="$OUT.tmp.$$"
  done_files=("$WORK"/done/*.md)
  {
    echo "# GPU results"
    echo
    echo "Written by \`scripts/gpu_check.sh\`, one section at a time as each finishes (one command on a GPU machine,"
    echo "about 5 minutes). Every figure below was measured by the command shown in its section, in the run"
    echo "described here; nothing is estimated or copied from elsewhere."
    echo
    if [[ $MODE == smoke ]]; then
      echo "**CPU smoke run** (\`--cpu-smoke\`): tiny shapes on the CPU, to check that the script works end to end."
      echo "Its figures measure nothing of interest."
      echo
    fi
    echo "- run: \`$INVOCATION\`, started $STARTED"
    echo "- commit: $COMMIT"
    echo "- machine: $MACHINE"
    echo "- state: $STATE"
    echo
    if [[ -e ${done_files[0]} ]]; then
      cat "${done_files[@]}"
    fi
  } >"$tmp"
  mv -f "$tmp" "$OUT"
}

on_signal() {
  local name=$1 number=$2
  [[ $BASHPID == "$MAIN_PID" ]] || exit $((128 + number))
  trap - TERM INT HUP
  if [[ -n $CHILD ]]; then
    kill -TERM "$CHILD" 2>/dev/null || true  # timeout passes it on to the section's whole process group
    wait "$CHILD" 2>/dev/null || true
  fi
  STATE="interrupted by SIG$name${CURRENT:+ while section ${LETTER[$CURRENT]} ($CURRENT) ran}; the sections above had finished"
  render || true
  progress "interrupted by SIG$name; the finished sections are in $OUT"
  exit $((128 + number))
}
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
trap 'on_signal HUP 1' HUP

FAILED=()
FINISHED=()

run_section() {
  local id=$1
  local letter=${LETTER[$id]} limit remaining
  if [[ -n $SECTION_TIMEOUT ]]; then
    limit=$SECTION_TIMEOUT
  elif [[ $MODE == smoke ]]; then
    limit=$SMOKE_TIMEOUT
  else
    limit=${GPU_TIMEOUT[$id]}
  fi
  remaining=$((DEADLINE - $(date +%s)))
  local block="$WORK/done/$letter-$id.md" md="$WORK/$id.md" log="$WORK/$id.log"
  {
    echo "## $letter. ${TITLE[$id]}"
    echo
  } >"$block.tmp"
  if ((remaining < MIN_SECTION_S)); then
    {
      echo "- status: failed: not run, ${remaining} s of the run's ${BUDGET} s budget (--budget) were left"
      echo "- machine: $MACHINE"
      echo
    } >>"$block.tmp"
    mv -f "$block.tmp" "$block"
    FAILED+=("$letter")
    render
    progress "section $letter ($id) not run: the budget is used up"
    return
  fi
  ((remaining < limit)) && limit=$remaining
  progress "section $letter ($id) started, timeout ${limit} s"
  CURRENT=$id
  STATE="running section $letter ($id)"
  local t0 t1 rc=0 status wall
  t0="$(date +%s.%N)"
  timeout -k 5 "$limit" bash "$SCRIPT" __section "$id" >"$md" 2>"$log" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  t1="$(date +%s.%N)"
  wall="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
  if ((rc == 0)); then
    status="ok"
    FINISHED+=("$letter")
  elif ((rc == 124 || rc == 137)); then
    status="failed: timed out after ${limit} s (what it printed before is below)"
    FAILED+=("$letter")
  else
    status="failed (exit $rc)"
    FAILED+=("$letter")
  fi
  {
    echo "- status: $status"
    echo "- wall time: $wall s (section timeout $limit s)"
    echo "- machine: $MACHINE"
    echo
    cat "$md"
    echo
    if ((rc != 0)); then
      if [[ -s $log ]]; then
        echo "Last lines of the error (the section's stderr):"
        echo
        echo '```text'
        tail -n 30 "$log"
        echo '```'
      else
        echo "The section wrote nothing to stderr."
      fi
      echo
    fi
  } >>"$block.tmp"
  mv -f "$block.tmp" "$block"
  CURRENT=""
  STATE="running: ${#FINISHED[@]} section(s) finished, ${#FAILED[@]} failed so far"
  render
  progress "section $letter ($id): $status, ${wall} s; wrote $OUT"
  if ((rc != 0)); then
    tail -n 15 "$log" | sed 's/^/    /' || true
  fi
}

progress "mode $MODE, ${#SELECTED[@]} section(s): ${SELECTED[*]}; budget ${BUDGET} s; results: $OUT"
progress "machine: $MACHINE"
render
for id in "${SELECTED[@]}"; do
  run_section "$id"
done
total=$(($(date +%s) - START_S))
if ((${#FAILED[@]} == 0)); then
  STATE="finished: all ${#SELECTED[@]} section(s) ok in $total s"
else
  STATE="finished in $total s; failed: ${FAILED[*]}"
fi
render
progress "$STATE; results: $OUT"
((${#FAILED[@]} == 0))
