"""`trace-ds run`: a small end-to-end pipeline, its cache, and what a changed setting reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.io import TraceError
from trace_ds.pipeline import Pipeline, load_config

SMALL = {
    "seed": 0,
    "data": {"synth": {"pairs": 48, "seed": 1, "eval_prompts": 8, "eval_pairs": 24}},
    "model": {
        "build_tiny": {
            "vocab_size": 512,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "intermediate_size": 64,
            "max_position_embeddings": 256,
            "tokenizer_documents": 400,
        },
        "sft": {"epochs": 1, "lr": 0.003, "batch_size": 16},
    },
    "tokenize": {"max_length": 160, "max_prompt_length": 64},
    "score": {"probe_size": 6, "beta": 0.1, "micro_batch": 8, "allow_empty": True},
    "train": {"max_steps": 2, "micro_batch": 4, "lr": 0.0005, "beta": 0.1, "alpha_kl": 1.0},
    "eval": {"max_new_tokens": 8, "batch_size": 8},
    "methods": ["trace", "naive_dpo", "no_triage"],
    "launch": {"ranks": 1},
}


def write_config(tmp_path: Path, **changes) -> Path:
    config = json.loads(json.dumps(SMALL))
    config["workdir"] = str(tmp_path / "work")
    for section, values in changes.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def done_times(pipeline: Pipeline) -> dict[str, float]:
    return {s.name: (s.directory / "done.json").stat().st_mtime_ns for s in pipeline.stages}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_runs_caches_and_reruns_only_what_changed(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 0, result.output
    first = Pipeline(load_config(config), str(config))
    assert all(stage.done() for stage in first.stages)
    report = next(s for s in first.stages if s.name == "report").directory
    assert (
        (report / "report.md").exists()
        and (report / "tpa.png").exists()
        and (report / "losses_trace.png").exists()
    )
    check = json.loads((report / "report.json").read_text())["check"]
    assert check["prompts"] == 8 and "tpa_gain" in check

    before = done_times(first)
    result = CliRunner().invoke(main, ["run", str(config)])  # nothing changed: everything is cached
    assert result.exit_code == 0, result.output
    assert done_times(Pipeline(load_config(config), str(config))) == before

    changed = write_config(tmp_path, train={"lr": 0.001})
    second = Pipeline(load_config(changed), str(changed))
    keys_before = {s.name: s.key for s in first.stages}
    rerun = {s.name for s in second.stages if s.key != keys_before[s.name]}
    assert rerun == {
        f"{kind}_{m}" for kind in ("train", "eval") for m in ("trace", "naive_dpo", "no_triage")
    } | {"report"}
    result = CliRunner().invoke(main, ["run", str(changed)])
    assert result.exit_code == 0, result.output
    after = done_times(second)
    for stage in second.stages:  # untouched stages kept their done markers; the dependent ones are new
        if stage.name not in rerun:
            assert after[stage.name] == before[stage.name], stage.name


def test_config_errors_are_named(tmp_path: Path) -> None:
    bad = write_config(tmp_path, methods=["trace", "magic"])
    with pytest.raises(TraceError, match="unknown method"):
        load_config(bad)
    no_model = tmp_path / "m.yaml"
    no_model.write_text(yaml.safe_dump({"data": SMALL["data"], "model": {}}))
    with pytest.raises(TraceError, match="model needs"):
        load_config(no_model)
