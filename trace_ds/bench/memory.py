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
import sys
from pathlib import Path
from typing import Any

import torch

from trace_ds.io import TraceError, free_port, write_json
from trace_ds.memory import MIB, MemoryMeter

LOADERS = ("trace-ds", "transformers")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def checkpoint_mib(model_dir: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / MIB


def _transformers_load(name: str, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from trace_ds.models import DTYPES

    return AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])


def _import_model_class(name: str) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(name))]


def _verify_against_checkpoint(model: torch.nn.Module, name: str) -> int:
    """Gather each parameter in turn and compare it with the checkpoint tensor; returns how many matched."""
    import deepspeed
    from safetensors import safe_open

    from trace_ds.partitioned import SafetensorsReader, _checkpoint_key, safetensors_weight_map

    weight_map = safetensors_weight_map(name) or {}
    prefix = getattr(model, "base_model_prefix", "model")
    checked = 0
    for tensor_name, param in model.named_parameters():
        key = _checkpoint_key(tensor_name, weight_map, prefix)
        if key is None:
            raise TraceError(f"{name}: no checkpoint tensor for {tensor_name}")
        with deepspeed.zero.GatheredParameters([param]), safe_open(str(weight_map[key]), "pt") as handle:
            expected = handle.get_tensor(key).to(param.dtype)
            if not torch.equal(param.detach().cpu(), expected):
                raise TraceError(f"{name}: {tensor_name} differs from the checkpoint after partitioned loading")
            reader = SafetensorsReader(weight_map[key])
            try:
                if not torch.equal(reader.tensor(key), handle.get_tensor(key)):
                    raise TraceError(f"{weight_map[key]}: {key} read differently from safetensors' own reader")
            finally:
                reader.close()
        checked += 1
    return checked


def measure_load(model: str, deepspeed: str, loader: str, dtype: str, out: str, verify: bool) -> None:
    """One rank of a loading measurement: the peak memory growth from building the model partitioned and
    filling it from the checkpoint. Rank 0 writes every rank's record to ``out``."""
    from trace_ds.engine import strategy_for
    from trace_ds.models import load_causal_lm

    with strategy_for(deepspeed, 1, dtype, stage=f"load:{loader}") as strategy:
        _import_model_class(model)  # a fixed cost that is not loading: keep it out of the measurement
        meter = MemoryMeter.start(strategy.device)
        loaded = load_causal_lm(model, dtype) if loader == "trace-ds" else _transformers_load(model, dtype)
        record = meter.record(rank=strategy.rank, world_size=strategy.world_size, loader=loader)
        if verify:
            record["verified_tensors"] = _verify_against_checkpoint(loaded, model)
        records = strategy.all_gather_object(record)
        if strategy.is_main:
            write_json(out, {"model": model, "checkpoint_mib": checkpoint_mib(model), "ranks": records})


def launch(args: list[str], ranks: int, env: dict[str, str], log: Path, timeout_s: float = 900) -> None:
    """``deepspeed --num_gpus ranks trace-ds ARGS`` (or one plain process), output to ``log``."""
    bin_dir = Path(sys.executable).parent
    trace_ds = str(bin_dir / "trace-ds")
    if ranks > 1:
        command = [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
        command += [trace_ds, *args]
    else:
        command = [trace_ds, *args]
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
