"""Evaluation metrics: preference metrics against the reference, generation + target-policy agreement, and
perplexity. Every function takes models and data in memory; `trace_ds.evaluate.run` wires them to files."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trace_ds.data.batching import collate_pairs
from trace_ds.data.pairs import Pair
from trace_ds.data.tokenize import TokenizeConfig, encode_prompt, tokenize_pair
from trace_ds.train import STAT_KEYS, compute_losses, summarise_stats


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well behaved near 0 and 1, unlike the normal one)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class HeadSettings:
    """What compute_losses needs to score held-out pairs the way training does."""

    beta: float = 0.1
    relational: str = "ipo"


def preference_metrics(
    policy: nn.Module,
    reference: nn.Module,
    pairs: Sequence[Pair],
    tokenizer: Any,
    tokenize: TokenizeConfig,
    pad_id: int,
    batch_size: int = 8,
    heads: HeadSettings | None = None,
) -> dict[str, Any]:
    """New-policy preference accuracy per category (sign of the implicit reward margin against the
    reference), the suppressed responses' log-probability change, and retention KL and agreement."""
    heads = heads or HeadSettings()
    stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    device = next(policy.parameters()).device
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = collate_pairs([tokenize_pair(p, tokenizer, tokenize) for p in chunk], pad_id).to(device)
            categories = [str(p.extra.get("category")) for p in chunk]
            weights = torch.ones(len(chunk))
            *_, micro = compute_losses(
                policy, lambda b, rows: b.logits(reference, rows), batch, categories, weights, heads
            )  # type: ignore[arg-type]
            stats += micro.cpu()
    summary = summarise_stats(stats)
    return {
        "pairs": {c: int(summary[f"pairs_{c}"] or 0) for c in ("inversion", "suppression", "retention")},
        "inversion_accuracy": summary["accuracy_inversion"],
        "inversion_margin": summary["margin_inversion"],
        "suppression_logp_change": summary["reward_suppression"],
        "retention_kl": summary["kl_retention"],
        "retention_agreement": summary["accuracy_retention"],
    }


def cut_turn(text: str) -> str:
    """A generation up to the next conversation turn (small models trained on transcripts keep going)."""
    for marker in ("\nUser:", "\nSystem:", "\nAssistant:"):
        text = text.split(marker)[0]
    return text.strip()


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Greedy (default) or seeded sampled completions through the shared prompt encoding, left-padded."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                )
            outputs += [
                cut_turn(tokenizer.decode(row, skip_special_tokens=True)) for row in out[:, width:].tolist()
            ]
    finally:
        torch.random.set_rng_state(generator_state)
    return outputs


def target_policy_agreement(
    prompts: Sequence[dict[str, Any]], responses: Sequence[str], violates: Callable[[str, str], bool]
) -> dict[str, Any]:
    """TPA: the share of generations the judge finds compliant with the new policy, overall and per group
    (``shifted`` topics, where the policy changed, and stable ones, where it did not), with 95% intervals."""
    groups: dict[str, list[bool]] = {"all": [], "shifted": [], "stable": []}
    for prompt, response in zip(prompts, responses, strict=True):
        ok = not violates(prompt["prompt"], response)
        groups["all"].append(ok)
        groups["shifted" if prompt.get("shifted") else "stable"].append(ok)
    result = {}
    for name, values in groups.items():
        low, high = wilson_interval(sum(values), len(values))
        result[name] = {
            "tpa": sum(values) / len(values) if values else None,
            "ci95": [low, high],
            "prompts": len(values),
        }
    return result


def perplexity(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16, max_length: int = 512
) -> float:
    """exp(mean next-token NLL) over every predicted token of ``texts`` (BOS added by the tokenizer)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = [tokenizer(t)["input_ids"][:max_length] for t in texts[start : start + batch_size]]
            width = max(len(ids) for ids in encoded)
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=device)
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:]
            valid = mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            total_nll += float(nll[valid.reshape(-1)].sum())
            total_tokens += int(valid.sum())
    return math.exp(total_nll / max(total_tokens, 1))
