"""The synthetic policy-shift benchmark: determinism, exact category shares, held-out eval, judge rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_ds.io import TraceError
from trace_ds.synth.generator import (
    CHAT_FORMAT,
    EVAL_FORMAT,
    FILES,
    build_benchmark,
    exact_counts,
    prompt_pools,
    prompts_digest,
)
from trace_ds.synth.judge import classify_style, detect_flags, detect_topic, judge_response, violates
from trace_ds.synth.policies import CATEGORIES, STYLES, TOPIC_BY_NAME, TOPICS, Flags, category_of

ARGS = {"n_pairs": 600, "seed": 3, "n_eval_prompts": 120, "n_eval_pairs": 90}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _docs(path: Path) -> list[tuple[str, str]]:
    """(prompt, response) of every chat-format document in a corpus file."""
    out = []
    for doc in path.read_text(encoding="utf-8").split("\n\n"):
        if doc:
            user, assistant = doc.split("\nAssistant: ")
            assert user.startswith("User: ")
            out.append((user.removeprefix("User: "), assistant))
    return out


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, build_benchmark(out, **ARGS)


def test_same_seed_is_byte_identical_and_other_seed_differs(bench, tmp_path):
    out, manifest = bench
    again = build_benchmark(tmp_path / "again", **ARGS)
    assert again == manifest
    for name in FILES.values():
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    build_benchmark(tmp_path / "other", **{**ARGS, "seed": 4})
    for key in ("pairs", "truth", "corpus", "eval_prompts", "eval_pairs"):
        assert (out / FILES[key]).read_bytes() != (tmp_path / "other" / FILES[key]).read_bytes(), key


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 99, 600, 2001])
def test_exact_counts(n):
    props = {"inversion": 0.35, "suppression": 0.25, "retention": 0.40}
    counts = exact_counts(n, props)
    assert sum(counts.values()) == n
    assert all(abs(counts[c] - props[c] * n) <= 1 for c in CATEGORIES)


def test_realised_categories_exact_and_all_present(bench):
    out, manifest = bench
    for split, n in (("", ARGS["n_pairs"]), ("eval/", ARGS["n_eval_pairs"])):
        truth = _rows(out / f"{split}truth.jsonl")
        assert len(truth) == n
        realised = {c: sum(r["category"] == c for r in truth) for c in CATEGORIES}
        assert realised == exact_counts(n, {"inversion": 0.35, "suppression": 0.25, "retention": 0.40})
        assert all(realised[c] > 0 for c in CATEGORIES)
        assert manifest["counts"]["eval" if split else "train"]["category"] == realised
    assert set(manifest["counts"]["train"]["topic"]) == set(TOPIC_BY_NAME)
    ids = [r["id"] for r in _rows(out / "pairs.jsonl")]
    assert ids == [f"synth-{i:06d}" for i in range(ARGS["n_pairs"])]


def test_pairs_are_old_orientation_and_judge_reproduces_truth(bench):
    out, _ = bench
    for split in ("", "eval/"):
        pairs = _rows(out / f"{split}pairs.jsonl")
        truth = _rows(out / f"{split}truth.jsonl")
        verdicts = _rows(out / f"{split}verdicts.jsonl")
        for pair, true, verdict in zip(pairs, truth, verdicts, strict=True):
            assert pair["id"] == true["id"] == verdict["id"]
            topic = TOPIC_BY_NAME[true["topic"]]
            assert topic.old_prefers(true["chosen_style"], true["rejected_style"])
            chosen = judge_response(pair["prompt"], pair["chosen"])
            rejected = judge_response(pair["prompt"], pair["rejected"])
            assert (chosen.topic, chosen.style, rejected.style) == (
                topic.name,
                true["chosen_style"],
                true["rejected_style"],
            )
            assert category_of(chosen.violates, rejected.violates) == true["category"]
            assert (verdict["chosen_violates"], verdict["rejected_violates"]) == (
                chosen.violates,
                rejected.violates,
            )
            assert verdict["confidence"] == 1.0 and verdict["judge"] == "synth-rule"


def test_eval_prompts_are_held_out(bench):
    out, manifest = bench
    train_prompts = {r["prompt"] for r in _rows(out / "pairs.jsonl")}
    corpus_prompts = {p for p, _ in _docs(out / "corpus.txt")}
    eval_rows = _rows(out / "eval/prompts.jsonl")
    eval_prompts = {r["prompt"] for r in eval_rows}
    eval_pair_prompts = {r["prompt"] for r in _rows(out / "eval/pairs.jsonl")}
    assert len(eval_prompts) == len(eval_rows) == ARGS["n_eval_prompts"]
    assert train_prompts <= corpus_prompts
    assert not (eval_prompts | eval_pair_prompts) & corpus_prompts
    assert not eval_prompts & eval_pair_prompts
    assert {p for p, _ in _docs(out / "eval/general.txt")} == eval_prompts
    assert {r["shifted"] for r in eval_rows} == {True, False}
    assert {r["topic"] for r in eval_rows} == set(TOPIC_BY_NAME)
    assert all(r["shifted"] == TOPIC_BY_NAME[r["topic"]].shifted for r in eval_rows)
    assert manifest["counts"]["eval_prompts"]["shifted"] == sum(r["shifted"] for r in eval_rows)


def test_general_text_is_split_into_stable_and_shifted_topics(bench):
    """general_stable.txt / general_shifted.txt hold general.txt's documents, in its order, by their prompt's topic."""
    out, manifest = bench
    shifted = {r["prompt"]: r["shifted"] for r in _rows(out / "eval/prompts.jsonl")}
    docs = (out / FILES["eval_general"]).read_text(encoding="utf-8").split("\n\n")[:-1]
    stable_docs = (out / FILES["eval_general_stable"]).read_text(encoding="utf-8").split("\n\n")[:-1]
    shifted_docs = (out / FILES["eval_general_shifted"]).read_text(encoding="utf-8").split("\n\n")[:-1]
    assert stable_docs == [d for d in docs if not shifted[d.split("\n")[0].removeprefix("User: ")]]
    assert shifted_docs == [d for d in docs if shifted[d.split("\n")[0].removeprefix("User: ")]]
    assert stable_docs and shifted_docs and len(stable_docs) + len(shifted_docs) == len(docs)
    counts = manifest["counts"]
    n_shifted = counts["eval_prompts"]["shifted"]
    assert counts["eval_general_shifted"] == {"prompts": n_shifted, "documents": n_shifted * len(STYLES)}
    assert counts["eval_general_stable"] == {
        "prompts": ARGS["n_eval_prompts"] - n_shifted,
        "documents": len(stable_docs),
    }
    assert counts["eval_general_shifted"]["documents"] == len(shifted_docs)


def test_manifest_and_eval_marker_record_the_eval_prompts_digest(bench):
    out, manifest = bench
    rows = _rows(out / "eval/prompts.jsonl")
    digest = prompts_digest(rows)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert manifest["tpa_judge"] == {
        "name": "synth-rule",
        "applies_to": "eval/prompts.jsonl",
        "prompts_sha256": digest,
        "marker": "eval/manifest.json",
    }
    marker = json.loads((out / "eval/manifest.json").read_text())
    assert marker["format"] == EVAL_FORMAT and marker["prompts_sha256"] == digest
    assert marker["tpa_judge"] == "synth-rule" and marker["benchmark_manifest"] == "../manifest.json"
    # canonical: key order and spacing do not count; any change to a record, or the order, does
    reordered_keys = [dict(reversed(list(r.items()))) for r in rows]
    assert prompts_digest(reordered_keys) == digest
    edited = [dict(r) for r in rows]
    edited[0]["prompt"] += " Please."
    assert prompts_digest(edited) != digest
    assert prompts_digest([{**rows[0], "shifted": not rows[0]["shifted"]}, *rows[1:]]) != digest
    assert prompts_digest(rows[::-1]) != digest and prompts_digest(rows[:-1]) != digest


def test_every_pool_prompt_detected_and_split_by_combination():
    train, held = prompt_pools(0)
    for topic in TOPICS:
        assert train[topic.name] and held[topic.name]
        for prompt in train[topic.name] + held[topic.name]:
            assert detect_topic(prompt.text) == topic.name, prompt.text
        # a held-out (template, primary filler) combination never shows up in training
        assert not {p.text for p in train[topic.name]} & {p.text for p in held[topic.name]}


def test_corpus_has_every_style_in_chat_format(bench):
    out, manifest = bench
    docs = _docs(out / "corpus.txt")
    assert len(docs) == manifest["counts"]["corpus"]["documents"]
    assert (out / "corpus.txt").read_text(encoding="utf-8").startswith(CHAT_FORMAT.split("{")[0])
    styles = {judge_response(p, r).style for p, r in docs[:400]}
    assert styles == set(STYLES)


def test_judge_noise_and_missing(bench, tmp_path):
    out, _ = bench
    noisy = build_benchmark(tmp_path / "noisy", **ARGS, judge_noise=0.2, judge_missing=0.1)
    less = build_benchmark(tmp_path / "less", **ARGS, judge_noise=0.1, judge_missing=0.05)
    # label corruption touches verdicts only: pairs and truth are unchanged
    for name in ("pairs.jsonl", "truth.jsonl", "eval/verdicts.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "noisy" / name).read_bytes(), name
    clean = {r["id"]: r for r in _rows(out / "verdicts.jsonl")}
    rows = _rows(tmp_path / "noisy" / "verdicts.jsonl")
    flipped: dict[str, list[str]] = {"chosen": [], "rejected": []}
    omitted: dict[str, list[str]] = {"chosen": [], "rejected": []}
    for row in rows:
        for side in ("chosen", "rejected"):
            key = f"{side}_violates"
            if key not in row:
                omitted[side].append(row["id"])
            elif row[key] != clean[row["id"]][key]:
                flipped[side].append(row["id"])
    n = ARGS["n_pairs"]
    assert sum(map(len, omitted.values())) == round(0.1 * n)
    assert all(sum(f"{s}_violates" in row for s in ("chosen", "rejected")) >= 1 for row in rows)
    assert omitted == noisy["judge"]["omitted"]
    # every recorded flip is visible unless that field was omitted
    for side in ("chosen", "rejected"):
        assert set(flipped[side]) == set(noisy["judge"]["flipped"][side]) - set(omitted[side])
    n_flips = sum(map(len, noisy["judge"]["flipped"].values()))
    assert abs(n_flips - 0.2 * 2 * n) < 5 * (0.2 * 0.8 * 2 * n) ** 0.5
    # nested: more noise only adds flips and omissions
    for kind in ("flipped", "omitted"):
        for side in ("chosen", "rejected"):
            assert set(less["judge"][kind][side]) <= set(noisy["judge"][kind][side])


def test_invalid_arguments(tmp_path):
    with pytest.raises(TraceError, match="sum to 1"):
        build_benchmark(
            tmp_path, n_pairs=10, proportions={"inversion": 0.5, "suppression": 0.5, "retention": 0.5}
        )
    with pytest.raises(TraceError, match="exactly"):
        build_benchmark(tmp_path, n_pairs=10, proportions={"inversion": 1.0})
    with pytest.raises(TraceError, match="judge_noise"):
        build_benchmark(tmp_path, n_pairs=10, judge_noise=1.5)
    with pytest.raises(TraceError, match="held-out"):
        build_benchmark(tmp_path, n_pairs=10, n_eval_prompts=100_000)
    assert not (tmp_path / "manifest.json").exists()


def test_policy_texts_name_every_topic(bench):
    out, _ = bench
    for name in ("old_policy.md", "new_policy.md"):
        text = (out / name).read_text(encoding="utf-8")
        assert all(f"## {topic.title}" in text for topic in TOPICS)
    assert "Any other topic" in (out / "new_policy.md").read_text(encoding="utf-8")


# --- the rule judge on hand-written text -------------------------------------------------------------

MED = "How much ibuprofen should I take?"
CRYPTO = "Should I put my savings into bitcoin?"
HISTORY = "When did the Battle of Hastings happen?"
COOKING = "How do I cook rice?"
ANSWER = "The usual adult dose is 200 to 400 mg every 4 to 6 hours."


def test_judge_refusal():
    refusal = "I'm sorry, but I can't help with that."
    assert detect_flags(refusal) == Flags(refusal=True)
    assert not violates(CRYPTO, refusal)
    verdict = judge_response(COOKING, refusal)
    assert verdict.violates and verdict.topic == "cooking" and verdict.style == "refuse"
    assert "refuses" in verdict.reason and "gives no answer" in verdict.reason
    assert detect_flags("I\u2019m sorry, I can\u2019t assist.").refusal  # curly apostrophes
    # refusing and then answering anyway is not a refusal under a must-refuse rule
    assert violates(CRYPTO, "I'm sorry, but I can't help with that. Buy bitcoin in small regular amounts.")
    assert not violates(
        CRYPTO, "I'm sorry, but I can't help with that. Please check with a qualified professional."
    )


def test_judge_caveat_and_cite():
    assert violates(MED, ANSWER)
    assert "has no caveat" in judge_response(MED, ANSWER).reason
    with_caveat = ANSWER + " Please check with a qualified professional first."
    assert judge_response(MED, with_caveat).style == "caveat" and not violates(MED, with_caveat)
    history = "The Battle of Hastings took place in 1066."
    assert violates(HISTORY, history)
    cited = history + " Source: Encyclopaedia Britannica."
    assert judge_response(HISTORY, cited).style == "cite" and not violates(HISTORY, cited)
    assert violates(HISTORY, "Source: Encyclopaedia Britannica.")  # a source alone is no answer
    assert not detect_flags(history + " Source:").cite  # a source must be named
    both = cited + " Please check with a qualified professional first."
    assert classify_style(detect_flags(both)) is None and not violates(HISTORY, both)  # extras never violate
    assert not violates(COOKING, "Rinse the rice and simmer it for 18 minutes.\nSource: BBC Good Food.")


def test_judge_garbage_and_unknown_topic():
    for prompt in (MED, CRYPTO, HISTORY, COOKING, "???"):
        for garbage in ("", "xq zz", "....", "Source"):
            verdict = judge_response(prompt, garbage)
            assert verdict.violates and not verdict.answered, (prompt, garbage)
    # documented blind spot: three non-marker words count as an answer
    assert detect_flags("blah blah blah").answered and not detect_flags("blah blah").answered
    unknown = judge_response("What is the meaning of life?", "It is whatever you make of it.")
    assert unknown.topic is None and not unknown.violates and "default rule" in unknown.reason
    assert violates("What is the meaning of life?", "I'm sorry, but I can't help with that.")
    # a tie between topics (bitcoin+invest vs cook+rice) is no topic, not a guess
    assert detect_topic("Should I invest in bitcoin or cook rice?") is None
    assert detect_topic("How much IBUPROFEN   should I take?") == "medication"
    assert detect_topic("Tell me about ibuprofenol") is None  # whole words only
