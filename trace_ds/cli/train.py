"""Training commands: ``train`` (the hybrid update) and ``sft`` (the old model of the synthetic benchmark)."""

from __future__ import annotations

from typing import Any

import click

from trace_ds.cli.options import (
    deepspeed_option,
    logp_reduction_option,
    parse_proportions,
    path_option,
    tokenize_config_from,
    tokenize_options,
    vocab_tile_option,
)
from trace_ds.console import console, key_value_table


@click.command("train")
@click.option(
    "--model", required=True, help="The aligned model to realign (folder or hub id); also the reference."
)
@path_option("--triaged", "Triaged pairs JSONL.", exists=True)
@path_option("--scores", "Scores JSONL from trace-ds score.", exists=True)
@path_option("--out", "Run folder: checkpoints, metrics, final export.", folder=True)
@deepspeed_option("DeepSpeed JSON config; default: one process, ZeRO off.")
@click.option("--relational", type=click.Choice(["ipo", "dpo"]), default="ipo", show_default=True)
@click.option("--beta", default=0.1, show_default=True)
@click.option("--alpha-kl", default=1.0, show_default=True, help="Weight of the retention KL head.")
@click.option("--lr", default=1e-6, show_default=True)
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--warmup-ratio", default=0.1, show_default=True)
@click.option("--epochs", type=int, default=None, help="Passes over the data (default 1 unless --max-steps).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (cycles epochs as needed).")
@click.option("--micro-batch", default=4, show_default=True, help="Pairs per micro-batch per rank.")
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--buffer-size", default=1000, show_default=True, help="Shuffle buffer (records held in memory)."
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--lora", is_flag=True, help="Train the LoRA adapter saved by `trace-ds score --lora`.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--eval-pairs", type=click.Path(exists=True, dir_okay=False), help="Held-out triaged pairs.")
@click.option("--eval-every", type=int, default=None, help="Validate every N steps (with --eval-pairs).")
@click.option(
    "--best-metric",
    default="eval_loss",
    show_default=True,
    help="eval_loss, eval_inversion_accuracy or eval_inversion_margin.",
)
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (also on SIGTERM).")
@click.option(
    "--keep-last", default=2, show_default=True, help="Checkpoints kept (the best one is kept too)."
)
@click.option("--resume", is_flag=True, help="Continue exactly from the last checkpoint in --out.")
@click.option(
    "--export-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Default: the training dtype.",
)
@click.option("--merge-lora", is_flag=True, help="Also export the base model with the adapter merged.")
@click.option("--tensorboard", is_flag=True, help="Also log to <out>/tensorboard (needs tensorboard).")
@click.option(
    "--category-proportions",
    default=None,
    metavar="inversion=P,suppression=P,retention=P",
    help="Per-category batching (Algorithm 1): each step draws its pairs in these shares; needs --max-steps.",
)
@click.option(
    "--precompute-ref-logps",
    is_flag=True,
    help="Compute reference log-probs once; the KL head still runs the reference on retention rows.",
)
@click.option(
    "--offload-reference",
    is_flag=True,
    help="ZeRO-3: keep the reference engine's partitions in host memory (frees its device memory).",
)
@click.option(
    "--rescore-every",
    type=int,
    default=None,
    help="Every K steps, re-score every conflict pair at the current weights (probe pass included) and "
    "train on with the new weights; weight-0 pairs stay in the data (docs/method.md, 'In-run re-scoring').",
)
@logp_reduction_option
@vocab_tile_option
@tokenize_options
def train_command(
    deepspeed_config: str | None, epochs: int | None, max_steps: int | None, **options: Any
) -> None:
    """The hybrid update: IPO/DPO on inversions, NPO on suppressions, KL on retention, impact-weighted."""
    from trace_ds.config import TrainConfig
    from trace_ds.training.train import run_train

    if epochs is None and max_steps is None:
        epochs = 1
    options["category_proportions"] = parse_proportions(options.pop("category_proportions"))
    config = TrainConfig(
        deepspeed=deepspeed_config,
        epochs=epochs,
        max_steps=max_steps,
        tokenize=tokenize_config_from(options),
        **options,
    )
    summary = run_train(config)
    if summary.get("export"):
        console.print(
            key_value_table(
                f"Trained model in {config.out}",
                {k: v for k, v in summary["export"].items() if not isinstance(v, dict)},
            )
        )


@click.command("sft")
@click.option("--model", required=True, help="The model to fine-tune (folder or hub id).")
@click.option("--pairs", "pairs_source", required=True, help="Pairs whose chosen responses are the targets.")
@path_option("--out", "Folder for the fine-tuned model.", folder=True)
@click.option("--epochs", default=3, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
@vocab_tile_option
@tokenize_options
def sft_command(pairs_source: str, **options: Any) -> None:
    """Supervised fine-tuning on chosen responses (how the demo aligns a tiny model to the old policy)."""
    from trace_ds.training.sft import SFTConfig, run_sft

    run_sft(SFTConfig(pairs=pairs_source, tokenize=tokenize_config_from(options), **options))


COMMANDS = [train_command, sft_command]
