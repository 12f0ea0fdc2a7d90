"""The local-model judge on a tiny model: the plumbing is real (verdict quality is irrelevant here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.io import write_jsonl

from .helpers import kill_when_lines, read_lines

SHORT_TEMPLATE = "Policy: {policy}\nUser: {prompt}\nAnswer: {response}\nJSON verdict:"


@pytest.fixture()
def judge_inputs(tmp_path: Path) -> dict[str, Path]:
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(
        pairs,
        [
            {"id": f"q{i}", "prompt": f"Is {i} + {i} = {2 * i}?", "chosen": "Yes.", "rejected": "No."}
            for i in range(6)
        ],
    )
    policy = tmp_path / "policy.md"
    policy.write_text("Be right.")
    template = tmp_path / "template.md"
    template.write_text(SHORT_TEMPLATE)
    return {"pairs": pairs, "policy": policy, "template": template}


def judge_args(model: Path, inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "judge",
        "run",
        "--model",
        str(model),
        "--pairs",
        str(inputs["pairs"]),
        "--policy",
        str(inputs["policy"]),
        "--template",
        str(inputs["template"]),
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        *extra,
    ]


def test_local_judge_resumes_and_never_guesses(
    tiny_model_dir: Path, judge_inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "verdicts.jsonl"
    responses = tmp_path / "verdicts.responses.jsonl"
    # An earlier, interrupted run answered two requests and was killed mid-line.
    responses.write_text(
        json.dumps({"custom_id": "q0::chosen", "output": '{"violates": true}'})
        + "\n"
        + json.dumps({"custom_id": "q0::rejected", "output": '{"violates": false, "confidence": 0.9}'})
        + "\n"
        + '{"custom_id": "q1::cho'
    )
    result = CliRunner().invoke(main, judge_args(tiny_model_dir, judge_inputs, out, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    lines = read_lines(responses)
    assert len(lines) == 12 and len({line["custom_id"] for line in lines}) == 12
    verdicts = {v["id"]: v for v in read_lines(out)}
    assert list(verdicts) == [f"q{i}" for i in range(6)]
    assert (verdicts["q0"]["chosen_violates"], verdicts["q0"]["rejected_violates"]) == (
        True,
        False,
    )  # kept, not redone
    problems = read_lines(tmp_path / "verdicts.problems.jsonl")
    # An untrained model answers gibberish: each such side is a listed problem and stays null, never "compliant".
    for problem in problems:
        assert verdicts[problem["id"]][f"{problem['side']}_violates"] is None


def test_judge_run_on_generations_feeds_tpa_resumes_and_never_guesses(
    tiny_model_dir: Path, judge_inputs: dict[str, Path], tmp_path: Path
) -> None:
    generations = tmp_path / "m.generations.jsonl"  # as `trace-ds eval` writes them without a judge
    write_jsonl(
        generations,
        [
            {
                "id": f"g{i}",
                "prompt": f"Is {i} even?",
                "response": "Yes.",
                "compliant": None,
                "shifted": i < 3,
            }
            for i in range(5)
        ],
    )
    out = tmp_path / "tpa_verdicts.jsonl"
    responses = tmp_path / "tpa_verdicts.responses.jsonl"
    responses.write_text(  # an earlier run answered two generations and was killed mid-line
        json.dumps({"custom_id": "g0::chosen", "output": '{"violates": false}'})
        + "\n"
        + json.dumps({"custom_id": "g3::chosen", "output": '{"violates": true}'})
        + "\n"
        + '{"custom_id": "g1::cho'
    )
    args = judge_args(tiny_model_dir, judge_inputs, out, "--batch-size", "2")
    args[args.index("--pairs") : args.index("--pairs") + 2] = ["--generations", str(generations)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = read_lines(responses)
    assert sorted(line["custom_id"] for line in lines) == [f"g{i}::chosen" for i in range(5)]  # one each
    verdicts = {v["id"]: v for v in read_lines(out)}
    assert list(verdicts) == [f"g{i}" for i in range(5)]
    assert verdicts["g0"]["chosen_violates"] is False and verdicts["g3"]["chosen_violates"] is True  # kept
    assert all(v["rejected_violates"] is None for v in verdicts.values())
    problems = read_lines(tmp_path / "tpa_verdicts.problems.jsonl")
    assert all(p["side"] == "chosen" for p in problems)  # a generation has no rejected side to miss
    for problem in problems:  # the tiny model's gibberish: unjudged, never "compliant"
        assert verdicts[problem["id"]]["chosen_violates"] is None

    tpa_out = tmp_path / "tpa.json"
    result = CliRunner().invoke(
        main, ["tpa", "--generations", str(generations), "--verdicts", str(out), "--out", str(tpa_out)]
    )
    assert result.exit_code == 0, result.output
    tpa = json.loads(tpa_out.read_text())
    known = {i: v["chosen_violates"] for i, v in verdicts.items() if v["chosen_violates"] is not None}
    assert tpa["generations"] == 5 and tpa["unjudged"] == 5 - len(known) == len(problems)
    assert tpa["tpa"]["all"]["prompts"] == len(known)
    assert tpa["tpa"]["all"]["tpa"] == sum(not v for v in known.values()) / len(known)

    both = CliRunner().invoke(main, [*args, "--pairs", str(judge_inputs["pairs"])])
    assert both.exit_code == 2 and "exactly one" in both.output


def test_prompt_longer_than_the_context_is_an_error_not_a_verdict(
    tiny_model_dir: Path, judge_inputs: dict[str, Path], tmp_path: Path
) -> None:
    judge_inputs["policy"].write_text("Be right. " * 400)
    out = tmp_path / "v.jsonl"
    result = CliRunner().invoke(main, judge_args(tiny_model_dir, judge_inputs, out))
    assert result.exit_code == 0, result.output
    assert all(
        v["chosen_violates"] is None and "exceeds the context" in v["problems"]["chosen"]
        for v in read_lines(out)
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_judge_run_continues_to_the_same_result(
    tiny_model_dir: Path, judge_inputs: dict[str, Path], tmp_path: Path
) -> None:
    reference = tmp_path / "ref" / "v.jsonl"
    assert (
        CliRunner()
        .invoke(main, judge_args(tiny_model_dir, judge_inputs, reference, "--batch-size", "1"))
        .exit_code
        == 0
    )

    out = tmp_path / "killed" / "v.jsonl"
    command = [
        sys.executable,
        "-m",
        "trace_ds.cli",
        *judge_args(tiny_model_dir, judge_inputs, out, "--batch-size", "1"),
    ]
    answered = kill_when_lines(command, out.with_name("v.responses.jsonl"), 3, wait_s=120)
    assert 3 <= answered < 12, "the run should have been killed part-way"

    result = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {answered}" in result.stderr.replace("\n", " ")
    assert out.read_text() == reference.read_text().replace(str(reference.parent), str(out.parent))
