"""What users read when something is wrong: one error prefix, no doubled words, JSON nulls, a fix to apply."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.data.pairs import Pair, Reject
from trace_ds.io import BadRecord, TraceError, iter_jsonl, write_jsonl
from trace_ds.judge.parse import Problem
from trace_ds.scoring.probe import build_probe, largest_probe_size


def test_invalid_json_line_names_the_column_without_doubled_words(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "unterminated')
    with pytest.raises(BadRecord) as caught:
        list(iter_jsonl(path))
    message = str(caught.value)
    assert message.startswith(f"{path}:1: not valid JSON: Unterminated string starting at: column ")
    words = message.split()
    assert all(a != b for a, b in itertools.pairwise(words)), message


def test_missing_positions_are_json_null() -> None:
    assert Reject(None, "why", {"x": 1}).to_record()["position"] is None
    assert json.loads(json.dumps(Problem("a", "chosen", "no response", None).to_record()))["position"] is None


def test_every_cli_failure_has_one_prefix(tmp_path: Path) -> None:
    runner = CliRunner()
    ours = runner.invoke(
        main, ["triage", "--pairs", str(tmp_path / "none.jsonl"), "--verdicts", __file__, "--out", "x"]
    )
    usage = runner.invoke(main, ["triage", "--no-such-option"])
    assert ours.exit_code == usage.exit_code == 2
    assert ours.output.startswith("Error: ") and "Traceback" not in ours.output
    assert "Error: No such option" in usage.output


def _triaged(counts: dict[str, int]) -> list[Pair]:
    return [
        Pair(f"{c}{i}", "text", f"prompt {c} {i}", f"chosen {i}", f"rejected {i}", extra={"category": c})
        for c, n in counts.items()
        for i in range(n)
    ]


def test_probe_size_too_large_for_small_data_gives_the_size_to_use(tmp_path: Path) -> None:
    counts = {"inversion": 5, "suppression": 3, "retention": 9}
    with pytest.raises(
        TraceError, match=r"--probe-size 64 needs 21 retention pairs but the triaged file has 9"
    ) as caught:
        build_probe(_triaged(counts), 64, seed=0)
    fits = largest_probe_size(counts)
    assert f"use --probe-size {fits} " in str(caught.value)
    assert len(build_probe(_triaged(counts), fits, seed=0)) == fits
    with pytest.raises(TraceError):
        build_probe(_triaged(counts), fits + 1, seed=0)
    with pytest.raises(TraceError, match="at least one pair of each category"):
        build_probe(_triaged({"inversion": 5, "suppression": 0, "retention": 9}), 6, seed=0)


@pytest.mark.parametrize(("suppression", "fits"), [(None, 4), ("pool", 6), ("drop", 4)])
def test_probe_size_hint_through_the_cli(
    tmp_path: Path, tiny_model_dir: Path, suppression: str | None, fits: int
) -> None:
    """The default probe (same-prompt; these prompts have no judged response, so no suppression third) and
    Algorithm 2's each name the largest --probe-size the file allows."""
    triaged = tmp_path / "t.jsonl"
    write_jsonl(
        triaged,
        [
            {**p.to_record(), "category": p.extra["category"]}
            for p in _triaged({"inversion": 2, "suppression": 2, "retention": 2})
        ],
    )
    result = CliRunner().invoke(
        main,
        [
            "score",
            "--model",
            str(tiny_model_dir),
            "--triaged",
            str(triaged),
            "--out",
            str(tmp_path / "s.jsonl"),
            *(["--probe-suppression", suppression] if suppression else []),
        ],
    )
    assert (
        result.exit_code == 2 and f"use --probe-size {fits} (the largest this file allows)" in result.output
    )
