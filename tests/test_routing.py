"""Routing inside one forward: each head's per-pair loss on a tiny mixed batch, by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from trace_ds.config import TrainConfig
from trace_ds.data.batching import collate_pairs
from trace_ds.data.tokenize import TokenizedPair
from trace_ds.training.losses import ipo_loss, npo_loss, sequence_logps, token_kl
from trace_ds.training.train import STAT_KEYS, compute_losses


def test_each_head_gets_its_pairs_and_nothing_else(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    from trace_ds.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    policy = LlamaForCausalLM(
        tiny_llama_config(50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    )
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs, so every head has a non-zero value
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    pairs = [TokenizedPair(f"p{i}", [1, 5 + i, 6], [7, 8 + i, 2], [9, 10 + i, 11, 2]) for i in range(4)]
    categories = ["inversion", "suppression", "retention", "inversion"]
    weights = torch.tensor([0.5, 2.0, 1.0, 0.0])  # the last pair is a zero-weight dummy
    batch = collate_pairs(pairs, pad_id=0)  # no padding beyond each row's end affects a row (right padding)
    (tmp_path / "t").write_text("")
    config = TrainConfig(
        model="m", triaged=str(tmp_path / "t"), scores=str(tmp_path / "t"), out=str(tmp_path / "o"), beta=0.5
    )

    def ref_logits(b, rows=None):
        return b.logits(reference, rows)

    conflict, conflict_w, kl, stats = compute_losses(
        policy, lambda fn: fn(reference), batch, categories, weights, config
    )
    # The same with precomputed reference log-probs: the reference then runs on retention chosen rows only.
    with torch.no_grad():
        full_ref = ref_logits(batch)
    pre = sequence_logps(full_ref, batch.labels, batch.loss_mask)
    rows_run = []

    def record_rows(module, args, kwargs):
        rows_run.append(int(kwargs["input_ids"].shape[0]))

    hook = reference.model.register_forward_pre_hook(record_rows, with_kwargs=True)
    pre_out = compute_losses(policy, lambda fn: fn(reference), batch, categories, weights, config, pre)
    hook.remove()
    assert rows_run == [1]  # one reference forward, on the one live retention pair's chosen row
    for a, b in zip((conflict, conflict_w, kl), pre_out[:3], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

    with torch.no_grad():
        logits = policy(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
        ref = ref_logits(batch)
    rewards = sequence_logps(logits, batch.labels, batch.loss_mask) - sequence_logps(
        ref, batch.labels, batch.loss_mask
    )
    rc, rr = rewards[:4], rewards[4:]
    assert conflict[0].item() == pytest.approx(ipo_loss(rc[0] - rr[0], 0.5).item(), rel=1e-5)
    assert conflict[1].item() == pytest.approx((npo_loss(rc[1], 0.5) + npo_loss(rr[1], 0.5)).item(), rel=1e-5)
    assert conflict[2].item() == 0.0  # retention has no conflict loss
    unlearning = compute_losses(policy, lambda fn: fn(reference), batch, ["unlearning"] * 4, weights, config)[
        0
    ]
    assert unlearning[1].item() == pytest.approx(npo_loss(rc[1], 0.5).item(), rel=1e-5)  # chosen only
    assert conflict_w.tolist() == [0.5, 2.0, 0.0, 0.0]
    expected_kl = token_kl(logits[2:3], ref[2:3], batch.loss_mask[2:3])
    assert kl[2].item() == pytest.approx(expected_kl.item(), rel=1e-5) and kl[2].item() > 0
    assert kl[0].item() == kl[1].item() == kl[3].item() == 0.0  # only live retention pairs carry KL
    counts = dict(zip(STAT_KEYS, stats.tolist(), strict=True))
    assert (counts["pairs"], counts["inversion"], counts["suppression"], counts["retention"]) == (3, 1, 1, 1)


def test_kl_head_pulls_retention_back_to_the_reference() -> None:
    """Retention pairs move the KL term: optimising alpha * KL alone brings a drifted policy back."""
    from transformers import LlamaForCausalLM

    from trace_ds.models.tiny import tiny_llama_config

    torch.manual_seed(1)
    reference = LlamaForCausalLM(
        tiny_llama_config(40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    )
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.1 * torch.randn_like(param))
    batch = collate_pairs([TokenizedPair("r", [1, 4, 5], [6, 7, 8, 2], [9, 2])], pad_id=0)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)

    def kl_now() -> torch.Tensor:
        logits = policy(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        with torch.no_grad():
            ref = reference(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        return token_kl(logits[:1], ref[:1], batch.loss_mask[:1])[0]

    start = kl_now().item()
    for _ in range(30):
        optimizer.zero_grad()
        kl_now().backward()
        optimizer.step()
    assert kl_now().item() < 0.2 * start
