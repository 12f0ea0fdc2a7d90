"""Each loss head against a hand computation, and the one reduction formula."""

from __future__ import annotations

import math

import pytest
import torch

from trace_ds.training.losses import (
    dpo_loss,
    ipo_loss,
    npo_loss,
    reduce_step_loss,
    relational_loss,
    sequence_logps,
    suppression_loss,
    token_kl,
)


def test_sequence_logps_sums_only_masked_positions() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [3.0, 0.0, 1.0]]])
    labels = torch.tensor([[2, 0, 1]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])

    def log_softmax(row: list[float], k: int) -> float:
        return row[k] - math.log(sum(math.exp(v) for v in row))

    expected = log_softmax([1.0, 0.0, 0.0], 0) + log_softmax([3.0, 0.0, 1.0], 1)
    assert sequence_logps(logits, labels, mask).item() == pytest.approx(expected, rel=1e-6)


def test_relational_and_punitive_heads_by_hand() -> None:
    delta = torch.tensor([0.0, 2.0, -1.0])
    beta = 0.5
    assert ipo_loss(delta, beta).tolist() == pytest.approx(
        [(d - 1 / (2 * beta)) ** 2 for d in delta.tolist()]
    )
    assert dpo_loss(delta, beta).tolist() == pytest.approx(
        [math.log(1 + math.exp(-beta * d)) for d in delta.tolist()]
    )
    assert relational_loss(delta, beta, "ipo").tolist() == ipo_loss(delta, beta).tolist()
    with pytest.raises(ValueError):
        relational_loss(delta, beta, "kto")  # type: ignore[arg-type]
    reward = torch.tensor([0.0, 1.0])
    npo = [(2 / beta) * math.log(1 + math.exp(beta * r)) for r in reward.tolist()]  # -(2/b) log sigmoid(-b r)
    assert npo_loss(reward, beta).tolist() == pytest.approx(npo)
    assert suppression_loss(reward, reward.flip(0), beta).tolist() == pytest.approx([npo[0] + npo[1]] * 2)


def test_npo_gradient_at_the_reference_is_the_logp_gradient() -> None:
    """At theta_ref (r = 0) d NPO / d r = 1, so the score of a suppression pair is exactly <grad logp, G>."""
    reward = torch.zeros(3, requires_grad=True)
    npo_loss(reward, 0.1).sum().backward()
    assert reward.grad.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_token_kl_by_hand_and_chunking() -> None:
    torch.manual_seed(0)
    policy, reference = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p, q = torch.log_softmax(policy, -1), torch.log_softmax(reference, -1)
    by_hand = [(q[0, t].exp() * (q[0, t] - p[0, t])).sum().item() for t in (1, 2)]
    got = token_kl(policy, reference, mask)
    assert got.tolist() == pytest.approx([sum(by_hand) / 2, 0.0], rel=1e-6)
    assert token_kl(policy, reference, mask, chunk_tokens=1).tolist() == pytest.approx(got.tolist())
    assert token_kl(reference, reference, mask).abs().max().item() < 1e-6  # KL(p || p) = 0


def test_reduction_formula() -> None:
    losses = torch.tensor([2.0, 4.0, 0.0, 9.0])
    weights = torch.tensor([0.5, 1.5, 0.0, 0.0])  # pairs 3 and 4 are retention (no conflict weight)
    kl = torch.tensor([0.0, 0.0, 0.2, 0.4])
    got = reduce_step_loss(losses, weights, kl, alpha_kl=2.0, pairs_in_step=8)
    assert got.item() == pytest.approx((0.5 * 2 + 1.5 * 4 + 2.0 * (0.2 + 0.4)) / 8)
    with pytest.raises(ValueError):
        reduce_step_loss(losses, weights, kl, 1.0, 0)
