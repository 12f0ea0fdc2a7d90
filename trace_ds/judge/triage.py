"""Stage 1: verdicts x pairs -> conflict categories, stored in the new orientation.

| chosen violates | rejected violates | category    | stored as                          |
|-----------------|-------------------|-------------|------------------------------------|
| yes             | no                | inversion   | swapped (chosen := old rejected)   |
| yes             | yes               | suppression | order kept; both pushed down       |
| no              | any               | retention   | order kept; anchored to reference  |

A pair is judged when the verdicts its category needs are known and confident enough; otherwise it goes to
the unjudged file with its reason. Nothing is guessed.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.data.pairs import OnBad, Pair, read_pairs, write_rejects
from trace_ds.io import BadRecord, TraceError, write_json, write_jsonl
from trace_ds.judge.verdicts import Verdict, read_verdicts

CATEGORIES = ("inversion", "suppression", "retention")
CONFLICT_CATEGORIES = ("inversion", "suppression")
# Not produced by triage: the "w/o triage" baseline stores every pair as "unlearning" (NPO on the old chosen).
BASELINE_CATEGORIES = ("unlearning",)
ADDED_FIELDS = ("category", "swapped", "chosen_violates", "rejected_violates", "verdict")


def categorize(verdict: Verdict | None, min_confidence: float = 0.0) -> tuple[str | None, str | None]:
    """(category, None) for a judged pair, (None, reason) for an unjudged one."""
    if verdict is None:
        return None, "no verdict for this id"
    for side in ("chosen", "rejected"):
        violates, confidence = verdict.violates(side), verdict.confidence(side)
        if violates is None:
            return None, f"{side} verdict missing"
        if confidence is not None and confidence < min_confidence:
            return None, f"{side} verdict confidence {confidence:g} below --min-confidence {min_confidence:g}"
        if side == "chosen" and not violates:
            return "retention", None  # the rejected verdict is not needed
    return ("suppression" if verdict.rejected_violates else "inversion"), None


def orient(pair: Pair, category: str) -> Pair:
    """The pair as stored for ``category``: inversions swapped, the others in their given order."""
    return pair.swapped() if category == "inversion" else pair


def triaged_record(pair: Pair, category: str, verdict: Verdict) -> dict[str, Any]:
    """The stored record: every input field, the category, and verdicts described in the stored order.

    ``chosen_violates``/``rejected_violates`` describe the record's own ``chosen``/``rejected`` (so after a
    swap they are exchanged); ``verdict`` is the judge's line as it was, in the original orientation.
    """
    swapped = category == "inversion"
    stored = orient(pair, category)
    chosen_v, rejected_v = verdict.chosen_violates, verdict.rejected_violates
    if swapped:
        chosen_v, rejected_v = rejected_v, chosen_v
    return {
        **stored.to_record(),
        "category": category,
        "swapped": swapped,
        "chosen_violates": chosen_v,
        "rejected_violates": rejected_v,
        "verdict": verdict.to_record(),
    }


@dataclass
class TriageResult:
    records: list[dict[str, Any]]
    unjudged: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


def triage(
    pairs: list[Pair],
    verdicts: dict[str, Verdict],
    min_confidence: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> TriageResult:
    """Categorise every pair; optionally give a fraction ``noise`` of judged pairs a different category."""
    if not 0.0 <= noise <= 1.0:
        raise TraceError(f"--noise {noise}: must be a fraction in [0, 1]")
    for pair in pairs:
        clash = [name for name in ADDED_FIELDS if name in pair.extra]
        if clash:
            raise BadRecord(
                pair.position, f"field(s) {clash} are set by triage; is this file already triaged?"
            )
    judged: list[tuple[Pair, str]] = []
    unjudged: list[dict[str, Any]] = []
    for pair in pairs:
        category, reason = categorize(verdicts.get(pair.id), min_confidence)
        if category is None:
            unjudged.append({**pair.to_record(), "unjudged_reason": reason})
        else:
            judged.append((pair, category))

    flipped = []
    if noise > 0 and judged:
        rng = random.Random(seed)
        for index in sorted(rng.sample(range(len(judged)), round(noise * len(judged)))):
            pair, old = judged[index]
            new = rng.choice([c for c in CATEGORIES if c != old])
            judged[index] = (pair, new)
            flipped.append({"id": pair.id, "from": old, "to": new})

    records = [triaged_record(pair, category, verdicts[pair.id]) for pair, category in judged]
    counts = Counter(category for _, category in judged)
    known_ids = {pair.id for pair in pairs}
    report: dict[str, Any] = {
        "pairs": len(pairs),
        "judged": len(judged),
        "categories": {name: counts.get(name, 0) for name in CATEGORIES},
        "unjudged": len(unjudged),
        "unjudged_reasons": dict(Counter(_reason_kind(u["unjudged_reason"]) for u in unjudged)),
        "verdicts": len(verdicts),
        "verdicts_for_unknown_ids": sum(1 for vid in verdicts if vid not in known_ids),
        "violation_rates": _violation_rates([verdicts[p.id] for p in pairs if p.id in verdicts]),
        "min_confidence": min_confidence,
    }
    if noise > 0:
        report["noise"] = {"rate": noise, "seed": seed, "flipped": len(flipped), "flips": flipped}
    return TriageResult(records, unjudged, report)


def _reason_kind(reason: str) -> str:
    """Group reasons for counting: 'chosen verdict confidence 0.3 below ...' -> 'chosen low confidence'."""
    if "confidence" in reason:
        return reason.split(" verdict")[0] + " verdict low confidence"
    return reason


def _violation_rates(verdicts: list[Verdict]) -> dict[str, float | None]:
    rates: dict[str, float | None] = {}
    for side in ("chosen", "rejected"):
        known = [v.violates(side) for v in verdicts if v.violates(side) is not None]
        rates[side] = round(sum(known) / len(known), 6) if known else None
    return rates


def output_paths(out: str | Path) -> dict[str, Path]:
    """Files written beside the triaged output: ``<stem>.unjudged.jsonl``, ``<stem>.report.json``."""
    out = Path(out)
    return {
        "triaged": out,
        "unjudged": out.with_name(f"{out.stem}.unjudged.jsonl"),
        "report": out.with_name(f"{out.stem}.report.json"),
    }


def run_triage(
    pairs_source: str,
    verdicts_path: str,
    out: str,
    columns: dict[str, str] | None = None,
    on_bad: OnBad = "error",
    min_confidence: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    split: str | None = None,
    unjudged_only: bool = False,
) -> dict[str, Any]:
    """Read, triage and write every output atomically; nothing is written when an input is bad, nor when no
    pair is judged (an empty triaged file trains nothing), unless ``unjudged_only`` asks for just the
    unjudged file and the report."""
    if not 0.0 <= min_confidence <= 1.0:
        raise TraceError(f"--min-confidence {min_confidence}: must be in [0, 1]")
    pair_set = read_pairs(pairs_source, columns, on_bad, split=split)
    verdict_set = read_verdicts(verdicts_path)
    result = triage(pair_set.pairs, verdict_set.by_id, min_confidence, noise, seed)
    if not result.records and not unjudged_only:
        raise TraceError(_nothing_judged(result.report, verdicts_path))
    paths = output_paths(out)
    rejects_file = write_rejects(out, pair_set.rejects)
    report = {
        "inputs": {"pairs": str(pairs_source), "verdicts": str(verdicts_path)},
        **result.report,
        "rejects": len(pair_set.rejects),
        "repeated_verdicts": verdict_set.repeated,
        "outputs": {
            "triaged": str(paths["triaged"]),
            "unjudged": str(paths["unjudged"]),
            "rejects": str(rejects_file) if rejects_file else None,
        },
    }
    write_jsonl(paths["unjudged"], result.unjudged)
    if unjudged_only:
        report["outputs"]["triaged"] = None
    else:
        write_jsonl(paths["triaged"], result.records)
    write_json(paths["report"], report)
    return report


def _nothing_judged(report: dict[str, Any], verdicts_path: str) -> str:
    reasons = ", ".join(f"{count} {reason}" for reason, count in report["unjudged_reasons"].items())
    unknown = report["verdicts_for_unknown_ids"]
    hint = (
        f"; {unknown} of {report['verdicts']} verdicts name ids that are not in the pairs (do the ids match?)"
        if unknown
        else ""
    )
    return (
        f"no pair was judged: {report['pairs']} pairs, all unjudged ({reasons or 'no pairs'}){hint}. "
        f"Check {verdicts_path} against docs/formats.md (verdicts), or pass --unjudged-only to write just "
        "the unjudged pairs and the report"
    )
