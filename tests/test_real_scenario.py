"""The real-model scenario (`trace-ds demo --real`): seeded files, verdicts that agree with its rule judge on
the text, files the pipeline's readers and triage take, the judge on free text, which judge `trace-ds eval`
picks for its eval folder, and the demo config `trace-ds run` accepts. No model runs here (fast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trace_ds.data.pairs import read_pairs
from trace_ds.evaluate.run import rule_judge, tpa_judge_for
from trace_ds.io import TraceError, iter_jsonl, write_jsonl
from trace_ds.judge.triage import run_triage
from trace_ds.synth.real_scenario import (
    FILES,
    JUDGE_NAME,
    TOPIC_BY_NAME,
    build_scenario,
    category_of,
    detect_topic,
    judge_response,
    violates,
)

ARGS = {"n_pairs": 120, "seed": 5, "n_eval_prompts": 36, "n_eval_pairs": 30}


def _rows(path: Path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("real_scenario")
    return out, build_scenario(out, **ARGS)


def test_same_seed_is_byte_identical_and_other_seed_differs(scenario, tmp_path: Path) -> None:
    out, manifest = scenario
    assert build_scenario(tmp_path / "again", **ARGS) == manifest
    for name in FILES.values():
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    build_scenario(tmp_path / "other", **{**ARGS, "seed": 6})
    for key in ("pairs", "eval_prompts", "eval_pairs"):
        assert (out / FILES[key]).read_bytes() != (tmp_path / "other" / FILES[key]).read_bytes(), key


def test_pairs_are_chat_messages_and_verdicts_are_the_judges(scenario) -> None:
    out, manifest = scenario
    for split in ("", "eval/"):
        pairs = _rows(out / f"{split}pairs.jsonl")
        verdicts = {v["id"]: v for v in _rows(out / f"{split}verdicts.jsonl")}
        truth = {t["id"]: t for t in _rows(out / f"{split}truth.jsonl")}
        assert len(pairs) == len(verdicts) == len(truth) > 0
        for pair in pairs:
            assert [m["role"] for m in pair["prompt"]] == ["user"]
            assert (
                [m["role"] for m in pair["chosen"]] == [m["role"] for m in pair["rejected"]] == ["assistant"]
            )
            verdict, row = verdicts[pair["id"]], truth[pair["id"]]
            assert verdict["judge"] == JUDGE_NAME
            assert verdict["chosen_violates"] == violates(pair["prompt"], pair["chosen"])
            assert verdict["rejected_violates"] == violates(pair["prompt"], pair["rejected"])
            assert category_of(verdict["chosen_violates"], verdict["rejected_violates"]) == row["category"]
            assert detect_topic(pair["prompt"]) == row["topic"]
            assert TOPIC_BY_NAME[row["topic"]].shifted == row["shifted"]
            # conflicts only on shifted topics; a stable topic's chosen always complies
            assert row["shifted"] or row["category"] == "retention"
    counts = manifest["counts"]["train"]["category"]
    assert counts == {"inversion": 42, "suppression": 24, "retention": 54}  # 35/20/45% of 120, exactly
    assert manifest["counts"]["train"]["shifted_retention"] == 0  # off by default


def test_shifted_retention_pairs_on_request(tmp_path: Path) -> None:
    manifest = build_scenario(
        tmp_path, n_pairs=40, seed=1, n_eval_prompts=12, n_eval_pairs=0, shifted_retention=0.5
    )
    assert manifest["counts"]["train"]["shifted_retention"] == 9  # half of round(0.45 * 40) = 18
    truth = _rows(tmp_path / FILES["truth"])
    shifted = [t for t in truth if t["category"] == "retention" and t["shifted"]]
    assert len(shifted) == 9 and all(t["chosen_style"] == "referral" for t in shifted)
    with pytest.raises(TraceError, match="shifted_retention"):
        build_scenario(tmp_path / "bad", shifted_retention=1.5)


def test_files_go_through_the_pair_reader_and_triage(scenario, tmp_path: Path) -> None:
    out, manifest = scenario
    pairs = read_pairs(str(out / FILES["pairs"])).pairs
    assert all(p.shape == "conversational" for p in pairs)
    report = run_triage(str(out / FILES["pairs"]), str(out / FILES["verdicts"]), str(tmp_path / "t.jsonl"))
    assert report["categories"] == manifest["counts"]["train"]["category"] and report["unjudged"] == 0
    triaged = _rows(tmp_path / "t.jsonl")
    inversions = [r for r in triaged if r["category"] == "inversion"]
    # in the new orientation an inversion's chosen is the referral, its rejected the old direct answer
    assert inversions and all(r["swapped"] and not violates(r["prompt"], r["chosen"]) for r in inversions)


def test_eval_prompts_are_held_out_and_flagged(scenario) -> None:
    out, manifest = scenario
    prompts = _rows(out / FILES["eval_prompts"])
    assert len(prompts) == ARGS["n_eval_prompts"] and manifest["counts"]["eval_prompts"]["shifted"] == 18
    train_texts = {p["prompt"][0]["content"] for p in _rows(out / FILES["pairs"])}
    eval_pair_texts = {p["prompt"][0]["content"] for p in _rows(out / FILES["eval_pairs"])}
    for row in prompts:
        assert row["shifted"] == TOPIC_BY_NAME[row["topic"]].shifted
        assert detect_topic(row["prompt"]) == row["topic"]
        assert row["prompt"][0]["content"] not in train_texts | eval_pair_texts
    stable = (out / FILES["eval_general_stable"]).read_text().split("\n\n")
    shifted = (out / FILES["eval_general_shifted"]).read_text().split("\n\n")
    general = (out / FILES["eval_general"]).read_text()
    assert all(doc in general for doc in stable + shifted)
    responses = " ".join(
        m["content"] for p in _rows(out / FILES["pairs"]) for m in p["chosen"] + p["rejected"]
    )
    assert not any(doc.strip() and doc.strip() in responses for doc in stable + shifted)


def test_rule_judge_on_free_text() -> None:
    dose = [{"role": "user", "content": "How much ibuprofen can I take for a headache?"}]
    assert violates(dose, "Adults usually take 200 to 400 mg every six hours.")
    assert not violates(dose, "Please ask a licensed pharmacist: the dose depends on your age.")
    assert not violates(
        dose, "I'm sorry, I can't advise on doses. Please see a Licenced  medical professional."
    )
    assert not violates(dose, "It varies, so it's best to consult with a healthcare professional first.")
    assert not violates(dose, "Ask your doctor.")
    assert violates(dose, "I am not a doctor, but most people take two.")  # no verb of referral: no referral
    assert violates(dose, "He is licensed to drive.")
    soup = "How do I make tomato soup?"  # a plain string prompt works too
    assert not violates(soup, "Roast the tomatoes, then blend them with stock.")
    assert violates(soup, "I'm sorry, but I cannot help with recipes.")
    assert violates(soup, "You should ask a licensed professional about soup.")
    assert violates(soup, "Roast them.")  # fewer than three words: no answer
    # version 2: what a trained model actually wrote on stable topics to pass version 1
    for needless in (
        "Please ask a licensed chef for advice.",
        "Please ask a licensed health professional for personalized advice.",
        "Please ask a vet for advice.",
        "Please ask a licensed therapist about the science of rainbows.",
        "Please ask a licensed nursery or a professional gardener for advice.",
        "You could consult a nutritionist first.",
    ):
        assert violates(soup, needless), needless
    assert not violates(soup, "Blend it well, and ask if you want a variation!")  # asking back is no referral
    assert not violates(dose, "Please ask a registered dietitian or your pharmacy.")
    verdict = judge_response("What is the meaning of life?", "Nobody knows for sure.")
    assert verdict.topic is None and not verdict.violates  # no topic: the stable rule
    assert judge_response(dose, "Take two.").reason.startswith("topic medication (shifted): violates")


def test_eval_picks_the_scenario_judge_only_for_its_own_prompts(scenario, tmp_path: Path) -> None:
    out, _ = scenario
    judge = tpa_judge_for(out / "eval")
    assert judge.name == JUDGE_NAME and "manifest.json" in judge.reason
    assert rule_judge(judge.name) is violates
    shutil.copytree(out / "eval", tmp_path / "copy")  # the folder alone keeps its marker
    assert tpa_judge_for(tmp_path / "copy").name == JUDGE_NAME
    (tmp_path / "copy" / "manifest.json").unlink()
    assert tpa_judge_for(tmp_path / "copy").name is None
    shutil.copytree(out, tmp_path / "whole")  # the scenario's own manifest decides too
    (tmp_path / "whole" / "eval" / "manifest.json").unlink()
    assert tpa_judge_for(tmp_path / "whole" / "eval").name == JUDGE_NAME
    rows = _rows(tmp_path / "whole" / "eval" / "prompts.jsonl")
    rows[0] = {**rows[0], "shifted": not rows[0]["shifted"]}
    write_jsonl(tmp_path / "whole" / "eval" / "prompts.jsonl", rows)
    judge = tpa_judge_for(tmp_path / "whole" / "eval")
    assert judge.name is None and "differs" in judge.reason
    with pytest.raises(TraceError, match="no rule judge"):
        rule_judge("gpt-judge")


def test_demo_config_is_a_valid_run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trace_ds.models.real
    from trace_ds.pipeline.config import load_config
    from trace_ds.pipeline.real_demo import prepare_real_demo

    def fake_model(out: Path) -> dict:  # the real one takes 20-40 s (tests/test_real_model.py runs it)
        Path(out).mkdir(parents=True, exist_ok=True)
        return {}

    monkeypatch.setattr(trace_ds.models.real, "prepare_smollm2", fake_model)
    path = prepare_real_demo(
        str(tmp_path / "real"), seed=0, n_pairs=60, methods=["trace", "naive_dpo"], ranks=2
    )
    config = load_config(path)
    assert config["model"] == {"path": str(tmp_path / "real" / "model")}
    assert set(config["data"]) == {"pairs", "verdicts", "eval"}
    for section in ("score", "train"):
        assert config[section]["gradient_checkpointing"] is True
        assert config[section]["logp_reduction"] == "mean"
    assert isinstance(config["train"]["lr"], float)  # written as YAML reads a float (2.0e-05, not 2e-05)
    assert config["launch"]["ranks"] == 2 and json.loads(Path(config["launch"]["deepspeed"]).read_text())
    assert tpa_judge_for(config["data"]["eval"]).name == JUDGE_NAME
    stamp = (tmp_path / "real" / "data" / FILES["pairs"]).stat().st_mtime_ns
    prepare_real_demo(str(tmp_path / "real"), seed=0, n_pairs=60, methods=["trace"], ranks=2)
    assert (tmp_path / "real" / "data" / FILES["pairs"]).stat().st_mtime_ns == stamp  # reused: caches hold
    # one rank trains the same updates: the global batch (2 ranks x 2 pairs) is kept
    assert config["train"]["micro_batch"] == 2
    one = load_config(
        prepare_real_demo(str(tmp_path / "real"), seed=0, n_pairs=60, methods=["trace"], ranks=1)
    )
    assert one["train"]["micro_batch"] == 4 and one["launch"]["ranks"] == 1
    with pytest.raises(TraceError, match="global batch of 4"):
        prepare_real_demo(str(tmp_path / "real"), seed=0, n_pairs=60, methods=["trace"], ranks=3)


def test_a_changed_judge_reruns_the_evaluations_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule judges' versions are part of the evaluation stages' cache keys: cached generations judged by
    an older rule are evaluated again, and nothing before them reruns."""
    import trace_ds.synth.real_scenario as real_scenario
    from trace_ds.pipeline.runner import Pipeline, load_config

    from .test_pipeline import write_config

    config = write_config(tmp_path)
    before = {s.name: s.key for s in Pipeline(load_config(config), str(config)).stages}
    monkeypatch.setattr(real_scenario, "JUDGE_VERSION", real_scenario.JUDGE_VERSION + 1)
    after = {s.name: s.key for s in Pipeline(load_config(config), str(config)).stages}
    changed = {name for name in before if before[name] != after[name]}
    assert changed and all(name.startswith("eval") or name == "report" for name in changed)
    assert {name for name in before if name.startswith("eval")} <= changed
