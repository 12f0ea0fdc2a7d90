"""The policy-probe set (the paper's "gold batch", Algorithm 2), seeded and written out as full records.

Size B: floor(B/3) retention pairs, floor(B/3) inversion pairs (new orientation), and the rest built from
suppression prompts: each paired with a compliant response drawn from the pool (retention chosen responses
and inversion new-chosen responses) as chosen, and its own violating old chosen as rejected. Drawing is
seeded (the reference code drew unseeded), and the probe file can be passed back with ``--probe``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from trace_ds.config import SUPPRESSION_SOURCES
from trace_ds.data.chat import prompt_key
from trace_ds.data.pairs import Pair
from trace_ds.io import TraceError


def category_of(pair: Pair) -> str:
    category = pair.extra.get("category")
    if category not in ("inversion", "suppression", "retention", "unlearning"):
        raise TraceError(
            f"{pair.position}: pair {pair.id!r} has no triage category; score reads triaged pairs"
        )
    return category


def build_probe(pairs: list[Pair], size: int, seed: int, suppression: str = "pool") -> list[Pair]:
    """Algorithm 2 (``suppression="pool"``) or a variant whose suppression-derived pairs are right for their
    prompt. Raises when a category is too small for its share, naming what is missing.

    ``pool``: each sampled suppression prompt gets a compliant response drawn from the whole pool, as the paper
    does; that response usually answers another prompt, and under the new policy it may well violate it for
    this one (13 of 20 did in one synthetic seed). ``same-prompt``: only suppression prompts that also occur in
    a retention or inversion pair, each with that pair's compliant response (judged for this very prompt).
    ``drop``: no suppression third; half retention, half inversion."""
    if suppression not in SUPPRESSION_SOURCES:
        raise TraceError(f"--probe-suppression {suppression!r}: use {', '.join(SUPPRESSION_SOURCES)}")
    if size < 3:
        raise TraceError(f"--probe-size {size}: must be at least 3 (one pair per category)")
    by_category: dict[str, list[Pair]] = {"inversion": [], "suppression": [], "retention": []}
    for pair in pairs:
        by_category[category_of(pair)].append(pair)
    if suppression != "pool":
        return _probe_judged_for_its_prompt(by_category, size, seed, suppression)
    need = _probe_shares(size)
    for name, count in need.items():
        if len(by_category[name]) < count:
            have = {category: len(members) for category, members in by_category.items()}
            fits = largest_probe_size(have)
            fix = (
                f"use --probe-size {fits} (the largest this file allows)"
                if fits is not None
                else "a built probe needs at least one pair of each category; pass a curated --probe file"
            )
            raise TraceError(
                f"--probe-size {size} needs {count} {name} pairs but the triaged file has {have[name]}; {fix}"
            )
    rng = random.Random(seed)
    retention = rng.sample(by_category["retention"], need["retention"])
    inversion = rng.sample(by_category["inversion"], need["inversion"])
    suppression = rng.sample(by_category["suppression"], need["suppression"])
    pool = [p.chosen for p in by_category["retention"]] + [p.chosen for p in by_category["inversion"]]
    if not pool:
        raise TraceError(
            "no compliant response (retention or inversion chosen) to build suppression probe pairs from"
        )
    probe = [_probe_record(p, p.chosen, p.rejected, p.id) for p in retention + inversion]
    for pair in suppression:
        probe.append(_probe_record(pair, rng.choice(pool), pair.chosen, pair.id, prefix="probe-"))
    return probe


def _probe_judged_for_its_prompt(
    by_category: dict[str, list[Pair]], size: int, seed: int, suppression: str
) -> list[Pair]:
    """The variants of :func:`build_probe` whose every chosen response was judged compliant for its own
    prompt."""
    compliant: dict[str, list[object]] = {}
    for pair in by_category["retention"] + by_category["inversion"]:
        compliant.setdefault(prompt_key(pair.prompt), []).append(pair.chosen)
    eligible = [p for p in by_category["suppression"] if prompt_key(p.prompt) in compliant]
    need, third = _judged_shares(size, len(eligible), suppression)
    n_suppression = size - need["retention"] - need["inversion"]
    if n_suppression < third:
        import warnings

        warnings.warn(
            f"--probe-suppression same-prompt: only {len(eligible)} suppression prompt(s) also occur in a retention or "
            f"inversion pair (a response judged compliant for that very prompt), so the probe has {n_suppression} "
            f"suppression pair(s) instead of {third}; the rest is retention and inversion",
            stacklevel=2,
        )
    have = {category: len(members) for category, members in by_category.items()}
    for name, count in need.items():
        if have[name] < count:
            fits = largest_probe_size(have, lambda n: _judged_shares(n, len(eligible), suppression)[0])
            fix = f"use --probe-size {fits} (the largest this file allows)" if fits else "lower --probe-size"
            raise TraceError(
                f"--probe-size {size} with --probe-suppression {suppression} needs {count} {name} pairs but the "
                f"triaged file has {have[name]}; {fix}"
            )
    rng = random.Random(seed)
    retention = rng.sample(by_category["retention"], need["retention"])
    inversion = rng.sample(by_category["inversion"], need["inversion"])
    probe = [_probe_record(p, p.chosen, p.rejected, p.id) for p in retention + inversion]
    for pair in rng.sample(eligible, n_suppression):
        chosen = rng.choice(compliant[prompt_key(pair.prompt)])
        probe.append(_probe_record(pair, chosen, pair.chosen, pair.id, prefix="probe-"))
    return probe


def _judged_shares(size: int, eligible: int, suppression: str) -> tuple[dict[str, int], int]:
    """The retention and inversion pairs a same-prompt or drop probe of ``size`` needs when ``eligible``
    suppression prompts have a response judged for them, and the suppression third it asks for."""
    third = size // 3 if suppression == "same-prompt" else 0
    rest = size - min(third, eligible)
    return {"retention": rest // 2, "inversion": rest - rest // 2}, third


def _probe_shares(size: int) -> dict[str, int]:
    """Algorithm 2's split of a probe of ``size`` pairs: a third each, the remainder to suppression."""
    third = size // 3
    return {"retention": third, "inversion": third, "suppression": size - 2 * third}


def largest_probe_size(
    available: dict[str, int], shares: Callable[[int], dict[str, int]] = _probe_shares
) -> int | None:
    """The largest --probe-size whose ``shares`` (Algorithm 2's by default) ``available`` pairs per category
    can fill (None below 3)."""
    size = sum(available.values())
    while size >= 3 and any(available.get(c, 0) < n for c, n in shares(size).items()):
        size -= 1
    return size if size >= 3 else None


def _probe_record(pair: Pair, chosen: object, rejected: object, source_id: str, prefix: str = "") -> Pair:
    extra = {"category": pair.extra["category"], "probe_source_id": source_id}
    return replace(pair, id=prefix + pair.id, chosen=chosen, rejected=rejected, extra=extra, position=None)


def probe_source_ids(probe: list[Pair]) -> set[str]:
    """Ids of triaged pairs the probe was built from (for ``--probe-holdout``)."""
    return {str(p.extra.get("probe_source_id", p.id)) for p in probe}
