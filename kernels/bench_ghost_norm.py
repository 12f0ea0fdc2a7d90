"""Benchmark of the per-pair ghost norm: the Gram form (torch, Triton) against forming each pair's gradient.

    python kernels/bench_ghost_norm.py                  # CPU: the torch forms (Triton needs a GPU)
    python kernels/bench_ghost_norm.py --device cuda    # GPU: the Triton kernel too

For each layer shape and segment length it prints milliseconds per call of every form, which form the
dispatcher picks (``materialize_is_cheaper``), and the largest relative difference between the forms, with the
command that produced the table. Nothing here is asserted: tests/test_ghost_norm_kernel.py checks exactness.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from trace_ds.kernels.ghost_norm import ghost_norm_torch, ghost_norm_triton, materialize_is_cheaper


def _time(fn, repeats: int, device: str) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (and the Triton compile)
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--lengths", default="64,256,1024", help="tokens per pair (chosen + rejected)")
    parser.add_argument("--shapes", default="512x512,2048x512,512x4096", help="d_in x d_out of a layer")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    triton_ok = args.device == "cuda"
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, dtype {args.dtype}, {args.pairs} pairs"
    )
    print(
        "| d_in x d_out | tokens/pair | gram torch ms | materialize ms | triton ms | picks | max rel diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        d_in, d_out = (int(x) for x in shape.split("x"))
        for length in (int(x) for x in args.lengths.split(",")):
            torch.manual_seed(0)
            a = torch.randn(args.pairs * length, d_in, device=args.device, dtype=dtype)
            d = torch.randn(args.pairs * length, d_out, device=args.device, dtype=dtype)
            seg = torch.arange(0, args.pairs + 1, device=args.device) * length
            gram = ghost_norm_torch(a, d, seg, materialize=False)
            formed = ghost_norm_torch(a, d, seg, materialize=True)
            diff = float(((gram - formed).abs() / formed.abs()).max())
            t_gram = _time(lambda: ghost_norm_torch(a, d, seg, materialize=False), args.repeats, args.device)  # noqa: B023
            t_formed = _time(lambda: ghost_norm_torch(a, d, seg, materialize=True), args.repeats, args.device)  # noqa: B023
            t_triton = float("nan")
            if triton_ok:
                t_triton = _time(lambda: ghost_norm_triton(a, d, seg), args.repeats, args.device)  # noqa: B023
                diff = max(diff, float(((ghost_norm_triton(a, d, seg) - formed).abs() / formed.abs()).max()))
            picks = "materialize" if materialize_is_cheaper(length, d_in, d_out) else "gram"
            print(
                f"| {d_in}x{d_out} | {length} | {t_gram:.2f} | {t_formed:.2f} | {t_triton:.2f} | {picks} | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
