"""The preference-pair record, its validation, and the one reader every stage uses.

Three record shapes are accepted (see docs/formats.md):

* ``text``: ``prompt``, ``chosen``, ``rejected`` are strings;
* ``conversational`` (TRL style): ``prompt`` is a list of ``{role, content}`` messages, ``chosen`` and
  ``rejected`` are lists of assistant messages;
* ``tokenized``: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` are integer lists,
  used exactly as given.

Fields other than these are kept verbatim in ``Pair.extra`` and written back out by every stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from trace_ds.io import BadRecord, Position, TraceError, iter_table_records, position_text, write_jsonl

Shape = Literal["text", "conversational", "tokenized"]
OnBad = Literal["error", "skip"]

TEXT_FIELDS = ("prompt", "chosen", "rejected")
TOKEN_FIELDS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
CANONICAL_FIELDS = ("id", *TEXT_FIELDS, *TOKEN_FIELDS)

Content = str | list[dict] | list[int]


@dataclass
class Pair:
    """One preference pair. ``chosen`` is the preferred response in the orientation the file states."""

    id: str
    shape: Shape
    prompt: Content
    chosen: Content
    rejected: Content
    extra: dict[str, Any] = field(default_factory=dict)
    position: Position | None = None

    def to_record(self) -> dict[str, Any]:
        """The record as written to files: canonical field names first, then every extra field."""
        if self.shape == "tokenized":
            body = dict(zip(TOKEN_FIELDS, (self.prompt, self.chosen, self.rejected), strict=True))
        else:
            body = dict(zip(TEXT_FIELDS, (self.prompt, self.chosen, self.rejected), strict=True))
        return {"id": self.id, **body, **self.extra}

    def swapped(self) -> Pair:
        """The same pair with chosen and rejected exchanged (inversion's new orientation)."""
        return replace(self, chosen=self.rejected, rejected=self.chosen, extra=dict(self.extra))


@dataclass(frozen=True)
class Reject:
    """A record that could not be used, with where it came from and why."""

    position: Position | None
    reason: str
    record: Any

    def to_record(self) -> dict[str, Any]:
        return {"position": position_text(self.position), "reason": self.reason, "record": self.record}


def parse_column_map(items: Iterable[str]) -> dict[str, str]:
    """Parse ``canonical=source`` options (``--column prompt=question``) into {source: canonical}."""
    mapping: dict[str, str] = {}
    for item in items:
        canonical, sep, source = item.partition("=")
        canonical, source = canonical.strip(), source.strip()
        if not sep or not canonical or not source:
            raise TraceError(f"--column {item!r}: expected CANONICAL=SOURCE, e.g. prompt=question")
        if canonical not in CANONICAL_FIELDS:
            raise TraceError(f"--column {item!r}: {canonical!r} is not one of {', '.join(CANONICAL_FIELDS)}")
        mapping[source] = canonical
    return mapping


def content_id(shape: str, prompt: Content, chosen: Content, rejected: Content) -> str:
    """Stable id for a record without one: sha256 of the canonical JSON of (shape, prompt, chosen, rejected).

    The same content always gets the same id on any machine, so identical pairs collide as duplicates.
    """
    blob = json.dumps(
        [shape, prompt, chosen, rejected], ensure_ascii=False, sort_keys=True, separators=(",", ":")
    )
    return "pair-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def pair_from_record(
    record: Any, position: Position | None = None, columns: Mapping[str, str] | None = None
) -> Pair:
    """Validate one raw record (after renaming columns) into a Pair; raise BadRecord naming the problem."""
    if not isinstance(record, Mapping):
        raise BadRecord(position, f"expected a JSON object, got {type(record).__name__}")
    renamed: dict[str, Any] = {}
    for key, value in record.items():
        target = (columns or {}).get(key, key)
        if target in renamed:
            raise BadRecord(position, f"field {target!r} given twice (check --column)")
        renamed[target] = value

    def need(name: str) -> Any:
        if name not in renamed or renamed[name] is None:
            source = next((src for src, dst in (columns or {}).items() if dst == name), None)
            hint = f" (mapped from {source!r})" if source else ""
            raise BadRecord(position, f"missing field {name!r}{hint}")
        return renamed.pop(name)

    if any(name in renamed for name in TOKEN_FIELDS):
        shape: Shape = "tokenized"
        prompt, chosen, rejected = (need(name) for name in TOKEN_FIELDS)
        for name, value in zip(TOKEN_FIELDS, (prompt, chosen, rejected), strict=True):
            _check_token_ids(value, name, position, allow_empty=name == "prompt_input_ids")
    elif isinstance(renamed.get("prompt"), list):
        shape = "conversational"
        prompt, chosen, rejected = (need(name) for name in TEXT_FIELDS)
        _check_messages(prompt, "prompt", position, assistant_only=False)
        _check_messages(chosen, "chosen", position, assistant_only=True)
        _check_messages(rejected, "rejected", position, assistant_only=True)
    else:
        shape = "text"
        prompt, chosen, rejected = (need(name) for name in TEXT_FIELDS)
        for name, value in zip(TEXT_FIELDS, (prompt, chosen, rejected), strict=True):
            if not isinstance(value, str):
                raise BadRecord(position, f"field {name!r} must be a string, got {type(value).__name__}")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise BadRecord(position, f"field {name!r} is an empty response")

    raw_id = renamed.pop("id", None)
    if raw_id is None:
        pair_id = content_id(shape, prompt, chosen, rejected)
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise BadRecord(position, f"field 'id' must be a string or integer, got {type(raw_id).__name__}")
    else:
        pair_id = str(raw_id)
        if not pair_id.strip():
            raise BadRecord(position, "field 'id' is empty")
    return Pair(pair_id, shape, prompt, chosen, rejected, extra=renamed, position=position)


def _check_token_ids(value: Any, name: str, position: Position | None, allow_empty: bool) -> None:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadRecord(position, f"field {name!r} must be a list of integers")
    if any(v < 0 for v in value):
        raise BadRecord(position, f"field {name!r} holds a negative token id")
    if not value and not allow_empty:
        raise BadRecord(position, f"field {name!r} is an empty response")


def _check_messages(value: Any, name: str, position: Position | None, assistant_only: bool) -> None:
    if not isinstance(value, list) or not value:
        raise BadRecord(position, f"field {name!r} must be a non-empty list of messages")
    for number, message in enumerate(value):
        where = f"{name}[{number}]"
        if not isinstance(message, Mapping):
            raise BadRecord(position, f"{where} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRecord(position, f"{where} needs string 'role' and 'content'")
        if assistant_only and role != "assistant":
            raise BadRecord(position, f"{where} has role {role!r}; responses must be assistant messages")
    if assistant_only and not any(message["content"].strip() for message in value):
        raise BadRecord(position, f"field {name!r} is an empty response")


@dataclass
class PairSet:
    """Pairs read from one source, plus everything rejected (in skip mode) on the way."""

    pairs: list[Pair]
    rejects: list[Reject]
    source: str


def iter_pairs(
    source: str | Path,
    columns: Mapping[str, str] | None = None,
    on_bad: OnBad = "error",
    split: str | None = None,
    streaming: bool = False,
    rejects: list[Reject] | None = None,
) -> Iterator[Pair]:
    """Lazily yield validated pairs. A bad record raises BadRecord, or with ``on_bad='skip'`` is appended
    to ``rejects`` (required then) and reading goes on. Duplicate ids are bad records too."""
    if on_bad == "skip" and rejects is None:
        raise ValueError("on_bad='skip' needs a rejects list to record what was skipped")
    seen: dict[str, Position | None] = {}
    for position, raw in iter_table_records(str(source), split=split, streaming=streaming):
        try:
            if isinstance(raw, BadRecord):
                raise raw
            pair = pair_from_record(raw, position, columns)
            if pair.id in seen:
                raise BadRecord(position, f"duplicate id {pair.id!r} (first seen at {seen[pair.id]})")
            seen[pair.id] = position
        except BadRecord as bad:
            if on_bad == "error":
                raise
            assert rejects is not None
            rejects.append(Reject(position, bad.reason, bad.raw if isinstance(raw, BadRecord) else raw))
            continue
        yield pair


def read_pairs(
    source: str | Path,
    columns: Mapping[str, str] | None = None,
    on_bad: OnBad = "error",
    split: str | None = None,
    streaming: bool = False,
) -> PairSet:
    """Read every pair of ``source`` into memory (see :func:`iter_pairs`)."""
    rejects: list[Reject] = []
    pairs = list(iter_pairs(source, columns, on_bad, split, streaming, rejects))
    return PairSet(pairs, rejects, str(source))


def rejects_path(output: str | Path) -> Path:
    """Where the rejects of a stage writing ``output`` go: ``<output stem>.rejects.jsonl`` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rejects.jsonl")


def write_rejects(output: str | Path, rejects: list[Reject]) -> Path | None:
    """Write the rejects file beside ``output`` (only when there is something to write)."""
    if not rejects:
        return None
    path = rejects_path(output)
    write_jsonl(path, (reject.to_record() for reject in rejects))
    return path


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> int:
    return write_jsonl(path, (pair.to_record() for pair in pairs))
