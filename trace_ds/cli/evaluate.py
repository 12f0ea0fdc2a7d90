"""Evaluation commands: ``eval`` (preference metrics, TPA, perplexity) and ``tpa`` (from a judge's verdicts)."""

from __future__ import annotations

from typing import Any

import click

from trace_ds.cli.options import (
    deepspeed_option,
    is_rank_zero,
    logp_reduction_option,
    path_option,
    tokenize_config_from,
    tokenize_options,
    vocab_tile_option,
)
from trace_ds.console import console, key_value_table


@click.command("eval")
@click.option("--model", required=True, help="The model to evaluate (folder or hub id).")
@click.option(
    "--reference",
    required=True,
    help="The model before realignment (margins, KL and perplexity are relative to it).",
)
@path_option("--data", "Evaluation folder (e.g. a synthetic benchmark's eval/).", folder=True, exists=True)
@path_option("--out", "Metrics JSON to write.")
@click.option("--max-prompts", type=int, default=None, help="Use only the first N held-out prompts for TPA.")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding (seeded).")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--beta", default=0.1, show_default=True)
@click.option("--relational", type=click.Choice(["ipo", "dpo"]), default="ipo", show_default=True)
@click.option(
    "--exclude",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Pairs (training set, probe) whose prompts are dropped from evaluation; overlaps are reported. Repeatable.",
)
@deepspeed_option(
    "DeepSpeed config: shard the evaluation over the launched ranks (ZeRO-3 partitioned models)."
)
@logp_reduction_option
@vocab_tile_option
@tokenize_options
def eval_command(exclude: tuple[str, ...], deepspeed_config: str | None, **options: Any) -> None:
    """Preference accuracy per category, TPA (with 95% intervals) and perplexity, against the reference.

    TPA is computed here only on the synthetic benchmark's own prompts (its rule judge); for any other data
    judge the written generations: `trace-ds judge run --generations` (a local model) or `judge export` /
    `judge parse --generations` (an external judge), then `trace-ds tpa`."""
    from trace_ds.evaluate.run import NO_TPA_SHORT, EvalConfig, run_eval

    config = EvalConfig(
        exclude=exclude, deepspeed=deepspeed_config, tokenize=tokenize_config_from(options), **options
    )
    metrics = run_eval(config)
    if metrics.get("world_size", 1) > 1 and not is_rank_zero():
        return
    rows = {f"preference: {k}": v for k, v in metrics["preference"].items() if not isinstance(v, dict)}
    if metrics["tpa"] is None:
        rows["TPA"] = NO_TPA_SHORT
    else:
        rows.update(
            {
                f"TPA {name}": f"{v['tpa']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] n={v['prompts']}"
                for name, v in metrics["tpa"].items()
                if v["prompts"]
            }
        )
        rows["TPA judge"] = metrics["tpa_judge"]
    if metrics["perplexity"]:
        rows.update(
            {
                "perplexity (model)": metrics["perplexity"]["model"],
                "perplexity (reference)": metrics["perplexity"]["reference"],
            }
        )
    console.print(key_value_table(f"Evaluation of {config.model}", rows))


@click.command("tpa")
@path_option("--generations", "Generations from `trace-ds eval`.", exists=True)
@path_option("--verdicts", "`judge parse --generations` output.", exists=True)
@path_option("--out", "TPA JSON to write.")
def tpa_command(generations: str, verdicts: str, out: str) -> None:
    """Target-policy agreement from an external judge's verdicts on the generations (unjudged ones excluded and counted)."""
    from trace_ds.evaluate.metrics import tpa_from_verdicts
    from trace_ds.io import iter_jsonl, write_json
    from trace_ds.judge.verdicts import read_verdicts

    records = [record for _, record in iter_jsonl(generations)]
    result = tpa_from_verdicts(records, read_verdicts(verdicts).by_id)
    write_json(out, result)
    rows = {
        f"TPA {name}": f"{v['tpa']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] n={v['prompts']}"
        for name, v in result["tpa"].items()
        if v["prompts"]
    }
    console.print(key_value_table("Target-policy agreement", {**rows, "unjudged": result["unjudged"]}))


COMMANDS = [eval_command, tpa_command]
