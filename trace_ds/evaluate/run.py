"""``trace-ds eval``: preference metrics against the reference, perplexity, and TPA where a judge exists.

TPA needs a judge of the NEW policy. trace-ds has two rule judges, each knowing only its own data's policy:
the synthetic benchmark's (trace_ds.synth.judge) and the real-model scenario's
(trace_ds.synth.real_scenario, `trace-ds demo --real`). One is used only when the evaluated
``prompts.jsonl`` is the one its generator wrote: its canonical digest (trace_ds.synth.generator.prompts_digest)
must equal the one recorded in ``eval/manifest.json`` or in the data's ``manifest.json`` one folder up, and
the manifest's ``format`` says which judge (:data:`EVAL_MARKERS`, :data:`DATA_MARKERS`). Anything else (your
own data, an edited copy) gets ``"tpa": null`` and the reason; judge the written generations with
`trace-ds judge run --generations` or `judge export` / `judge parse --generations`, then `trace-ds tpa`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.config import (
    DEFAULT_VOCAB_TILE,
    check_logp_reduction,
    check_model_source,
    check_vocab_tile,
    resolve_deepspeed_option,
)
from trace_ds.data.chat import prompt_key
from trace_ds.data.pairs import pair_from_record, read_pairs
from trace_ds.data.tokenize import TokenizeConfig
from trace_ds.evaluate.degeneracy import degenerate_reason
from trace_ds.evaluate.metrics import (
    HeadSettings,
    generate,
    nll_totals,
    perplexity,
    perplexity_of,
    preference_metrics,
    target_policy_agreement,
)
from trace_ds.io import TraceError, iter_jsonl, read_json, write_json, write_jsonl
from trace_ds.judge.triage import triage
from trace_ds.judge.verdicts import read_verdicts
from trace_ds.training.vocab_head import check_head

NO_TPA = "TPA not computed: no judge for this policy"
PERPLEXITY_GROUPS = ("stable", "shifted")  # general_<group>.txt in an evaluation folder (optional)
NO_TPA_SHORT = "not computed (no judge for this policy)"
TPA_HOW = (
    "judge the generations: `trace-ds judge run --generations G --model JUDGE --policy NEW_POLICY --out V` "
    "(or `judge export --generations` / `judge parse --generations` with an external judge), "
    "then `trace-ds tpa --generations G --verdicts V --out TPA.json`"
)


@dataclass(frozen=True)
class TpaJudge:
    """Which judge scores TPA in `trace-ds eval`: ``name`` is a rule judge's name (:func:`rule_judge`) or None
    (no judge); ``reason`` says why (the marker that matched, or what did not)."""

    name: str | None
    reason: str
    prompts_sha256: str


def _markers() -> tuple[dict[str, str], dict[str, str]]:
    """(eval-folder manifest format -> judge name, data manifest format -> judge name)."""
    from trace_ds.synth import generator, judge, real_scenario

    return (
        {generator.EVAL_FORMAT: judge.JUDGE_NAME, real_scenario.EVAL_FORMAT: real_scenario.JUDGE_NAME},
        {generator.FORMAT: judge.JUDGE_NAME, real_scenario.FORMAT: real_scenario.JUDGE_NAME},
    )


def _rule_judges() -> dict[str, Any]:
    """Every rule judge's module (``JUDGE_NAME``, ``JUDGE_VERSION``, ``violates``), by judge name."""
    from trace_ds.synth import judge, real_scenario

    return {module.JUDGE_NAME: module for module in (judge, real_scenario)}


def judge_versions() -> dict[str, int]:
    """Each rule judge's version: part of the evaluation stages' cache keys, so a changed rule re-judges."""
    return {name: module.JUDGE_VERSION for name, module in _rule_judges().items()}


def rule_judge(name: str) -> Callable[[Any, str], bool]:
    """The ``violates(prompt, response)`` function of the rule judge called ``name``."""
    judges = _rule_judges()
    if name not in judges:
        raise TraceError(f"no rule judge called {name!r}; known: {', '.join(sorted(judges))}")
    return judges[name].violates


def tpa_judge_for(folder: str | Path) -> TpaJudge:
    """A rule judge when ``folder/prompts.jsonl`` is exactly (canonically) the eval prompts its generator wrote
    (`trace-ds synth`, or the real-model scenario of `trace-ds demo --real`), as recorded in
    ``folder/manifest.json`` (kept by a copy of the folder) or in ``folder/../manifest.json`` (the data's own);
    the manifest's format names the judge. A ``shifted`` field, a topic or a file name is no proof."""
    from trace_ds.synth.generator import prompts_digest

    eval_markers, data_markers = _markers()
    folder = Path(folder)
    prompts = folder / "prompts.jsonl"
    digest = prompts_digest(record for _, record in iter_jsonl(prompts))
    candidates: list[tuple[Path, str | None, str]] = []
    for marker in (folder / "manifest.json", folder.parent / "manifest.json"):
        manifest = _read_manifest(marker)
        if manifest is None:
            continue
        kind = manifest.get("format")
        if kind in eval_markers:
            candidates.append((marker, manifest.get("prompts_sha256"), eval_markers[kind]))
        elif kind in data_markers:
            eval_prompts = (manifest.get("files") or {}).get("eval_prompts")
            if eval_prompts and _same_file(marker.parent / eval_prompts, prompts):
                recorded = (manifest.get("tpa_judge") or {}).get("prompts_sha256")
                candidates.append((marker, recorded, data_markers[kind]))
    for marker, recorded, name in candidates:
        if recorded == digest:
            return TpaJudge(name, f"{prompts} matches the digest recorded in {marker}", digest)
    if not candidates:
        reason = (
            f"no synthetic-benchmark manifest (nor a real-scenario one) for {folder} (the rule judges know only "
            "their own data's policies)"
        )
    elif all(recorded is None for _, recorded, _ in candidates):
        reason = (
            f"{candidates[0][0]} records no prompt digest (a benchmark from before trace-ds recorded one: "
            "rebuild it with `trace-ds synth`)"
        )
    else:
        reason = f"{prompts} differs from the recorded prompts of its data ({candidates[0][0]})"
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


def read_documents(path: Path) -> list[str]:
    """The documents of a held-out text file, separated by blank lines; none when the file is missing."""
    if not path.exists():
        return []
    return [doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]


def perplexity_metrics(
    model: Any, reference: Any, tokenizer: Any, folder: Path, batch_size: int, strategy: Any, vocab_tile: int
) -> dict[str, Any] | None:
    """``{"model", "reference", "texts"}``: perplexity of model and reference on ``folder/general.txt`` (None
    without text there), plus the same under ``stable`` / ``shifted`` for each ``general_<group>.txt`` that holds
    text (held-out text of the topics the new policy keeps, and of those it changes). When the two group files
    hold exactly general.txt's documents (the synthetic benchmark's, the real-model scenario's), the overall
    figure pools their NLL and token totals instead of a third pass over the same text."""
    texts = read_documents(folder / "general.txt")
    if not texts:
        return None
    groups = {group: read_documents(folder / f"general_{group}.txt") for group in PERPLEXITY_GROUPS}
    groups = {group: docs for group, docs in groups.items() if docs}
    pooled = len(groups) == len(PERPLEXITY_GROUPS) and Counter(texts) == Counter(
        doc for docs in groups.values() for doc in docs
    )
    result: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {group: {} for group in groups}
    for role, net in (("model", model), ("reference", reference)):
        totals = {
            group: nll_totals(net, tokenizer, docs, batch_size, strategy=strategy, vocab_tile=vocab_tile)
            for group, docs in groups.items()
        }
        result[role] = (
            perplexity_of(*totals.values())
            if pooled
            else perplexity(net, tokenizer, texts, batch_size, strategy=strategy, vocab_tile=vocab_tile)
        )
        for group, total in totals.items():
            parts[group][role] = perplexity_of(total)
    result["texts"] = len(texts)
    for group, entry in parts.items():
        result[group] = {**entry, "texts": len(groups[group])}
    return result


def tpa_summary(metrics: dict[str, Any]) -> float | str | None:
    """Overall TPA for a one-line summary (the pipeline's eval stages), or why there is none."""
    return metrics["tpa"]["all"]["tpa"] if metrics.get("tpa") else NO_TPA_SHORT


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and on what. ``data`` is an evaluation folder laid out like the synthetic benchmark's
    ``eval/``: ``pairs.jsonl`` + ``verdicts.jsonl`` (held-out pairs, triaged here), ``prompts.jsonl``
    (held-out prompts to generate from, with ``shifted``; TPA on them only with a judge, see
    :func:`tpa_judge_for`), ``general.txt`` (held-out text for perplexity) and, optionally,
    ``general_stable.txt`` / ``general_shifted.txt`` (its stable-topic and shifted-topic documents, each
    reported on its own: :func:`perplexity_metrics`)."""

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
        check_model_source(self.model)
        check_model_source(self.reference, "--reference")
        resolve_deepspeed_option(self)
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
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise TraceError("--max-new-tokens and --batch-size must be at least 1")


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """One process, or every rank of a ``deepspeed`` launch (sharded, the same calls on every rank, results
    gathered; rank 0 writes). Returns the metrics (on every rank)."""
    from trace_ds.runtime.engine import strategy_for

    with strategy_for(config.deepspeed, config.batch_size, config.dtype, "eval") as strategy:
        return _run_eval(config, strategy)


def _run_eval(config: EvalConfig, strategy: Any) -> dict[str, Any]:
    from trace_ds.console import console
    from trace_ds.models.loading import load_causal_lm, load_tokenizer, pad_token_id
    from trace_ds.runtime.fingerprint import environment_fingerprint

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
        violates = rule_judge(judge.name)
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
                    "degenerate": degenerate_reason(r),
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

    general = perplexity_metrics(
        model, reference, tokenizer, folder, config.batch_size, strategy, config.vocab_tile
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
        "perplexity": general,
        "generations": str(generations),
        "world_size": strategy.world_size,
        "seconds": round(time.perf_counter() - started, 2),
        "environment": environment_fingerprint(),
    }
    if strategy.is_main:
        write_json(config.out, metrics)
    return metrics
