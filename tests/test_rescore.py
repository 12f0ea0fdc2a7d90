"""In-run re-scoring (``train --rescore-every K``): at step 0 it equals the offline scores, under 2-rank
ZeRO-3 inside the training launch; a killed re-scoring run resumes with exactly the weights it had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trace_ds.config import PAPER_WEIGHTING, LoraConfig, ScoreConfig
from trace_ds.data.tokenize import TokenizeConfig
from trace_ds.scoring.scorer import run_score

from .helpers import assert_same_raw_scores, deepspeed_command, kill_when_lines, read_lines, triaged_benchmark

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
TOKENIZE = {"max_length": 160, "max_prompt_length": 64}


@pytest.fixture(scope="module")
def scored(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rescore")
    triaged = triaged_benchmark(root, n_pairs=48, seed=11, n_eval_prompts=4, n_eval_pairs=4)
    scores = root / "scores.jsonl"
    run_score(
        ScoreConfig(
            model=str(tiny_model_dir),
            triaged=str(triaged),
            out=str(scores),
            probe_size=12,
            micro_batch=8,
            tokenize=TokenizeConfig(**TOKENIZE),
            **PAPER_WEIGHTING,  # in-run re-scoring supports the paper's weighting only
        )
    )
    return {"triaged": triaged, "scores": scores}


def test_rescoring_at_step_0_under_zero3_equals_the_offline_scores(
    tiny_model_dir: Path, scored: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = tmp_path / "config.json"
    fields = {
        "model": str(tiny_model_dir),
        "triaged": str(scored["triaged"]),
        "scores": str(scored["scores"]),
        "out": str(out),
        "deepspeed": str(REPO / "ds_configs" / "cpu.json"),
        "micro_batch": 3,  # 2 ranks x 3 pairs: uneven last steps, dummy steps on one rank
        "rescore_every": 4,
        "max_steps": 4,
        "tokenize": TOKENIZE,
    }
    config.write_text(json.dumps(fields))
    command = deepspeed_command(2, "-", str(config))
    command[command.index("-") - 1 : command.index("-") + 1] = [str(REPO / "tests" / "rescore_worker.py")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRACE_DS_DIST_TIMEOUT_S": "120"}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=540, start_new_session=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    offline = read_lines(scored["scores"])
    rescored = read_lines(out / "rescores" / "step_00000000.jsonl")
    assert len(rescored) == len(offline) and any(
        r["weight"] == 0.0 for r in offline
    )  # zeroed pairs rescored too
    assert_same_raw_scores(offline, rescored, rel=1e-6)  # the same pairs, within 1e-6 of the largest score
    for a, b in zip(offline, rescored, strict=True):
        assert a["category"] == b["category"]
        assert b["weight"] == pytest.approx(a["weight"], abs=1e-5)


def test_rescoring_lora_adapters_at_step_0_equals_their_offline_scores(
    tiny_model_dir: Path, scored: dict[str, Path], tmp_path: Path
) -> None:
    """Under --lora the scores are over the adapters' weights (scored from the initial adapter that offline
    scoring saved); in-run re-scoring must score the same adapters of the training module."""
    scores = tmp_path / "lora_scores.jsonl"
    run_score(
        ScoreConfig(
            model=str(tiny_model_dir),
            triaged=str(scored["triaged"]),
            out=str(scores),
            probe_size=12,
            micro_batch=8,
            tokenize=TokenizeConfig(**TOKENIZE),
            **PAPER_WEIGHTING,  # in-run re-scoring supports the paper's weighting only
            lora=LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj")),
        )
    )
    out = tmp_path / "run"
    config = tmp_path / "config.json"
    fields = {
        "model": str(tiny_model_dir),
        "triaged": str(scored["triaged"]),
        "scores": str(scores),
        "out": str(out),
        "lora": True,
        "micro_batch": 3,
        "rescore_every": 4,
        "max_steps": 4,
        "tokenize": TOKENIZE,
    }
    config.write_text(json.dumps(fields))
    command = [sys.executable, str(REPO / "tests" / "rescore_worker.py"), str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    offline = read_lines(scores)
    rescored = read_lines(out / "rescores" / "step_00000000.jsonl")
    assert len(rescored) == len(offline)
    assert_same_raw_scores(offline, rescored, rel=1e-6)
    full = {r["id"]: r["raw_score"] for r in read_lines(scored["scores"])}
    assert any(abs(r["raw_score"] - full[r["id"]]) > 1e-3 * abs(full[r["id"]]) for r in offline)  # adapters


def train_command(model: Path, scored: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "trace_ds.cli", "train", "--model", str(model), "--triaged", str(scored["triaged"]),
        "--scores", str(scored["scores"]), "--out", str(out), "--micro-batch", "4", "--max-length", "160",
        "--max-prompt-length", "64", "--lr", "1e-3", "--rescore-every", "2", "--max-steps", "6", *extra,
    ]  # fmt: skip


def test_a_killed_rescoring_run_resumes_with_the_same_weights(
    tiny_model_dir: Path, scored: dict[str, Path], tmp_path: Path
) -> None:
    env = {**os.environ}
    reference = tmp_path / "reference"
    result = subprocess.run(
        train_command(tiny_model_dir, scored, reference), env=env, capture_output=True, text=True, timeout=500
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_lines(reference / "metrics.jsonl")
    rescored_at = [m.get("rescored_at") for m in metrics]
    assert rescored_at == [None, None, 2, None, 4, None]  # each logged with the step after it
    assert all(m["rescore_s"] > 0 for m in metrics if "rescored_at" in m)
    offline = {r["id"]: r["weight"] for r in read_lines(scored["scores"])}
    at_4 = {r["id"]: r["weight"] for r in read_lines(reference / "rescores" / "step_00000004.jsonl")}
    assert at_4.keys() == offline.keys() and at_4 != offline  # every pair re-scored, and the weights moved
    assert all(0.0 <= m["rescore_zero_inversion"] <= 1.0 for m in metrics if "rescored_at" in m)

    out = tmp_path / "killed"
    kill_when_lines(train_command(tiny_model_dir, scored, out, "--save-every", "3"), out / "metrics.jsonl", 4)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    saved = json.loads((out / "checkpoints" / "step_00000003" / "rescored_weights.json").read_text())
    at_2 = {r["id"]: r["weight"] for r in read_lines(reference / "rescores" / "step_00000002.jsonl")}
    assert saved["step"] == 2 and saved["weights"] == at_2  # exactly, float for float
    result = subprocess.run(
        train_command(tiny_model_dir, scored, out, "--save-every", "3", "--resume"),
        env=env, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    compared = (
        "step",
        "loss",
        "loss_inversion",
        "loss_suppression",
        "kl_retention",
        "grad_norm",
        "rescored_at",
    )
    got = [{k: m.get(k) for k in compared} for m in read_lines(out / "metrics.jsonl")]
    want = [{k: m.get(k) for k in compared} for m in metrics]
    assert got == want  # bitwise, across the resume and the re-scoring at step 4 after it
    assert read_lines(out / "rescores" / "step_00000004.jsonl") == read_lines(
        reference / "rescores" / "step_00000004.jsonl"
    )
