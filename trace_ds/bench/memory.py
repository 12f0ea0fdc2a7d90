"""Memory benchmarks: peak host memory per rank while loading a model, and `trace-ds plan` against measured
peaks of real `score` and `train` runs.

Each measurement runs in its own launch (``deepspeed --num_gpus R``) so that nothing else in the process
counts. On the CPU, glibc's malloc is told to return freed blocks of 64 KiB and up to the system at once
(``MALLOC_MMAP_THRESHOLD_``), so that the resident set follows live tensors rather than allocator caching.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from trace_ds.io import TraceError, trace_ds_command, write_json
from trace_ds.runtime.engine import cpu_ds_config
from trace_ds.runtime.memory import MIB, REPORT_ENV, MemoryMeter

LOADERS = ("trace-ds", "transformers")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def checkpoint_mib(model_dir: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / MIB


def _transformers_load(name: str, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from trace_ds.models.loading import DTYPES

    return AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])


def _import_model_class(name: str) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(name))]


def verify_against_checkpoint(model: torch.nn.Module, name: str) -> int:
    """Gather each parameter in turn and compare it with the checkpoint tensor (for a fused MoE expert tensor
    stored per expert, the concatenation of its per-expert tensors); returns how many matched."""
    import deepspeed
    from safetensors import safe_open

    from trace_ds.runtime.partitioned import SafetensorsReader, safetensors_weight_map, tensor_sources

    weight_map = safetensors_weight_map(name) or {}
    shapes: dict[str, list[int]] = {}
    for path in set(weight_map.values()):
        with safe_open(str(path), "pt") as handle:
            shapes.update({key: list(handle.get_slice(key).get_shape()) for key in handle.keys()})  # noqa: SIM118
    prefix = getattr(model, "base_model_prefix", "model")
    checked = 0
    for tensor_name, param in model.named_parameters():
        keys = tensor_sources(tensor_name, getattr(param, "ds_shape", param.shape), shapes, prefix)
        if keys is None:
            raise TraceError(f"{name}: no checkpoint tensor for {tensor_name}")
        pieces, read = [], []
        for key in keys:
            with safe_open(str(weight_map[key]), "pt") as handle:
                pieces.append(handle.get_tensor(key).reshape(-1))
            reader = SafetensorsReader(weight_map[key])
            try:
                read.append(reader.tensor(key).reshape(-1))
            finally:
                reader.close()
            if not torch.equal(read[-1], pieces[-1]):
                raise TraceError(f"{weight_map[key]}: {key} read differently from safetensors' own reader")
        with deepspeed.zero.GatheredParameters([param]):
            expected = torch.cat(pieces).to(param.dtype).reshape(param.shape)
            if not torch.equal(param.detach().cpu(), expected):
                raise TraceError(
                    f"{name}: {tensor_name} differs from the checkpoint after partitioned loading"
                )
        checked += 1
    return checked


def measure_load(model: str, deepspeed: str, loader: str, dtype: str, out: str, verify: bool) -> None:
    """One rank of a loading measurement: the peak memory growth from building the model partitioned and
    filling it from the checkpoint. Rank 0 writes every rank's record to ``out``."""
    from trace_ds.models.loading import load_causal_lm
    from trace_ds.runtime.engine import strategy_for

    with strategy_for(deepspeed, 1, dtype, stage=f"load:{loader}") as strategy:
        _import_model_class(model)  # a fixed cost that is not loading: keep it out of the measurement
        meter = MemoryMeter.start(strategy.device)
        loaded = load_causal_lm(model, dtype) if loader == "trace-ds" else _transformers_load(model, dtype)
        record = meter.record(rank=strategy.rank, world_size=strategy.world_size, loader=loader)
        if verify:
            record["verified_tensors"] = verify_against_checkpoint(loaded, model)
        records = strategy.all_gather_object(record)
        if strategy.is_main:
            write_json(out, {"model": model, "checkpoint_mib": checkpoint_mib(model), "ranks": records})


def launch(args: list[str], ranks: int, env: dict[str, str], log: Path, timeout_s: float = 900) -> None:
    """``deepspeed --num_gpus ranks trace-ds ARGS`` (or one plain process), output to ``log``."""
    command = trace_ds_command(ranks, *args)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **MALLOC_ENV, **env}
    with open(log, "w", encoding="utf-8") as sink:
        try:
            proc = subprocess.run(
                command, env=full_env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s,
                start_new_session=True,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise TraceError(f"{' '.join(args[:2])} timed out after {timeout_s:.0f} s; log: {log}") from err
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise TraceError(f"{' '.join(args[:2])} failed (exit {proc.returncode}); log: {log}\n{tail}")


def run_load_benchmark(
    model_dir: str,
    workdir: Path,
    ranks: int,
    deepspeed: str,
    verify: bool = False,
    loaders: tuple[str, ...] = LOADERS,
) -> dict[str, Any]:
    """Peak growth per rank (MiB) for each loader on the same checkpoint and launch shape."""
    results: dict[str, Any] = {"checkpoint_mib": checkpoint_mib(model_dir), "ranks": ranks, "loaders": {}}
    for loader in loaders:
        out = workdir / f"load_{loader}.json"
        args = ["bench", "load", "--model", model_dir, "--deepspeed", deepspeed, "--loader", loader]
        args += ["--out", str(out)] + (["--verify"] if verify and loader == "trace-ds" else [])
        launch(args, ranks, {}, workdir / f"load_{loader}.log")
        report = json.loads(out.read_text(encoding="utf-8"))
        results["loaders"][loader] = [r["peak_growth_mib"] for r in report["ranks"]]
    return results


# ------------------------------------------------------------------------------ plan vs measured peaks

CATEGORY_CYCLE = ("inversion", "suppression", "retention")


def measure_stages(
    model_dir: str,
    workdir: Path,
    zero: int,
    ranks: int,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    steps: int = 2,
    lora: bool = False,
    vocab_tile: int | None = None,
    zero_overrides: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Run `trace-ds score` and `trace-ds train` (``steps`` optimizer steps) with a memory report; returns
    the per-rank peak growth (MiB) of each recorded segment, e.g. ``score:end`` and ``train:steps``."""
    from transformers import AutoConfig

    from trace_ds.io import write_jsonl

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    workdir.mkdir(parents=True, exist_ok=True)
    n_pairs = micro_batch * ranks * steps
    from trace_ds.bench.train import make_pairs

    # every sequence exactly seq_len tokens, inversion, suppression and retention in turn: the planned shape
    pairs = make_pairs(n_pairs, seq_len, vocab, seed=0, jitter=0, categories=CATEGORY_CYCLE)
    triaged = workdir / "triaged.jsonl"
    write_jsonl(triaged, pairs)
    ds_config = workdir / f"ds_zero{zero}.json"
    config = cpu_ds_config(zero)
    config["zero_optimization"] = {**config["zero_optimization"], **(zero_overrides or {})}
    write_json(ds_config, config)
    report = workdir / "memory.jsonl"
    report.unlink(missing_ok=True)
    caps = ["--max-length", str(seq_len), "--max-prompt-length", str(seq_len // 2)]
    common = ["--model", model_dir, "--triaged", str(triaged), "--micro-batch", str(micro_batch), *caps]
    common += ["--deepspeed", str(ds_config)] + (
        ["--gradient-checkpointing"] if gradient_checkpointing else []
    )
    common += ["--lora"] if lora else []  # default rank and targets: train reuses score's initial adapter
    common += ["--vocab-tile", str(vocab_tile)] if vocab_tile is not None else []
    scores = workdir / "scores.jsonl"
    score_args = ["score", *common, "--out", str(scores), "--probe-size", str(micro_batch * ranks)]
    launch([*score_args, "--allow-empty"], ranks, {REPORT_ENV: str(report)}, workdir / "score.log")
    train_args = ["train", *common, "--scores", str(scores), "--out", str(workdir / "train")]
    train_args += ["--max-steps", str(steps), "--buffer-size", "1", "--alpha-kl", "1"]
    launch(train_args, ranks, {REPORT_ENV: str(report)}, workdir / "train.log")
    segments: dict[str, list[float]] = {}
    for line in report.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        segments.setdefault(record["stage"], [0.0] * ranks)[record["rank"]] = record["peak_growth_mib"]
    return segments


def planned_mib(
    model_dir: str,
    zero: int,
    ranks: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    lora: bool = False,
    zero_overrides: dict[str, float] | None = None,
) -> dict[str, float]:
    """`trace-ds plan`'s scoring and training totals (MiB per rank) for the measured launch: fp32 on the CPU."""
    from trace_ds.config import LoraConfig
    from trace_ds.runtime.plan import PlanSettings, model_shape, plan

    settings = PlanSettings(
        ranks_per_node=ranks, zero=zero, micro_batch=micro_batch, seq_len=seq_len, dtype="float32",
        ds_config={"zero_optimization": dict(zero_overrides or {})},
    )  # fmt: skip
    shape = model_shape(model_dir, LoraConfig() if lora else None)
    result = plan(shape, settings)["checkpointing" if checkpointing else "no_checkpointing"]
    return {stage: result[stage]["total"] / MIB for stage in ("scoring", "training")}


def compare_plan(
    model_dir: str,
    workdir: Path,
    zero: int,
    ranks: int,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool = False,
    lora: bool = False,
    zero_overrides: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Measured peak (the larger rank) against the plan, for scoring and for the training steps."""
    measured = measure_stages(
        model_dir, workdir, zero, ranks, micro_batch, seq_len, checkpointing, lora=lora,
        zero_overrides=zero_overrides,
    )  # fmt: skip
    planned = planned_mib(model_dir, zero, ranks, micro_batch, seq_len, checkpointing, lora, zero_overrides)
    rows = []
    for stage, segment in (("scoring", "score:end"), ("training", "train:steps")):
        peak = max(measured[segment])
        rows.append(
            {
                "model_mib": checkpoint_mib(model_dir), "zero": zero, "ranks": ranks, "checkpointing": checkpointing,
                "stage": f"{stage} (LoRA)" if lora else stage, "measured_mib": peak, "planned_mib": planned[stage],
                "error": planned[stage] / peak - 1.0,
            }
        )  # fmt: skip
    return rows


def run_memory_benchmark(settings: dict[str, Any], out: str | None = None) -> dict[str, Any]:
    """Loading peaks (both loaders) and plan-vs-measured rows for every model depth x ZeRO stage."""
    workdir = Path(settings["workdir"])
    report: dict[str, Any] = {"settings": settings, "load": [], "plan": []}
    bucket = settings.get("reduce_bucket_size")
    overrides = {"reduce_bucket_size": bucket} if bucket else None
    for layers in settings["layers"]:
        model_dir = workdir / "models" / f"layers{layers}"
        if not (model_dir / "model.safetensors").exists():
            from trace_ds.models.tiny import build_tiny_llama

            heads = max(settings["hidden"] // 64, 1)
            build_tiny_llama(
                model_dir, settings["vocab"], hidden_size=settings["hidden"], num_layers=layers, num_heads=heads,
                num_kv_heads=heads, intermediate_size=3 * settings["hidden"], seed=0,
            )  # fmt: skip
        if not settings.get("lora") and not overrides:  # only the plan rows: loading does not depend on them
            load = run_load_benchmark(
                str(model_dir), workdir / f"load{layers}", settings["ranks"], _zero3_config(workdir)
            )
            report["load"].append({"layers": layers, **load})
        for zero in settings["zero"]:
            for checkpointing in [False, True] if settings["checkpointing"] else [False]:
                tag = f"layers{layers}_zero{zero}{'_ckpt' if checkpointing else ''}{'_lora' if settings.get('lora') else ''}{f'_bucket{bucket:g}' if bucket else ''}"
                report["plan"] += compare_plan(
                    str(model_dir), workdir / tag, zero, settings["ranks"], settings["micro_batch"],
                    settings["seq_len"], checkpointing, bool(settings.get("lora")), overrides,
                )  # fmt: skip
    if out:
        write_json(out, report)
    return report


def _zero3_config(workdir: Path) -> str:
    path = workdir / "ds_zero3_load.json"
    write_json(path, cpu_ds_config(3))
    return str(path)


def markdown_tables(report: dict[str, Any]) -> str:
    lines = []
    if report["load"]:
        lines += [
            "| checkpoint (MiB) | ranks | loader | peak growth per rank while loading (MiB) |",
            "|---:|---:|---|---|",
        ]
        for row in report["load"]:
            for loader, peaks in row["loaders"].items():
                peaks_text = ", ".join(f"{p:.0f}" for p in peaks)
                lines.append(f"| {row['checkpoint_mib']:.0f} | {row['ranks']} | {loader} | {peaks_text} |")
        lines.append("")
    lines += [
        "| model (MiB) | ZeRO | ranks | checkpointing | stage | measured peak (MiB) | `trace-ds plan` (MiB) | error |",
        "|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for row in report["plan"]:
        lines.append(
            f"| {row['model_mib']:.0f} | {row['zero']} | {row['ranks']} | {'yes' if row['checkpointing'] else 'no'} | "
            f"{row['stage']} | {row['measured_mib']:.0f} | {row['planned_mib']:.0f} | {row['error']:+.0%} |"
        )
    return "\n".join(lines)
