"""Tokenized pairs -> one padded batch for ONE concatenated forward (chosen rows first, then rejected rows).

Right padding with explicit position ids, so padding never changes a valid position's computation; the
loss mask marks the positions that predict a response token, so the label start is the same in every stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trace_ds.data.tokenize import TokenizedPair


@dataclass
class PairBatch:
    """Rows 0..B-1 are ``prompt + chosen``, rows B..2B-1 are ``prompt + rejected`` of the same pairs."""

    ids: list[str]
    input_ids: torch.Tensor  # (2B, L) right-padded
    attention_mask: torch.Tensor  # (2B, L) 1 on real tokens
    position_ids: torch.Tensor  # (2B, L)
    labels: torch.Tensor  # (2B, L) the token each position predicts (0 where nothing is predicted)
    loss_mask: torch.Tensor  # (2B, L) float, 1 where the position predicts a response token
    lengths: torch.Tensor  # (2B,) real tokens per row

    @property
    def num_pairs(self) -> int:
        return len(self.ids)

    def logits(self, model: torch.nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``model``'s logits for the batch (or the given rows of it): the one way every stage calls a model
        (MoE models without the router's auxiliary loss: trace_ds.models.loading.forward_settings)."""
        from trace_ds.models.loading import forward_settings

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if rows is None else tensor.index_select(0, rows)

        return model(
            input_ids=pick(self.input_ids),
            attention_mask=pick(self.attention_mask),
            position_ids=pick(self.position_ids),
            use_cache=False,
            **forward_settings(model),
        ).logits

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(
            self.ids,
            *(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.labels)),
            self.loss_mask.to(device),
            self.lengths.to(device),
        )


def left_padded(
    encoded: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded for generation: (input_ids, attention_mask), real tokens flush right."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return input_ids, mask


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, pad_to: int | None = None) -> PairBatch:
    """Pad chosen and rejected sequences of ``pairs`` into one batch (``pad_to`` widens it, for tests)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return _padded([p.id for p in pairs], rows, pad_id, pad_to)


def text_batch(encoded: Sequence[Sequence[int]], pad_id: int) -> PairBatch:
    """Token sequences as one right-padded batch, one row each, whose loss mask covers every predicted token
    (perplexity: each row is an empty prompt and the whole text as the response)."""
    return _padded([str(i) for i in range(len(encoded))], [([], ids) for ids in encoded], pad_id, None)


def _padded(
    ids: list[str], rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, pad_to: int | None
) -> PairBatch:
    width = max(len(prompt) + len(response) for prompt, response in rows)
    width = max(width, pad_to or 0)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.float32)
    for row, (prompt, response) in enumerate(rows):
        tokens = list(prompt) + list(response)
        length = len(tokens)
        input_ids[row, :length] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, : length - 1] = input_ids[row, 1:length]
        # position t predicts token t+1; response tokens start at index len(prompt)
        start = max(len(prompt) - 1, 0)
        loss_mask[row, start : length - 1] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lengths = attention_mask.sum(-1)
    return PairBatch(ids, input_ids, attention_mask, position_ids, labels, loss_mask, lengths)
