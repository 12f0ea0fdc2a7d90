"""Evaluation: intervals, TPA bookkeeping and which judge may score it, `trace-ds eval` on a tiny model (the
model as its own reference), the report and the environment fingerprint."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.evaluate.metrics import cut_turn, target_policy_agreement, wilson_interval
from trace_ds.evaluate.run import NO_TPA, tpa_judge_for
from trace_ds.io import iter_jsonl, write_jsonl
from trace_ds.synth.generator import build_benchmark

from .helpers import read_lines


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)  # the textbook Wilson 95% interval for 8/10
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_cut_turn_and_tpa_groups() -> None:
    assert cut_turn(" Take 200 mg.\nUser: and then?") == "Take 200 mg."
    prompts = [
        {"prompt": "a", "shifted": True},
        {"prompt": "b", "shifted": True},
        {"prompt": "c", "shifted": False},
    ]
    tpa = target_policy_agreement(prompts, ["ok", "bad", "ok"], lambda prompt, response: response == "bad")
    assert tpa["all"]["tpa"] == pytest.approx(2 / 3) and tpa["all"]["prompts"] == 3
    assert tpa["shifted"]["tpa"] == 0.5 and tpa["stable"]["tpa"] == 1.0


def _edit_first_prompt(folder: Path) -> None:
    rows = [record for _, record in iter_jsonl(folder / "prompts.jsonl")]
    rows[0] = {**rows[0], "prompt": "Which of these is better for my team, and why?"}
    write_jsonl(folder / "prompts.jsonl", rows)


def test_rule_judge_only_on_the_benchmarks_own_prompts(tmp_path: Path) -> None:
    build_benchmark(tmp_path / "bench", n_pairs=20, seed=1, n_eval_prompts=10, n_eval_pairs=12)
    own = tmp_path / "bench" / "eval"
    assert tpa_judge_for(own).name == "synth-rule"
    # the eval folder copied alone keeps its marker (eval/manifest.json)
    shutil.copytree(own, tmp_path / "copy")
    assert tpa_judge_for(tmp_path / "copy").name == "synth-rule"
    # reformatting the file (spacing, key order) is not a change of prompts
    rows = read_lines(own / "prompts.jsonl")
    (tmp_path / "copy" / "prompts.jsonl").write_text(
        "\n".join(json.dumps(dict(reversed(list(r.items()))), indent=None) for r in rows) + "\n\n"
    )
    assert tpa_judge_for(tmp_path / "copy").name == "synth-rule"
    # one edited prompt: the rule judge is gone, in a copy of the folder and in a copy of the whole benchmark
    _edit_first_prompt(tmp_path / "copy")
    judge = tpa_judge_for(tmp_path / "copy")
    assert judge.name is None and "differs" in judge.reason
    shutil.copytree(tmp_path / "bench", tmp_path / "bench2")
    _edit_first_prompt(tmp_path / "bench2" / "eval")
    assert tpa_judge_for(tmp_path / "bench2" / "eval").name is None
    (tmp_path / "bench2" / "eval" / "manifest.json").unlink()  # the benchmark's manifest alone decides too
    assert tpa_judge_for(tmp_path / "bench2" / "eval").name is None
    shutil.copy(own / "prompts.jsonl", tmp_path / "bench2" / "eval" / "prompts.jsonl")
    judge = tpa_judge_for(tmp_path / "bench2" / "eval")
    assert judge.name == "synth-rule" and str(tmp_path / "bench2" / "manifest.json") in judge.reason
    # a benchmark from before the digest was recorded (format_version 1): no judge, and the hint to rebuild
    old = json.loads((tmp_path / "bench2" / "manifest.json").read_text())
    del old["tpa_judge"]
    (tmp_path / "bench2" / "manifest.json").write_text(json.dumps({**old, "format_version": 1}))
    judge = tpa_judge_for(tmp_path / "bench2" / "eval")
    assert judge.name is None and "rebuild" in judge.reason
    # user data with `shifted` and synthetic-looking prompts but no marker: no judge
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(own / "prompts.jsonl", mine / "prompts.jsonl")
    judge = tpa_judge_for(mine)
    assert judge.name is None and "no synthetic-benchmark manifest" in judge.reason
    # a marker that is not JSON is no marker
    (mine / "manifest.json").write_text("{not json")
    assert tpa_judge_for(mine).name is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_of_the_reference_itself(tiny_model_dir: Path, tmp_path: Path) -> None:
    build_benchmark(tmp_path / "bench", n_pairs=30, seed=2, n_eval_prompts=12, n_eval_pairs=24)
    out = tmp_path / "metrics.json"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--reference",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "bench" / "eval"),
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        "--max-length",
        "160",
        "--max-prompt-length",
        "64",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    preference = metrics["preference"]
    # policy == reference: every implicit reward is 0, so no margin is positive and the KL is 0
    assert preference["inversion_accuracy"] == 0.0 and preference["inversion_margin"] == 0.0
    assert preference["suppression_logp_change"] == 0.0 and preference["retention_kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert metrics["perplexity"]["model"] == metrics["perplexity"]["reference"] > 1.0
    # the benchmark's general_stable.txt / general_shifted.txt: perplexity on each, their texts general.txt's
    stable, shifted = metrics["perplexity"]["stable"], metrics["perplexity"]["shifted"]
    assert stable["model"] == stable["reference"] > 1.0 and shifted["model"] == shifted["reference"] > 1.0
    assert stable["texts"] + shifted["texts"] == metrics["perplexity"]["texts"] > 0
    assert (
        min(stable["model"], shifted["model"])
        < metrics["perplexity"]["model"]
        < max(stable["model"], shifted["model"])
    )
    assert (
        metrics["tpa"]["all"]["prompts"]
        == metrics["tpa"]["shifted"]["prompts"] + metrics["tpa"]["stable"]["prompts"]
        > 0
    )
    assert metrics["tpa_judge"] == "synth-rule" and metrics["tpa_note"] is None  # the untouched benchmark
    generations = [json.loads(line) for line in Path(metrics["generations"]).read_text().splitlines()]
    assert len(generations) == metrics["tpa"]["all"]["prompts"]
    assert sum(g["compliant"] for g in generations) == round(metrics["tpa"]["all"]["tpa"] * len(generations))
    assert metrics["environment"]["packages"]["torch"] and "cpu" in metrics["environment"]


EDITED_ARGS = ["--max-new-tokens", "4", "--max-length", "160", "--max-prompt-length", "64"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_on_edited_prompts_has_no_tpa_until_a_judge_scores_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    build_benchmark(tmp_path / "bench", n_pairs=30, seed=2, n_eval_prompts=6, n_eval_pairs=12)
    data = tmp_path / "mine"
    shutil.copytree(tmp_path / "bench" / "eval", data)
    _edit_first_prompt(data)
    out = tmp_path / "metrics.json"
    model = str(tiny_model_dir)
    args = ["eval", "--model", model, "--reference", model, "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, *EDITED_ARGS])
    assert result.exit_code == 0, result.output
    assert NO_TPA in " ".join(result.output.split())
    metrics = json.loads(out.read_text())
    assert metrics["tpa"] is None and metrics["tpa_judge"] is None and metrics["tpa_note"] == NO_TPA
    assert metrics["preference"]["pairs"]["inversion"] > 0  # the rest of the evaluation is unchanged
    generations = read_lines(Path(metrics["generations"]))
    assert len(generations) == 6 and all(g["compliant"] is None for g in generations)

    # A real judge (here a tiny random model: the verdicts are noise, the plumbing is what is tested).
    policy = tmp_path / "policy.md"
    policy.write_text("Answer briefly.")
    template = tmp_path / "template.md"
    template.write_text("Policy: {policy}\nUser: {prompt}\nAnswer: {response}\nJSON verdict:")
    verdicts = tmp_path / "tpa_verdicts.jsonl"
    judge = [
        "judge", "run", "--model", model, "--generations", metrics["generations"], "--policy", str(policy),
        "--template", str(template), "--out", str(verdicts), "--max-new-tokens", "8",
    ]  # fmt: skip
    result = CliRunner().invoke(main, judge)
    assert result.exit_code == 0, result.output
    tpa_out = tmp_path / "tpa.json"
    result = CliRunner().invoke(
        main,
        ["tpa", "--generations", metrics["generations"], "--verdicts", str(verdicts), "--out", str(tpa_out)],
    )
    assert result.exit_code == 0, result.output
    tpa = json.loads(tpa_out.read_text())
    known = [v for v in read_lines(verdicts) if v["chosen_violates"] is not None]
    assert tpa["generations"] == 6 and tpa["unjudged"] == 6 - len(known)
    assert tpa["tpa"]["all"]["prompts"] == len(known)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_drops_and_reports_prompts_seen_in_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    from trace_ds.io import write_jsonl

    build_benchmark(tmp_path / "bench", n_pairs=30, seed=2, n_eval_prompts=12, n_eval_pairs=24)
    eval_dir = tmp_path / "bench" / "eval"
    prompts = [json.loads(line) for line in (eval_dir / "prompts.jsonl").read_text().splitlines()]
    eval_pairs = [json.loads(line) for line in (eval_dir / "pairs.jsonl").read_text().splitlines()]
    leaked = (
        tmp_path / "training.jsonl"
    )  # a training set that (wrongly) contains 3 eval prompts and 2 eval pairs
    write_jsonl(
        leaked,
        [
            {"id": f"t{i}", "prompt": p["prompt"].upper(), "chosen": "a", "rejected": "b"}
            for i, p in enumerate(prompts[:3])
        ]
        + [{**p, "id": f"u{i}"} for i, p in enumerate(eval_pairs[:2])],
    )
    out = tmp_path / "metrics.json"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--reference",
        str(tiny_model_dir),
        "--data",
        str(eval_dir),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--max-length",
        "160",
        "--max-prompt-length",
        "64",
        "--exclude",
        str(leaked),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    overlap = metrics["overlap"]
    assert overlap["eval_prompts_seen_in_them"] == 3 and overlap["eval_pairs_sharing_a_prompt_with_them"] >= 2
    assert metrics["tpa"]["all"]["prompts"] == len({p["prompt"] for p in prompts}) - 3


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_eval_under_zero3_equals_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    import os
    import subprocess

    from .helpers import deepspeed_command

    build_benchmark(tmp_path / "bench", n_pairs=30, seed=4, n_eval_prompts=11, n_eval_pairs=21)
    args = [
        "--model",
        str(tiny_model_dir),
        "--reference",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "bench" / "eval"),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "4",
        "--max-length",
        "160",
        "--max-prompt-length",
        "64",
    ]
    one = tmp_path / "one.json"
    result = CliRunner().invoke(main, ["eval", *args, "--out", str(one)])
    assert result.exit_code == 0, result.output
    two = tmp_path / "two.json"
    command = deepspeed_command(
        2,
        "eval",
        *args,
        "--out",
        str(two),
        "--deepspeed",
        str(Path(__file__).resolve().parents[1] / "ds_configs" / "cpu.json"),
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRACE_DS_DIST_TIMEOUT_S": "90"}
    run = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=540, start_new_session=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["world_size"] == 2
    for key, value in a["preference"].items():
        assert b["preference"][key] == (
            value if isinstance(value, dict) else pytest.approx(value, rel=1e-4, abs=1e-6)
        ), key
    for part in (a["perplexity"], a["perplexity"]["stable"], a["perplexity"]["shifted"]):
        assert part["texts"] > 0
    assert b["perplexity"]["model"] == pytest.approx(a["perplexity"]["model"], rel=1e-5)
    for group in ("stable", "shifted"):
        assert b["perplexity"][group] == pytest.approx(a["perplexity"][group], rel=1e-5)
    assert b["tpa"] == a["tpa"]
    gen_a = [json.loads(line)["response"] for line in Path(a["generations"]).read_text().splitlines()]
    gen_b = [json.loads(line)["response"] for line in Path(b["generations"]).read_text().splitlines()]
    assert gen_a == gen_b  # greedy decoding, same prompts in the same order


def test_perplexity_on_stable_and_shifted_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    """general_stable.txt / general_shifted.txt get their own perplexity; when they partition general.txt the
    overall figure pools their totals and equals a pass over general.txt."""
    from trace_ds.evaluate.metrics import perplexity
    from trace_ds.evaluate.run import perplexity_metrics
    from trace_ds.models.loading import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir), True)
    stable = ["User: How do I bake bread?\nAssistant: Knead the dough.", "User: A poem?\nAssistant: Roses."]
    shifted = ["User: Which stock should I buy?\nAssistant: Ask an adviser, please."]
    (tmp_path / "general.txt").write_text("".join(f"{d}\n\n" for d in [stable[0], *shifted, stable[1]]))
    (tmp_path / "general_stable.txt").write_text("".join(f"{d}\n\n" for d in stable))
    (tmp_path / "general_shifted.txt").write_text("".join(f"{d}\n\n" for d in shifted))

    def ppl(texts: list[str]) -> float:
        return perplexity(model, tokenizer, texts, 2)

    got = perplexity_metrics(model, model, tokenizer, tmp_path, 2, None, 8192)
    assert got is not None and set(got) == {"model", "reference", "texts", "stable", "shifted"}
    assert got["texts"] == 3 and got["model"] == got["reference"]
    assert got["model"] == pytest.approx(ppl([stable[0], *shifted, stable[1]]), rel=1e-6)
    assert got["stable"] == {
        "model": pytest.approx(ppl(stable), rel=1e-9),
        "reference": got["stable"]["model"],
        "texts": 2,
    }
    assert got["shifted"]["model"] == pytest.approx(ppl(shifted), rel=1e-9) and got["shifted"]["texts"] == 1
    # one group file alone (no partition): the overall figure is its own pass, the other group is absent
    (tmp_path / "general_shifted.txt").unlink()
    alone = perplexity_metrics(model, model, tokenizer, tmp_path, 2, None, 8192)
    assert alone is not None and "shifted" not in alone and alone["stable"] == got["stable"]
    assert alone["model"] == pytest.approx(got["model"], rel=1e-6)
    (tmp_path / "general_stable.txt").write_text("\n\n")  # a group file without text counts as absent
    assert set(perplexity_metrics(model, model, tokenizer, tmp_path, 2, None, 8192) or {}) == {
        "model",
        "reference",
        "texts",
    }
    (tmp_path / "general.txt").unlink()  # no general text: no perplexity at all
    assert perplexity_metrics(model, model, tokenizer, tmp_path, 2, None, 8192) is None


# --- the report ---------------------------------------------------------------------------------------


def _evaluation(
    tpa: float | None, ppl: float, stable: float | None = None, shifted: float | None = None
) -> dict:
    def group(value: float, prompts: int) -> dict:
        return {"tpa": value, "ci95": wilson_interval(round(value * prompts), prompts), "prompts": prompts}

    from trace_ds.runtime.fingerprint import environment_fingerprint

    return {
        "preference": {
            "pairs": {"inversion": 10, "suppression": 6, "retention": 8},
            "inversion_accuracy": 0.8,
            "inversion_margin": 1.5,
            "suppression_logp_change": -3.0,
            "retention_kl": 0.01,
            "retention_agreement": 0.5,
        },
        "tpa": None
        if tpa is None
        else {"all": group(tpa, 20), "shifted": group(tpa, 10), "stable": group(tpa, 10)},
        "tpa_judge": None if tpa is None else "synth-rule",
        "tpa_note": NO_TPA if tpa is None else None,
        "perplexity": {
            "model": ppl,
            "reference": 10.0,
            "texts": 5,
            **({} if stable is None else {"stable": {"model": stable, "reference": 9.0, "texts": 3}}),
            **({} if shifted is None else {"shifted": {"model": shifted, "reference": 11.0, "texts": 2}}),
        },
        "environment": environment_fingerprint(),
    }


@pytest.fixture()
def report_inputs(tmp_path: Path) -> dict:
    scores = tmp_path / "scores.jsonl"
    write_jsonl(
        scores,
        [
            {"id": "a", "category": "inversion", "raw_score": 2.0, "weight": 1.0},
            {"id": "b", "category": "inversion", "raw_score": -1.0, "weight": 0.0},
            {"id": "c", "category": "inversion", "raw_score": 0.0, "weight": 0.0},
            {"id": "d", "category": "inversion", "raw_score": 2.0, "weight": 1.0},
            {"id": "e", "category": "suppression", "raw_score": -3.0, "weight": 0.0},
            {"id": "f", "category": "suppression", "raw_score": 5.0, "weight": 2.0},
            {"id": "g", "category": "suppression", "raw_score": None, "weight": 1.0},  # --probe-holdout
        ],
    )
    metrics = tmp_path / "metrics.jsonl"
    write_jsonl(
        metrics,
        [
            {"step": i, "loss": 1.0 / (i + 1), "loss_inversion": 2.0 / (i + 1), "kl_retention": 0.01}
            for i in range(1, 41)
        ],
    )
    return {"scores": str(scores), "training": {"trace": str(metrics)}}


def test_report_directions_config_environment_smoothing_and_zero_weights(
    report_inputs: dict, tmp_path: Path
) -> None:
    from trace_ds import __version__
    from trace_ds.evaluate.report import METRICS, write_report

    config = {"seed": 3, "train": {"lr": 0.001, "beta": 0.1}, "methods": ["trace"]}
    # overall perplexity +50%, but the utility target is judged on stable-topic text: +5%
    evaluations = {"old": _evaluation(0.5, 10.0, 9.0, 11.0), "trace": _evaluation(0.75, 15.0, 9.45, 22.0)}
    out = tmp_path / "report"
    check = write_report(out, evaluations, report_inputs["scores"], report_inputs["training"], config)
    data = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    assert check["tpa_target_met"] is True and check["perplexity_target_met"] is True
    assert check["perplexity_text"] == "stable" and check["perplexity_change"] == pytest.approx(0.05)
    assert (check["perplexity_old"], check["perplexity_trace"]) == (9.0, 9.45)
    assert check["perplexity_shifted_change"] == pytest.approx(1.0)
    assert "Utility perplexity on held-out stable-topic text: old 9.00, TRACE 9.45 (+5.0%" in text
    assert "shifted-topic text: +100.0%, not a target" in text
    rows = {
        line.split(" | ")[0].removeprefix("| "): line for line in text.splitlines() if line.startswith("| ")
    }
    assert rows["perplexity on held-out general text"].endswith("| 10.00 | 15.00 |")
    assert rows["perplexity on held-out stable-topic text (utility target)"].endswith("| 9.00 | 9.45 |")
    assert rows["perplexity on held-out shifted-topic text"].endswith("| 11.00 | 22.00 |")
    assert data["results"]["trace"]["perplexity_stable"] == 9.45
    assert data["check"] == {k: v for k, v in check.items() if k != "report"}
    # every metric says which way is better, in both files
    assert {m["key"]: m["better"] for m in data["metrics"]} == {m.key: m.better for m in METRICS}
    assert {"tpa_all": "higher", "perplexity": "lower", "retention_kl": "lower"}.items() <= {
        m["key"]: m["better"] for m in data["metrics"]
    }.items()
    for metric in METRICS:
        if metric.optional and all(data["results"][n][metric.key] is None for n in data["results"]):
            continue  # an optional row no evaluation has a value for is left out (degenerate share: old files)
        row = next(line for line in text.splitlines() if line.startswith(f"| {metric.label} |"))
        assert ("↑ higher" if metric.better == "higher" else "↓ lower") in row
    row = next(line for line in text.splitlines() if line.startswith("| retention KL"))
    assert row.endswith("| 0.0100 | 0.0100 |")
    assert data["results"]["trace"]["tpa_all"]["tpa"] == 0.75 and "0.750 [" in text
    # config, versions, environment
    assert data["config"] == config and "lr: 0.001" in text
    assert data["trace_ds_version"] == __version__ and data["packages"]["trace-ds"] == __version__
    assert data["packages"]["torch"] and f"torch {data['packages']['torch']}" in text
    environment = data["environment"]
    assert set(environment) >= {"cpu", "torch", "env", "platform", "python", "packages", "gpu"}
    assert data["environment_id"] in text
    assert data["evaluations"]["trace"]["environment_id"] == data["environment_id"]
    # zero-weight pairs per category, with the reason and what to change
    zero = data["zero_weight"]["categories"]
    assert zero["inversion"] == {
        "pairs": 4,
        "zero_weight": 2,
        "raw_score_at_most_0": 2,
        "not_scored": 0,
        "zero_weight_share": 0.5,
    }
    assert zero["suppression"]["zero_weight"] == 1 and zero["suppression"]["not_scored"] == 1
    assert "| inversion | 4 | 2 | 50.0% | 2 |" in text and "--probe-size" in text and "no_impact" in text
    # smoothed loss curves with the window stated
    assert data["loss_smoothing"] == {"trace": {"kind": "trailing moving average", "window_steps": 4}}
    assert "window in steps: trace: 4" in text
    assert {"tpa.png", "preference_accuracy.png", "score_distribution.png", "losses_trace.png"} == set(
        data["plots"]
    )
    assert all((out / name).exists() for name in data["plots"])


def test_report_without_a_tpa_judge(report_inputs: dict, tmp_path: Path) -> None:
    from trace_ds.evaluate.report import write_report

    evaluations = {"old": _evaluation(None, 10.0), "trace": _evaluation(None, 12.0)}
    out = tmp_path / "report"
    check = write_report(out, evaluations, report_inputs["scores"], report_inputs["training"])
    assert check["tpa_checked"] is False and check["tpa_target_met"] is None and check["tpa_gain"] is None
    assert check["tpa_note"] == "TPA targets not checked: TPA not computed (no judge for this policy)"
    assert check["perplexity_target_met"] is False  # +20%: the targets that can be checked still are
    assert check["perplexity_text"] == "all" and check["perplexity_shifted_change"] is None
    text = (out / "report.md").read_text()
    # no stable/shifted split in these evaluations: no rows for it, the target on all general text
    assert "stable-topic text" not in text and "shifted-topic text" not in text
    assert "Utility perplexity on held-out general text: old 10.00, TRACE 12.00 (+20.0%" in text
    tpa_row = next(line for line in text.splitlines() if line.startswith("| TPA, all"))
    assert tpa_row.count("not computed (no judge for this policy)") == 2
    assert "TPA targets not checked" in text and "Not recorded" in text  # no config given
    data = json.loads((out / "report.json").read_text())
    assert data["results"]["trace"]["tpa_all"] is None and data["config"] is None
    assert "tpa.png" not in data["plots"] and not (out / "tpa.png").exists()


def test_moving_average_and_window() -> None:
    from trace_ds.evaluate.report import moving_average, smoothing_window

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]
    assert smoothing_window(5) == 1 and smoothing_window(400) == 40 and smoothing_window(10**6) == 50


# --- the environment fingerprint ------------------------------------------------------------------------


def test_fingerprint_records_cpu_threads_env_and_versions(tmp_path: Path, monkeypatch) -> None:
    from importlib import metadata

    import torch

    from trace_ds.runtime import fingerprint

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f amx_tile\n"
    )
    assert fingerprint._cpu_info(str(info)) == (
        "Test CPU 9000",
        {"fpu", "sse2", "avx2", "avx512f", "amx_tile"},
    )
    record = fingerprint.environment_fingerprint()
    assert record["env"]["OMP_NUM_THREADS"] == "3" and record["env"]["MKL_CBWR"] is None
    assert record["torch"] == {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
    }
    assert record["packages"]["torch"] == metadata.version("torch")
    assert set(record["packages"]) == {*fingerprint.PACKAGES, "trace-ds"}
    assert record["python"]["version"] and record["cpu"]["cpu_count"] >= 1
    assert record["gpu"] is None or record["gpu"]["devices"]
    json.dumps(record)  # plain JSON


def test_fingerprint_never_crashes_on_a_bare_machine(monkeypatch) -> None:
    from importlib import metadata

    from trace_ds.runtime import fingerprint

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    real_cpu_info = fingerprint._cpu_info
    monkeypatch.setattr(fingerprint, "_cpu_info", lambda: real_cpu_info("/nonexistent/cpuinfo"))
    monkeypatch.setattr(fingerprint, "_torch", lambda: None)  # torch not installed
    monkeypatch.setattr(metadata, "version", missing)  # no distribution metadata at all
    record = fingerprint.environment_fingerprint()
    assert record["cpu"]["model"] is None and record["cpu"]["flags"] is None
    assert record["cpu"]["flags_sha256"] is None
    assert record["torch"] == {"cpu_capability": None, "num_threads": None} and record["gpu"] is None
    for name, version in record["packages"].items():  # null, or a loaded module's own __version__
        module = sys.modules.get(name.replace("-", "_"))
        assert version == (str(module.__version__) if hasattr(module, "__version__") else None), name
    assert record["packages"]["trace-ds"]
    assert fingerprint.fingerprint_id(record) == fingerprint.fingerprint_id(json.loads(json.dumps(record)))


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        (None, "max(0, s) normalised"),  # a file from before the meta: the paper's map
        ({"weighting": "paper", "score_metric": "dot"}, "max(0, s) normalised"),
        ({"weighting": "prune:0.25", "score_metric": "cosine"}, "cosine score is among the lowest 25%"),
        (
            {"weighting": "uniform", "score_metric": "cosine"},
            "No pair gets weight 0 under `--weighting uniform`",
        ),
    ],
)
def test_the_zero_weight_section_explains_the_file_s_own_weight_map(
    tmp_path: Path, meta: dict | None, says: str
) -> None:
    from trace_ds.evaluate.report import zero_weight_summary

    scores = tmp_path / "scores.jsonl"
    write_jsonl(scores, [{"id": "a", "category": "inversion", "raw_score": -1.0, "weight": 0.0}])
    if meta is not None:
        (tmp_path / "scores.meta.json").write_text(json.dumps(meta))
    summary = zero_weight_summary(scores)
    assert says in summary["advice"][0] and "--probe-size" in " ".join(summary["advice"])
    assert summary["categories"]["inversion"]["raw_score_at_most_0"] == 1
