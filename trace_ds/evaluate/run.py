"""``trace-ds eval``: preference metrics against the reference, perplexity, and TPA where a judge exists.

TPA needs a judge of the NEW policy. The synthetic benchmark's rule judge (trace_ds.synth.judge) knows only
the benchmark's own policy, so it is used only when the evaluated ``prompts.jsonl`` is the one
``trace-ds synth`` wrote: its canonical digest (trace_ds.synth.generator.prompts_digest) must equal the one
recorded in ``eval/manifest.json`` or in the benchmark's ``manifest.json`` one folder up. Anything else (your
own data, an edited copy of the benchmark) gets ``"tpa": null`` and the reason; judge the written
generations with `trace-ds judge run --generations` or `judge export` / `judge parse --generations`, then
`trace-ds tpa`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.config import DEFAULT_VOCAB_TILE, check_logp_reduction, check_vocab_tile
from trace_ds.data.pairs import pair_from_record, read_pairs
from trace_ds.data.tokenize import TokenizeConfig
from trace_ds.evaluate.metrics import (
    HeadSettings,
    generate,
    perplexity,
    preference_metrics,
    target_policy_agreement,
)
from trace_ds.io import TraceError, iter_jsonl, read_json, write_json, write_jsonl
from trace_ds.judge.verdicts import read_verdicts
from trace_ds.triage import triage
from trace_ds.vocab_head import check_head

NO_TPA = "TPA not computed: no judge for this policy"
NO_TPA_SHORT = "not computed (no judge for this policy)"
TPA_HOW = (
    "judge the generations: `trace-ds judge run --generations G --model JUDGE --policy NEW_POLICY --out V` "
    "(or `judge export --generations` / `judge parse --generations` with an external judge), "
    "then `trace-ds tpa --generations G --verdicts V --out TPA.json`"
)


@dataclass(frozen=True)
class TpaJudge:
    """Which judge scores TPA in `trace-ds eval`: ``name`` is ``synth-rule`` or None (no judge); ``reason``
    says why (the marker that matched, or what did not)."""

    name: str | None
    reason: str
    prompts_sha256: str


def tpa_judge_for(folder: str | Path) -> TpaJudge:
    """The rule judge when ``folder/prompts.jsonl`` is exactly (canonically) the synthetic benchmark's eval
    prompts, as recorded by `trace-ds synth` in ``folder/manifest.json`` (kept by a copy of the folder) or in
    ``folder/../manifest.json`` (the benchmark's own). A ``shifted`` field, a topic or a file name is no proof."""
    from trace_ds.synth.generator import EVAL_FORMAT, FILES, FORMAT, prompts_digest
    from trace_ds.synth.judge import JUDGE_NAME

    folder = Path(folder)
    prompts = folder / "prompts.jsonl"
    digest = prompts_digest(record for _, record in iter_jsonl(prompts))
    candidates: list[tuple[Path, str | None]] = []
    for marker in (folder / "manifest.json", folder.parent / FILES["manifest"]):
        manifest = _read_manifest(marker)
        if manifest is None:
            continue
        if manifest.get("format") == EVAL_FORMAT:
            candidates.append((marker, manifest.get("prompts_sha256")))
        elif manifest.get("format") == FORMAT:
            eval_prompts = (manifest.get("files") or {}).get("eval_prompts")
            if eval_prompts and _same_file(marker.parent / eval_prompts, prompts):
                candidates.append((marker, (manifest.get("tpa_judge") or {}).get("prompts_sha256")))
    for marker, recorded in candidates:
        if recorded == digest:
            return TpaJudge(JUDGE_NAME, f"{prompts} matches the digest recorded in {marker}", digest)
    if not candidates:
        reason = f"no synthetic-benchmark manifest for {folder} (the rule judge knows only that benchmark's policy)"
    elif all(recorded is None for _, recorded in candidates):
        reason = (
            f"{candidates[0][0]} records no prompt digest (a benchmark from before trace-ds recorded one: "
            "rebuild it with `trace-ds synth`)"
        )
    else:
        reason = f"{prompts} differs from the synthetic benchmark's recorded prompts ({candidates[0][0]})"
    return TpaJudge(None, reason, digest)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (TraceError, OSError, UnicodeDecodeError):  # unreadable: not a marker (BadRecord is a TraceError)
        return None
    return manifest if isinstance(manifest, dict) else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def tpa_summary(metrics: dict[str, Any]) -> float | str | None:
    """Overall TPA for a one-line summary (the pipeline's eval stages), or why there is none."""
    return metrics["tpa"]["all"]["tpa"] if metrics.get("tpa") else NO_TPA_SHORT


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and on what. ``data`` is an evaluation folder laid out like the synthetic benchmark's
    ``eval/``: ``pairs.jsonl`` + ``verdicts.jsonl`` (held-out pairs, triaged here), ``prompts.jsonl``
    (held-out prompts to generate from, with ``shifted``; TPA on them only with a judge, see
    :func:`tpa_judge_for`), ``general.txt`` (held-out text for perplexity)."""

    model: str
    reference: str
    data: str
    out: str
    max_prompts: int | None = None
    max_new_tokens: int = 48
    batch_size: int = 16
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    beta: float = 0.1
    relational: str = "ipo"
    dtype: str = "float32"
    exclude: tuple[str, ...] = ()  # pair files whose prompts must not be evaluated (training set, probe)
    deepspeed: str | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    vocab_tile: int = DEFAULT_VOCAB_TILE
    logp_reduction: str = "sum"

    def __post_init__(self) -> None:
        check_vocab_tile(self.vocab_tile)
        check_logp_reduction(self.logp_reduction)
        folder = Path(self.data)
        missing = [
            name
            for name in ("pairs.jsonl", "verdicts.jsonl", "prompts.jsonl")
            if not (folder / name).exists()
        ]
        if missing:
            raise TraceError(
                f"--data {self.data}: missing {', '.join(missing)} (see docs/formats.md, evaluation folder)"
            )
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise TraceError(f"--deepspeed {self.deepspeed}: no such file (see ds_configs/)")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise TraceError("--max-new-tokens and --batch-size must be at least 1")


def prompt_key(prompt: Any) -> str:
    """Prompts compared for deduplication: text (a conversation as its transcript), case and spaces folded."""
    from trace_ds.data.tokenize import plain_transcript

    text = (
        prompt
        if isinstance(prompt, str)
        else plain_transcript(prompt)
        if isinstance(prompt, list)
        else str(prompt)
    )
    return " ".join(text.lower().split())


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """One process, or every rank of a ``deepspeed`` launch (sharded, the same calls on every rank, results
    gathered; rank 0 writes). Returns the metrics (on every rank)."""
    from trace_ds.engine import strategy_for

    with strategy_for(config.deepspeed, config.batch_size, config.dtype, "eval") as strategy:
        return _run_eval(config, strategy)


def _run_eval(config: EvalConfig, strategy: Any) -> dict[str, Any]:
    from trace_ds.console import console
    from trace_ds.fingerprint import environment_fingerprint
    from trace_ds.models import load_causal_lm, load_tokenizer, pad_token_id
    from trace_ds.synth.judge import violates

    started = time.perf_counter()
    folder = Path(config.data)
    judge = tpa_judge_for(folder)
    tokenizer = load_tokenizer(config.model, required=True)
    model = strategy.prepare_inference(load_causal_lm(config.model, config.dtype))
    reference = strategy.prepare_reference(load_causal_lm(config.reference, config.dtype))
    check_head(model, config.vocab_tile)
    pad_id = pad_token_id(tokenizer, model)

    seen = {prompt_key(p.prompt) for source in config.exclude for p in read_pairs(source).pairs}
    held_out = triage(
        read_pairs(folder / "pairs.jsonl").pairs, read_verdicts(folder / "verdicts.jsonl").by_id
    )
    all_pairs = [pair_from_record(record) for record in held_out.records]
    pairs = [p for p in all_pairs if prompt_key(p.prompt) not in seen]
    preference = preference_metrics(
        model,
        reference,
        pairs,
        tokenizer,
        config.tokenize,
        pad_id,
        config.batch_size,
        HeadSettings(config.beta, config.relational, config.vocab_tile, config.logp_reduction),
        strategy,
    )

    every_prompt = [record for _, record in iter_jsonl(folder / "prompts.jsonl")]
    unique: dict[str, dict[str, Any]] = {}
    for record in every_prompt:
        unique.setdefault(prompt_key(record["prompt"]), record)
    prompts = [r for key, r in unique.items() if key not in seen][: config.max_prompts]
    overlap = {
        "excluded_sources": list(config.exclude),
        "eval_pairs_sharing_a_prompt_with_them": len(all_pairs) - len(pairs),
        "eval_prompts_seen_in_them": sum(1 for key in unique if key in seen),
        "duplicate_eval_prompts": len(every_prompt) - len(unique),
    }
    responses = generate(
        model, tokenizer, [p["prompt"] for p in prompts], config.max_new_tokens, config.batch_size,
        config.sample, config.temperature, config.seed, strategy,
    )  # fmt: skip
    if judge.name is not None:
        tpa: dict[str, Any] | None = target_policy_agreement(prompts, responses, violates)
        compliant: list[bool | None] = [
            not violates(p["prompt"], r) for p, r in zip(prompts, responses, strict=True)
        ]
    else:
        tpa, compliant = None, [None] * len(prompts)  # unknown, never guessed
    generations = Path(config.out).with_name(f"{Path(config.out).stem}.generations.jsonl")
    if strategy.is_main:
        write_jsonl(
            generations,
            (
                {
                    "id": p["id"],
                    "prompt": p["prompt"],
                    "response": r,
                    "compliant": ok,
                    "shifted": p.get("shifted"),
                }
                for p, r, ok in zip(prompts, responses, compliant, strict=True)
            ),
        )
        if judge.name is None:
            console.print(
                f"{NO_TPA} ({judge.reason}); to score it, {TPA_HOW}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    general = folder / "general.txt"
    texts = (
        [line for line in general.read_text(encoding="utf-8").split("\n\n") if line.strip()]
        if general.exists()
        else []
    )
    metrics = {
        "model": config.model,
        "reference": config.reference,
        "data": config.data,
        "preference": preference,
        "overlap": overlap,
        "tpa": tpa,
        "tpa_judge": judge.name,
        "tpa_note": NO_TPA if judge.name is None else None,
        "tpa_judge_reason": judge.reason,
        "prompts_sha256": judge.prompts_sha256,
        "generation": {
            "sample": config.sample,
            "temperature": config.temperature,
            "seed": config.seed,
            "max_new_tokens": config.max_new_tokens,
        },
        "perplexity": {
            "model": perplexity(
                model, tokenizer, texts, config.batch_size, strategy=strategy, vocab_tile=config.vocab_tile
            ),
            "reference": perplexity(
                reference,
                tokenizer,
                texts,
                config.batch_size,
                strategy=strategy,
                vocab_tile=config.vocab_tile,
            ),
            "texts": len(texts),
        }
        if texts
        else None,
        "generations": str(generations),
        "world_size": strategy.world_size,
        "seconds": round(time.perf_counter() - started, 2),
        "environment": environment_fingerprint(),
    }
    if strategy.is_main:
        write_json(config.out, metrics)
    return metrics
