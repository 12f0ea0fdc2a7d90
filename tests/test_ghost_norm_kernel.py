"""The fused ghost-norm kernel against per-segment gradients formed in fp64 (Triton under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools

import pytest
import torch
from trace_ds.kernels.ghost_norm import (
    ghost_norm,
    ghost_norm_torch,
    ghost_norm_triton,
    materialize_is_cheaper,
)


def truth(a: torch.Tensor, d: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """||sum_t d_t a_t^T||^2 per segment, the gradient formed in fp64."""
    return torch.stack(
        [(d[s:e].double().t() @ a[s:e].double()).square().sum() for s, e in itertools.pairwise(offsets)]
    )


CASES = [
    # (tokens per segment, d_in, d_out): empty and one-token segments, lengths off the 16/32 block sizes
    ([5, 0, 15, 17, 1], 20, 24),
    ([40, 33], 7, 130),
    ([3, 3, 3], 64, 64),
]


@pytest.mark.parametrize(("lengths", "d_in", "d_out"), CASES)
@pytest.mark.parametrize("form", ["gram", "materialize", "triton"])
def test_ghost_norm_equals_the_formed_gradient(lengths: list[int], d_in: int, d_out: int, form: str) -> None:
    torch.manual_seed(sum(lengths) + d_in)
    a, d = torch.randn(sum(lengths), d_in), torch.randn(sum(lengths), d_out)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    seg = torch.tensor(offsets)
    if form == "triton":
        got = ghost_norm_triton(a, d, seg, block_t=16, block_k=16)
    else:
        got = ghost_norm_torch(a, d, seg, materialize=form == "materialize")
    want = truth(a, d, offsets)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.max())), (got, want)
    assert got[lengths.index(0)] == 0 if 0 in lengths else True


def test_the_dispatcher_picks_the_cheaper_form_and_both_agree() -> None:
    assert materialize_is_cheaper(200, 8, 8)  # long segments through a small layer: form the 8x8 gradient
    assert not materialize_is_cheaper(16, 512, 512)  # short segments through a wide layer: the Gram form
    torch.manual_seed(0)
    a, d = torch.randn(60, 8), torch.randn(60, 8)
    seg = torch.tensor([0, 30, 60])
    assert torch.allclose(ghost_norm(a, d, seg), truth(a, d, [0, 30, 60]).float(), rtol=1e-5)


def test_bf16_inputs_within_bf16_rounding_of_the_truth() -> None:
    """bf16 a and d (as a bf16 model's backward gives them): products and sums in fp32, so the error is the
    inputs' rounding (~3 significant digits), not an accumulation in bf16."""
    torch.manual_seed(1)
    a, d = torch.randn(50, 48), torch.randn(50, 40)
    seg = torch.tensor([0, 20, 50])
    want = truth(a.bfloat16().float(), d.bfloat16().float(), [0, 20, 50])
    for got in (
        ghost_norm_torch(a.bfloat16(), d.bfloat16(), seg, materialize=False),
        ghost_norm_triton(a.bfloat16(), d.bfloat16(), seg, block_t=16, block_k=16),
    ):
        assert torch.allclose(got.double(), want, rtol=1e-5), (got, want)


def test_bad_inputs_are_refused() -> None:
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same number of tokens"):
        ghost_norm_torch(a, torch.randn(5, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="2-D"):
        ghost_norm_torch(a[0], torch.randn(4, 3), torch.tensor([0, 4]))
