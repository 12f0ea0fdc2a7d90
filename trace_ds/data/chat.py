"""Chat text without a tokenizer: the plain chat format (for tokenizers with no chat template), a
conversation's transcript, and the key that compares prompts across pairs and files.

Below both ``pairs`` (which compares prompts) and ``tokenize`` (which renders them), so neither imports the
other for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_GENERATION_PROMPT = "Assistant:"


def plain_transcript(messages: Sequence[dict]) -> str:
    """Messages as ``Role: content`` lines (the plain chat format, without a generation prompt)."""
    return "\n".join(
        f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages
    )


def render_plain(messages: Sequence[dict]) -> str:
    """The plain chat format used when a tokenizer has no chat template (documented in docs/formats.md)."""
    return f"{plain_transcript(messages)}\n{PLAIN_GENERATION_PROMPT}"


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_key(prompt: Any) -> str:
    """Prompts compared across pairs and files (deduplication, the same prompt in two pairs): text (a
    conversation as its transcript, pre-tokenized ids as their list), case and spaces folded."""
    conversation = isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)
    text = prompt if isinstance(prompt, str) else plain_transcript(prompt) if conversation else str(prompt)
    return " ".join(text.lower().split())
