"""Benchmark the fused ghost dot-product kernel at Llama-8B linear-layer shapes.

    python kernels/bench_ghost_dot.py [--quick] [--sweep] [--short-sweep] [--tiny] [--out FILE.md]

On CUDA it times (CUDA events, warm-up, median) the Triton kernel, the cuBLAS floor ``a @ g.T`` alone (same
shapes and dtype: the kernel does this matmul plus a fused epilogue, so cuBLAS time is the bar) and the plain-torch
reference, and checks accuracy against an fp64 reference on a token subset. Without CUDA it times only the torch
reference against a plain matmul at reduced shapes: the Triton interpreter is a correctness tool, not a
performance measure. Every number printed is measured in this run.

``--short-sweep`` is the whole measurement sized for a short GPU session (scripts/gpu_check.sh): every shape and
both token counts, at most 3 timed repetitions and 0.5 s per measurement, then the block-size sweep with its
first 3 configurations per dtype. ``--tiny`` swaps in tiny shapes (1/64 of the widths, 256 tokens): a
seconds-long smoke run, e.g. on the CPU with TRITON_INTERPRET=1 (``gpu_check.sh --cpu-smoke``).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

try:
    from trace_ds.kernels.ghost_dot import HAS_TRITON, ghost_dot_torch, ghost_dot_triton, kernels_interpreted
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ghost_dot import HAS_TRITON, ghost_dot_torch, ghost_dot_triton, kernels_interpreted  # type: ignore

# (d_in, d_out) of Llama-3.1-8B's linear layers: q/o proj, k/v proj, gate/up proj, down proj, and lm_head
# (hidden 4096 -> the Llama 3 vocabulary of 128256).
LLAMA8B_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 128256)]
GPU_TOKENS = [8192, 16384]
# the same aspect ratios at 1/8 the width (CPU), 1/64 (--tiny)
CPU_SHAPES = [(512, 512), (512, 128), (512, 1792), (1792, 512), (512, 16032)]
CPU_TOKENS = [1024, 2048]
TINY_SHAPES = [(64, 64), (64, 16), (64, 224), (224, 64), (64, 2004)]
TINY_TOKENS = [256]
SHORT_REPS, SHORT_BUDGET_S, SHORT_SWEEP_CONFIGS = 3, 0.5, 3  # --short-sweep
ERR_TOKENS = 2048  # accuracy is checked on the segments inside the first ~ERR_TOKENS tokens
MEAN_SEGMENT = 512  # tokens per pair, roughly a prompt plus two responses

SWEEP_CONFIGS = {
    torch.bfloat16: [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
    ],
    torch.float32: [
        (64, 64, 32, 4, 3),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 128, 16, 8, 2),
        (32, 64, 32, 4, 3),
    ],
}


def _offsets(n_tok: int, gen: torch.Generator) -> torch.Tensor:
    """Ragged segments of 0..2*MEAN_SEGMENT tokens (some empty), covering exactly n_tok tokens."""
    lengths: list[int] = []
    total = 0
    while total < n_tok:
        n = int(torch.randint(0, 2 * MEAN_SEGMENT + 1, (1,), generator=gen)) if len(lengths) % 7 else 0
        n = min(n, n_tok - total)
        lengths.append(n)
        total += n
    return torch.cumsum(torch.tensor([0, *lengths]), 0)


def _fp64_reference(a: torch.Tensor, d: torch.Tensor, g: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    g64 = g.double()
    per_tok = torch.cat(
        [
            ((a[s : s + 1024].double() @ g64.T) * d[s : s + 1024].double()).sum(1)
            for s in range(0, a.shape[0], 1024)
        ]
    )
    csum = torch.cat([per_tok.new_zeros(1), per_tok.cumsum(0)])
    return csum[off[1:]] - csum[off[:-1]]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max_p |s_p - ref_p| / max_p |ref_p| (random inputs make per-segment ratios meaningless near zero)."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def _subset(
    a: torch.Tensor, d: torch.Tensor, off: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The segments lying inside the first ERR_TOKENS tokens (at least one segment)."""
    k = max(1, int((off <= ERR_TOKENS).sum().item()) - 1)
    n = int(off[k])
    return a[:n], d[:n], off[: k + 1]


def _time_cuda(fn: Callable[[], object], reps: int, budget_s: float) -> float:
    """Median ms over up to `reps` CUDA-event timed runs after warm-up; fewer reps when one run is slow."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = max(3, min(reps, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _time_cpu(fn: Callable[[], object], reps: int, budget_s: float) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    reps = max(3, min(reps, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _tflops(n_tok: int, d_in: int, d_out: int, ms: float) -> float:
    return 2.0 * n_tok * d_in * d_out / (ms * 1e-3) / 1e12


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _environment_lines(on_cuda: bool) -> list[str]:
    cmd = " ".join(shlex.quote(x) for x in [Path(sys.executable).name, *sys.argv])
    lines = [f"- command: `{cmd}`", f"- torch {torch.__version__}"]
    if HAS_TRITON:
        import triton

        lines.append(f"- triton {triton.__version__} (interpreted: {kernels_interpreted()})")
    else:
        lines.append("- triton: not importable")
    if on_cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"- GPU: {torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs), CUDA {torch.version.cuda}"
        )
        lines.append(
            f"- fp32 matmul precision: {torch.get_float32_matmul_precision()} (IEEE fp32 for cuBLAS and the torch reference)"
        )
    else:
        lines.append(
            f"- CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        )
    return lines


def _emit(lines: list[str], *new: str) -> None:
    """Append to the report and print at once, so a long run shows progress."""
    lines.extend(new)
    print("\n".join(new), flush=True)


def _inputs(
    n_tok: int, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random a, d, g (g scaled so G a_t is O(1)) and ragged offsets."""
    gen = torch.Generator(device=device).manual_seed(n_tok * 31 + d_in * 7 + d_out)
    off = _offsets(n_tok, torch.Generator().manual_seed(n_tok + d_in + d_out)).to(device)
    a = torch.randn(n_tok, d_in, device=device, generator=gen).to(dtype)
    d = torch.randn(n_tok, d_out, device=device, generator=gen).to(dtype)
    g = (torch.randn(d_out, d_in, device=device, generator=gen) / d_in**0.5).to(dtype)
    return a, d, g, off


def _cuda_row(dtype: torch.dtype, d_in: int, d_out: int, n_tok: int, reps: int, budget_s: float = 2.0) -> str:
    a, d, g, off = _inputs(n_tok, d_in, d_out, dtype, torch.device("cuda"))
    t_tri = _time_cuda(partial(ghost_dot_triton, a, d, g, off, check_offsets=False), reps, budget_s)
    t_mm = _time_cuda(partial(torch.matmul, a, g.T), reps, budget_s)
    t_ref = _time_cuda(partial(ghost_dot_torch, a, d, g, off, check_offsets=False), reps, budget_s)
    sa, sd, soff = _subset(a, d, off)
    ref = _fp64_reference(sa, sd, g, soff)
    err_tri = _rel_err(ghost_dot_triton(sa, sd, g, soff), ref)
    err_ref = _rel_err(ghost_dot_torch(sa, sd, g, soff), ref)
    return (
        f"| {_dtype_name(dtype)} | {d_in} | {d_out} | {n_tok} | {t_tri:.3f} "
        f"| {_tflops(n_tok, d_in, d_out, t_tri):.1f} | {t_mm:.3f} | {_tflops(n_tok, d_in, d_out, t_mm):.1f} "
        f"| {t_ref:.3f} | {t_tri / t_mm:.2f} | {t_ref / t_tri:.2f} | {err_tri:.1e} | {err_ref:.1e} |"
    )


def _shapes_tokens(args: argparse.Namespace, on_cuda: bool) -> tuple[list[tuple[int, int]], list[int]]:
    if args.tiny:
        return TINY_SHAPES, TINY_TOKENS
    shapes, tokens = (LLAMA8B_SHAPES, GPU_TOKENS) if on_cuda else (CPU_SHAPES, CPU_TOKENS)
    return shapes, tokens[:1] if args.quick else tokens


def _bench_cuda(args: argparse.Namespace, lines: list[str]) -> None:
    shapes, tokens = _shapes_tokens(args, on_cuda=True)
    reps = SHORT_REPS if args.short_sweep else 5 if args.quick else args.reps
    budget_s = SHORT_BUDGET_S if args.short_sweep else 2.0
    _emit(
        lines,
        "| dtype | d_in | d_out | tokens | triton ms | triton TFLOP/s | cuBLAS a@g.T ms | cuBLAS TFLOP/s "
        "| torch-ref ms | triton / cuBLAS | torch-ref / triton | rel err triton | rel err torch-ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    )
    for dtype in (torch.bfloat16, torch.float32):
        for d_in, d_out in shapes:
            for n_tok in tokens:
                _emit(lines, _cuda_row(dtype, d_in, d_out, n_tok, reps, budget_s))
                torch.cuda.empty_cache()


def _sweep_row(
    dtype: torch.dtype,
    cfg: tuple[int, int, int, int, int],
    inputs: tuple[torch.Tensor, ...],
    reps: int = 5,
    budget_s: float = 1.0,
) -> str:
    n_tok, d_in = inputs[0].shape
    d_out = inputs[1].shape[1]
    bt, bo, bk, warps, stages = cfg
    kw = {"block_t": bt, "block_o": bo, "block_k": bk, "num_warps": warps, "num_stages": stages}
    try:
        ms = _time_cuda(partial(ghost_dot_triton, *inputs, check_offsets=False, **kw), reps, budget_s)
        result = f"{ms:.3f} | {_tflops(n_tok, d_in, d_out, ms):.1f}"
    except Exception as exc:  # e.g. triton OutOfResources (shared memory): report it and go on
        result = f"failed: {type(exc).__name__} | -"
    return f"| {_dtype_name(dtype)} | {bt} | {bo} | {bk} | {warps} | {stages} | {result} |"


def _bench_sweep(lines: list[str], short: bool = False, tiny: bool = False) -> None:
    """Time a few launch configs on the up-projection shape (the largest) to tune the defaults; ``short``: the
    first SHORT_SWEEP_CONFIGS of each dtype, briefly; ``tiny``: at the --tiny up-projection shape."""
    n_tok, d_in, d_out = (TINY_TOKENS[0], *TINY_SHAPES[2]) if tiny else (8192, 4096, 14336)
    reps, budget_s = (SHORT_REPS, SHORT_BUDGET_S) if short else (5, 1.0)
    _emit(
        lines,
        "",
        f"Block-size sweep at tokens={n_tok}, d_in={d_in}, d_out={d_out} (first row of each dtype = default):",
        "",
        "| dtype | BLOCK_T | BLOCK_O | BLOCK_K | warps | stages | ms | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    )
    for dtype, configs in SWEEP_CONFIGS.items():
        inputs = _inputs(n_tok, d_in, d_out, dtype, torch.device("cuda"))
        for cfg in configs[:SHORT_SWEEP_CONFIGS] if short else configs:
            _emit(lines, _sweep_row(dtype, cfg, inputs, reps, budget_s))
        del inputs
        torch.cuda.empty_cache()


def _cpu_row(dtype: torch.dtype, d_in: int, d_out: int, n_tok: int, reps: int) -> str:
    a, d, g, off = _inputs(n_tok, d_in, d_out, dtype, torch.device("cpu"))
    t_ref = _time_cpu(partial(ghost_dot_torch, a, d, g, off, check_offsets=False), reps, 2.0)
    t_mm = _time_cpu(partial(torch.matmul, a, g.T), reps, 2.0)
    sa, sd, soff = _subset(a, d, off)
    err = _rel_err(ghost_dot_torch(sa, sd, g, soff), _fp64_reference(sa, sd, g, soff))
    gflops = _tflops(n_tok, d_in, d_out, t_mm) * 1e3
    return (
        f"| {_dtype_name(dtype)} | {d_in} | {d_out} | {n_tok} | {t_ref:.2f} | {t_mm:.2f} "
        f"| {gflops:.1f} | {t_ref / t_mm:.2f} | {err:.1e} |"
    )


def _bench_cpu(args: argparse.Namespace, lines: list[str]) -> None:
    shapes, tokens = _shapes_tokens(args, on_cuda=False)
    reps = 3 if args.quick or args.short_sweep else 5
    _emit(
        lines,
        "**Triton kernel NOT timed: no CUDA device.** The Triton interpreter (TRITON_INTERPRET=1) is a correctness "
        "tool, not a performance measure. This table times the plain-torch reference against a plain matmul "
        f"at reduced shapes (Llama-8B aspect ratios, 1/{64 if args.tiny else 8} the width).",
        "",
        "| dtype | d_in | d_out | tokens | torch-ref ms | matmul a@g.T ms | matmul GFLOP/s | torch-ref / matmul "
        "| rel err torch-ref |",
        "|---|---|---|---|---|---|---|---|---|",
    )
    for dtype in (torch.bfloat16, torch.float32):
        for d_in, d_out in shapes:
            for n_tok in tokens:
                _emit(lines, _cpu_row(dtype, d_in, d_out, n_tok, reps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one token count and fewer repetitions")
    parser.add_argument("--sweep", action="store_true", help="CUDA only: also time a few block-size configs")
    parser.add_argument(
        "--short-sweep",
        action="store_true",
        help="every shape and token count with at most 3 reps and 0.5 s per measurement, then (CUDA) the "
        "block-size sweep with 3 configs per dtype: a full pass sized for a short GPU session",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes (1/64 the width, 256 tokens): a smoke run"
    )
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (median)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)

    on_cuda = torch.cuda.is_available()
    if on_cuda and not HAS_TRITON:
        print("triton is not importable: cannot time the kernel", file=sys.stderr)
        return 1
    if on_cuda and kernels_interpreted():
        print("TRITON_INTERPRET=1 is set: unset it to time the compiled kernel", file=sys.stderr)
        return 1
    if on_cuda:
        torch.set_float32_matmul_precision("highest")  # IEEE fp32 everywhere: cuBLAS floor, torch reference
    t_start = time.perf_counter()
    lines: list[str] = []
    title = "## Ghost dot-product kernel benchmark" + ("" if on_cuda else " (CPU, torch reference only)")
    _emit(lines, title, "", *_environment_lines(on_cuda), "")
    if on_cuda:
        _bench_cuda(args, lines)
    else:
        _bench_cpu(args, lines)
    notes = [
        "",
        "FLOP/s count 2*tokens*d_in*d_out flops (the matmul; the fused epilogue is extra work). Relative error: "
        f"max_p |s_p - ref_p| / max_p |ref_p| against an fp64 reference on the segments in the first {ERR_TOKENS} "
        "tokens; bf16 rows compare to fp64 of the same bf16 inputs. Segments: ragged, 0..1024 tokens, some empty.",
    ]
    if on_cuda:
        notes += [
            "",
            "triton / cuBLAS > 1: the fused kernel is slower than the bare matmul it contains. "
            "torch-ref / triton > 1: the fused kernel is faster than the reference. Triton and torch-ref timings "
            "skip the offsets check (check_offsets=False, no host sync).",
        ]
    _emit(lines, *notes)
    if on_cuda and (args.sweep or args.short_sweep):
        _bench_sweep(lines, short=args.short_sweep, tiny=args.tiny)
    _emit(lines, "", f"Wall time: {time.perf_counter() - t_start:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
