"""The trainer end to end on the synthetic benchmark and a tiny model (each run in its own process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trace_ds.io import write_jsonl
from trace_ds.judge.triage import run_triage
from trace_ds.synth.generator import build_benchmark

from .helpers import kill_when_lines, read_lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_data")
    build_benchmark(root / "bench", n_pairs=64, seed=7, n_eval_prompts=8, n_eval_pairs=48)
    run_triage(
        str(root / "bench" / "pairs.jsonl"),
        str(root / "bench" / "verdicts.jsonl"),
        str(root / "triaged.jsonl"),
    )
    run_triage(
        str(root / "bench" / "eval" / "pairs.jsonl"),
        str(root / "bench" / "eval" / "verdicts.jsonl"),
        str(root / "eval.jsonl"),
    )
    # Uniform weights (the "w/o impact weighting" input): the trainer is under test here, not the scores.
    conflict = [r for r in read_lines(root / "triaged.jsonl") if r["category"] != "retention"]
    write_jsonl(
        root / "scores.jsonl",
        [{"id": r["id"], "category": r["category"], "raw_score": 1.0, "weight": 1.0} for r in conflict],
    )
    return {"triaged": root / "triaged.jsonl", "eval": root / "eval.jsonl", "scores": root / "scores.jsonl"}


def train_command(model: Path, data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "trace_ds.cli", "train", "--model", str(model), "--triaged", str(data["triaged"]),
        "--scores", str(data["scores"]), "--out", str(out), "--micro-batch", "4", "--max-length", "160",
        "--max-prompt-length", "64", "--beta", "0.1", "--lr", "3e-4", *extra,
    ]  # fmt: skip


def run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=500
    )


COMPARED = (
    "step",
    "epoch",
    "loss",
    "loss_inversion",
    "margin_inversion",
    "loss_suppression",
    "reward_suppression",
    "kl_retention",
    "lr",
    "grad_norm",
)


def test_training_realigns_held_out_pairs_and_exports(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = run(
        train_command(
            tiny_model_dir,
            data,
            out,
            "--epochs",
            "2",
            "--eval-pairs",
            str(data["eval"]),
            "--eval-every",
            "8",
            "--keep-last",
            "1",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 33))  # 64 pairs / 4 per step, 2 epochs
    last = [m for m in metrics if "eval_loss" in m][-1]
    # At the start policy = reference, so every margin and reward is 0; training must move held-out pairs.
    assert last["eval_inversion_accuracy"] >= 0.7 and last["eval_inversion_margin"] > 0.5
    assert last["eval_reward_suppression"] < -0.5  # suppressed responses lost log-probability
    assert all(m["grad_norm"] is not None and m["lr"] > 0 for m in metrics)

    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert (out / "checkpoints" / best["tag"]).is_dir()  # kept despite --keep-last 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    check = torch.load(out / "final" / "export_check.pt")
    with torch.no_grad():
        logits = exported(input_ids=check["input_ids"]).logits
    assert (logits - check["logits"]).abs().max() <= 1e-4 * check["logits"].abs().max()
    assert AutoTokenizer.from_pretrained(out / "final").eos_token_id is not None
    assert json.loads((out / "final" / "export.json").read_text())["parameters"] == sum(
        p.numel() for p in exported.parameters()
    )


def test_alpha_kl_keeps_retention_close_to_the_reference(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    kls = {}
    for alpha in ("0", "1000"):
        out = tmp_path / f"alpha{alpha}"
        result = run(
            train_command(
                tiny_model_dir,
                data,
                out,
                "--max-steps",
                "12",
                "--alpha-kl",
                alpha,
                "--eval-pairs",
                str(data["eval"]),
                "--eval-every",
                "12",
                "--export-dtype",
                "bfloat16",
            )
        )
        assert result.returncode == 0, result.stderr[-3000:]
        kls[alpha] = read_lines(out / "metrics.jsonl")[-1]["eval_kl_retention"]
        export = json.loads(
            (out / "final" / "export.json").read_text()
        )  # the bf16 export reproduces the logits
        assert export["dtype"] == "bfloat16" and export["logit_relative_error"] <= export["tolerance"]
    # IPO losses start near 1/(4 beta^2) = 25, so the KL head needs a large alpha to show at this scale
    assert kls["1000"] < 0.6 * kls["0"], kls


def test_killed_run_resumes_bitwise_across_an_epoch_boundary(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    extra = ("--max-steps", "12", "--micro-batch", "8", "--save-every", "3")  # 8 steps per epoch
    reference = tmp_path / "reference"
    assert run(train_command(tiny_model_dir, data, reference, *extra)).returncode == 0

    out = tmp_path / "killed"
    kill_when_lines(train_command(tiny_model_dir, data, out, *extra), out / "metrics.jsonl", 7)
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest in ("step_00000006", "step_00000009"), latest  # killed after a checkpoint, before the end
    result = run(train_command(tiny_model_dir, data, out, *extra, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    got = [{k: m[k] for k in COMPARED} for m in read_lines(out / "metrics.jsonl")]
    want = [{k: m[k] for k in COMPARED} for m in read_lines(reference / "metrics.jsonl")]
    assert got == want  # bitwise: the same floats, step for step, across the epoch boundary at step 8
    assert {m["epoch"] for m in want} == {0, 1}


def test_an_epoch_trains_each_pair_once_with_a_short_last_step(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """64 pairs, 6 per step (micro-batch 3 x accumulation 2): each epoch is 10 full steps and a step of 4
    pairs, never filled from the next epoch; the step loss divides by the pairs the step really has."""
    out = tmp_path / "run"
    extra = ("--epochs", "2", "--micro-batch", "3", "--grad-accum", "2")
    result = run(train_command(tiny_model_dir, data, out, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 23))
    assert [m["epoch"] for m in metrics] == [0] * 11 + [1] * 11
    assert [m["pairs"] for m in metrics] == ([6] * 10 + [4]) * 2
    for epoch in (0, 1):
        assert sum(m["pairs"] for m in metrics if m["epoch"] == epoch) == 64  # each pair exactly once

    def total(m: dict, loss: str, count: str) -> float:
        return (m[loss] or 0.0) * m[count]

    for m in metrics:  # uniform weights, alpha_kl 1: the loss is the plain mean over the step's pairs
        summed = (
            total(m, "loss_inversion", "pairs_inversion")
            + total(m, "loss_suppression", "pairs_suppression")
            + total(m, "kl_retention", "pairs_retention")
        )
        assert m["loss"] == pytest.approx(summed / m["pairs"], rel=1e-5), m["step"]


def test_sigterm_writes_a_checkpoint_and_resume_finishes(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    command = train_command(tiny_model_dir, data, out, "--max-steps", "40")
    process = subprocess.Popen(
        command,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert "SIGTERM: checkpoint written" in stderr
    steps = len(read_lines(metrics))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{steps:08d}"
    result = run([*command, "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in read_lines(metrics)] == list(range(1, 41))


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = run(
        train_command(tiny_model_dir, data, out, "--max-steps", "6", "--save-every", "1"),
        env={"TRACE_DS_FAULT_NAN_AT_STEP": "3"},
    )
    assert result.returncode == 2
    assert "the loss became nan at step 3" in result.stderr.replace("\n", " ")
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (out / "checkpoints" / "step_00000002").is_dir() and not (out / "final").exists()


def test_bad_record_mid_stream_names_file_and_line(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "triaged.jsonl"
    lines = data["triaged"].read_text().splitlines()
    broken.write_text("\n".join([*lines[:40], "{not json", *lines[40:]]) + "\n")
    out = tmp_path / "run"
    command = train_command(
        tiny_model_dir,
        {**data, "triaged": broken},
        out,
        "--max-steps",
        "30",
        "--save-every",
        "2",
        "--buffer-size",
        "4",
    )
    result = run(command)
    assert result.returncode == 2
    assert f"{broken}:41" in result.stderr.replace("\n", "")
    assert (out / "checkpoints" / "latest").exists()  # the checkpoints written before it stay


def test_options_are_checked_before_anything_loads(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cases = [
        (("--epochs", "1", "--max-steps", "3"), "not both"),
        (("--resume",), "no checkpoint"),
        (("--eval-every", "3"), "go together"),
        (("--deepspeed", "ds_configs/zero3.json"), "enables bf16 but --dtype is float32"),
        (("--merge-lora",), "needs --lora"),
        (("--offload-reference",), "needs a ZeRO-3 --deepspeed config"),
        (("--offload-reference", "--lora"), "with --lora the reference is the base model"),
    ]
    for extra, message in cases:
        result = run(train_command(tiny_model_dir, data, out, *extra))
        assert result.returncode == 2 and message in result.stderr.replace("\n", " "), (
            extra,
            result.stderr[-2000:],
        )


def test_lora_trains_from_the_scoring_adapter_and_exports_it(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    scores = tmp_path / "lora_scores.jsonl"
    score = [
        sys.executable,
        "-m",
        "trace_ds.cli",
        "score",
        "--model",
        str(tiny_model_dir),
        "--triaged",
        str(data["triaged"]),
        "--out",
        str(scores),
        "--probe-size",
        "9",
        "--max-length",
        "160",
        "--max-prompt-length",
        "64",
        "--allow-empty",
        "--lora",
        "--lora-r",
        "4",
        "--lora-targets",
        "q_proj,v_proj,down_proj",
    ]
    result = run(score)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    result = run(
        train_command(
            tiny_model_dir,
            {**data, "scores": scores},
            out,
            "--max-steps",
            "4",
            "--lora",
            "--merge-lora",
            "--lr",
            "1e-2",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    export = json.loads((out / "final" / "export.json").read_text())
    assert export["kind"] == "lora-adapter" and export["logit_relative_error"] <= export["tolerance"]
    assert export["merged"]["logit_relative_error"] <= export["merged"]["tolerance"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = PeftModel.from_pretrained(base, out / "final" / "adapter")
    initial = json.loads((out.parent / "lora_scores.initial_adapter" / "adapter_config.json").read_text())
    assert initial["r"] == 4
    check = torch.load(out / "final" / "export_check.pt")
    with torch.no_grad():
        logits = trained(input_ids=check["input_ids"]).logits
    assert (logits - check["logits"]).abs().max() <= 1e-4 * check["logits"].abs().max()
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    with torch.no_grad():
        assert (merged(input_ids=check["input_ids"]).logits - check["logits"]).abs().max() <= 1e-4 * check[
            "logits"
        ].abs().max()

    result = run(train_command(tiny_model_dir, data, tmp_path / "no_adapter", "--max-steps", "2", "--lora"))
    assert result.returncode == 2 and "was not scored with LoRA" in result.stderr.replace("\n", " ")


def test_split_counts_is_exact() -> None:
    from trace_ds.training.train import split_counts

    for count in range(0, 13):
        for shares in (
            {"inversion": 0.4, "suppression": 0.2, "retention": 0.4},
            {"inversion": 1 / 3, "suppression": 1 / 3, "retention": 1 / 3},
            {"inversion": 0.5, "suppression": 0.5, "retention": 0.0},
        ):
            counts = split_counts(count, shares)
            assert sum(counts.values()) == count and min(counts.values()) >= 0
            assert all(abs(counts[k] - count * v) < 1 for k, v in shares.items())


def test_per_category_batching_draws_set_proportions_and_resumes(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    extra = (
        "--max-steps",
        "6",
        "--micro-batch",
        "5",
        "--save-every",
        "3",
        "--category-proportions",
        "inversion=0.4,suppression=0.2,retention=0.4",
    )
    out = tmp_path / "run"
    result = run(train_command(tiny_model_dir, data, out, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_lines(out / "metrics.jsonl")
    assert [(m["pairs_inversion"], m["pairs_suppression"], m["pairs_retention"]) for m in metrics] == [
        (2, 1, 2)
    ] * 6

    resumed = tmp_path / "resumed"  # the same run, resumed from its step-3 checkpoint
    shutil.copytree(out, resumed)
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    shutil.rmtree(resumed / "final")
    result = run(train_command(tiny_model_dir, data, resumed, *extra, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [{k: m[k] for k in COMPARED} for m in read_lines(resumed / "metrics.jsonl")] == [
        {k: m[k] for k in COMPARED} for m in metrics
    ]


def test_precomputed_reference_logps_give_the_same_training(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    losses = {}
    for name, extra in (("live", ()), ("precomputed", ("--precompute-ref-logps",))):
        out = tmp_path / name
        result = run(train_command(tiny_model_dir, data, out, "--max-steps", "5", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [m["loss"] for m in read_lines(out / "metrics.jsonl")]
    assert (tmp_path / "precomputed" / "reference_logps.jsonl").exists()
    assert losses["precomputed"] == pytest.approx(losses["live"], rel=1e-4, abs=1e-6)


def test_training_refuses_scores_of_another_logp_reduction(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """The impact weights are for the loss they were computed with: scores made with --logp-reduction mean
    do not train with the default sum (nor the other way round), and the message names both."""
    scores = tmp_path / "scores.jsonl"
    scores.write_text(data["scores"].read_text())
    (tmp_path / "scores.meta.json").write_text(json.dumps({"logp_reduction": "mean", "lora": None}))
    result = run(
        train_command(tiny_model_dir, {**data, "scores": scores}, tmp_path / "out", "--max-steps", "1")
    )
    message = " ".join(result.stderr.split())
    assert result.returncode == 2 and "--logp-reduction mean" in message and "--logp-reduction sum" in message
    result = run(
        train_command(
            tiny_model_dir,
            {**data, "scores": scores},
            tmp_path / "out2",
            "--max-steps",
            "1",
            "--logp-reduction",
            "mean",
        )
    )
    assert result.returncode == 0, result.stderr[-2000:]
