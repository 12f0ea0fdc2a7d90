"""The verdict record (one line per pair) and its reader.

A verdict says, for each response of a pair **in the pairs file's orientation**, whether it violates the
new policy. A side may be unknown (``null`` or absent): the judge failed on it. Triage decides whether
the pair is still judged (see trace_ds.judge.triage).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.io import BadRecord, Position, TraceError, iter_jsonl

SIDES = ("chosen", "rejected")
VIOLATION_KEYS = tuple(f"{side}_violates" for side in SIDES)
VERDICT_KEYS = (*VIOLATION_KEYS, *(f"{side}_confidence" for side in SIDES), "confidence")


@dataclass(frozen=True)
class Verdict:
    id: str
    chosen_violates: bool | None
    rejected_violates: bool | None
    chosen_confidence: float | None = None
    rejected_confidence: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # rationale, judge, problems, ...

    def violates(self, side: str) -> bool | None:
        return self.chosen_violates if side == "chosen" else self.rejected_violates

    def confidence(self, side: str) -> float | None:
        return self.chosen_confidence if side == "chosen" else self.rejected_confidence

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "chosen_violates": self.chosen_violates,
            "rejected_violates": self.rejected_violates,
        }
        for side in SIDES:
            if self.confidence(side) is not None:
                record[f"{side}_confidence"] = self.confidence(side)
        return {**record, **self.extra}

    def key(self) -> tuple:
        """What two verdicts for one id must agree on to count as the same verdict."""
        return (
            self.chosen_violates,
            self.rejected_violates,
            self.chosen_confidence,
            self.rejected_confidence,
        )


def verdict_from_record(record: Any, position: Position | None) -> Verdict:
    """Validate one verdict line. ``confidence`` applies to both sides; ``<side>_confidence`` overrides it."""
    if not isinstance(record, dict):
        raise BadRecord(position, f"expected a JSON object, got {type(record).__name__}")
    record = dict(record)
    _check_keys(record, position)
    raw_id = record.pop("id", None)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
        raise BadRecord(position, "verdict needs a string or integer 'id'")
    values: dict[str, Any] = {}
    shared = _confidence(record.pop("confidence", None), "confidence", position)
    for side in SIDES:
        name = f"{side}_violates"
        value = record.pop(name, None)
        if value is not None and not isinstance(value, bool):
            raise BadRecord(position, f"{name!r} must be true, false or null, got {value!r}")
        values[name] = value
        own = _confidence(record.pop(f"{side}_confidence", None), f"{side}_confidence", position)
        values[f"{side}_confidence"] = own if own is not None else shared
    return Verdict(str(raw_id), extra=record, **values)


def _check_keys(record: dict[str, Any], position: Position | None) -> None:
    """A misspelt verdict key would read as 'unknown' and leave the pair unjudged without a word: a key close
    to a verdict key is an error with the fix, and so is a record with neither violation key. Other extra
    fields (rationale, judge, ...) are kept."""
    for key in record:
        if key == "id" or any(name in str(key) for name in VERDICT_KEYS):  # exact, or an extension
            continue
        close = difflib.get_close_matches(str(key), VERDICT_KEYS, n=1, cutoff=0.8)
        if close:
            raise BadRecord(position, f"unknown key {key!r}; did you mean {close[0]!r}?")
    if not any(key in record for key in VIOLATION_KEYS):
        raise BadRecord(
            position,
            f"no verdict: the record has neither {VIOLATION_KEYS[0]!r} nor {VIOLATION_KEYS[1]!r} "
            f"(keys: {sorted(record)}); an unknown side is written as null (docs/formats.md)",
        )


def _confidence(value: Any, name: str, position: Position | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise BadRecord(position, f"{name!r} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class VerdictSet:
    by_id: dict[str, Verdict]
    repeated: int  # identical duplicate lines, counted and folded into one


def read_verdicts(path: str | Path) -> VerdictSet:
    """Read a verdict file. A bad line is an error naming file and line; so are two different verdicts for
    one id (which one to believe is the user's call, not ours). Identical repeats are counted and folded."""
    by_id: dict[str, Verdict] = {}
    first_seen: dict[str, Position] = {}
    repeated = 0
    for position, record in iter_jsonl(path):
        verdict = verdict_from_record(record, position)
        previous = by_id.get(verdict.id)
        if previous is None:
            by_id[verdict.id] = verdict
            first_seen[verdict.id] = position
        elif previous.key() == verdict.key():
            repeated += 1
        else:
            raise TraceError(
                f"{position}: a second, different verdict for id {verdict.id!r} (first at {first_seen[verdict.id]}); "
                "remove one of them"
            )
    return VerdictSet(by_id, repeated)
