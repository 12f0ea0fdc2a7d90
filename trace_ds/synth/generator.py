"""Build the synthetic policy-shift benchmark: preference pairs, judge verdicts, truth, corpus, eval sets.

Everything is drawn from :mod:`trace_ds.synth.policies` with ``random.Random`` streams seeded from
``(seed, stream name)`` (string seeds are hashed with SHA-512 by ``random``, so no ``PYTHONHASHSEED``
dependence): the same arguments give byte-identical files, and separate streams mean that e.g. changing
``judge_noise`` leaves the pairs themselves unchanged, while raising it only adds flips (nested noise).

Every generated pair is checked against the rule judge on its *text*: the judge must find the intended
topic, both intended styles and the intended category, so the files never disagree with the judge that
later scores generations. See docs/synth.md for the files written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.chat import PLAIN_GENERATION_PROMPT, PLAIN_ROLES
from ..io import TraceError, write_json, write_jsonl, write_text
from .judge import JUDGE_NAME, judge_response
from .policies import (
    CATEGORIES,
    CAVEATS,
    PROMPT_SUFFIXES,
    REFUSALS,
    SOURCE_PREFIX,
    STYLES,
    TOPICS,
    Topic,
    category_of,
    new_policy_markdown,
    old_policy_markdown,
)

FORMAT = "trace-ds-synth"
FORMAT_VERSION = 2  # 2: the manifest records the eval prompts' hash; eval/manifest.json
EVAL_FORMAT = "trace-ds-synth-eval"  # eval/manifest.json: what ties eval/ to the rule judge
DEFAULT_PROPORTIONS: dict[str, float] = {"inversion": 0.35, "suppression": 0.25, "retention": 0.40}
EVAL_CORE_FRACTION = 0.25  # share of each topic's (template, primary filler) combinations held out for eval
# The project's plain chat format (trace_ds.data.tokenize), one document per prompt/response.
CHAT_FORMAT = f"{PLAIN_ROLES['user']}: {{prompt}}\n{PLAIN_GENERATION_PROMPT} {{response}}\n\n"
# The evaluation folder's files (docs/formats.md, "Evaluation folder"), shared by every generator that writes one.
EVAL_FILES: dict[str, str] = {
    "eval_prompts": "eval/prompts.jsonl",
    "eval_pairs": "eval/pairs.jsonl",
    "eval_verdicts": "eval/verdicts.jsonl",
    "eval_truth": "eval/truth.jsonl",
    "eval_general": "eval/general.txt",
    "eval_general_stable": "eval/general_stable.txt",
    "eval_general_shifted": "eval/general_shifted.txt",
    "eval_manifest": "eval/manifest.json",
}
# The pairs, the judge's verdicts, the ground truth and both policies: every generator writes these first.
DATASET_FILES: dict[str, str] = {
    "pairs": "pairs.jsonl",
    "verdicts": "verdicts.jsonl",
    "truth": "truth.jsonl",
    "old_policy": "old_policy.md",
    "new_policy": "new_policy.md",
}
FILES: dict[str, str] = {**DATASET_FILES, "corpus": "corpus.txt", **EVAL_FILES, "manifest": "manifest.json"}


@dataclass(frozen=True)
class SynthPrompt:
    """One rendered prompt and the slot values its answers are written from."""

    text: str
    topic: Topic
    slots: Mapping[str, str]


def prompts_digest(records: Iterable[Any]) -> str:
    """``sha256:<hex>`` of evaluation prompt records, canonicalised: each record as compact JSON with sorted
    keys (UTF-8, non-ASCII kept), one per line, in file order. Blank lines, key order and spacing in the file
    do not change it; any change to a record's content (a prompt, an id, ``shifted``), an added, removed or
    reordered record does. `trace-ds eval` uses the rule judge only on prompts whose digest is the recorded one.
    """
    digest = hashlib.sha256()
    for record in records:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")
    return f"sha256:{digest.hexdigest()}"


def eval_prompt_records(
    prefix: str,
    prompts: Sequence[Any],
    text: Any,
    marker: Mapping[str, Any],
    files: Mapping[str, str],
    min_width: int,
) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """The held-out prompt rows (``<prefix>-evalprompt-NNNN``, the prompt as ``text(p)``, topic, shifted), their
    digest, and the eval folder's manifest (``marker``: format, format_version, seed, tpa_judge) that lets
    `trace-ds eval` apply the data's rule judge: shared by this benchmark and the real-model scenario
    (trace_ds/synth/real_scenario.py)."""
    width = max(min_width, len(str(max(len(prompts) - 1, 0))))
    rows = [
        {
            "id": f"{prefix}-evalprompt-{i:0{width}d}",
            "prompt": text(p),
            "topic": p.topic.name,
            "shifted": p.topic.shifted,
        }
        for i, p in enumerate(prompts)
    ]
    digest = prompts_digest(rows)
    manifest = {
        **marker,
        "prompts": Path(files["eval_prompts"]).name,
        "prompts_sha256": digest,
        "benchmark_manifest": f"../{files['manifest']}",
    }
    return rows, digest, manifest


def _rng(seed: int, stream: str) -> random.Random:
    """An independent, reproducible random stream per purpose."""
    return random.Random(f"trace-ds-synth:{seed}:{stream}")


def exact_counts(n: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Per-category counts summing to ``n``: each rounded (half to even), the remainder to the largest share."""
    counts = {c: round(n * proportions[c]) for c in CATEGORIES}
    largest = max(CATEGORIES, key=lambda c: proportions[c])
    counts[largest] += n - sum(counts.values())
    return counts


def render_chat(prompt: str, response: str) -> str:
    """One document in the plain chat format used for the corpus."""
    return CHAT_FORMAT.format(prompt=prompt, response=response)


def prompt_pools(seed: int) -> tuple[dict[str, list[SynthPrompt]], dict[str, list[SynthPrompt]]]:
    """Per topic, (train, eval) prompts: whole (template, primary) combinations are held out for eval.

    Holding out combinations (rather than single surface forms) means an eval question is never a
    training question with another suffix or person in it.
    """
    rng = _rng(seed, "split")
    train: dict[str, list[SynthPrompt]] = {}
    held: dict[str, list[SynthPrompt]] = {}
    for topic in TOPICS:
        cores = [(t, p) for t in range(len(topic.prompt_templates)) for p in range(len(topic.primary))]
        rng.shuffle(cores)
        n_eval = max(1, round(EVAL_CORE_FRACTION * len(cores)))
        pools: tuple[list[SynthPrompt], list[SynthPrompt]] = ([], [])
        for index, (t, p) in enumerate(cores):
            pool = pools[1] if index < n_eval else pools[0]
            for secondary in topic.secondary:
                slots = {**topic.primary[p], **secondary}
                for suffix in PROMPT_SUFFIXES:
                    text = topic.prompt_templates[t].format(**slots) + suffix
                    pool.append(SynthPrompt(text, topic, slots))
        train[topic.name], held[topic.name] = pools
        overlap = {s.text for s in pools[0]} & {s.text for s in pools[1]}
        if overlap:  # only possible if two templates render the same text: a data bug
            raise AssertionError(
                f"{topic.name}: prompt text in both train and eval pools: {sorted(overlap)[:3]}"
            )
        rng.shuffle(pools[0])
        rng.shuffle(pools[1])
    return train, held


def _cycle(prompts: list[SynthPrompt], rng: random.Random) -> Iterator[SynthPrompt]:
    """Every prompt once, in order, then reshuffled passes: repeats only when the pool is used up."""
    order = list(prompts)
    while True:
        yield from order
        order = list(prompts)
        rng.shuffle(order)


def _answer(prompt: SynthPrompt, rng: random.Random) -> str:
    text = rng.choice(prompt.topic.answer_templates).format(**prompt.slots)
    return text[0].upper() + text[1:]


def render_response(prompt: SynthPrompt, style: str, body: str, rng: random.Random) -> str:
    """A response of ``style`` built around the answer ``body`` (unused for a refusal)."""
    if style == "answer":
        return body
    if style == "caveat":
        return f"{body} {rng.choice(CAVEATS)}"
    if style == "cite":
        return f"{body} {SOURCE_PREFIX}{rng.choice(prompt.topic.sources)}."
    if style == "refuse":
        return rng.choice(REFUSALS)
    raise ValueError(f"unknown style {style!r}")


def _checked_verdict(prompt: SynthPrompt, response: str, style: str) -> bool:
    """The rule judge's verdict on generated text, after checking it sees the intended topic and style."""
    verdict = judge_response(prompt.text, response)
    if verdict.topic != prompt.topic.name or verdict.style != style:
        raise AssertionError(
            f"rule judge disagrees with the generator: wanted topic {prompt.topic.name}, style {style}; "
            f"got topic {verdict.topic}, style {verdict.style} for {prompt.text!r} -> {response!r}"
        )
    return verdict.violates


def _make_pairs(
    n: int,
    proportions: Mapping[str, float],
    pools: Mapping[str, list[SynthPrompt]],
    rng: random.Random,
    id_prefix: str,
) -> tuple[list[dict], list[dict], list[tuple[bool, bool]]]:
    """``n`` OLD-orientation pairs with exact category counts: (pairs, truth rows, judge verdicts)."""
    eligible = {c: [t for t in TOPICS if t.pairs_by_category()[c] and pools[t.name]] for c in CATEGORIES}
    plan = [c for c in CATEGORIES for _ in range(exact_counts(n, proportions)[c])]
    rng.shuffle(plan)
    missing = sorted({c for c in plan if not eligible[c]})
    if missing:
        raise TraceError(f"no prompts left for categories {missing}; lower n_eval_prompts")
    streams = {name: _cycle(pool, rng) for name, pool in pools.items() if pool}
    width = max(6, len(str(max(n - 1, 0))))
    pairs, truth, verdicts = [], [], []
    for index, category in enumerate(plan):
        topic = rng.choice(eligible[category])
        chosen_style, rejected_style = rng.choice(topic.pairs_by_category()[category])
        prompt = next(streams[topic.name])
        body = _answer(prompt, rng)  # one answer for both sides: the pair differs in style only
        chosen = render_response(prompt, chosen_style, body, rng)
        rejected = render_response(prompt, rejected_style, body, rng)
        judged = (
            _checked_verdict(prompt, chosen, chosen_style),
            _checked_verdict(prompt, rejected, rejected_style),
        )
        if category_of(*judged) != category:
            raise AssertionError(
                f"rule judge puts {prompt.text!r} in {category_of(*judged)}, planned {category}"
            )
        pair_id = f"{id_prefix}{index:0{width}d}"
        pairs.append({"id": pair_id, "prompt": prompt.text, "chosen": chosen, "rejected": rejected})
        truth.append(
            {
                "id": pair_id,
                "topic": topic.name,
                "chosen_style": chosen_style,
                "rejected_style": rejected_style,
                "category": category,
            }
        )
        verdicts.append(judged)
    return pairs, truth, verdicts


def _verdict_rows(
    pairs: list[dict], judged: list[tuple[bool, bool]], noise: float, missing: float, seed: int
) -> tuple[list[dict], dict[str, Any]]:
    """Offline-judge lines, with seeded label noise and omitted fields; returns (rows, what was changed).

    Noise flips each side independently with probability ``noise``; two uniforms are drawn per pair
    whatever ``noise`` is, so a larger value flips a superset. Missing omits one side's field on exactly
    ``round(missing * n)`` lines, taken from the front of one seeded permutation (also nested).
    """
    noise_rng, missing_rng = _rng(seed, "judge-noise"), _rng(seed, "judge-missing")
    flipped: dict[str, list[str]] = {"chosen": [], "rejected": []}
    rows = []
    for pair, sides in zip(pairs, judged, strict=True):
        row: dict[str, Any] = {"id": pair["id"]}
        for side, value in zip(("chosen", "rejected"), sides, strict=True):
            if noise_rng.random() < noise:
                value = not value
                flipped[side].append(pair["id"])
            row[f"{side}_violates"] = value
        row.update(confidence=1.0, judge=JUDGE_NAME)
        rows.append(row)
    order = list(range(len(rows)))
    missing_rng.shuffle(order)
    sides = [missing_rng.choice(("chosen", "rejected")) for _ in order]
    omitted: dict[str, list[str]] = {"chosen": [], "rejected": []}
    for index, side in list(zip(order, sides, strict=True))[: round(missing * len(rows))]:
        del rows[index][f"{side}_violates"]
        omitted[side].append(rows[index]["id"])
    for ids in (*flipped.values(), *omitted.values()):
        ids.sort()
    return rows, {"flipped": flipped, "omitted": omitted}


def _documents(prompts: list[SynthPrompt], rng: random.Random) -> str:
    """Every prompt with a response in every style, in chat format, shuffled: a style-neutral LM corpus."""
    return "".join(doc for _, doc in _document_list(prompts, rng))


def _document_list(prompts: list[SynthPrompt], rng: random.Random) -> list[tuple[SynthPrompt, str]]:
    """:func:`_documents`' documents in its order, each with its prompt (the same draws from ``rng``)."""
    docs = [
        (p, render_chat(p.text, render_response(p, style, _answer(p, rng), rng)))
        for p in prompts
        for style in STYLES
    ]
    rng.shuffle(docs)
    return docs


def _split_counts(truth: list[dict]) -> dict[str, Any]:
    by_topic_category: dict[str, dict[str, int]] = {}
    for row in truth:
        cell = by_topic_category.setdefault(row["topic"], dict.fromkeys(CATEGORIES, 0))
        cell[row["category"]] += 1
    return {
        "pairs": len(truth),
        "category": {c: sum(r["category"] == c for r in truth) for c in CATEGORIES},
        "topic": {t.name: sum(r["topic"] == t.name for r in truth) for t in TOPICS},
        "topic_category": {t.name: by_topic_category[t.name] for t in TOPICS if t.name in by_topic_category},
    }


def _validate(
    n_pairs: int,
    proportions: Mapping[str, float],
    n_eval_prompts: int,
    n_eval_pairs: int,
    noise: float,
    missing: float,
) -> dict[str, float]:
    if n_pairs < 1:
        raise TraceError(f"n_pairs must be at least 1, got {n_pairs}")
    if n_eval_prompts < 0 or n_eval_pairs < 0:
        raise TraceError("n_eval_prompts and n_eval_pairs must not be negative")
    if set(proportions) != set(CATEGORIES):
        raise TraceError(f"proportions must name exactly {list(CATEGORIES)}, got {sorted(proportions)}")
    if (
        any(not 0.0 <= float(v) <= 1.0 for v in proportions.values())
        or abs(sum(proportions.values()) - 1) > 1e-6
    ):
        raise TraceError(f"proportions must lie in [0, 1] and sum to 1, got {dict(proportions)}")
    for name, value in (("judge_noise", noise), ("judge_missing", missing)):
        if not 0.0 <= value <= 1.0:
            raise TraceError(f"{name} must lie in [0, 1], got {value}")
    return {c: float(proportions[c]) for c in CATEGORIES}


def build_benchmark(
    out_dir: str | os.PathLike,
    n_pairs: int = 2000,
    seed: int = 0,
    proportions: Mapping[str, float] | None = None,
    n_eval_prompts: int = 300,
    n_eval_pairs: int = 300,
    judge_noise: float = 0.0,
    judge_missing: float = 0.0,
) -> dict[str, Any]:
    """Write the benchmark into ``out_dir`` (files: :data:`FILES`, docs/synth.md) and return its manifest.

    ``proportions`` (default :data:`DEFAULT_PROPORTIONS`) are the true category shares, realised exactly
    (see :func:`exact_counts`) in both the training and the eval pairs. ``judge_noise`` / ``judge_missing``
    corrupt only the training ``verdicts.jsonl`` (eval verdicts stay clean); ``truth.jsonl`` is never
    corrupted. Raises :class:`TraceError` for invalid arguments or when the eval prompts use up a topic's
    held-out pool.
    """
    props = _validate(
        n_pairs, proportions or DEFAULT_PROPORTIONS, n_eval_prompts, n_eval_pairs, judge_noise, judge_missing
    )
    out = Path(out_dir)
    train_pools, eval_pools = prompt_pools(seed)

    # Eval prompts: an even share per topic (remainder to a seeded choice of topics); the rest of each
    # held-out pool feeds the eval pairs, so eval prompts and eval pairs never share a prompt either.
    eval_rng = _rng(seed, "eval")
    per_topic = dict.fromkeys((t.name for t in TOPICS), n_eval_prompts // len(TOPICS))
    for name in eval_rng.sample(sorted(per_topic), n_eval_prompts % len(TOPICS)):
        per_topic[name] += 1
    for name, k in per_topic.items():
        if k > len(eval_pools[name]):
            raise TraceError(
                f"n_eval_prompts={n_eval_prompts} needs {k} held-out {name} prompts; only {len(eval_pools[name])}"
            )
    eval_prompts = [p for name, k in per_topic.items() for p in eval_pools[name][:k]]
    eval_rng.shuffle(eval_prompts)
    eval_pair_pools = {name: pool[per_topic[name] :] for name, pool in eval_pools.items()}

    pairs, truth, judged = _make_pairs(n_pairs, props, train_pools, _rng(seed, "train"), "synth-")
    verdicts, judge_changes = _verdict_rows(pairs, judged, judge_noise, judge_missing, seed)
    if n_eval_pairs:
        eval_pairs, eval_truth, eval_judged = _make_pairs(
            n_eval_pairs, props, eval_pair_pools, eval_rng, "synth-eval-"
        )
    else:
        eval_pairs, eval_truth, eval_judged = [], [], []
    eval_verdicts, _ = _verdict_rows(eval_pairs, eval_judged, 0.0, 0.0, seed)
    marker = {"format": EVAL_FORMAT, "format_version": FORMAT_VERSION, "seed": seed, "tpa_judge": JUDGE_NAME}
    eval_prompt_rows, eval_digest, eval_manifest = eval_prompt_records(
        "synth", eval_prompts, lambda p: p.text, marker, FILES, min_width=6
    )

    corpus_prompts = [p for t in TOPICS for p in train_pools[t.name]]
    corpus = _documents(corpus_prompts, _rng(seed, "corpus"))
    # general_stable.txt / general_shifted.txt: general.txt's own documents (the same text, in its order) split by
    # their prompt's topic, so perplexity can be read on text the new policy leaves alone (the utility target)
    # apart from text it changes
    general_docs = _document_list(eval_prompts, _rng(seed, "general"))
    general = "".join(doc for _, doc in general_docs)
    general_stable = "".join(doc for p, doc in general_docs if not p.topic.shifted)
    general_shifted = "".join(doc for p, doc in general_docs if p.topic.shifted)
    n_shifted_prompts = sum(p.topic.shifted for p in eval_prompts)

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "arguments": {
            "n_pairs": n_pairs,
            "seed": seed,
            "proportions": props,
            "n_eval_prompts": n_eval_prompts,
            "n_eval_pairs": n_eval_pairs,
            "judge_noise": judge_noise,
            "judge_missing": judge_missing,
        },
        "files": FILES,
        "chat_format": CHAT_FORMAT,
        "topics": {
            t.name: {
                "title": t.title,
                "shifted": t.shifted,
                "old_order": list(t.old_order),
                "new_rule": t.new_rule.describe(),
            }
            for t in TOPICS
        },
        "counts": {
            "train": {**_split_counts(truth), "distinct_prompts": len({p["prompt"] for p in pairs})},
            "eval": {**_split_counts(eval_truth), "distinct_prompts": len({p["prompt"] for p in eval_pairs})},
            "eval_prompts": {
                "prompts": len(eval_prompt_rows),
                "shifted": sum(r["shifted"] for r in eval_prompt_rows),
                "topic": per_topic,
            },
            "corpus": {"prompts": len(corpus_prompts), "documents": len(corpus_prompts) * len(STYLES)},
            "eval_general": {"prompts": len(eval_prompts), "documents": len(eval_prompts) * len(STYLES)},
            "eval_general_stable": {
                "prompts": len(eval_prompts) - n_shifted_prompts,
                "documents": (len(eval_prompts) - n_shifted_prompts) * len(STYLES),
            },
            "eval_general_shifted": {
                "prompts": n_shifted_prompts,
                "documents": n_shifted_prompts * len(STYLES),
            },
        },
        "judge": {
            "name": JUDGE_NAME,
            "noise": judge_noise,
            "missing": judge_missing,
            "applies_to": FILES["verdicts"],
            "flipped": judge_changes["flipped"],
            "omitted": judge_changes["omitted"],
        },
        "tpa_judge": {
            "name": JUDGE_NAME,
            "applies_to": FILES["eval_prompts"],
            "prompts_sha256": eval_digest,
            "marker": FILES["eval_manifest"],
        },
    }

    write_jsonl(out / FILES["pairs"], pairs)
    write_jsonl(out / FILES["verdicts"], verdicts)
    write_jsonl(out / FILES["truth"], truth)
    write_text(out / FILES["old_policy"], old_policy_markdown())
    write_text(out / FILES["new_policy"], new_policy_markdown())
    write_text(out / FILES["corpus"], corpus)
    write_jsonl(out / FILES["eval_prompts"], eval_prompt_rows)
    write_jsonl(out / FILES["eval_pairs"], eval_pairs)
    write_jsonl(out / FILES["eval_verdicts"], eval_verdicts)
    write_jsonl(out / FILES["eval_truth"], eval_truth)
    write_text(out / FILES["eval_general"], general)
    write_text(out / FILES["eval_general_stable"], general_stable)
    write_text(out / FILES["eval_general_shifted"], general_shifted)
    write_json(out / FILES["eval_manifest"], eval_manifest)
    write_json(out / FILES["manifest"], manifest)  # last: its presence marks a complete benchmark
    return manifest
