"""Judge responses -> verdicts. A missing, errored or unparsable response is a *problem*, never "compliant".

The public reference code read anything not containing "yes" as compliant (an empty reply, "Non-compliant",
a refusal). Here a side is known only when the judge returned a JSON object whose ``violates`` is a boolean
(or exactly one of the words true/false/yes/no); everything else leaves that side ``null`` and is listed,
with its reason, in the problems file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.io import BadRecord, Position, iter_jsonl, iter_jsonl_lenient, position_text, write_jsonl
from trace_ds.judge.export import split_custom_id
from trace_ds.judge.verdicts import SIDES, Verdict

WORDS = {"true": True, "yes": True, "false": False, "no": False}
FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


@dataclass(frozen=True)
class SideVerdict:
    violates: bool
    confidence: float | None
    rationale: str | None


def parse_verdict_text(text: str | None) -> SideVerdict:
    """Parse the judge's reply; raise ValueError with the reason when it is not a usable verdict."""
    if text is None or not text.strip():
        raise ValueError("empty reply")
    body = FENCE.sub("", text.strip())
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON object in reply {_clip(text)!r}")
    try:
        obj = json.loads(body[start : end + 1])
    except json.JSONDecodeError:
        raise ValueError(f"reply is not valid JSON: {_clip(text)!r}") from None
    if not isinstance(obj, dict) or "violates" not in obj:
        raise ValueError(f"reply has no 'violates' field: {_clip(text)!r}")
    raw = obj["violates"]
    if isinstance(raw, bool):
        violates = raw
    elif isinstance(raw, str) and raw.strip().lower() in WORDS:
        violates = WORDS[raw.strip().lower()]
    else:
        raise ValueError(f"'violates' is {raw!r}, not a boolean")
    confidence = obj.get("confidence")
    if confidence is not None:
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, (int, float))
            or not 0 <= confidence <= 1
        ):
            raise ValueError(f"'confidence' is {confidence!r}, not a number in [0, 1]")
        confidence = float(confidence)
    rationale = obj.get("rationale")
    return SideVerdict(violates, confidence, rationale if isinstance(rationale, str) else None)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def response_content(record: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(reply text, error, judge model) of one response line, OpenAI Batch output or the plain form.

    OpenAI Batch: ``{"custom_id", "response": {"status_code", "body": {chat.completion}}, "error"}``.
    Plain: ``{"custom_id", "output": "..."}`` or ``{"custom_id", "error": "..."}``.
    """
    error = record.get("error")
    if error:
        return None, f"errored: {error.get('message', error) if isinstance(error, dict) else error}", None
    if "response" in record:
        response = record.get("response") or {}
        status = response.get("status_code")
        body = response.get("body") or {}
        if status != 200:
            message = (body.get("error") or {}).get("message", "") if isinstance(body, dict) else ""
            return None, f"errored: HTTP {status} {message}".rstrip(), None
        try:
            return body["choices"][0]["message"].get("content"), None, body.get("model")
        except (KeyError, IndexError, TypeError, AttributeError):
            return None, "errored: response body has no choices[0].message", None
    if "output" in record:
        output = record["output"]
        return (output if isinstance(output, str) else None), None, record.get("judge")
    return None, "errored: line has neither 'response' nor 'output'", None


@dataclass
class Problem:
    pair_id: str | None
    side: str | None
    reason: str
    position: Position | None

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.pair_id,
            "side": self.side,
            "reason": self.reason,
            "position": position_text(self.position),
        }


@dataclass
class ParseResult:
    verdicts: list[Verdict]
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        complete = sum(
            v.chosen_violates is not None and v.rejected_violates is not None for v in self.verdicts
        )
        return {
            "pairs": len(self.verdicts),
            "complete": complete,
            "incomplete": len(self.verdicts) - complete,
            "problems": len(self.problems),
        }


def expected_ids(requests_path: str | Path) -> list[str]:
    """Pair ids in the order of an exported requests file (so missing responses are noticed)."""
    order: list[str] = []
    for position, record in iter_jsonl(requests_path):
        try:
            pair_id, _ = split_custom_id(record["custom_id"])
        except (KeyError, TypeError, ValueError) as err:
            raise BadRecord(position, f"not a judge request line: {err}") from None
        if not order or order[-1] != pair_id:
            order.append(pair_id)
    return list(dict.fromkeys(order))


def parse_responses(
    paths: Iterable[str | Path], expected: list[str] | None = None, expected_sides: tuple[str, ...] = SIDES
) -> ParseResult:
    """Join the two sides of each pair from one or more response files.

    With ``expected`` (from the requests file) a pair or side with no response is listed as missing;
    without it, pairs are those seen and a side never seen is missing all the same.
    """
    sides: dict[str, dict[str, SideVerdict]] = {}
    models: dict[str, str] = {}
    problems: list[Problem] = []
    seen: dict[str, tuple[str | None, str | None, Position]] = {}
    order: list[str] = list(expected or [])
    for path in paths:
        for position, record in iter_jsonl_lenient(path):
            if isinstance(record, BadRecord) or not isinstance(record, dict):
                reason = record.reason if isinstance(record, BadRecord) else "line is not a JSON object"
                problems.append(Problem(None, None, reason, position))
                continue
            try:
                pair_id, side = split_custom_id(str(record.get("custom_id")))
            except ValueError as err:
                problems.append(Problem(None, None, str(err), position))
                continue
            if pair_id not in sides:
                sides[pair_id] = {}
                if expected is None:
                    order.append(pair_id)
            text, error, model = response_content(record)
            previous = seen.get(record["custom_id"])
            if previous is not None:
                if previous[:2] != (text, error):
                    problems.append(
                        Problem(pair_id, side, f"two different responses (first at {previous[2]})", position)
                    )
                    sides[pair_id].pop(side, None)
                continue
            seen[record["custom_id"]] = (text, error, position)
            if error is not None:
                problems.append(Problem(pair_id, side, error, position))
                continue
            try:
                sides[pair_id][side] = parse_verdict_text(text)
            except ValueError as err:
                problems.append(Problem(pair_id, side, f"unparsable: {err}", position))
                continue
            if model:
                models[pair_id] = model
    known = set(order)
    for pair_id in sides:
        if pair_id not in known:
            problems.append(Problem(pair_id, None, "response for a pair not in the requests file", None))
    reasons: dict[tuple[str, str], str] = {(p.pair_id, p.side): p.reason for p in problems if p.side in SIDES}
    verdicts = []
    for pair_id in order:
        got = sides.get(pair_id, {})
        extra: dict[str, Any] = {}
        side_problems = {}
        for side in expected_sides:
            if side in got:
                continue
            reason = reasons.get((pair_id, side))
            if reason is None:
                reason = "missing: no response"
                problems.append(Problem(pair_id, side, reason, None))
            side_problems[side] = reason
        rationale = {side: got[side].rationale for side in SIDES if side in got and got[side].rationale}
        if rationale:
            extra["rationale"] = rationale
        if pair_id in models:
            extra["judge"] = models[pair_id]
        if side_problems:
            extra["problems"] = side_problems
        verdicts.append(
            Verdict(
                pair_id,
                got["chosen"].violates if "chosen" in got else None,
                got["rejected"].violates if "rejected" in got else None,
                got["chosen"].confidence if "chosen" in got else None,
                got["rejected"].confidence if "rejected" in got else None,
                extra=extra,
            )
        )
    return ParseResult(verdicts, problems)


def problems_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.problems.jsonl")


def write_parse_result(result: ParseResult, out: str | Path) -> dict[str, Any]:
    """Write the verdicts and, beside them, ``<stem>.problems.jsonl`` (always, empty when all went well)."""
    write_jsonl(problems_path(out), (problem.to_record() for problem in result.problems))
    write_jsonl(out, (verdict.to_record() for verdict in result.verdicts))
    return {**result.counts(), "verdicts": str(out), "problems_file": str(problems_path(out))}
