"""`trace-ds run`: a small end-to-end pipeline, its cache, and what a changed setting reruns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.io import TraceError
from trace_ds.pipeline.runner import Pipeline, load_config

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
def test_pipeline_runs_caches_and_reruns_only_what_changed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 0, result.output
    launch_output = capfd.readouterr().err  # the distributed launch's ranks write to this process's stderr
    # each rank's resident set and live DeepSpeed engines after each stage (this launch has no DeepSpeed; the
    # engines' release under ZeRO-3 is tested in test_engine_release.py)
    for stage in ("score", "train_trace", "train_naive_dpo"):
        assert re.search(
            rf"rank 0: resident [\d,]+ MiB after {stage}, [\d,]+ MiB once released, 0 DeepSpeed engines alive",
            launch_output,
        ), launch_output
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


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A user's own files (taken from a small synthetic benchmark, but given as plain paths)."""
    from trace_ds.synth.generator import build_benchmark

    bench = tmp_path_factory.mktemp("own") / "bench"
    build_benchmark(bench, n_pairs=48, seed=1, n_eval_prompts=8, n_eval_pairs=24)
    return {
        "pairs": str(bench / "pairs.jsonl"),
        "verdicts": str(bench / "verdicts.jsonl"),
        "eval": str(bench / "eval"),
        "corpus": str(bench / "corpus.txt"),
    }


def write_own_config(tmp_path: Path, data: dict) -> Path:
    """SMALL with your own files instead of the synthetic benchmark."""
    config = write_config(tmp_path, data=data)
    raw = yaml.safe_load(config.read_text())
    raw["data"] = data  # replaced, not merged with synth
    config.write_text(yaml.safe_dump(raw))
    return config


def test_own_data_with_build_tiny_needs_a_corpus_and_says_so(tmp_path: Path, own_data: dict) -> None:
    config = write_own_config(tmp_path, {k: v for k, v in own_data.items() if k != "corpus"})
    with pytest.raises(TraceError, match=r"add data\.corpus: FILE.*or use model\.path"):
        load_config(config)
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code != 0 and "data.corpus" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("score", {"probe_sise": 4}, r"unknown key 'probe_sise' in score; did you mean 'probe_size'\?"),
        ("train", {"seed": 3}, r"train\.seed is set by the pipeline"),
        ("model", {"sft": {"epoch": 1}}, r"unknown key 'epoch' in model\.sft; did you mean 'epochs'\?"),
        ("data", {"synth": {"pair": 4}}, r"unknown key 'pair' in data\.synth; did you mean 'pairs'\?"),
        ("launch", {"ranks": 2}, r"launch\.ranks 2 needs launch\.deepspeed"),
        ("launch", {"ranks": 0}, r"launch\.ranks 0: a whole number"),
        ("eval", {"max_new_token": 4}, r"did you mean 'max_new_tokens'"),
        ("launch", {"cpu_isa": "avx9"}, r"launch\.cpu_isa 'avx9': one of avx2"),
        ("launch", {"threads": 0}, r"launch\.threads 0: a whole number"),
        ("score", {"lora": {"r": 4}}, r"LoRA needs both score\.lora .* and train\.lora: true"),
        ("train", {"lora": True}, r"LoRA needs both score\.lora"),
    ],
)
def test_config_keys_are_checked_up_front(tmp_path: Path, section: str, values: dict, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        load_config(write_config(tmp_path, **{section: values}))


def test_own_files_are_checked_up_front(tmp_path: Path, own_data: dict) -> None:
    config = write_own_config(tmp_path, {**own_data, "eval": str(tmp_path)})  # no evaluation files there
    with pytest.raises(
        TraceError, match=r"data\.eval .*missing pairs\.jsonl, verdicts\.jsonl, prompts\.jsonl"
    ):
        load_config(config)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_own_data_builds_the_tiny_model_from_the_corpus_and_keys_follow_the_files(
    tmp_path: Path, own_data: dict
) -> None:
    """The prepare phase on your own files: data, tokenizer + tiny model from data.corpus, SFT, triage; a
    changed corpus reruns the model stages, a changed pairs file reruns everything downstream of data."""
    import shutil

    own = {}
    for key, value in own_data.items():
        target = tmp_path / "mine" / Path(value).name
        target.parent.mkdir(exist_ok=True)
        (shutil.copytree if Path(value).is_dir() else shutil.copy)(value, target)
        own[key] = str(target)
    config = write_own_config(tmp_path, own)
    pipeline = Pipeline(load_config(config), str(config))
    pipeline._run_phase("prepare")
    stages = {s.name: s for s in pipeline.stages}
    assert all(stages[name].done() for name in ("data", "base_model", "old_model", "triage"))
    model_dir = Path(json.loads((stages["base_model"].directory / "paths.json").read_text())["model"])
    assert (model_dir / "tokenizer.json").exists()

    keys = {s.name: s.key for s in pipeline.stages}
    Path(own["corpus"]).write_text(Path(own["corpus"]).read_text() + "\n\nOne more document.\n")
    after_corpus = {s.name: s.key for s in Pipeline(load_config(config), str(config)).stages}
    assert after_corpus["data"] != keys["data"] and after_corpus["base_model"] != keys["base_model"]
    eval_prompts = Path(own["eval"]) / "prompts.jsonl"
    eval_prompts.write_text(eval_prompts.read_text())  # same bytes, new mtime: inside a folder, still seen
    after_eval = {s.name: s.key for s in Pipeline(load_config(config), str(config)).stages}
    assert after_eval["data"] != after_corpus["data"]


LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(
    ("lora", "train", "message"),
    [
        ({"rank": 4}, {}, r"unknown key 'rank' in score\.lora"),
        ({"r": 0}, {}, r"--lora-r 0: must be at least 1"),
        ([4], {}, r"score\.lora \[4\]: a mapping"),
        (LORA, {"merge_lora": False}, r"train\.merge_lora false: the pipeline's eval stage loads"),
    ],
)
def test_lora_settings_are_checked_up_front(tmp_path: Path, lora: object, train: dict, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        load_config(write_config(tmp_path, score={"lora": lora}, train={"lora": True, **train}))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lora_pipeline_scores_trains_merges_and_evaluates_the_adapters(tmp_path: Path) -> None:
    """`score: {lora: {...}}` and `train: {lora: true}`: the adapters are scored, trained from the initial
    adapter scoring saved, merged into run/final (eval loads a full model) and kept in run/final/adapter."""
    config = write_config(tmp_path, score={"lora": LORA}, train={"lora": True}, methods=["trace"])
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 0, result.output
    stages = {s.name: s for s in Pipeline(load_config(config), str(config)).stages}
    meta = json.loads((stages["score"].directory / "scores.meta.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["target_modules"] == ["q_proj", "v_proj"]
    final = stages["train_trace"].directory / "run" / "final"
    export = json.loads((final / "export.json").read_text())
    assert export["kind"] == "lora-adapter" and "merged" in export
    assert (final / "adapter" / "adapter_config.json").is_file() and not (
        final / "adapter_config.json"
    ).exists()
    metrics = json.loads((stages["eval_trace"].directory / "metrics.json").read_text())
    assert (
        metrics["model"] == str(final) and metrics["preference"]["retention_kl"] > 0.0
    )  # the adapters moved


def test_a_training_stage_stopped_by_sigterm_is_not_marked_done(tmp_path: Path, monkeypatch) -> None:
    """The trainer answers SIGTERM with a checkpoint and returns normally ({"stopped_at": step}); the stage
    was then marked done without a model, and every later run failed at the evaluation ("model folder not
    found"). Now the stage raises, leaves no done.json, and the rerun resumes from the checkpoint."""
    import trace_ds.training.train as train_module

    path = write_config(tmp_path)
    stage = next(s for s in Pipeline(load_config(path), str(path)).stages if s.name == "train_trace")
    inputs = {}
    for name, paths in (
        ("old_model", {"model": "m"}),
        ("triage", {"triaged": "t"}),
        ("score", {"scores": "s"}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "paths.json").write_text(json.dumps(paths))
        inputs[name] = tmp_path / name
    seen = {}

    def stopped(train_config):  # what the trainer returns after a SIGTERM checkpoint
        seen["config"] = train_config
        return {"stopped_at": 3}

    monkeypatch.setattr(train_module, "run_train", stopped)
    monkeypatch.setattr("trace_ds.config.TrainConfig", lambda **kw: kw)
    directory = tmp_path / "stage"
    directory.mkdir()
    with pytest.raises(TraceError, match="stopped by SIGTERM at step 3"):
        stage.run(directory, inputs)
    assert not (directory / "paths.json").exists() and seen["config"]["resume"] is False
