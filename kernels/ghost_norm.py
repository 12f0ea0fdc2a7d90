"""Fused per-pair ghost norm: n_p = ||sum_{t in segment p} d_t a_t^T||_F^2 for one linear layer.

Cosine impact scores need every pair's gradient norm ||grad L_p||, and a per-pair gradient is never formed.
For a linear layer the pair's weight gradient is sum_t d_t a_t^T (the same factors the ghost dot reads), so

    ||grad_W L_p||^2 = sum_{t, t' in p} (a_t . a_t') (d_t . d_t')

(the DP-SGD literature's "ghost norm" / book-keeping trick). That costs T_p^2 (d_in + d_out) per pair instead of
T_p d_in d_out; where d_in * d_out is the smaller (short segments, or a long sequence through a small layer),
forming the pair's d_out x d_in gradient and squaring it is cheaper, and :func:`ghost_norm` picks per layer.

The Triton kernel runs one program per (segment, token block i, token block j): it forms the two
BLOCK_T x BLOCK_T Gram tiles A_i A_j^T and D_i D_j^T with tl.dot over the feature dimensions, multiplies them
elementwise and reduces the tile in registers; a fixed-order second pass sums each segment's partials (no
float atomics: bitwise reproducible). Nothing of size T^2 reaches memory.

Backends: ``ghost_norm_triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``ghost_norm_torch`` (plain-torch
reference, any device) and the dispatcher ``ghost_norm``.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from trace_ds.kernels.ghost_dot import HAS_TRITON, kernels_interpreted

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["ghost_norm", "ghost_norm_torch", "ghost_norm_triton", "materialize_is_cheaper"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(a: torch.Tensor, d: torch.Tensor, seg_offsets: torch.Tensor) -> torch.Tensor:
    for name, t in (("a", a), ("d", d)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D torch.Tensor")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if d.shape[0] != a.shape[0]:
        raise ValueError(f"a and d must have the same number of tokens, got {a.shape[0]} and {d.shape[0]}")
    if d.device != a.device:
        raise ValueError(f"a and d must be on one device, got {a.device} and {d.device}")
    if seg_offsets.dim() != 1 or seg_offsets.numel() < 1:
        raise ValueError(f"seg_offsets must be 1-D with P+1 >= 1 entries, got {tuple(seg_offsets.shape)}")
    return seg_offsets.to(device=a.device, dtype=torch.int64)


def materialize_is_cheaper(longest_segment: int, d_in: int, d_out: int) -> bool:
    """Forming each pair's d_out x d_in gradient (T d_in d_out + d_in d_out) costs less than the Gram form
    (T^2 (d_in + d_out))."""
    t = longest_segment
    return t * d_in * d_out + d_in * d_out < t * t * (d_in + d_out)


def ghost_norm_torch(
    a: torch.Tensor, d: torch.Tensor, seg_offsets: torch.Tensor, materialize: bool | None = None
) -> torch.Tensor:
    """Plain-torch reference: per segment, ``((A A^T) * (D D^T)).sum()`` or ``||D^T A||^2`` (whichever
    ``materialize``, by default :func:`materialize_is_cheaper`, picks), in fp32 whatever the input dtype.
    Returns fp32 (P,)."""
    off = _validate(a, d, seg_offsets).tolist()
    out = torch.zeros(len(off) - 1, dtype=torch.float32, device=a.device)
    if len(off) < 2:
        return out
    longest = max(stop - start for start, stop in itertools.pairwise(off))
    if materialize is None:
        materialize = materialize_is_cheaper(longest, a.shape[1], d.shape[1])
    for p, (start, stop) in enumerate(itertools.pairwise(off)):
        if stop == start:
            continue
        a_p, d_p = a[start:stop].float(), d[start:stop].float()
        if materialize:
            out[p] = d_p.t().matmul(a_p).square().sum()
        else:
            out[p] = (a_p.matmul(a_p.t()) * d_p.matmul(d_p.t())).sum()
    return out


if HAS_TRITON:

    @triton.jit
    def _gram_tile(
        x_ptr, stride, offs_i, offs_j, mask_i, mask_j, width, BLOCK_K: tl.constexpr, FP32: tl.constexpr
    ):
        """X_i X_j^T for two blocks of rows of x (BLOCK_T x BLOCK_T, fp32 accumulation)."""
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((offs_i.shape[0], offs_j.shape[0]), dtype=tl.float32)
        for kb in range(0, tl.cdiv(width, BLOCK_K)):
            k = kb * BLOCK_K + offs_k
            xi = tl.load(
                x_ptr + offs_i[:, None] * stride + k[None, :],
                mask=mask_i[:, None] & (k[None, :] < width),
                other=0.0,
            )
            xj = tl.load(
                x_ptr + offs_j[:, None] * stride + k[None, :],
                mask=mask_j[:, None] & (k[None, :] < width),
                other=0.0,
            )
            if FP32:
                acc = tl.dot(xi.to(tl.float32), tl.trans(xj.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xi, tl.trans(xj), acc)
        return acc

    @triton.jit
    def _ghost_norm_partial_kernel(
        a_ptr,
        d_ptr,
        off_ptr,
        part_ptr,
        d_in,
        d_out,
        stride_a,
        stride_d,
        n_blk,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FP32: tl.constexpr,
    ):
        """part[p, i, j] = sum over tile (i, j) of segment p of (A_i A_j^T) * (D_i D_j^T)."""
        p = tl.program_id(0)
        bi = tl.program_id(1)
        bj = tl.program_id(2)
        start = tl.load(off_ptr + p)
        stop = tl.load(off_ptr + p + 1)
        offs_i = start + bi * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_j = start + bj * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_i = offs_i < stop
        mask_j = offs_j < stop
        rows_i = offs_i.to(tl.int64)
        rows_j = offs_j.to(tl.int64)
        total = 0.0
        if start + bi * BLOCK_T < stop and start + bj * BLOCK_T < stop:
            ga = _gram_tile(a_ptr, stride_a, rows_i, rows_j, mask_i, mask_j, d_in, BLOCK_K, FP32)
            gd = _gram_tile(d_ptr, stride_d, rows_i, rows_j, mask_i, mask_j, d_out, BLOCK_K, FP32)
            total = tl.sum(tl.sum(ga * gd, axis=1), axis=0)
        tl.store(part_ptr + (p * n_blk + bi) * n_blk + bj, total)


def ghost_norm_triton(
    a: torch.Tensor, d: torch.Tensor, seg_offsets: torch.Tensor, *, block_t: int = 32, block_k: int = 64
) -> torch.Tensor:
    """The Gram form as one fused Triton kernel (fp32 (P,), bitwise reproducible for fixed block sizes).
    ``a`` and ``d`` must share a dtype (tl.dot needs equal operand types)."""
    if not HAS_TRITON:
        raise RuntimeError("ghost_norm_triton needs triton; use backend='torch'")
    off = _validate(a, d, seg_offsets)
    if a.dtype != d.dtype:
        raise ValueError(
            f"a and d must have the same dtype for the Triton kernel, got {a.dtype} and {d.dtype}"
        )
    interpreted = kernels_interpreted()
    if not a.is_cuda and not interpreted:
        raise RuntimeError(
            "ghost_norm_triton runs on CUDA, or on CPU under TRITON_INTERPRET=1; use backend='torch'"
        )
    n_seg = off.numel() - 1
    if n_seg == 0 or a.shape[0] == 0:
        return torch.zeros(n_seg, dtype=torch.float32, device=a.device)
    a, d = (t if t.stride(1) == 1 else t.contiguous() for t in (a, d))
    longest = int((off[1:] - off[:-1]).max())  # one host sync: the grid's extent
    n_blk = max(1, triton.cdiv(longest, block_t))
    part = torch.empty((n_seg, n_blk, n_blk), dtype=torch.float32, device=a.device)
    fp32 = a.dtype == torch.float32 or interpreted  # the interpreter's tl.dot mis-multiplies bf16
    with torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext():
        _ghost_norm_partial_kernel[(n_seg, n_blk, n_blk)](
            a, d, off, part, a.shape[1], d.shape[1], a.stride(0), d.stride(0), n_blk,
            BLOCK_T=block_t, BLOCK_K=block_k, FP32=fp32,
        )  # fmt: skip
    return part.reshape(n_seg, -1).sum(1)  # a fixed-order reduction of the tile partials


def ghost_norm(
    a: torch.Tensor,
    d: torch.Tensor,
    seg_offsets: torch.Tensor,
    backend: str = "auto",
    longest: int | None = None,
) -> torch.Tensor:
    """Per-segment ||sum_t d_t a_t^T||_F^2 as fp32 (P,). Forms each pair's gradient where that is cheaper
    (:func:`materialize_is_cheaper`; ``longest`` is the longest segment, computed when not given), else the
    Gram form: the Triton kernel for ``backend`` "triton" (or "auto" on CUDA), the torch reference otherwise."""
    off = _validate(a, d, seg_offsets)
    if longest is None:
        longest = int((off[1:] - off[:-1]).max()) if off.numel() > 1 else 0
    if materialize_is_cheaper(longest, a.shape[1], d.shape[1]):
        return ghost_norm_torch(a, d, off, materialize=True)
    if backend == "auto":
        backend = "triton" if a.is_cuda and HAS_TRITON and not kernels_interpreted() else "torch"
    if backend == "triton":
        if a.dtype != d.dtype:  # one operand type for tl.dot, without losing the wider one's precision
            a, d = a.float(), d.float()
        return ghost_norm_triton(a, d, off)
    if backend == "torch":
        return ghost_norm_torch(a, d, off, materialize=False)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
