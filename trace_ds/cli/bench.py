"""Runtime tools: ``plan`` (memory per rank), ``ds-configs`` (the shipped DeepSpeed configs), ``bench``."""

from __future__ import annotations

import sys
from typing import Any

import click

from trace_ds.cli.options import (
    deepspeed_option,
    lora_config_from,
    lora_options,
    path_option,
    report_json_option,
    vocab_tile_option,
)
from trace_ds.console import console
from trace_ds.io import TraceError


@click.command("plan")
@click.option(
    "--model", required=True, help="Model folder, config.json, or hub id (only the config is read)."
)
@click.option(
    "--ranks", default=1, type=click.IntRange(min=1), show_default=True, help="Ranks (GPUs) per node."
)
@click.option("--nodes", default=1, type=click.IntRange(min=1), show_default=True)
@click.option("--zero", type=click.IntRange(0, 3), default=3, show_default=True, help="ZeRO stage.")
@click.option("--offload", is_flag=True, help="Optimizer states (and ZeRO-3 parameters) in host memory.")
@click.option("--offload-reference", is_flag=True, help="As `train --offload-reference` (ZeRO-3).")
@click.option(
    "--micro-batch",
    default=4,
    type=click.IntRange(min=1),
    show_default=True,
    help="Pairs per micro-batch per rank.",
)
@click.option(
    "--seq-len",
    default=1024,
    type=click.IntRange(min=2),
    show_default=True,
    help="Tokens per sequence (prompt + response).",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16", show_default=True
)
@click.option(
    "--device-gib", type=float, help="Device memory per rank; the plan says whether each stage fits."
)
@click.option(
    "--reserve-gib",
    default=2.0,
    show_default=True,
    help="Runtime memory outside tensors (CUDA context, NCCL).",
)
@deepspeed_option("Read ZeRO knobs (buckets, live parameters) from this config.", "deepspeed")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the plan as JSON (bytes).")
@vocab_tile_option
@lora_options
def plan_command(model: str, deepspeed: str | None, json_out: str | None, **options: Any) -> None:
    """Memory per rank for scoring and training, from the model config alone (no weights are loaded)."""
    from trace_ds.io import write_json
    from trace_ds.runtime.plan import PlanSettings, model_shape, plan, render

    lora = lora_config_from(options)
    ds_config: dict[str, Any] = {}
    if deepspeed:
        from trace_ds.runtime.engine import load_ds_config

        ds_config = load_ds_config(deepspeed, options["micro_batch"], dtype=options["dtype"])
        zero_section = ds_config.get("zero_optimization", {})
        stage = zero_section.get("stage")
        if stage is not None and int(stage) != options["zero"]:
            raise TraceError(f"--deepspeed {deepspeed} is ZeRO-{stage} but --zero is {options['zero']}")
    settings = PlanSettings(
        ranks_per_node=options["ranks"], nodes=options["nodes"], zero=options["zero"], offload=options["offload"],
        offload_reference=options["offload_reference"],
        micro_batch=options["micro_batch"], seq_len=options["seq_len"], dtype=options["dtype"],
        device_gib=options["device_gib"], reserve_gib=options["reserve_gib"], ds_config=ds_config,
        vocab_tile=options["vocab_tile"],
    )  # fmt: skip
    if options["offload"] and options["zero"] == 0:
        raise TraceError("--offload needs ZeRO 1-3 (DeepSpeed offloads partitioned optimizer states)")
    if options["offload_reference"] and options["zero"] != 3:
        raise TraceError("--offload-reference needs --zero 3 (only ZeRO-3 partitions the reference)")
    result = plan(model_shape(model, lora), settings)
    console.print(render(result, settings), highlight=False, markup=False, soft_wrap=True)
    if json_out:
        write_json(json_out, result)


@click.command("ds-configs")
def ds_configs_command() -> None:
    """The DeepSpeed configs shipped with trace-ds: pass a name to --deepspeed (e.g. --deepspeed zero3)."""
    from trace_ds.runtime.deepspeed_configs import describe, shipped_configs

    for name, path in shipped_configs().items():  # plain stdout lines: a script may read them
        click.echo(f"{name}\t{describe(name, path)}\t{path}")


@click.group()
def bench() -> None:
    """Benchmarks (each arm in its own process; run with nothing else on the machine)."""


@bench.command("scoring")
@click.option(
    "--family",
    default="llama",
    show_default=True,
    help="Model family: a model type of trace_ds.models.tiny.FAMILIES (mixtral, qwen3_moe, qwen3, gemma2, ...), built "
    "from transformers' own classes with random weights at this width and depth.",
)
@click.option(
    "--experts",
    default=8,
    show_default=True,
    help="MoE families: experts per layer (top 2, each half the MLP).",
)
@click.option("--layers", default=4, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--vocab", default=8192, show_default=True)
@click.option("--pairs", "n_pairs", default=64, show_default=True)
@click.option(
    "--tokens", default=128, show_default=True, help="Tokens per sequence (prompt + response), about."
)
@click.option("--batch", default=16, show_default=True, help="Pairs per micro-batch (ghost and floor arms).")
@click.option("--probe", default=16, show_default=True, help="Probe pairs.")
@click.option("--threads", default=2, show_default=True, help="torch threads per arm.")
@click.option("--seed", default=0, show_default=True)
@click.option("--arms", default="floor,ghost,ghost+norms,per-pair,reference-code", show_default=True)
@click.option("--workdir", default="runs/bench_scoring", show_default=True, type=click.Path(file_okay=False))
@report_json_option
def bench_scoring(n_pairs: int, arms: str, out: str | None, **settings: Any) -> None:
    """Ghost scorer vs per-pair methods vs a plain forward + backward: pairs/s, ratios, peak memory."""
    import shlex

    from trace_ds.bench.scoring import ARMS, markdown_table, run_benchmark
    from trace_ds.models.tiny import FAMILIES

    if settings["family"] not in FAMILIES:
        raise TraceError(f"--family {settings['family']!r}: choose one of {', '.join(sorted(FAMILIES))}")
    chosen = tuple(a.strip() for a in arms.split(",") if a.strip())
    unknown = [a for a in chosen if a not in ARMS]
    if unknown:
        raise TraceError(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    report = run_benchmark({**settings, "pairs": n_pairs}, chosen, out)
    console.print(markdown_table(report), highlight=False, soft_wrap=True)
    console.print(
        f"score agreement vs ghost (max |diff| / max |score|): {report['max_relative_score_difference_vs_ghost']}"
    )
    console.print("command: trace-ds " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


@bench.command("train")
@click.option("--layers", default=4, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--vocab", default=8192, show_default=True)
@click.option("--pairs", "n_pairs", default=64, show_default=True)
@click.option(
    "--tokens", default=256, show_default=True, help="Tokens per sequence (prompt + response), about."
)
@click.option("--micro-batch", default=8, show_default=True)
@click.option(
    "--steps", default=8, show_default=True, help="Optimizer steps (the first is warm-up, not timed)."
)
@click.option("--zero", default=0, show_default=True, help="ZeRO stage of the speed comparison.")
@click.option("--ranks", default=1, show_default=True, help="Processes of the speed comparison.")
@click.option("--repeats", default=1, show_default=True, help="Speed runs per arm (interleaved).")
@click.option("--threads", default=2, show_default=True)
@click.option("--arms", default="trace-ds,trl", show_default=True)
@click.option(
    "--memory/--no-memory",
    default=True,
    show_default=True,
    help="Also the peak-memory matrix (ZeRO 2/3 x 1/2 ranks).",
)
@click.option("--workdir", default="runs/bench_train", show_default=True, type=click.Path(file_okay=False))
@report_json_option
def bench_train(n_pairs: int, arms: str, out: str | None, **settings: Any) -> None:
    """trace-ds training tokens/s vs TRL's DPOTrainer on the same work, and peak memory per rank."""
    import shlex

    from trace_ds.bench.train import markdown_tables, run_train_benchmark

    chosen = [a.strip() for a in arms.split(",") if a.strip()]
    try:
        report = run_train_benchmark({**settings, "pairs": n_pairs, "arms": chosen}, out)
    except (ValueError, RuntimeError) as err:
        raise TraceError(str(err)) from err
    console.print(markdown_tables(report), highlight=False, soft_wrap=True, markup=False)
    console.print("command: trace-ds " + " ".join(shlex.quote(a) for a in sys.argv[1:]), markup=False)


@bench.command("memory")
@click.option("--layers", default="4,16", show_default=True, help="Model depths to build (same width).")
@click.option("--hidden", default=512, show_default=True)
@click.option("--vocab", default=8000, show_default=True)
@click.option("--zero", default="2,3", show_default=True, help="ZeRO stages to compare.")
@click.option("--ranks", default=2, show_default=True)
@click.option("--micro-batch", default=4, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option(
    "--checkpointing/--no-checkpointing",
    default=False,
    show_default=True,
    help="Also with gradient checkpointing.",
)
@click.option("--lora", is_flag=True, help="Only the plan rows, with LoRA adapters (scoring and training).")
@click.option(
    "--reduce-bucket-size",
    type=float,
    default=None,
    help="DeepSpeed's reduce_bucket_size (elements) for every launch and its plan row. Default: DeepSpeed's.",
)
@click.option("--workdir", default="runs/bench_memory", show_default=True, type=click.Path(file_okay=False))
@report_json_option
def bench_memory(layers: str, zero: str, out: str | None, **settings: Any) -> None:
    """Peak memory per rank while loading (trace-ds vs transformers' loader), and `trace-ds plan` against the
    measured peaks of real score and train runs."""
    import shlex

    from trace_ds.bench.memory import markdown_tables, run_memory_benchmark

    parsed = {"layers": [int(x) for x in layers.split(",")], "zero": [int(x) for x in zero.split(",")]}
    report = run_memory_benchmark({**settings, **parsed}, out)
    console.print(markdown_tables(report), highlight=False, soft_wrap=True, markup=False)
    console.print("command: trace-ds " + " ".join(shlex.quote(a) for a in sys.argv[1:]), markup=False)


@bench.command("load")
@click.option("--model", required=True, help="Model folder (safetensors) or hub id.")
@deepspeed_option("DeepSpeed config (ZeRO-3).", "deepspeed")
@click.option(
    "--loader", type=click.Choice(["trace-ds", "transformers"]), default="trace-ds", show_default=True
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
@click.option(
    "--verify", is_flag=True, help="Afterwards, gather every weight and compare with the checkpoint."
)
@path_option("--out", "JSON report (rank 0 writes it).")
def bench_load(model: str, deepspeed: str | None, loader: str, dtype: str, verify: bool, out: str) -> None:
    """One launch of the loading-memory measurement: peak memory growth per rank while the model loads."""
    from trace_ds.bench.memory import measure_load

    measure_load(model, deepspeed, loader, dtype, out, verify)


COMMANDS = [plan_command, ds_configs_command, bench]
