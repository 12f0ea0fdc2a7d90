"""Every loss formula of trace-ds, per sample and UNREDUCED; reduction happens in :func:`reduce_step_loss`.

Conventions (docs/method.md):

* ``logp`` is the **sum** over response tokens of log pi(y_t | x, y_<t); prompt tokens and padding give no term.
* ``r = logp_theta - logp_ref`` is the implicit reward; ``delta = r(chosen) - r(rejected)``.
* IPO (the default relational loss) is ``(delta - 1/(2 beta))^2``; DPO is ``-log sigmoid(beta delta)``.
* NPO on one response is ``-(2/beta) log sigmoid(-beta r)`` (the NPO paper's form, with its 2/beta factor).

The public reference code called the DPO sigmoid loss "IPO" and dropped NPO's 2/beta; both are fixed here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Relational = Literal["ipo", "dpo"]
LogpReduction = Literal["sum", "mean"]


def reduce_logps(sums: torch.Tensor, loss_mask: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Per-row response log-probs from their sums: the sum itself (the paper's convention), or the mean per
    response token (``mean``, the length normalisation TRL and the IPO authors use for IPO: its target margin
    1/(2 beta) assumes a per-token scale)."""
    if reduction == "sum":
        return sums
    if reduction == "mean":
        return sums / loss_mask.sum(-1).clamp(min=1).to(sums.dtype)
    raise ValueError(f"unknown log-prob reduction {reduction!r}; use 'sum' or 'mean'")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of ``labels`` under ``logits`` where ``loss_mask`` is 1. Shapes: (N, L, V), (N, L), (N, L).

    ``labels[:, t]`` is the token predicted at position t (already shifted by the caller), so no token is
    scored twice and prompt/padding positions carry mask 0. Computed in fp32 with a gather, not a full
    one-hot product.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logprobs, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * loss_mask).sum(-1)


def ipo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    return (delta - 1.0 / (2.0 * beta)) ** 2


def dpo_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta)


def relational_loss(delta: torch.Tensor, beta: float, kind: Relational = "ipo") -> torch.Tensor:
    """The relational (preference) loss per pair: IPO by default, DPO as an option."""
    if kind == "ipo":
        return ipo_loss(delta, beta)
    if kind == "dpo":
        return dpo_loss(delta, beta)
    raise ValueError(f"unknown relational loss {kind!r}; use 'ipo' or 'dpo'")


def npo_loss(reward: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO on one response: -(2/beta) log sigmoid(-beta r). Pushes the response's likelihood below the reference."""
    return -(2.0 / beta) * F.logsigmoid(-beta * reward)


def suppression_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Both responses violate the new policy: NPO on each, summed."""
    return npo_loss(reward_chosen, beta) + npo_loss(reward_rejected, beta)


HEADS = {
    "inversion": "relational loss on the (swapped) pair",
    "suppression": "NPO on both responses",
    "unlearning": "NPO on the chosen response only (the w/o-triage baseline's head)",
    "retention": "no conflict loss (KL head)",
}


def conflict_losses(
    reward_chosen: torch.Tensor,
    reward_rejected: torch.Tensor,
    categories: list[str],
    beta: float,
    relational: Relational,
) -> torch.Tensor:
    """Per-pair conflict loss, routed by category with masks (never by skipping computation)."""
    unknown = set(categories) - HEADS.keys()
    if unknown:
        raise ValueError(f"no loss head for categories {sorted(unknown)}")
    device = reward_chosen.device

    def mask(name: str) -> torch.Tensor:
        return torch.tensor([c == name for c in categories], dtype=torch.bool, device=device)

    rel = relational_loss(reward_chosen - reward_rejected, beta, relational)
    out = torch.where(mask("inversion"), rel, torch.zeros_like(rel))
    out = torch.where(mask("suppression"), suppression_loss(reward_chosen, reward_rejected, beta), out)
    return torch.where(mask("unlearning"), npo_loss(reward_chosen, beta), out)


def token_kl(
    policy_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-row mean over masked positions of KL(pi_ref || pi_theta), over the full vocabulary.

    KL_t = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)). Only the masked positions (those predicting the
    chosen response's tokens) are selected, and the log-softmax runs on ``chunk_tokens`` of them at a time,
    in fp64: in fp32 each log-prob carries an error of eps * log-sum-exp, and the KL of two close policies
    (1e-4) lost 4e-4 of its value to it. The full-logits path (``--vocab-tile 0``); the chunked head
    (trace_ds/training/vocab_head.py) computes the same without the logits. A row with no masked position gives 0.
    """
    rows, length, vocab = policy_logits.shape
    flat_mask = loss_mask.reshape(-1) > 0
    index = torch.nonzero(flat_mask, as_tuple=False).squeeze(-1)
    policy_flat = policy_logits.reshape(-1, vocab)
    reference_flat = reference_logits.reshape(-1, vocab)
    per_token = []
    for start in range(0, index.numel(), chunk_tokens):
        chunk = index[start : start + chunk_tokens]
        log_p = torch.log_softmax(policy_flat.index_select(0, chunk).double(), dim=-1)
        log_q = torch.log_softmax(reference_flat.index_select(0, chunk).double(), dim=-1)
        per_token.append((log_q.exp() * (log_q - log_p)).sum(-1).float())
    counts = flat_mask.reshape(rows, length).sum(-1)
    if not per_token:
        return policy_logits.new_zeros(rows, dtype=torch.float32) + 0.0 * policy_logits.sum()
    sums = torch.segment_reduce(torch.cat(per_token), "sum", lengths=counts)
    return sums / counts.clamp(min=1)


def reduce_step_loss(
    conflict_losses: torch.Tensor,
    conflict_weights: torch.Tensor,
    retention_kl: torch.Tensor,
    alpha_kl: float,
    pairs_in_step: int,
) -> torch.Tensor:
    """The one reduction: (sum_i w_i L_i + alpha_kl * sum_j KL_j) / pairs in the global step.

    The denominator is the same on every rank and accumulation step, so the balance between heads does not
    depend on how pairs fall into micro-batches. Callers pass zeros where a pair is not of that head.
    """
    if pairs_in_step <= 0:
        raise ValueError("pairs_in_step must be positive")
    return ((conflict_weights * conflict_losses).sum() + alpha_kl * retention_kl.sum()) / pairs_in_step
