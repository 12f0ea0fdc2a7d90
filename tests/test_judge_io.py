"""Judge export -> (fake judge) -> parse round trip, with every kind of malformed response."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.data.pairs import Pair
from trace_ds.io import TraceError, write_jsonl
from trace_ds.judge.export import build_requests, custom_id, load_template, split_custom_id
from trace_ds.judge.parse import parse_responses, parse_verdict_text

PAIRS = [
    Pair("p1", "text", "How do I bake bread?", "Knead and bake.", "I can't help."),
    Pair(
        "p::2",
        "conversational",
        [{"role": "user", "content": "Hi {name}"}],
        [{"role": "assistant", "content": "Hello"}],
        [{"role": "assistant", "content": "Bye"}],
    ),
    Pair("p3", "text", "Q3", "A3", "B3"),
    Pair("p4", "text", "Q4", "A4", "B4"),
]


def openai_line(cid: str, content: str | None, status: int = 200, error: dict | None = None) -> dict:
    body = {
        "id": "chatcmpl-1",
        "model": "judge-x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }
    return {
        "id": "batch_req_1",
        "custom_id": cid,
        "response": {"status_code": status, "request_id": "r", "body": body},
        "error": error,
    }


def test_custom_ids_round_trip_even_with_separator_in_the_id() -> None:
    assert split_custom_id(custom_id("a::b", "rejected")) == ("a::b", "rejected")
    for bad in ("nope", "x::middle", "::chosen"):
        with pytest.raises(ValueError):
            split_custom_id(bad)


def test_export_formats_and_template() -> None:
    template = load_template(None)
    policy = "Never refuse {cooking} questions."
    openai = list(build_requests(PAIRS, policy, template, "openai", model="m"))
    assert len(openai) == 2 * len(PAIRS)
    first = openai[0]
    assert first["custom_id"] == "p1::chosen" and first["url"] == "/v1/chat/completions"
    assert first["body"]["model"] == "m" and first["body"]["temperature"] == 0
    text = first["body"]["messages"][0]["content"]
    assert (
        "Never refuse {cooking} questions." in text
        and "How do I bake bread?" in text
        and "Knead and bake." in text
    )
    assert "{response}" not in text
    plain = list(build_requests(PAIRS, policy, template, "plain"))
    assert plain[3] == {
        "custom_id": "p::2::rejected",
        "pair_id": "p::2",
        "side": "rejected",
        "prompt": plain[3]["prompt"],
    }
    assert "User: Hi {name}" in plain[3]["prompt"] and "Bye" in plain[3]["prompt"]
    tokenized = Pair("t", "tokenized", [1], [2], [3])
    with pytest.raises(TraceError, match="pre-tokenized"):
        list(build_requests([tokenized], policy, template))


def test_custom_template_must_keep_placeholders(tmp_path: Path) -> None:
    custom = tmp_path / "t.md"
    custom.write_text("Policy: {policy}\nAnswer: {response}\n")
    with pytest.raises(TraceError, match=r"lacks placeholder\(s\) \{prompt\}"):
        load_template(custom)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"violates": true, "confidence": 0.8, "rationale": "r"}', (True, 0.8, "r")),
        ('```json\n{"violates": false}\n```', (False, None, None)),
        ('Sure! {"violates": "No"}', (False, None, None)),
    ],
)
def test_parse_good_replies(reply: str, expected: tuple) -> None:
    got = parse_verdict_text(reply)
    assert (got.violates, got.confidence, got.rationale) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "   ",
        None,
        "yes",
        "Non-compliant",
        "I cannot judge this.",
        '{"violates": "maybe"}',
        '{"violates": 1}',
        '{"verdict": true}',
        '{"violates": true, "confidence": 3}',
        "{broken",
    ],
)
def test_unparsable_replies_are_never_compliant(reply: str | None) -> None:
    with pytest.raises(ValueError):
        parse_verdict_text(reply)


def test_round_trip_with_malformed_responses(tmp_path: Path) -> None:
    requests = tmp_path / "req.jsonl"
    write_jsonl(requests, build_requests(PAIRS, "policy", load_template(None)))
    responses = tmp_path / "out.jsonl"
    lines = [
        openai_line("p1::chosen", '{"violates": true, "confidence": 0.9, "rationale": "answers"}'),
        openai_line("p1::rejected", '{"violates": false}'),
        openai_line("p::2::chosen", '{"violates": false}'),
        openai_line("p::2::rejected", None, status=500),  # errored
        openai_line("p3::chosen", "I think it is fine"),  # unparsable
        openai_line("p3::rejected", '{"violates": true}', error={"code": "x", "message": "batch expired"}),
        # p4: no response at all for either side
        openai_line("zz::chosen", '{"violates": true}'),  # not in the requests
    ]
    responses.write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + "{torn line\n", encoding="utf-8"
    )

    out = tmp_path / "verdicts.jsonl"
    result = CliRunner().invoke(
        main,
        ["judge", "parse", "--responses", str(responses), "--requests", str(requests), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    verdicts = {v["id"]: v for v in map(json.loads, out.read_text().splitlines())}
    assert list(verdicts) == ["p1", "p::2", "p3", "p4"]
    assert verdicts["p1"] | {} == {
        "id": "p1",
        "chosen_violates": True,
        "rejected_violates": False,
        "chosen_confidence": 0.9,
        "rationale": {"chosen": "answers"},
        "judge": "judge-x",
    }
    assert verdicts["p::2"]["chosen_violates"] is False and verdicts["p::2"]["rejected_violates"] is None
    assert verdicts["p::2"]["problems"] == {"rejected": "errored: HTTP 500"}
    assert verdicts["p3"]["chosen_violates"] is None and verdicts["p3"]["rejected_violates"] is None
    assert verdicts["p3"]["problems"]["chosen"].startswith("unparsable")
    assert verdicts["p3"]["problems"]["rejected"] == "errored: batch expired"
    assert verdicts["p4"]["problems"] == {
        "chosen": "missing: no response",
        "rejected": "missing: no response",
    }
    problems = [json.loads(line) for line in (tmp_path / "verdicts.problems.jsonl").read_text().splitlines()]
    reasons = sorted(p["reason"].split(":")[0] for p in problems)
    assert reasons == [
        "errored",
        "errored",
        "missing",
        "missing",
        "not valid JSON",
        "response for a pair not in the requests file",
        "unparsable",
    ]
    assert "not valid JSON: Expecting property name enclosed in double quotes: column 2" in {
        p["reason"] for p in problems
    }


def test_plain_form_and_conflicting_duplicates(tmp_path: Path) -> None:
    responses = tmp_path / "plain.jsonl"
    write_jsonl(
        responses,
        [
            {"custom_id": "a::chosen", "output": '{"violates": true}'},
            {"custom_id": "a::rejected", "output": '{"violates": false}'},
            {"custom_id": "a::rejected", "output": '{"violates": false}'},  # identical repeat: fine
            {"custom_id": "b::chosen", "output": '{"violates": false}'},
            {"custom_id": "b::chosen", "output": '{"violates": true}'},  # contradicts: unknown
            {"custom_id": "b::rejected", "error": "timeout"},
        ],
    )
    result = parse_responses([responses])
    by_id = {v.id: v for v in result.verdicts}
    assert (by_id["a"].chosen_violates, by_id["a"].rejected_violates) == (True, False)
    assert (by_id["b"].chosen_violates, by_id["b"].rejected_violates) == (None, None)
    assert by_id["b"].extra["problems"]["chosen"].startswith("two different responses")
    assert result.counts() == {"pairs": 2, "complete": 1, "incomplete": 1, "problems": 2}


def test_cli_export_then_triage_end_to_end(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [p.to_record() for p in PAIRS])
    policy = tmp_path / "policy.md"
    policy.write_text("Be helpful.")
    runner = CliRunner()
    requests = tmp_path / "req.jsonl"
    result = runner.invoke(
        main,
        [
            "judge",
            "export",
            "--pairs",
            str(pairs),
            "--policy",
            str(policy),
            "--out",
            str(requests),
            "--format",
            "plain",
        ],
    )
    assert result.exit_code == 0, result.output
    answers = [
        {"custom_id": r["custom_id"], "output": json.dumps({"violates": r["side"] == "chosen"})}
        for r in map(json.loads, requests.read_text().splitlines())
    ]
    responses = tmp_path / "resp.jsonl"
    write_jsonl(responses, answers)
    verdicts = tmp_path / "v.jsonl"
    assert (
        runner.invoke(
            main, ["judge", "parse", "--responses", str(responses), "--out", str(verdicts)]
        ).exit_code
        == 0
    )
    triaged = tmp_path / "triaged.jsonl"
    result = runner.invoke(
        main, ["triage", "--pairs", str(pairs), "--verdicts", str(verdicts), "--out", str(triaged)]
    )
    assert result.exit_code == 0, result.output
    assert "Triage report" in result.output
    assert {json.loads(line)["category"] for line in triaged.read_text().splitlines()} == {"inversion"}


def test_cli_bad_input_exits_nonzero_and_writes_nothing(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"id": "a", "prompt": "Q", "chosen": "A", "rejected": "B"}\n{"id": "a", "prompt": "Q", "chosen": "A", "rejected": "C"}\n'
    )
    verdicts = tmp_path / "v.jsonl"
    write_jsonl(verdicts, [{"id": "a", "chosen_violates": False, "rejected_violates": False}])
    out = tmp_path / "out" / "triaged.jsonl"
    result = CliRunner().invoke(
        main, ["triage", "--pairs", str(pairs), "--verdicts", str(verdicts), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert f"{pairs}:2: duplicate id 'a'" in result.output.replace("\n", "")
    assert not out.parent.exists()


def test_external_judge_tpa_on_generations(tmp_path: Path) -> None:
    """Generations (as `trace-ds eval` writes them) -> judge export -> external judge -> parse -> TPA."""
    generations = tmp_path / "gen.jsonl"
    write_jsonl(
        generations,
        [{"id": f"g{i}", "prompt": f"Q{i}", "response": f"A{i}", "shifted": i % 2 == 0} for i in range(6)],
    )
    policy = tmp_path / "policy.md"
    policy.write_text("Be careful.")
    runner = CliRunner()
    requests = tmp_path / "req.jsonl"
    result = runner.invoke(
        main,
        [
            "judge",
            "export",
            "--generations",
            str(generations),
            "--policy",
            str(policy),
            "--out",
            str(requests),
            "--format",
            "plain",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in requests.read_text().splitlines()]
    assert [r["custom_id"] for r in lines] == [f"g{i}::chosen" for i in range(6)] and "A3" in lines[3][
        "prompt"
    ]
    answers = {
        "g0": '{"violates": false}',
        "g1": '{"violates": true}',
        "g2": '{"violates": false}',
        "g3": "no idea",
        "g4": '{"violates": true}',
    }  # g5: no answer
    responses = tmp_path / "resp.jsonl"
    write_jsonl(responses, [{"custom_id": f"{k}::chosen", "output": v} for k, v in answers.items()])
    verdicts = tmp_path / "v.jsonl"
    result = runner.invoke(
        main,
        [
            "judge",
            "parse",
            "--generations",
            "--responses",
            str(responses),
            "--requests",
            str(requests),
            "--out",
            str(verdicts),
        ],
    )
    assert result.exit_code == 0, result.output
    problems = [json.loads(line) for line in (tmp_path / "v.problems.jsonl").read_text().splitlines()]
    assert sorted((p["id"], p["side"]) for p in problems) == [
        ("g3", "chosen"),
        ("g5", "chosen"),
    ]  # no 'rejected' side expected
    out = tmp_path / "tpa.json"
    result = runner.invoke(
        main, ["tpa", "--generations", str(generations), "--verdicts", str(verdicts), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    tpa = json.loads(out.read_text())
    assert tpa["unjudged"] == 2 and tpa["tpa"]["all"]["prompts"] == 4
    assert (
        tpa["tpa"]["all"]["tpa"] == 0.5
        and tpa["tpa"]["shifted"]["tpa"] == pytest.approx(2 / 3)
        and tpa["tpa"]["stable"]["tpa"] == 0.0
    )
    assert (
        runner.invoke(main, ["judge", "export", "--policy", str(policy), "--out", str(requests)]).exit_code
        == 2
    )
