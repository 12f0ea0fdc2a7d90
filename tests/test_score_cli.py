"""`trace-ds score` end to end on the synthetic benchmark and a tiny model: outputs, probe round trip, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.io import TraceError, write_jsonl
from trace_ds.scoring.scorer import Scored, normalize_weights

from .helpers import kill_when_lines, paper_flags, triaged_benchmark
from .helpers import read_lines as lines


@pytest.fixture(scope="module")
def triaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("score_data")
    return triaged_benchmark(root, n_pairs=48, seed=3, n_eval_prompts=8, n_eval_pairs=8)


def score_args(model: Path, triaged: Path, out: Path, *extra: str, paper: bool = True) -> list[str]:
    """``trace-ds score`` on the tiny model; with the paper's weighting unless ``paper`` is False (these tests
    check its clamp-and-normalise weights and Algorithm 2's probe; later flags in ``extra`` override it)."""
    return [
        "score",
        "--model",
        str(model),
        "--triaged",
        str(triaged),
        "--out",
        str(out),
        "--probe-size",
        "9",
        "--micro-batch",
        "4",
        "--max-length",
        "160",
        "--max-prompt-length",
        "64",
        "--beta",
        "0.5",
        "--allow-empty",
        *(paper_flags(probe_file="--probe" in extra) if paper else []),
        *extra,
    ]


def test_score_outputs_probe_round_trip_and_holdout(
    tiny_model_dir: Path, triaged: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(main, score_args(tiny_model_dir, triaged, out))
    assert result.exit_code == 0, result.output
    conflict = [r["id"] for r in lines(triaged) if r["category"] != "retention"]
    scores = lines(out)
    assert [s["id"] for s in scores] == conflict  # one line per conflict pair, in input order
    for category in ("inversion", "suppression"):
        group = [s for s in scores if s["category"] == category]
        weights = [s["weight"] for s in group]
        assert min(weights) >= 0.0 and all((s["weight"] > 0) == (s["raw_score"] > 0) for s in group)
        if any(s["raw_score"] > 0 for s in group):  # an untrained model may give a category no positive score
            assert sum(weights) / len(weights) == pytest.approx(1.0)  # mean 1 within the category
    meta = json.loads((tmp_path / "scores.meta.json").read_text())
    assert meta["probe_size"] == 9 and meta["kernel"] == "torch" and meta["world_size"] == 1
    assert not (tmp_path / "scores.partial.jsonl").exists()
    probe = lines(tmp_path / "scores.probe.jsonl")
    assert [p["category"] for p in probe] == ["retention"] * 3 + ["inversion"] * 3 + ["suppression"] * 3

    again = tmp_path / "again.jsonl"
    result = CliRunner().invoke(
        main, score_args(tiny_model_dir, triaged, again, "--probe", str(tmp_path / "scores.probe.jsonl"))
    )
    assert result.exit_code == 0, result.output
    assert [s["raw_score"] for s in lines(again)] == pytest.approx(
        [s["raw_score"] for s in scores], rel=1e-6, abs=1e-9
    )

    held = tmp_path / "held.jsonl"
    assert (
        CliRunner().invoke(main, score_args(tiny_model_dir, triaged, held, "--probe-holdout")).exit_code == 0
    )
    check_holdout_scores(held, triaged, {p["probe_source_id"] for p in probe})


def test_the_default_weighting_is_the_study_s_pick(
    tiny_model_dir: Path, triaged: Path, tmp_path: Path
) -> None:
    """Without weighting flags: cosine scores against a unit-normalised, same-prompt probe, the lowest quarter
    of each category (and every negative cosine) pruned, the rest uniform with mean 1 (docs/results.md)."""
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(main, score_args(tiny_model_dir, triaged, out, paper=False))
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "scores.meta.json").read_text())
    chosen = {k: meta[k] for k in ("score_metric", "weighting", "probe_normalize", "probe_suppression")}
    assert chosen == {
        "score_metric": "cosine",
        "weighting": "prune:0.25",
        "probe_normalize": "unit",
        "probe_suppression": "same-prompt",
    }
    scores = lines(out)
    for category in ("inversion", "suppression"):  # (this untrained model may give a category no cosine > 0)
        group = [s for s in scores if s["category"] == category]
        kept = [s for s in group if s["weight"] > 0]
        assert len(group) - len(kept) >= len(group) // 4  # at least the lowest quarter dropped
        assert all(s["cosine"] >= 0 for s in kept) and {s["weight"] for s in kept} <= {
            len(group) / max(len(kept), 1)
        }
        if kept:
            assert min(s["cosine"] for s in kept) >= max(s["cosine"] for s in group if s["weight"] == 0)
    assert any(s["weight"] > 0 for s in scores)


def check_holdout_scores(held: Path, triaged: Path, sources: set[str]) -> list[dict]:
    """A --probe-holdout scores file: a line for every conflict pair, in input order; the held-out ones
    unscored (raw_score null, marked probe_holdout) with their category's mean weight."""
    conflict = [r["id"] for r in lines(triaged) if r["category"] != "retention"]
    scores = lines(held)
    assert [s["id"] for s in scores] == conflict
    held_out = [s for s in scores if s.get("probe_holdout")]
    assert {s["id"] for s in held_out} == sources & set(conflict) and held_out
    for s in scores:
        assert (s["raw_score"] is None) == (s["id"] in sources)
        assert s.get("probe_holdout", False) == (s["id"] in sources)
    for category in ("inversion", "suppression"):
        scored = [s["weight"] for s in scores if s["category"] == category and s["raw_score"] is not None]
        mean = sum(scored) / len(scored)
        assert mean == pytest.approx(1.0 if any(scored) else 0.0)  # per-category normalisation kept
        for s in held_out:
            if s["category"] == category:
                assert s["weight"] == pytest.approx(mean)
    meta = json.loads(held.with_name(f"{held.stem}.meta.json").read_text())
    assert meta["probe_holdout"] is True and meta["probe_holdout_pairs"] == len(held_out)
    assert meta["scored_pairs"] == len(conflict) - len(held_out)
    return scores


def test_probe_holdout_pairs_take_their_category_mean_weight() -> None:
    def scored() -> list[Scored]:
        return [
            Scored("a", "inversion", 2.0),
            Scored("b", "inversion", -1.0),
            Scored("h", "inversion", None, probe_holdout=True),
            Scored("c", "inversion", 4.0),
            Scored("d", "suppression", 1e-6),
            Scored("g", "suppression", None, probe_holdout=True),
        ]

    per_category = scored()
    normalize_weights(per_category, "per-category", allow_empty=False)
    assert [s.weight for s in per_category] == pytest.approx([1.0, 0.0, 1.0, 2.0, 1.0, 1.0])
    joint = scored()
    normalize_weights(joint, "joint", allow_empty=False)
    assert sum(s.weight for s in joint) == pytest.approx(1.0)  # the sum covers the held-out pairs too
    assert joint[2].weight == pytest.approx((joint[0].weight + joint[1].weight + joint[3].weight) / 3)
    assert joint[5].weight == pytest.approx(joint[4].weight)
    assert [record.record() for record in joint[2:4]] == [
        {
            "id": "h",
            "category": "inversion",
            "raw_score": None,
            "weight": joint[2].weight,
            "probe_holdout": True,
        },
        {"id": "c", "category": "inversion", "raw_score": 4.0, "weight": joint[3].weight},
    ]

    nothing_positive = [Scored("a", "inversion", -1.0), Scored("h", "inversion", None, probe_holdout=True)]
    normalize_weights(nothing_positive, "per-category", allow_empty=True)
    assert [s.weight for s in nothing_positive] == [0.0, 0.0]
    with pytest.raises(TraceError, match="holds out every suppression pair"):
        normalize_weights(
            [Scored("a", "inversion", 1.0), Scored("h", "suppression", None, probe_holdout=True)],
            "per-category",
            allow_empty=False,
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_probe_holdout_scores_train_every_pair(tiny_model_dir: Path, triaged: Path, tmp_path: Path) -> None:
    """`score --probe-holdout` then `train` on the same triaged file: no missing score, every pair trains."""
    held = tmp_path / "held.jsonl"
    result = CliRunner().invoke(main, score_args(tiny_model_dir, triaged, held, "--probe-holdout"))
    assert result.exit_code == 0, result.output
    sources = {p["probe_source_id"] for p in lines(tmp_path / "held.probe.jsonl")}
    scores = check_holdout_scores(held, triaged, sources)
    weights = {s["id"]: s["weight"] for s in scores}
    records = lines(triaged)
    trainable = [r["id"] for r in records if r["category"] == "retention" or weights[r["id"]] > 0]
    assert any(weights[i] > 0 for i in sources if i in weights)  # held-out pairs are among those trained

    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "trace_ds.cli", "train", "--model", str(tiny_model_dir), "--triaged", str(triaged),
        "--scores", str(held), "--out", str(out), "--micro-batch", "5", "--max-length", "160",
        "--max-prompt-length", "64", "--lr", "1e-4",
    ]  # fmt: skip
    result = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = lines(out / "metrics.jsonl")
    assert {m["epoch"] for m in metrics} == {0}
    assert sum(m["pairs"] for m in metrics) == len(trainable)  # one epoch: every trainable pair once
    assert len(metrics) == -(-len(trainable) // 5)


def test_bad_options_fail_before_loading_anything(
    tiny_model_dir: Path, triaged: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    result = runner.invoke(main, score_args(tiny_model_dir, triaged, tmp_path / "s.jsonl", "--beta", "0"))
    assert result.exit_code == 2 and "--beta 0.0: must be positive" in result.output
    result = runner.invoke(
        main,
        score_args(tiny_model_dir, triaged, tmp_path / "s.jsonl", "--probe", str(triaged), "--probe-holdout"),
    )
    assert result.exit_code == 2 and "drop --probe-holdout" in result.output.replace("\n", " ")
    result = runner.invoke(
        main,
        score_args(tiny_model_dir, triaged, tmp_path / "s.jsonl", "--deepspeed", "ds_configs/zero3.json"),
    )
    assert result.exit_code == 2 and "enables bf16 but --dtype is float32" in result.output.replace("\n", " ")
    untriaged = tmp_path / "plain.jsonl"
    write_jsonl(untriaged, [{"id": "a", "prompt": "Q", "chosen": "A", "rejected": "B"}])
    result = runner.invoke(main, score_args(tiny_model_dir, untriaged, tmp_path / "s.jsonl"))
    assert result.exit_code == 2 and "has no triage category" in result.output


def test_lora_scores_save_the_initial_adapter(tiny_model_dir: Path, triaged: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora.jsonl"
    result = CliRunner().invoke(
        main,
        score_args(
            tiny_model_dir, triaged, out, "--lora", "--lora-r", "2", "--lora-targets", "q_proj,v_proj"
        ),
    )
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "lora.initial_adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    meta = json.loads((tmp_path / "lora.meta.json").read_text())
    assert meta["initial_adapter"] == str(adapter)
    assert 0 < meta["parameters_covered"] < 50_000  # adapters only


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_scoring_continues_to_the_same_result(
    tiny_model_dir: Path, triaged: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "ref" / "s.jsonl"
    extra = ("--micro-batch", "2", "--save-every", "1")
    assert CliRunner().invoke(main, score_args(tiny_model_dir, triaged, reference, *extra)).exit_code == 0

    out = tmp_path / "killed" / "s.jsonl"
    command = [sys.executable, "-m", "trace_ds.cli", *score_args(tiny_model_dir, triaged, out, *extra)]
    partial = out.with_name("s.partial.jsonl")
    finished = kill_when_lines(command, partial, 5) - 1
    total = len(lines(reference))
    assert 4 <= finished < total, "the run should have been killed part-way"

    result = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr
    assert "resuming:" in result.stderr
    got, want = lines(out), lines(reference)
    assert [(g["id"], g["category"]) for g in got] == [(w["id"], w["category"]) for w in want]
    assert [g["raw_score"] for g in got] == pytest.approx([w["raw_score"] for w in want], rel=1e-6, abs=1e-9)
    assert [g["weight"] for g in got] == pytest.approx([w["weight"] for w in want], rel=1e-6, abs=1e-9)


def test_pretokenized_pairs_need_no_tokenizer(triaged: Path, tmp_path: Path) -> None:
    """A model folder without tokenizer files scores pre-tokenized pairs (ids used as given)."""
    import random

    from trace_ds.models.tiny import build_tiny_llama

    model_dir = tmp_path / "bare_model"
    build_tiny_llama(model_dir, vocab_size=300)
    rng = random.Random(0)
    records = []
    for record in lines(triaged):
        ids = [rng.randrange(3, 300) for _ in range(12)]
        records.append(
            {
                "id": record["id"],
                "prompt_input_ids": [1, *ids[:5]],
                "chosen_input_ids": [*ids[5:8], 2],
                "rejected_input_ids": [*ids[8:], 2],
                "category": record["category"],
            }
        )
    tokenized = tmp_path / "tokenized.jsonl"
    write_jsonl(tokenized, records)
    out = tmp_path / "s.jsonl"
    result = CliRunner().invoke(main, score_args(model_dir, tokenized, out))
    assert result.exit_code == 0, result.output
    assert len(lines(out)) == sum(r["category"] != "retention" for r in records)
    assert not list(model_dir.glob("tokenizer*"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scoring_benchmark_runs_every_arm_and_they_agree(tmp_path: Path) -> None:
    """Smoke test of `trace-ds bench scoring` at toy sizes: it runs and its arms compute the same scores.
    (No timing is asserted: performance lives in docs/performance.md.)"""
    out = tmp_path / "report.json"
    args = [
        "bench",
        "scoring",
        "--pairs",
        "6",
        "--batch",
        "3",
        "--probe",
        "3",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--vocab",
        "256",
        "--tokens",
        "24",
        "--workdir",
        str(tmp_path / "w"),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [row["arm"] for row in report["arms"]] == [
        "floor",
        "ghost",
        "ghost+norms",
        "per-pair",
        "reference-code",
    ]
    assert all(diff < 1e-5 for diff in report["max_relative_score_difference_vs_ghost"].values())
