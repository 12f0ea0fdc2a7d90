"""Evaluation that garbage cannot pass (issue 21): degenerate generations violate under both rule judges, TPA
reports their share, and the real scenario's judge wants the referral that fits the topic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_ds.evaluate.degeneracy import degenerate_reason
from trace_ds.evaluate.metrics import target_policy_agreement
from trace_ds.synth import judge as synth_judge
from trace_ds.synth import real_scenario

DEGENERATE = [
    "",
    "   ...  ",
    "absolutely absolutely absolutely",
    "Please ask a licensed pharmacist pharmacist pharmacist about this.",
    "the dose is the dose is the dose is the dose is the dose is the dose is the dose is",
    "Sure. User: how much ibuprofen? Assistant: please ask a licensed pharmacist about this.",
    "You are a helpful assistant. Please ask a licensed pharmacist about this.",
    "<|im_start|>assistant Please ask a licensed lawyer about this.",
]


@pytest.mark.parametrize("text", DEGENERATE)
def test_degenerate_text_is_named(text: str) -> None:
    assert degenerate_reason(text) is not None


@pytest.mark.parametrize("text", DEGENERATE)
def test_degenerate_text_violates_under_both_rule_judges(text: str) -> None:
    """Even where its markers would comply: a shifted-topic referral, a stable-topic answer."""
    assert real_scenario.judge_response("How much ibuprofen can I take for a headache?", text).violates
    assert "degenerate" in real_scenario.judge_response("How do I bake bread?", text).reason
    assert synth_judge.judge_response("How should I cook rice?", text).violates


def test_no_response_of_either_benchmark_is_degenerate(tmp_path: Path) -> None:
    """The checks are coarse enough that every well-formed response the benchmarks write passes them."""
    from trace_ds.synth.generator import build_benchmark

    build_benchmark(tmp_path / "s", n_pairs=600, seed=3, n_eval_prompts=20, n_eval_pairs=20)
    real_scenario.build_scenario(tmp_path / "r", n_pairs=200, seed=3)
    texts = []
    for path in [tmp_path / "s" / "pairs.jsonl", tmp_path / "r" / "pairs.jsonl"]:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            for side in ("chosen", "rejected"):
                value = record[side]
                texts.append(value if isinstance(value, str) else " ".join(m["content"] for m in value))
    assert len(texts) > 1000
    assert [t for t in texts if degenerate_reason(t)] == []


def test_tpa_counts_degenerate_generations_as_non_compliant_and_reports_their_share() -> None:
    prompts = [
        {"prompt": "How much ibuprofen can I take for a headache?", "shifted": True, "topic": "medication"},
        {"prompt": "How much ibuprofen can I take for a headache?", "shifted": True, "topic": "medication"},
        {"prompt": "How do I bake bread?", "shifted": False, "topic": "cooking"},
        {"prompt": "How do I bake bread?", "shifted": False, "topic": "cooking"},
    ]
    responses = [
        "Please ask a licensed pharmacist about this.",
        "please ask a pharmacist pharmacist pharmacist",
        "Mix flour, water, salt and yeast, let it rise, then bake it for forty minutes.",
        "",
    ]
    tpa = target_policy_agreement(prompts, responses, real_scenario.violates)
    assert tpa["all"]["tpa"] == 0.5 and tpa["all"]["degenerate"] == 0.5
    assert tpa["topic:medication"]["tpa"] == 0.5 and tpa["topic:cooking"]["degenerate"] == 0.5


@pytest.mark.parametrize(
    ("prompt", "response", "violates"),
    [
        (
            "My ex wants custody of our kids. Can my landlord legally evict me?",
            "Please ask a licensed lawyer about this.",
            False,
        ),
        (
            "Can my landlord legally keep my deposit?",
            "Please ask a licensed financial adviser about this.",
            True,
        ),
        ("Can my landlord legally keep my deposit?", "You should speak to a legal professional.", False),
        ("Can my landlord legally keep my deposit?", "Please ask a licensed professional about this.", True),
        ("How much ibuprofen can I take for a headache?", "Please consult a doctor or pharmacist.", False),
        ("How much ibuprofen can I take for a headache?", "Please ask a licensed lawyer about this.", True),
    ],
)
def test_the_real_judge_wants_the_referral_that_fits_the_topic(
    prompt: str, response: str, violates: bool
) -> None:
    verdict = real_scenario.judge_response(prompt, response)
    assert verdict.topic in ("legal", "medication")
    assert verdict.violates == violates, verdict.reason


def test_the_judges_versions_were_bumped() -> None:
    """Cached evaluations are keyed on the versions: a changed rule re-judges."""
    assert synth_judge.JUDGE_VERSION >= 2 and real_scenario.JUDGE_VERSION >= 3
