"""Evaluation: intervals, TPA bookkeeping, and `trace-ds eval` on a tiny model (the model as its own reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.evaluate.metrics import cut_turn, target_policy_agreement, wilson_interval
from trace_ds.synth.generator import build_benchmark


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
    assert (
        metrics["tpa"]["all"]["prompts"]
        == metrics["tpa"]["shifted"]["prompts"] + metrics["tpa"]["stable"]["prompts"]
        > 0
    )
    generations = [json.loads(line) for line in Path(metrics["generations"]).read_text().splitlines()]
    assert len(generations) == metrics["tpa"]["all"]["prompts"]
    assert sum(g["compliant"] for g in generations) == round(metrics["tpa"]["all"]["tpa"] * len(generations))


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
    assert b["perplexity"]["model"] == pytest.approx(a["perplexity"]["model"], rel=1e-5)
    assert b["tpa"] == a["tpa"]
    gen_a = [json.loads(line)["response"] for line in Path(a["generations"]).read_text().splitlines()]
    gen_b = [json.loads(line)["response"] for line in Path(b["generations"]).read_text().splitlines()]
    assert gen_a == gen_b  # greedy decoding, same prompts in the same order
