"""The ``trace-ds run`` config: defaults, and every check made before any stage runs.

A config error must surface at once, naming the key and the fix, not as a traceback from a stage an hour in.
The keys each section accepts are read from the dataclasses and functions the stages call, so the check
cannot drift from what the stages take.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from trace_ds.config import check_model_source
from trace_ds.io import TraceError

METHODS = {
    "trace": "TRACE (triage, impact weights, KL)",
    "naive_dpo": "naive oracle DPO (every judged pair, new orientation, uniform, no KL)",
    "no_impact": "TRACE w/o impact weighting (all conflict weights 1)",
    "no_kl": "TRACE w/o KL (alpha_kl = 0)",
    "no_triage": "w/o triage (NPO on every pair's old chosen response, impact-weighted, no KL)",
    "trace_rescore": "TRACE with in-run re-scoring every train.rescore_every steps (default 50)",
}
DEFAULT_RESCORE_EVERY = 50
DEFAULTS: dict[str, Any] = {
    "workdir": "runs/pipeline",
    "seed": 0,
    "tokenize": {"max_length": 1024, "max_prompt_length": 512},
    # noise: the share of judged pairs given another category (a label-noise study; seeded by the top seed)
    "triage": {"noise": 0.0, "min_confidence": 0.0},
    "score": {"probe_size": 64, "beta": 0.1, "micro_batch": 8},
    "train": {"epochs": 1, "micro_batch": 8, "lr": 1e-6, "beta": 0.1, "alpha_kl": 1.0},
    "eval": {"max_new_tokens": 48, "batch_size": 16},
    "methods": ["trace"],
    # threads / cpu_isa: pin CPU numerics so a run's digits reproduce on another machine (trace_ds.runtime.determinism)
    "launch": {"ranks": 1, "deepspeed": None, "threads": None, "cpu_isa": None},
}
SFT_DEFAULTS = {"epochs": 3, "lr": 3e-3, "batch_size": 32}
# Set by the pipeline itself (paths between stages, the top-level seed and tokenize section): not config keys.
PIPELINE_SET = {
    *("model", "reference", "data", "pairs", "triaged", "scores", "out"),
    *("deepspeed", "resume", "tokenize", "seed"),
}
USER_DATA = ("pairs", "verdicts", "eval")
# data.synth's keys -> build_benchmark's parameters where they differ
SYNTH_PARAMETERS = {"pairs": "n_pairs", "eval_prompts": "n_eval_prompts", "eval_pairs": "n_eval_pairs"}
EVAL_FILES = ("pairs.jsonl", "verdicts.jsonl", "prompts.jsonl")


def load_config(path: str | Path) -> dict[str, Any]:
    """The config at ``path`` merged over :data:`DEFAULTS`, checked (see :func:`validate_config`)."""
    config = read_config(path)
    validate_config(config, str(path))
    return config


def read_config(path: str | Path) -> dict[str, Any]:
    """The config merged over :data:`DEFAULTS`, only its shape checked: no heavy import (torch), so that
    ``launch.threads``/``launch.cpu_isa`` can be applied before anything loads torch."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TraceError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise TraceError(f"{path}: expected a mapping of sections (workdir, data, model, ...), got {raw!r}")
    for section in ("tokenize", "triage", "score", "train", "eval", "launch", "data", "model"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise TraceError(f"{path}: {section} must be a mapping, got {raw[section]!r}")
    config = {**DEFAULTS, **raw}
    for section in ("tokenize", "triage", "score", "train", "eval", "launch"):
        config[section] = {**DEFAULTS[section], **(raw.get(section) or {})}
    if "max_steps" in (raw.get("train") or {}) and "epochs" not in raw["train"]:
        config["train"].pop("epochs")  # the default epoch count gives way to an explicit step count
    return config


def validate_config(config: dict[str, Any], where: str) -> None:
    """Every key known, every input present, every combination possible; each error names the fix."""
    _known(config, DEFAULTS.keys() | {"data", "model"}, "the top level", where)
    methods = config["methods"]
    if not isinstance(methods, list) or not methods:
        raise TraceError(f"{where}: methods must be a non-empty list, e.g. [trace, naive_dpo]")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TraceError(f"{where}: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    _check_data(config.get("data") or {}, where)
    _check_model(config.get("model") or {}, config.get("data") or {}, where)
    _check_sections(config, where)
    _check_launch(config["launch"], where)


def _check_data(data: dict[str, Any], where: str) -> None:
    if "synth" in data:
        _known(data, {"synth"}, "data (with synth)", where, hint="your own files go without synth")
        from trace_ds.synth.generator import build_benchmark

        renamed = {parameter: key for key, parameter in SYNTH_PARAMETERS.items()}
        synth_keys = {renamed.get(p, p) for p in _parameters(build_benchmark)} - {"out_dir"}
        _known(data["synth"] or {}, synth_keys, "data.synth", where)
        return
    _known(data, {*USER_DATA, "corpus"}, "data", where)
    missing = [key for key in USER_DATA if key not in data]
    if missing:
        raise TraceError(
            f"{where}: data needs either synth: {{...}} or your files pairs, verdicts and eval; missing "
            f"{', '.join(missing)} (docs/pipeline.md, 'Your own data')"
        )
    if not Path(data["verdicts"]).is_file():
        raise TraceError(f"{where}: data.verdicts {data['verdicts']}: no such file (a verdicts JSONL)")
    folder = Path(data["eval"])
    absent = [name for name in EVAL_FILES if not (folder / name).is_file()]
    if absent:
        raise TraceError(
            f"{where}: data.eval {folder}: missing {', '.join(absent)} (an evaluation folder: "
            "docs/formats.md, 'Evaluation folder')"
        )
    if "corpus" in data and not Path(data["corpus"]).is_file():
        raise TraceError(
            f"{where}: data.corpus {data['corpus']}: no such file (text, documents separated by blank lines)"
        )


def _check_model(model: dict[str, Any], data: dict[str, Any], where: str) -> None:
    _known(model, {"path", "build_tiny", "sft"}, "model", where)
    if ("path" in model) == ("build_tiny" in model):
        raise TraceError(
            f"{where}: model needs exactly one of path: (a folder or hub id of the model aligned to the OLD "
            "policy) or build_tiny: {...} (a tiny model trained here, then aligned by sft: {...})"
        )
    if "path" in model:
        if "sft" in model:
            raise TraceError(f"{where}: model.sft applies to build_tiny only; a model.path is used as it is")
        try:
            check_model_source(str(model["path"]), "model.path")
        except TraceError as err:
            raise TraceError(f"{where}: {err}") from None
        return
    from trace_ds.models.tiny import build_tiny_llama
    from trace_ds.training.sft import SFTConfig

    tiny_keys = (_parameters(build_tiny_llama) - {"out_dir", "seed", "dtype"}) | {"tokenizer_documents"}
    _known(model["build_tiny"] or {}, tiny_keys, "model.build_tiny", where)
    _known(model.get("sft") or {}, _field_names(SFTConfig) - PIPELINE_SET, "model.sft", where)
    if "synth" not in data and "corpus" not in data:
        raise TraceError(
            f"{where}: model.build_tiny trains a tokenizer and a tiny model on text, and your own data has none: "
            "add data.corpus: FILE (plain text, documents separated by blank lines), or use model.path: "
            "with your model folder or hub id"
        )


def _check_sections(config: dict[str, Any], where: str) -> None:
    from trace_ds.config import ScoreConfig, TrainConfig
    from trace_ds.data.tokenize import TokenizeConfig
    from trace_ds.evaluate.run import EvalConfig

    _known(config["tokenize"], _field_names(TokenizeConfig), "tokenize", where)
    _known(config["triage"], DEFAULTS["triage"].keys(), "triage", where)
    for key, value in config["triage"].items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise TraceError(f"{where}: triage.{key} {value!r}: a fraction in [0, 1]")
    for section, cls in (("score", ScoreConfig), ("train", TrainConfig), ("eval", EvalConfig)):
        given = config[section]
        set_here = sorted(PIPELINE_SET & given.keys())
        if set_here:
            raise TraceError(
                f"{where}: {section}.{set_here[0]} is set by the pipeline (paths between stages; seed and "
                "tokenize at the top level): remove it"
            )
        _known(given, _field_names(cls), section, where)
    _check_lora(config["score"], config["train"], where)


def _check_lora(score: dict[str, Any], train: dict[str, Any], where: str) -> None:
    """LoRA is scored and trained together: the score stage saves the initial adapter that training starts
    from, and the pipeline merges the trained adapter so that the eval stage loads a full model."""
    from trace_ds.config import LoraConfig

    lora = score.get("lora")
    if (lora is not None) != bool(train.get("lora")):
        raise TraceError(
            f"{where}: LoRA needs both score.lora (the adapters, e.g. {{r: 16, alpha: 32}}) and train.lora: true, "
            "or neither: training starts from the adapter that scoring saved"
        )
    if lora is None:
        return
    if not isinstance(lora, dict):
        raise TraceError(
            f"{where}: score.lora {lora!r}: a mapping of LoRA settings, e.g. {{r: 16, alpha: 32}}"
        )
    _known(lora, _field_names(LoraConfig), "score.lora", where)
    if train.get("merge_lora") is False:
        raise TraceError(
            f"{where}: train.merge_lora false: the pipeline's eval stage loads the trained model as a full "
            "model, so it merges the adapter (the adapter is kept too, in run/final/adapter); remove the key"
        )
    lora_config(lora)  # r, dropout and target_modules checked before anything runs


def _check_launch(launch: dict[str, Any], where: str) -> None:
    from trace_ds.runtime.determinism import cpu_numerics_env

    _known(launch, DEFAULTS["launch"].keys(), "launch", where)
    try:
        cpu_numerics_env(launch["threads"], launch["cpu_isa"])
    except TraceError as err:
        raise TraceError(f"{where}: launch.{err}") from None
    ranks = launch["ranks"]
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise TraceError(f"{where}: launch.ranks {ranks!r}: a whole number of ranks, at least 1")
    deepspeed = launch.get("deepspeed")
    if ranks > 1 and not deepspeed:
        raise TraceError(
            f"{where}: launch.ranks {ranks} needs launch.deepspeed: a DeepSpeed JSON config "
            "(ds_configs/zero3.json on GPUs, ds_configs/cpu.json on CPUs)"
        )
    if deepspeed:
        from trace_ds.runtime.deepspeed_configs import resolve_deepspeed_config

        try:
            resolve_deepspeed_config(deepspeed, "launch.deepspeed")
        except TraceError as err:
            raise TraceError(f"{where}: {err}") from None


def _known(
    given: Mapping[str, Any], allowed: Iterable[str], section: str, where: str, hint: str | None = None
) -> None:
    """An unknown key is an error with the closest allowed key, or the list of allowed ones."""
    allowed = sorted(set(allowed))
    for key in given:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        fix = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
        raise TraceError(f"{where}: unknown key {key!r} in {section}; {fix}" + (f" ({hint})" if hint else ""))


def _field_names(cls: Any) -> set[str]:
    return {f.name for f in fields(cls)}


def _parameters(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)


def lora_config(mapping: dict[str, Any]) -> Any:
    """``score: {lora: {r: ..., alpha: ...}}`` as the LoraConfig that scoring takes (YAML gives a list of
    target modules; the frozen dataclass keeps a tuple)."""
    from trace_ds.config import LoraConfig

    fields = dict(mapping)
    if "target_modules" in fields:
        fields["target_modules"] = tuple(fields["target_modules"])
    return LoraConfig(**fields)
