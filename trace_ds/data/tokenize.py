"""The ONE tokenisation path, shared by probe, scoring, training, evaluation and the local judge.

The public reference code tokenised differently in each stage (chat template in one, raw text in another,
an off-by-one label start in a third), so scores were computed for sequences the trainer never saw. Here
every stage calls :func:`tokenize_pair` / :func:`render_prompt`, and the rules are:

* A text prompt goes through the tokenizer's chat template with the generation prompt added; a tokenizer
  without a template uses the plain format ``User: {prompt}\\nAssistant:`` (:data:`PLAIN_ROLES`).
* The response is tokenised on its own (no special tokens) and ends with EOS.
* BOS (when the tokenizer has one) appears exactly once, at the start of the prompt.
* Caps: at most ``max_prompt_length`` prompt tokens (truncated on ``prompt_truncation`` side, BOS kept),
  at most ``max_length`` prompt + response tokens (the response loses its end). A pair left with no
  response token is a bad record.
* Pre-tokenized pairs are used exactly as given: nothing added or removed; over a cap is a bad record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from trace_ds.data.chat import (
    as_messages,
    render_plain,
)
from trace_ds.data.pairs import Pair
from trace_ds.io import BadRecord, TraceError


@dataclass(frozen=True)
class TokenizeConfig:
    """Length caps. Defaults suit 7B-70B chat models on preference data (TRL uses the same caps)."""

    max_length: int = 1024
    max_prompt_length: int = 512
    prompt_truncation: Literal["left", "right"] = "left"

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise TraceError(
                f"max_length={self.max_length}: must be at least 2 (one prompt and one response token)"
            )
        if not 1 <= self.max_prompt_length < self.max_length:
            raise TraceError(
                f"max_prompt_length={self.max_prompt_length} must be >= 1 and < max_length={self.max_length}, "
                "so every pair keeps at least one response token"
            )
        if self.prompt_truncation not in ("left", "right"):
            raise TraceError(f"prompt_truncation={self.prompt_truncation!r}: use 'left' or 'right'")


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair: the shared prompt and the two responses (each ending with EOS unless cut)."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def render_prompt(tokenizer: Any, prompt: str | list[dict]) -> str:
    """Prompt text as the model sees it: chat template with generation prompt, or the plain format."""
    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return render_plain(messages)


def response_text(response: str | list[dict]) -> str:
    """A response as text: a string, or the assistant messages' contents joined by a blank line."""
    if isinstance(response, str):
        return response
    return "\n\n".join(message["content"] for message in response)


def encode_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    """Prompt token ids with exactly one leading BOS (when the tokenizer has one)."""
    ids = list(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None:
        while ids and ids[0] == bos:
            ids.pop(0)
        ids.insert(0, bos)
    return ids


def encode_response(tokenizer: Any, response: str | list[dict]) -> list[int]:
    """Response token ids, no special tokens, ending with EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TraceError(
            "the tokenizer has no EOS token; responses must end with one (set tokenizer.eos_token)"
        )
    return [*tokenizer(response_text(response), add_special_tokens=False)["input_ids"], eos]


def tokenize_pair(pair: Pair, tokenizer: Any | None, config: TokenizeConfig) -> TokenizedPair:
    """Token ids for ``pair`` under the shared rules; raise BadRecord when no response token would remain."""
    if pair.shape == "tokenized":
        prompt, chosen, rejected = list(pair.prompt), list(pair.chosen), list(pair.rejected)  # type: ignore[arg-type]
        longest = len(prompt) + max(len(chosen), len(rejected))
        if len(prompt) > config.max_prompt_length or longest > config.max_length:
            raise BadRecord(
                pair.position,
                f"pre-tokenized pair {pair.id!r} has {len(prompt)} prompt and {longest} total tokens, over the caps "
                f"(max_prompt_length={config.max_prompt_length}, max_length={config.max_length}); "
                "pre-tokenized pairs are never truncated: raise the caps or shorten the record",
            )
        return TokenizedPair(pair.id, prompt, chosen, rejected)
    if tokenizer is None:
        raise TraceError(f"pair {pair.id!r} is text, so a tokenizer is needed (give a model folder with one)")
    prompt = _truncate_prompt(encode_prompt(tokenizer, pair.prompt), tokenizer.bos_token_id, config)  # type: ignore[arg-type]
    room = config.max_length - len(prompt)
    chosen = encode_response(tokenizer, pair.chosen)[:room]  # type: ignore[arg-type]
    rejected = encode_response(tokenizer, pair.rejected)[:room]  # type: ignore[arg-type]
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids or ids == [tokenizer.eos_token_id]:
            raise BadRecord(pair.position, f"pair {pair.id!r}: the {name} response has no token besides EOS")
    return TokenizedPair(pair.id, prompt, chosen, rejected)


def _truncate_prompt(ids: list[int], bos: int | None, config: TokenizeConfig) -> list[int]:
    cap = config.max_prompt_length
    if len(ids) <= cap:
        return ids
    if config.prompt_truncation == "right":
        return ids[:cap]
    head = ids[:1] if bos is not None and ids[:1] == [bos] else []
    return head + ids[len(ids) - (cap - len(head)) :]
