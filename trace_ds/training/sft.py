"""Supervised fine-tuning on chosen responses: how the demo aligns a freshly built tiny model to the OLD
policy before TRACE realigns it (the role a real model's original alignment plays). One process, plain torch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trace_ds.config import DEFAULT_VOCAB_TILE, check_vocab_tile
from trace_ds.console import console, progress
from trace_ds.data.batching import collate_pairs
from trace_ds.data.pairs import read_pairs
from trace_ds.data.tokenize import TokenizeConfig, tokenize_pair
from trace_ds.io import TraceError, write_json
from trace_ds.training.vocab_head import check_head, response_logps


@dataclass(frozen=True)
class SFTConfig:
    model: str
    pairs: str
    out: str
    epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 32
    seed: int = 0
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    vocab_tile: int = DEFAULT_VOCAB_TILE

    def __post_init__(self) -> None:
        check_vocab_tile(self.vocab_tile)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TraceError("--epochs and --batch-size must be at least 1 and --lr positive")


def run_sft(config: SFTConfig) -> dict[str, Any]:
    """Maximise the likelihood of each pair's chosen response (prompt tokens carry no loss), then save."""
    from trace_ds.models.loading import load_causal_lm, load_tokenizer, pad_token_id

    tokenizer = load_tokenizer(config.model, required=True)
    model = load_causal_lm(config.model)
    check_head(model, config.vocab_tile)
    model.train()
    pad = pad_token_id(tokenizer, model)
    examples = [tokenize_pair(p, tokenizer, config.tokenize) for p in read_pairs(config.pairs).pairs]
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(examples) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    losses: list[float] = []
    started = time.perf_counter()
    with progress("sft", total=steps, unit="step") as bar:
        for _ in range(config.epochs):
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                chunk = [examples[i] for i in order[start : start + config.batch_size]]
                batch = collate_pairs(chunk, pad)
                n = batch.num_pairs
                rows = torch.arange(n)  # the chosen rows only
                tokens = batch.loss_mask[:n].sum()
                loss = -response_logps(model, batch, rows, tile=config.vocab_tile).sum() / tokens
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update(advance=1, loss=losses[-1])
    model.eval()
    out = Path(config.out)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    summary = {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out / "sft.json", summary)
    console.print(f"SFT: {steps} steps, token NLL {losses[0]:.3f} -> {losses[-1]:.3f}, saved to {out}")
    return summary
