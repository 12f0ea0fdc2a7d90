"""Triage: every verdict combination, orientation, unjudged and low-confidence handling, noise, files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_ds.data.pairs import Pair
from trace_ds.io import BadRecord, TraceError, write_jsonl
from trace_ds.judge.triage import categorize, output_paths, run_triage, triage
from trace_ds.judge.verdicts import Verdict, read_verdicts


def pair(pair_id: str) -> Pair:
    return Pair(pair_id, "text", f"prompt {pair_id}", f"old chosen {pair_id}", f"old rejected {pair_id}")


# (chosen_violates, rejected_violates) -> category; None means the verdict is unknown
COMBINATIONS = {
    (True, False): "inversion",
    (True, True): "suppression",
    (False, False): "retention",
    (False, True): "retention",
    (False, None): "retention",  # chosen complies: the rejected verdict is not needed
    (True, None): None,
    (None, False): None,
    (None, True): None,
    (None, None): None,
}


@pytest.mark.parametrize(("sides", "expected"), list(COMBINATIONS.items()))
def test_every_verdict_combination(sides: tuple, expected: str | None) -> None:
    category, reason = categorize(Verdict("x", *sides))
    assert category == expected
    assert (reason is None) == (expected is not None)


def test_orientation_and_attached_fields() -> None:
    pairs = [pair("inv"), pair("sup"), pair("ret")]
    verdicts = {
        "inv": Verdict("inv", True, False, extra={"judge": "j", "rationale": {"chosen": "bad"}}),
        "sup": Verdict("sup", True, True),
        "ret": Verdict("ret", False, True),
    }
    result = triage(pairs, verdicts)
    inv, sup, ret = result.records
    assert (inv["category"], inv["swapped"]) == ("inversion", True)
    assert (inv["chosen"], inv["rejected"]) == ("old rejected inv", "old chosen inv")
    # stored-orientation flags describe the stored texts; the raw verdict keeps the judge's orientation
    assert (inv["chosen_violates"], inv["rejected_violates"]) == (False, True)
    assert inv["verdict"] == {
        "id": "inv",
        "chosen_violates": True,
        "rejected_violates": False,
        "judge": "j",
        "rationale": {"chosen": "bad"},
    }
    assert (sup["chosen"], sup["swapped"], sup["category"]) == ("old chosen sup", False, "suppression")
    assert (ret["chosen"], ret["category"]) == ("old chosen ret", "retention")
    assert inv["prompt"] == "prompt inv"


def test_unjudged_low_confidence_and_unknown_ids() -> None:
    pairs = [pair(str(i)) for i in range(5)]
    verdicts = {
        "0": Verdict("0", True, False, 0.9, 0.9),
        "1": Verdict("1", True, False, 0.9, 0.4),  # rejected needed, not confident
        "2": Verdict("2", False, True, 0.95, 0.1),  # retention: rejected not needed
        "3": Verdict("3", None, False),
        "ghost": Verdict("ghost", True, True),
    }
    result = triage(pairs, verdicts, min_confidence=0.5)
    assert [r["id"] for r in result.records] == ["0", "2"]
    reasons = {u["id"]: u["unjudged_reason"] for u in result.unjudged}
    assert reasons == {
        "1": "rejected verdict confidence 0.4 below --min-confidence 0.5",
        "3": "chosen verdict missing",
        "4": "no verdict for this id",
    }
    report = result.report
    assert report["categories"] == {"inversion": 1, "suppression": 0, "retention": 1}
    assert report["unjudged"] == 3 and report["verdicts_for_unknown_ids"] == 1
    assert report["unjudged_reasons"]["rejected verdict low confidence"] == 1


def test_noise_flips_the_requested_fraction_deterministically() -> None:
    pairs = [pair(str(i)) for i in range(200)]
    verdicts = {str(i): Verdict(str(i), True, i % 2 == 0) for i in range(200)}
    first = triage(pairs, verdicts, noise=0.1, seed=3)
    again = triage(pairs, verdicts, noise=0.1, seed=3)
    other = triage(pairs, verdicts, noise=0.1, seed=4)
    flips = first.report["noise"]["flips"]
    assert len(flips) == 20 and flips == again.report["noise"]["flips"] != other.report["noise"]["flips"]
    by_id = {r["id"]: r for r in first.records}
    for flip in flips:
        record = by_id[flip["id"]]
        assert flip["from"] != flip["to"] == record["category"]
        assert record["swapped"] == (flip["to"] == "inversion")  # oriented as the new category is stored
    with pytest.raises(TraceError):
        triage(pairs, verdicts, noise=1.5)


def test_verdict_file_validation(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    write_jsonl(path, [{"id": "a", "chosen_violates": True, "rejected_violates": False}] * 2)
    assert read_verdicts(path).repeated == 1
    write_jsonl(
        path,
        [
            {"id": "a", "chosen_violates": True, "rejected_violates": False},
            {"id": "a", "chosen_violates": False, "rejected_violates": False},
        ],
    )
    with pytest.raises(TraceError, match=rf"{path}:2: a second, different verdict for id 'a'"):
        read_verdicts(path)
    for bad, message in (
        ({"id": "a", "chosen_violates": "yes"}, "must be true, false or null"),
        ({"id": "a", "chosen_violates": True, "confidence": 1.5}, r"must be a number in \[0, 1\]"),
        ({"chosen_violates": True}, "needs a string or integer 'id'"),
    ):
        write_jsonl(path, [bad])
        with pytest.raises(BadRecord, match=message):
            read_verdicts(path)
    write_jsonl(path, [{"id": "a", "chosen_violates": True, "confidence": 0.7, "rejected_confidence": 0.2}])
    verdict = read_verdicts(path).by_id["a"]
    assert (verdict.chosen_confidence, verdict.rejected_confidence, verdict.rejected_violates) == (
        0.7,
        0.2,
        None,
    )


def test_run_triage_writes_everything_or_nothing(tmp_path: Path) -> None:
    pairs_path, verdicts_path, out = (
        tmp_path / "pairs.jsonl",
        tmp_path / "v.jsonl",
        tmp_path / "t" / "triaged.jsonl",
    )
    write_jsonl(
        pairs_path,
        [
            {"id": "a", "prompt": "Q", "chosen": "A", "rejected": "B"},
            {"id": "b", "prompt": "Q", "chosen": "A", "rejected": "B"},
        ],
    )
    write_jsonl(verdicts_path, [{"id": "a", "chosen_violates": True, "rejected_violates": False}])
    report = run_triage(str(pairs_path), str(verdicts_path), str(out))
    paths = output_paths(out)
    assert [json.loads(line)["id"] for line in paths["triaged"].read_text().splitlines()] == ["a"]
    assert [json.loads(line)["id"] for line in paths["unjudged"].read_text().splitlines()] == ["b"]
    assert json.loads(paths["report"].read_text()) == report

    bad_out = tmp_path / "bad" / "triaged.jsonl"
    pairs_path.write_text(pairs_path.read_text() + "{broken\n")
    with pytest.raises(BadRecord, match=rf"{pairs_path}:3"):
        run_triage(str(pairs_path), str(verdicts_path), str(bad_out))
    assert not bad_out.parent.exists() or not any(bad_out.parent.iterdir())
    report = run_triage(str(pairs_path), str(verdicts_path), str(bad_out), on_bad="skip")
    assert report["rejects"] == 1
    rejects = [
        json.loads(line) for line in (bad_out.parent / "triaged.rejects.jsonl").read_text().splitlines()
    ]
    assert rejects[0]["position"] == f"{pairs_path}:3" and rejects[0]["record"] == "{broken"


def test_already_triaged_input_is_refused() -> None:
    triaged = Pair("a", "text", "Q", "A", "B", extra={"category": "retention"})
    with pytest.raises(BadRecord, match="already triaged"):
        triage([triaged], {"a": Verdict("a", False, False)})


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "a", "chosen_violation": True, "rejected_violates": False}, "did you mean 'chosen_violates'"),
        (
            {"id": "a", "chosen_violates": True, "rejected_violated": False},
            "did you mean 'rejected_violates'",
        ),
        ({"id": "a", "chosen_violates": True, "chosen_confidense": 0.5}, "did you mean 'chosen_confidence'"),
        (
            {"id": "a", "rationale": "no verdict keys at all"},
            "neither 'chosen_violates' nor 'rejected_violates'",
        ),
    ],
)
def test_misspelt_or_missing_verdict_keys_are_bad_records(tmp_path: Path, record: dict, message: str) -> None:
    path = tmp_path / "v.jsonl"
    write_jsonl(path, [{"id": "ok", "chosen_violates": False}, record])
    with pytest.raises(BadRecord, match=rf"{path}:2: .*{message}"):
        read_verdicts(path)


def test_extra_verdict_fields_are_kept() -> None:
    from trace_ds.judge.verdicts import verdict_from_record

    record = {
        "id": "a",
        "chosen_violates": True,
        "rejected_violates": None,
        "judge": "j",
        "confidence_note": "x",
    }
    verdict = verdict_from_record(record, None)
    assert verdict.extra == {"judge": "j", "confidence_note": "x"}
    assert verdict.to_record()["confidence_note"] == "x"


def test_a_run_that_judges_nothing_fails_unless_unjudged_only(tmp_path: Path) -> None:
    pairs_path, verdicts_path, out = tmp_path / "pairs.jsonl", tmp_path / "v.jsonl", tmp_path / "t.jsonl"
    write_jsonl(pairs_path, [{"id": "a", "prompt": "Q", "chosen": "A", "rejected": "B"}])
    write_jsonl(verdicts_path, [{"id": "zzz", "chosen_violates": True, "rejected_violates": False}])
    with pytest.raises(
        TraceError, match=r"no pair was judged: 1 pairs.*1 of 1 verdicts name ids.*--unjudged-only"
    ):
        run_triage(str(pairs_path), str(verdicts_path), str(out))
    assert not any(tmp_path.glob("t*"))
    report = run_triage(str(pairs_path), str(verdicts_path), str(out), unjudged_only=True)
    assert report["judged"] == 0 and report["outputs"]["triaged"] is None and not out.exists()
    assert [json.loads(line)["id"] for line in output_paths(out)["unjudged"].read_text().splitlines()] == [
        "a"
    ]


def test_triage_cli_refuses_misspelt_verdict_keys(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from trace_ds.cli import main

    pairs_path, verdicts_path = tmp_path / "pairs.jsonl", tmp_path / "v.jsonl"
    write_jsonl(
        pairs_path, [{"id": f"p{i}", "prompt": "Q", "chosen": "A", "rejected": "B"} for i in range(3)]
    )
    write_jsonl(verdicts_path, [{"id": f"p{i}", "chosen_violation": True} for i in range(3)])
    result = CliRunner().invoke(
        main,
        [
            "triage",
            "--pairs",
            str(pairs_path),
            "--verdicts",
            str(verdicts_path),
            "--out",
            str(tmp_path / "t.jsonl"),
        ],
    )
    assert result.exit_code != 0
    assert f"{verdicts_path}:1" in result.output and "did you mean 'chosen_violates'" in result.output
    assert not (tmp_path / "t.jsonl").exists()
