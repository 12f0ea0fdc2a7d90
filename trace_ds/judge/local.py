"""A local transformers causal LM as the judge: greedy, batched, resumable.

It writes the same plain response lines a remote judge would (``<out stem>.responses.jsonl``), appending
each finished batch, then parses them with trace_ds.judge.parse. Killed part-way, the same command skips
every request already answered. Prompts go through the shared tokenisation path (chat template or the
plain format, BOS once).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trace_ds.console import console, progress
from trace_ds.data.batching import left_padded
from trace_ds.data.pairs import Pair
from trace_ds.data.tokenize import encode_prompt
from trace_ds.io import BadRecord, append_lines, dumps, iter_jsonl_lenient, write_jsonl
from trace_ds.judge.export import build_requests
from trace_ds.judge.parse import ParseResult, parse_responses
from trace_ds.judge.verdicts import SIDES
from trace_ds.models.loading import forward_settings


def responses_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.responses.jsonl")


def load_finished(path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Responses already written by an earlier run; the file is rewritten without a torn last line."""
    if not path.exists():
        return {}
    done: dict[str, dict[str, Any]] = {}
    for _, record in iter_jsonl_lenient(path):
        if isinstance(record, BadRecord) or not isinstance(record, dict):
            continue  # a line cut by a kill: that request is simply asked again
        if record.get("custom_id") in wanted:
            done[record["custom_id"]] = record
    write_jsonl(path, done.values())
    return done


def batches(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_local_judge(
    model_path: str,
    pairs: list[Pair],
    policy: str,
    template: str,
    out: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 96,
    dtype: str = "float32",
    sides: tuple[str, ...] = SIDES,
) -> ParseResult:
    """Judge the ``sides`` of every pair in ``pairs`` with the model at ``model_path``; returns the parsed
    verdicts. Generations (``generations_as_pairs``) are judged with ``sides=("chosen",)``: one request per
    generation, verdicts whose ``chosen_violates`` `trace-ds tpa` reads (``null`` when the reply was unusable)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    requests = list(build_requests(pairs, policy, template, request_format="plain", sides=sides))
    path = responses_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = load_finished(path, {r["custom_id"] for r in requests})
    todo = [r for r in requests if r["custom_id"] not in done]
    if done:
        console.print(f"resuming: {len(done)} of {len(requests)} judge requests already answered in {path}")
    if todo:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = (
            AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
        )
        context = getattr(model.config, "max_position_embeddings", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with open(path, "a", encoding="utf-8") as sink, progress("judging", len(todo), unit="request") as bar:
            for batch in batches(todo, batch_size):
                lines = _judge_batch(
                    model, tokenizer, batch, pad, context, max_new_tokens, model_path, device
                )
                append_lines(sink, (dumps(line) for line in lines))
                bar.update(advance=len(batch))
    return parse_responses(
        [path], expected=list(dict.fromkeys(r["pair_id"] for r in requests)), expected_sides=sides
    )


def _judge_batch(
    model: Any,
    tokenizer: Any,
    batch: list[dict[str, Any]],
    pad: int,
    context: int | None,
    max_new_tokens: int,
    judge_name: str,
    device: str,
) -> list[dict[str, Any]]:
    """Greedy-decode one left-padded batch; a prompt too long for the context is an error line, not a guess."""
    import torch

    lines: list[dict[str, Any]] = []
    runnable: list[tuple[dict[str, Any], list[int]]] = []
    for request in batch:
        ids = encode_prompt(tokenizer, request["prompt"])
        if context is not None and len(ids) + max_new_tokens > context:
            error = f"judge prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the context of {context}"
            lines.append({"custom_id": request["custom_id"], "error": error, "judge": judge_name})
        else:
            runnable.append((request, ids))
    if runnable:
        input_ids, mask = left_padded([ids for _, ids in runnable], pad, device)
        width = input_ids.shape[1]
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **forward_settings(model),
            )
        for (request, _), row in zip(runnable, generated[:, width:].tolist(), strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            lines.append({"custom_id": request["custom_id"], "output": text, "judge": judge_name})
    return lines
