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
