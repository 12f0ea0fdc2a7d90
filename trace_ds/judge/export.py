"""Judge requests: one per response (two per pair), in OpenAI Batch format or a plain JSONL form.

The judge sees each response alone, against the new policy, and is asked for a JSON object
``{"violates": bool, "confidence": float, "rationale": str}`` (parsed by trace_ds.judge.parse).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from trace_ds.data.chat import plain_transcript
from trace_ds.data.pairs import Pair
from trace_ds.data.tokenize import response_text
from trace_ds.io import BadRecord, TraceError
from trace_ds.judge.verdicts import SIDES

RequestFormat = Literal["openai", "plain"]
PLACEHOLDERS = ("{policy}", "{prompt}", "{response}")
CUSTOM_ID_SEPARATOR = "::"


def default_template() -> str:
    return resources.files("trace_ds.judge").joinpath("templates/judge_prompt.md").read_text(encoding="utf-8")


def load_template(path: str | Path | None) -> str:
    """The judge prompt template: the packaged default, or a user file with the same placeholders."""
    text = default_template() if path is None else Path(path).read_text(encoding="utf-8")
    missing = [name for name in PLACEHOLDERS if name not in text]
    if missing:
        raise TraceError(
            f"{path or 'default template'}: judge template lacks placeholder(s) {', '.join(missing)}"
        )
    return text


def fill_template(template: str, policy: str, prompt: str, response: str) -> str:
    """Substitute the three placeholders literally (no str.format: policies and answers contain braces)."""
    return (
        template.replace("{policy}", policy.strip())
        .replace("{prompt}", prompt)
        .replace("{response}", response)
    )


def custom_id(pair_id: str, side: str) -> str:
    """``<pair id>::<side>``; split with :func:`split_custom_id` (the side never contains the separator)."""
    return f"{pair_id}{CUSTOM_ID_SEPARATOR}{side}"


def split_custom_id(value: str) -> tuple[str, str]:
    pair_id, sep, side = value.rpartition(CUSTOM_ID_SEPARATOR)
    if not sep or not pair_id or side not in SIDES:
        raise ValueError(f"custom_id {value!r} is not '<pair id>::chosen' or '<pair id>::rejected'")
    return pair_id, side


def judge_prompts(
    pair: Pair, policy: str, template: str, sides: tuple[str, ...] = SIDES
) -> Iterator[tuple[str, str]]:
    """(side, judge prompt text) for the responses of ``pair`` (both by default)."""
    if pair.shape == "tokenized":
        raise BadRecord(pair.position, f"pair {pair.id!r} is pre-tokenized; the judge needs text")
    prompt = pair.prompt if isinstance(pair.prompt, str) else plain_transcript(pair.prompt)
    for side in sides:
        response = response_text(getattr(pair, side))
        yield side, fill_template(template, policy, prompt, response)


def build_requests(
    pairs: Iterable[Pair],
    policy: str,
    template: str,
    request_format: RequestFormat = "openai",
    model: str = "gpt-4o-mini",
    max_tokens: int = 256,
    sides: tuple[str, ...] = SIDES,
) -> Iterator[dict[str, Any]]:
    """One request per response. OpenAI Batch lines post to /v1/chat/completions with JSON output and
    temperature 0; plain lines carry the rendered prompt for any local runner."""
    for pair in pairs:
        for side, text in judge_prompts(pair, policy, template, sides):
            cid = custom_id(pair.id, side)
            if request_format == "plain":
                yield {"custom_id": cid, "pair_id": pair.id, "side": side, "prompt": text}
            else:
                yield {
                    "custom_id": cid,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": model,
                        "messages": [{"role": "user", "content": text}],
                        "temperature": 0,
                        "max_tokens": max_tokens,
                        "response_format": {"type": "json_object"},
                    },
                }


def generations_as_pairs(path: str | Path) -> list[Pair]:
    """Generations (``{"id", "prompt", "response"}``, as `trace-ds eval` writes them) as one-sided pairs: the
    response is the ``chosen`` side, so one request per generation goes through the same export and parse."""
    from trace_ds.io import iter_jsonl

    pairs = []
    for position, record in iter_jsonl(path):
        if (
            not isinstance(record, dict)
            or not all(isinstance(record.get(k), str) for k in ("prompt", "response"))
            or "id" not in record
        ):
            raise BadRecord(position, "a generation needs string 'prompt' and 'response' and an 'id'")
        pairs.append(
            Pair(
                str(record["id"]),
                "text",
                record["prompt"],
                record["response"],
                record["response"],
                position=position,
            )
        )
    return pairs
