"""Evaluation metrics: preference metrics against the reference, generation + target-policy agreement, and
perplexity. Every function takes models and data in memory; `trace_ds.evaluate.run` wires them to files."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trace_ds.config import DEFAULT_VOCAB_TILE
from trace_ds.console import progress
from trace_ds.data.batching import collate_pairs, left_padded, text_batch
from trace_ds.data.pairs import Pair
from trace_ds.data.tokenize import TokenizeConfig, encode_prompt, tokenize_pair
from trace_ds.models.loading import forward_settings
from trace_ds.training.train import STAT_KEYS, compute_losses, summarise_stats
from trace_ds.training.vocab_head import response_logps


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
    vocab_tile: int = DEFAULT_VOCAB_TILE
    logp_reduction: str = "sum"


def preference_metrics(
    policy: nn.Module,
    reference: nn.Module,
    pairs: Sequence[Pair],
    tokenizer: Any,
    tokenize: TokenizeConfig,
    pad_id: int,
    batch_size: int = 8,
    heads: HeadSettings | None = None,
    strategy: Any = None,
) -> dict[str, Any]:
    """New-policy preference accuracy per category (sign of the implicit reward margin against the
    reference), the suppressed responses' log-probability change, and retention KL and agreement.
    With a distributed ``strategy`` each rank takes its shard (zero-weight dummies keep the calls equal)."""
    heads = heads or HeadSettings()
    strategy = strategy or _LOCAL
    stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    device = next(policy.parameters()).device
    with torch.no_grad():
        for chunk in strategy.shard(list(pairs), batch_size):
            live = chunk is not None
            chunk = chunk if live else list(pairs[:1])
            batch = collate_pairs([tokenize_pair(p, tokenizer, tokenize) for p in chunk], pad_id).to(device)
            categories = [str(p.extra.get("category")) for p in chunk]
            weights = torch.full((len(chunk),), 1.0 if live else 0.0)
            *_, micro = compute_losses(policy, lambda fn: fn(reference), batch, categories, weights, heads)  # type: ignore[arg-type]
            stats += micro.cpu()
    stats = strategy.all_reduce_sum(stats)
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
    strategy: Any = None,
) -> list[str]:
    """Greedy (default) or seeded sampled completions through the shared prompt encoding, left-padded.
    Distributed: each rank generates its shard with ``synced_gpus`` (under ZeRO-3 every rank must keep
    stepping until all are done) and the texts are gathered back in prompt order."""
    strategy = strategy or _LOCAL
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    indexed = list(enumerate(prompts))
    mine: list[tuple[int, str]] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed + strategy.rank)
    chunks = strategy.shard(indexed, batch_size)
    try:
        with progress("generating", len(chunks), unit="batch", visible=strategy.is_main) as bar:
            for chunk in chunks:
                live = chunk is not None
                chunk = chunk if live else indexed[:1]
                input_ids, mask = left_padded(
                    [encode_prompt(tokenizer, text) for _, text in chunk], pad, device
                )
                width = input_ids.shape[1]
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
                        synced_gpus=strategy.world_size > 1,
                        **forward_settings(model),
                    )
                if live:
                    rows = out[:, width:].tolist()
                    mine += [
                        (i, cut_turn(tokenizer.decode(row, skip_special_tokens=True)))
                        for (i, _), row in zip(chunk, rows, strict=True)
                    ]
                bar.advance()
    finally:
        torch.random.set_rng_state(generator_state)
    texts = dict(item for part in strategy.all_gather_object(mine) for item in part)
    return [texts[i] for i in range(len(prompts))]


def target_policy_agreement(
    prompts: Sequence[dict[str, Any]],
    responses: Sequence[str],
    violates: Callable[[str, str], bool],
    texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """TPA: the share of generations the judge finds compliant with the new policy, overall and per group
    (``shifted`` topics, where the policy changed, and stable ones, where it did not, and per ``topic`` where
    the prompts name one), with 95% intervals. A degenerate generation (``texts``, the generated text, default
    ``responses``: :mod:`trace_ds.evaluate.degeneracy`) is non-compliant whatever the judge says, and each
    group reports its ``degenerate`` share beside TPA."""
    from trace_ds.evaluate.degeneracy import is_degenerate

    texts = responses if texts is None else texts
    groups: dict[str, list[tuple[bool, bool]]] = {"all": [], "shifted": [], "stable": []}
    for prompt, response, text in zip(prompts, responses, texts, strict=True):
        broken = is_degenerate(str(text))
        ok = not broken and not violates(prompt["prompt"], response)
        keys = ["all", "shifted" if prompt.get("shifted") else "stable"]
        if prompt.get("topic"):
            keys.append(f"topic:{prompt['topic']}")
        for key in keys:
            groups.setdefault(key, []).append((ok, broken))
    result = {}
    for name, values in groups.items():
        agree = sum(ok for ok, _ in values)
        low, high = wilson_interval(agree, len(values))
        result[name] = {
            "tpa": agree / len(values) if values else None,
            "ci95": [low, high],
            "prompts": len(values),
            "degenerate": sum(broken for _, broken in values) / len(values) if values else None,
        }
    return result


def tpa_from_verdicts(generations: Sequence[dict[str, Any]], verdicts: dict[str, Any]) -> dict[str, Any]:
    """TPA from an external judge: a generation is compliant when its verdict says ``chosen_violates: false``;
    a generation without a usable verdict is unjudged, counted, and left out of the rates (never guessed)."""
    judged = [
        g
        for g in generations
        if verdicts.get(str(g["id"])) is not None and verdicts[str(g["id"])].chosen_violates is not None
    ]
    tpa = target_policy_agreement(
        judged,
        [str(g["id"]) for g in judged],
        lambda _, gid: bool(verdicts[gid].chosen_violates),
        texts=[str(g.get("response", "")) for g in judged],
    )
    return {"tpa": tpa, "unjudged": len(generations) - len(judged), "generations": len(generations)}


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    strategy: Any = None,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
) -> float:
    """exp(mean next-token NLL) over every predicted token of ``texts`` (BOS added by the tokenizer), through
    the vocabulary-chunked head when ``vocab_tile`` > 0."""
    return perplexity_of(nll_totals(model, tokenizer, texts, batch_size, max_length, strategy, vocab_tile))


def perplexity_of(*totals: tuple[float, float]) -> float:
    """Perplexity from :func:`nll_totals` of one or more disjoint text sets (their tokens pooled)."""
    nll = math.fsum(t[0] for t in totals)
    tokens = math.fsum(t[1] for t in totals)
    return math.exp(nll / max(tokens, 1.0))


def nll_totals(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    strategy: Any = None,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
) -> tuple[float, float]:
    """(total next-token NLL, predicted tokens) over ``texts``, summed over ranks: what :func:`perplexity` is
    made of, kept apart so perplexities of text sets that partition a larger one pool exactly."""
    strategy = strategy or _LOCAL
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = torch.zeros(2, dtype=torch.float64)  # total NLL, total tokens
    with torch.no_grad():
        for chunk in strategy.shard(list(texts), batch_size):
            live = chunk is not None
            encoded = [tokenizer(t)["input_ids"][:max_length] for t in (chunk if live else texts[:1])]
            batch = text_batch(encoded, pad).to(device)
            nll = -response_logps(model, batch, tile=vocab_tile).sum()
            if live:
                sums += torch.tensor([float(nll), float(batch.loss_mask.sum())], dtype=torch.float64)
    sums = strategy.all_reduce_sum(sums)
    return sums[0].item(), sums[1].item()


def _local_strategy() -> Any:
    from trace_ds.runtime.engine import Strategy

    return Strategy()


_LOCAL = _local_strategy()
