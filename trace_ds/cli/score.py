"""``trace-ds score``: impact scores of every pair against the policy probe."""

from __future__ import annotations

from typing import Any

import click

from trace_ds.cli.options import (
    deepspeed_option,
    logp_reduction_option,
    lora_config_from,
    lora_options,
    path_option,
    tokenize_config_from,
    tokenize_options,
    vocab_tile_option,
)
from trace_ds.config import DEFAULT_PROBE_SUPPRESSION, SUPPRESSION_SOURCES, ScoreConfig
from trace_ds.console import console, key_value_table


@click.command("score")
@click.option(
    "--model", required=True, help="A transformers causal-LM folder or hub id (the reference weights)."
)
@path_option("--triaged", "Triaged pairs JSONL.", exists=True)
@path_option("--out", "Scores JSONL to write.")
@click.option(
    "--probe",
    type=click.Path(exists=True, dir_okay=False),
    help="A curated probe file (pairs in new orientation).",
)
@click.option(
    "--probe-size", default=64, show_default=True, help="Probe pairs built by Algorithm 2 (without --probe)."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the built probe.")
@click.option("--probe-holdout", is_flag=True, help="Do not score the pairs the built probe was made from.")
@click.option("--relational", type=click.Choice(["ipo", "dpo"]), default="ipo", show_default=True)
@click.option("--beta", default=0.1, show_default=True)
@click.option(
    "--normalize", type=click.Choice(["per-category", "joint"]), default="per-category", show_default=True
)
@click.option(
    "--kernel",
    type=click.Choice(["auto", "triton", "torch"]),
    default="auto",
    show_default=True,
    help="auto: Triton on CUDA, torch on CPU.",
)
@click.option("--micro-batch", default=8, show_default=True, help="Pairs per forward/backward.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--allow-empty", is_flag=True, help="Continue when a conflict category has no positive score.")
@deepspeed_option("DeepSpeed JSON config for ZeRO-3 scoring over the launched ranks.")
@click.option(
    "--save-every", default=4, show_default=True, help="Micro-batches between partial-result saves."
)
@click.option("--on-bad-record", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute each layer in the backward: activations of one layer at a time (same scores).",
)
@click.option(
    "--g-dtype",
    type=click.Choice(["float32", "model"]),
    default="float32",
    show_default=True,
    help="Dtype G is kept and (ZeRO-3) gathered in while scoring: model = the model's bf16/fp16, half the bytes "
    "(error measured in docs/method.md); the Triton kernel uses the model's dtype either way.",
)
@click.option(
    "--score-metric",
    type=click.Choice(["dot", "cosine"]),
    default=ScoreConfig.score_metric,
    show_default=True,
    help="dot: <g_i, G> (the paper); cosine: divided by ||g_i|| ||G|| (exact ghost norms), so a pair is weighted "
    "by its gradient's direction, not its size.",
)
@click.option(
    "--weighting",
    default=ScoreConfig.weighting,
    show_default=True,
    help="Scores -> weights within each category, mean 1: paper (clamp at 0), standardized (max(w_min, 1 + alpha "
    "z)), prune:Q (drop the lowest fraction Q and negative scores, the rest uniform), uniform.",
)
@click.option("--weight-alpha", default=0.5, show_default=True, help="standardized: the slope alpha.")
@click.option("--weight-min", default=0.1, show_default=True, help="standardized: the floor w_min.")
@click.option(
    "--probe-normalize",
    type=click.Choice(["none", "unit"]),
    default=ScoreConfig.probe_normalize,
    show_default=True,
    help="unit: every probe pair's gradient scaled to norm 1 before it enters G (no pair dominates the probe).",
)
@click.option(
    "--probe-suppression",
    type=click.Choice(SUPPRESSION_SOURCES),
    default=None,
    help="The built probe's suppression third: pool (Algorithm 2: a compliant response from any prompt), "
    f"same-prompt (only a response judged compliant for that prompt), drop (none). Default: "
    f"{DEFAULT_PROBE_SUPPRESSION}; a --probe file is used as it is.",
)
@logp_reduction_option
@vocab_tile_option
@tokenize_options
@lora_options
def score_command(deepspeed_config: str | None, **options: Any) -> None:
    """Impact scores of inversion and suppression pairs (ghost dot products; resumable)."""
    from trace_ds.scoring.scorer import run_score

    config = ScoreConfig(
        deepspeed=deepspeed_config,
        lora=lora_config_from(options),
        tokenize=tokenize_config_from(options),
        **options,
    )
    meta = run_score(config)
    if meta:
        console.print(
            key_value_table(
                f"Scores written to {config.out}", {k: v for k, v in meta.items() if not isinstance(v, dict)}
            )
        )


COMMANDS = [score_command]
