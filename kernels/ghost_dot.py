"""Fused per-pair ghost dot product: s_p = sum_{t in segment p} delta_t^T G a_t for one linear layer.

TRACE scores every pair by <grad_W L_p, G_W>. For a linear layer y_t = W a_t the per-pair weight gradient is
sum_t delta_t a_t^T, so the score needs only the activations a_t, the output gradients delta_t and the probe
gradient G: never a per-pair gradient. The Triton kernel tiles (tokens x d_out), loops over d_in with tl.dot,
multiplies by the delta tile and reduces over d_out in registers, so the tokens x d_out product G a_t never
reaches memory; a second kernel sums the per-token partials of each segment in a fixed order (no float atomics,
so results are bitwise reproducible).

Backends: ``ghost_dot_triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``ghost_dot_torch`` (plain-torch
reference, any device) and the dispatcher ``ghost_dot``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is an install requirement, but absent on e.g. macOS
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "GhostDotConfig",
    "default_config",
    "ghost_dot",
    "ghost_dot_torch",
    "ghost_dot_triton",
    "kernels_interpreted",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------------------------
# Validation (shared by both backends)
# --------------------------------------------------------------------------------------------------------------


def _validate(
    a: torch.Tensor, d: torch.Tensor, g: torch.Tensor, seg_offsets: torch.Tensor, check_offsets: bool
) -> torch.Tensor:
    """Check shapes, dtypes, devices and offsets; return the offsets as int64 on the inputs' device."""
    for name, t in (("a", a), ("d", d), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    n_tok, d_in = a.shape
    if d.shape[0] != n_tok:
        raise ValueError(f"a and d must have the same number of tokens, got {n_tok} and {d.shape[0]}")
    d_out = d.shape[1]
    if tuple(g.shape) != (d_out, d_in):
        raise ValueError(f"g must have shape (d_out, d_in) = ({d_out}, {d_in}), got {tuple(g.shape)}")
    if d.device != a.device or g.device != a.device:
        raise ValueError(f"a, d and g must be on one device, got {a.device}, {d.device}, {g.device}")
    if not isinstance(seg_offsets, torch.Tensor):
        raise ValueError(f"seg_offsets must be a torch.Tensor, got {type(seg_offsets).__name__}")
    if seg_offsets.dim() != 1 or seg_offsets.numel() < 1:
        raise ValueError(
            f"seg_offsets must be 1-D with P+1 >= 1 entries, got shape {tuple(seg_offsets.shape)}"
        )
    if seg_offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seg_offsets must be int64 (or int32), got {seg_offsets.dtype}")
    off = seg_offsets.to(device=a.device, dtype=torch.int64)
    if check_offsets:
        # One host sync for the common (valid) case; the detailed message is only built on failure.
        bad = (off[0] != 0) | (off[-1] != n_tok)
        if off.numel() > 1:
            bad = bad | (off[1:] < off[:-1]).any()
        if bool(bad):
            first, last = int(off[0]), int(off[-1])
            if first != 0:
                raise ValueError(f"seg_offsets[0] must be 0, got {first}")
            if last != n_tok:
                raise ValueError(f"seg_offsets[-1] must equal the number of tokens {n_tok}, got {last}")
            raise ValueError("seg_offsets must be non-decreasing (segments may be empty, never negative)")
    return off


# --------------------------------------------------------------------------------------------------------------
# Plain-torch reference
# --------------------------------------------------------------------------------------------------------------


def _segment_sum(per_token: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Deterministic segment sums via an fp64 prefix sum (cancellation error ~1e-16 of the running total)."""
    csum = torch.zeros(per_token.numel() + 1, dtype=torch.float64, device=per_token.device)
    csum[1:] = per_token.double().cumsum(0)
    return (csum[off[1:]] - csum[off[:-1]]).float()


def ghost_dot_torch(
    a: torch.Tensor,
    d: torch.Tensor,
    g: torch.Tensor,
    seg_offsets: torch.Tensor,
    chunk_tokens: int = 4096,
    *,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Plain-torch reference of the fused kernel: per chunk of tokens, ((a @ g.T) * d).sum(d_out), then segment sums.

    Computes in fp32 whatever the input dtype (inputs are upcast per chunk, G once), so it serves as the
    accuracy reference for bf16 inputs too. Chunking bounds the tokens x d_out intermediate to
    ``chunk_tokens x d_out`` floats. On CUDA the fp32 matmul follows torch's matmul precision setting
    (IEEE unless the caller enabled TF32). Returns fp32 scores of shape (P,).
    """
    off = _validate(a, d, g, seg_offsets, check_offsets)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n_tok = a.shape[0]
    g32 = g.float()
    per_token = torch.zeros(n_tok, dtype=torch.float32, device=a.device)
    for start in range(0, n_tok, chunk_tokens):
        stop = min(start + chunk_tokens, n_tok)
        ga = a[start:stop].float() @ g32.T  # (chunk, d_out): G a_t for each token
        per_token[start:stop] = (ga * d[start:stop].float()).sum(dim=1)
    return _segment_sum(per_token, off)


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GhostDotConfig:
    """Launch parameters of the fused kernel (block dims are powers of two, >= 16 because tl.dot needs it)."""

    block_t: int
    block_o: int
    block_k: int
    group_t: int = 8
    num_warps: int = 4
    num_stages: int = 3
    block_r: int = 1024  # segment-reduction vector width


# Untuned on hardware (no GPU was available when they were chosen); sweep with bench_ghost_dot.py --sweep.
# 16-bit: the classic Hopper tensor-core matmul tile (128x128x64, 8 warps): 3 stages of A/B tiles take 96 KiB of
# shared memory, leaving room for the epilogue's layout conversion of the delta tile.
# fp32 with input_precision="ieee" runs on CUDA cores (FMA, no tensor cores): a smaller 64x64x32 tile keeps the
# accumulator at 32 registers per thread with 4 warps, so the epilogue's fp32 delta tile does not spill.
_DEFAULTS = {
    torch.bfloat16: GhostDotConfig(
        block_t=128, block_o=128, block_k=64, group_t=8, num_warps=8, num_stages=3
    ),
    torch.float16: GhostDotConfig(block_t=128, block_o=128, block_k=64, group_t=8, num_warps=8, num_stages=3),
    torch.float32: GhostDotConfig(block_t=64, block_o=64, block_k=32, group_t=8, num_warps=4, num_stages=3),
}


def default_config(dtype: torch.dtype) -> GhostDotConfig:
    """Default launch parameters for an input dtype (H100/H200-oriented)."""
    if dtype not in _DEFAULTS:
        raise ValueError(f"no default config for dtype {dtype}")
    return _DEFAULTS[dtype]


if HAS_TRITON:

    @triton.jit
    def _ghost_dot_partial_kernel(
        a_ptr,
        d_ptr,
        g_ptr,
        part_ptr,
        n_tok,
        d_in,
        d_out,
        stride_at,
        stride_dt,
        stride_go,
        n_oblk,
        BLOCK_T: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_T: tl.constexpr,
        FP32_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """part[t, j] = sum_{o in block j} d[t, o] * (G a_t)[o]; inner dims of a, d, g are contiguous."""
        # Grouped ordering: GROUP_T token blocks sweep the d_out blocks together, so the a tiles and the g tiles
        # they share stay in L2.
        pid = tl.program_id(0)
        n_tblk = tl.cdiv(n_tok, BLOCK_T)
        per_group = GROUP_T * n_oblk
        first_t = (pid // per_group) * GROUP_T
        group_size = tl.minimum(n_tblk - first_t, GROUP_T)
        pid_t = first_t + (pid % per_group) % group_size
        pid_o = (pid % per_group) // group_size

        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_k = tl.arange(0, BLOCK_K)
        mask_t = offs_t < n_tok
        mask_o = offs_o < d_out
        rows_t = offs_t.to(tl.int64)  # T * d_in can exceed 2**31
        rows_o = offs_o.to(tl.int64)

        a_ptrs = a_ptr + rows_t[:, None] * stride_at + offs_k[None, :]
        g_ptrs = g_ptr + offs_k[:, None] + rows_o[None, :] * stride_go  # (BLOCK_K, BLOCK_O) view of G^T
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for kb in range(0, tl.cdiv(d_in, BLOCK_K)):
            k_left = d_in - kb * BLOCK_K
            a_tile = tl.load(a_ptrs, mask=mask_t[:, None] & (offs_k[None, :] < k_left), other=0.0)
            g_tile = tl.load(g_ptrs, mask=(offs_k[:, None] < k_left) & mask_o[None, :], other=0.0)
            if UPCAST:
                # Interpreter only: its tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584).
                a_tile = a_tile.to(tl.float32)
                g_tile = g_tile.to(tl.float32)
            if FP32_DOT:
                acc = tl.dot(a_tile, g_tile, acc, input_precision="ieee")  # no TF32 for fp32 inputs
            else:
                acc = tl.dot(a_tile, g_tile, acc)  # 16-bit tensor cores, fp32 accumulation
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K

        d_tile = tl.load(
            d_ptr + rows_t[:, None] * stride_dt + offs_o[None, :],
            mask=mask_t[:, None] & mask_o[None, :],
            other=0.0,
        ).to(tl.float32)
        partial = tl.sum(acc * d_tile, axis=1)
        tl.store(part_ptr + rows_t * n_oblk + pid_o, partial, mask=mask_t)

    @triton.jit
    def _segment_sum_kernel(part_ptr, off_ptr, out_ptr, n_oblk, BLOCK_R: tl.constexpr):
        """out[p] = sum of part rows off[p]:off[p+1] (a contiguous range), in a fixed order: deterministic."""
        p = tl.program_id(0)
        start = tl.load(off_ptr + p) * n_oblk
        stop = tl.load(off_ptr + p + 1) * n_oblk
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for i in range(start, stop, BLOCK_R):
            idx = i + tl.arange(0, BLOCK_R)
            acc += tl.load(part_ptr + idx, mask=idx < stop, other=0.0)
        tl.store(out_ptr + p, tl.sum(acc, axis=0))


def kernels_interpreted() -> bool:
    """True when the Triton kernels were built by the interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    return HAS_TRITON and type(_ghost_dot_partial_kernel).__name__ == "InterpretedFunction"


def _check_pow2(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")


def ghost_dot_triton(
    a: torch.Tensor,
    d: torch.Tensor,
    g: torch.Tensor,
    seg_offsets: torch.Tensor,
    *,
    block_t: int | None = None,
    block_o: int | None = None,
    block_k: int | None = None,
    group_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_r: int | None = None,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Fused Triton ghost dot product; fp32 scores of shape (P,), bitwise reproducible for fixed block sizes.

    ``a`` and ``g`` must share a dtype (tl.dot needs equal operand types; cast G yourself rather than have a
    silent precision change); ``d`` may be any of fp32/bf16/fp16. Unset launch parameters come from
    ``default_config(a.dtype)``. ``check_offsets=False`` skips the offsets check (one host sync).
    """
    if not HAS_TRITON:
        raise RuntimeError("ghost_dot_triton needs triton, which is not importable here; use backend='torch'")
    off = _validate(a, d, g, seg_offsets, check_offsets)
    if a.dtype != g.dtype:
        raise ValueError(
            f"a and g must have the same dtype for the Triton kernel, got {a.dtype} and {g.dtype}"
        )
    interpreted = kernels_interpreted()
    if not a.is_cuda and not interpreted:
        raise RuntimeError(
            f"ghost_dot_triton got tensors on {a.device}: the Triton kernel runs on CUDA, or on CPU only when "
            "TRITON_INTERPRET=1 is set before triton is first imported; use backend='torch' on CPU"
        )
    base = default_config(a.dtype)
    cfg = GhostDotConfig(
        block_t=base.block_t if block_t is None else block_t,
        block_o=base.block_o if block_o is None else block_o,
        block_k=base.block_k if block_k is None else block_k,
        group_t=base.group_t if group_t is None else group_t,
        num_warps=base.num_warps if num_warps is None else num_warps,
        num_stages=base.num_stages if num_stages is None else num_stages,
        block_r=base.block_r if block_r is None else block_r,
    )
    for name in ("block_t", "block_o", "block_k"):
        _check_pow2(name, getattr(cfg, name), 16)
    _check_pow2("block_r", cfg.block_r, 16)
    _check_pow2("num_warps", cfg.num_warps, 1)
    if not isinstance(cfg.group_t, int) or cfg.group_t < 1:
        raise ValueError(f"group_t must be a positive int, got {cfg.group_t!r}")
    if not isinstance(cfg.num_stages, int) or cfg.num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {cfg.num_stages!r}")

    n_tok, d_in = a.shape
    d_out = d.shape[1]
    n_seg = off.numel() - 1
    out = torch.zeros(n_seg, dtype=torch.float32, device=a.device)
    if n_seg == 0 or n_tok == 0 or d_in == 0 or d_out == 0:
        return out
    # The kernel assumes unit inner strides (keeps all column offsets in int32); row strides are free.
    a, d, g = (t if t.stride(1) == 1 else t.contiguous() for t in (a, d, g))

    n_oblk = triton.cdiv(d_out, cfg.block_o)
    part = torch.empty((n_tok, n_oblk), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n_tok, cfg.block_t) * n_oblk,)
    upcast = interpreted and a.dtype == torch.bfloat16
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        _ghost_dot_partial_kernel[grid](
            a,
            d,
            g,
            part,
            n_tok,
            d_in,
            d_out,
            a.stride(0),
            d.stride(0),
            g.stride(0),
            n_oblk,
            BLOCK_T=cfg.block_t,
            BLOCK_O=cfg.block_o,
            BLOCK_K=cfg.block_k,
            GROUP_T=cfg.group_t,
            FP32_DOT=a.dtype == torch.float32 or upcast,
            UPCAST=upcast,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        _segment_sum_kernel[(n_seg,)](part, off, out, n_oblk, BLOCK_R=cfg.block_r, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------------------


def ghost_dot(
    a: torch.Tensor,
    d: torch.Tensor,
    g: torch.Tensor,
    seg_offsets: torch.Tensor,
    backend: str = "auto",
    *,
    check_offsets: bool = True,
) -> torch.Tensor:
    """Per-segment sum of delta_t^T G a_t as fp32 (P,).

    ``backend``: "triton", "torch" or "auto" (Triton for CUDA tensors when triton is importable and compiled,
    i.e. not interpreted; the torch reference otherwise, so CPU runs never go through the slow interpreter
    unless asked).
    """
    if backend == "auto":
        use_triton = isinstance(a, torch.Tensor) and a.is_cuda and HAS_TRITON and not kernels_interpreted()
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        return ghost_dot_triton(a, d, g, seg_offsets, check_offsets=check_offsets)
    if backend == "torch":
        return ghost_dot_torch(a, d, g, seg_offsets, check_offsets=check_offsets)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
