"""Stage 2: impact scores s_i = <grad L_i, grad J> at the reference weights, with ghost dot products.

One batched forward + backward per micro-batch computes every pair's score at once (pairs do not interact);
no per-pair gradient is ever formed. At theta_ref the policy is the reference, so the reference log-probs
are the policy's own, detached: r = logp - logp.detach() is 0 in value with the right gradient, and no
second model is needed.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trace_ds.config import ScoreConfig
from trace_ds.console import console, progress
from trace_ds.data.batching import PairBatch, collate_pairs
from trace_ds.data.pairs import Pair, read_pairs, write_pairs, write_rejects
from trace_ds.data.tokenize import TokenizedPair, tokenize_pair
from trace_ds.io import TraceError, append_lines, dumps, iter_jsonl_lenient, write_json, write_jsonl
from trace_ds.scoring.fallback import report_fallback
from trace_ds.scoring.ghost import check_coverage, ghost_mode, names_listing
from trace_ds.scoring.ghost_ops import GhostState, ProbeGradient
from trace_ds.scoring.norms import PairNorms
from trace_ds.scoring.probe import build_probe, category_of, probe_source_ids
from trace_ds.scoring.weights import CONFLICT, Scored, Weighting, assign_weights, scores_meta_path
from trace_ds.training.losses import conflict_losses
from trace_ds.training.vocab_head import check_head, response_logps


def batch_logps(
    model: nn.Module, batch: PairBatch, tile: int = 0, reduction: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response log-probs (summed, or per-token means) of the chosen and rejected rows, from one concatenated
    forward (through the vocabulary-chunked head when ``tile`` > 0)."""
    logps = response_logps(model, batch, tile=tile, reduction=reduction)
    n = batch.num_pairs
    return logps[:n], logps[n:]


def pair_losses(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    categories: Sequence[str],
    relational: str,
    beta: float,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss. At theta_ref (``reference`` None) r = logp - logp.detach(): 0 in value, the right
    gradient. Away from it (in-run re-scoring) r = logp - the reference's log-probs ``reference`` (2B,)."""
    if reference is None:
        ref_chosen, ref_rejected = logp_chosen.detach(), logp_rejected.detach()
    else:
        n = logp_chosen.shape[0]
        ref_chosen, ref_rejected = reference[:n].to(logp_chosen), reference[n:].to(logp_rejected)
    reward_chosen = logp_chosen - ref_chosen
    reward_rejected = logp_rejected - ref_rejected
    return conflict_losses(reward_chosen, reward_rejected, list(categories), beta, relational)  # type: ignore[arg-type]


def micro_batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class GhostScorer:
    """Runs the probe pass (G) and the scoring passes over one model. ``store`` decides where G lives."""

    def __init__(
        self, model: nn.Module, pad_id: int, config: ScoreConfig, store: ProbeGradient | None = None
    ):
        self.model = model
        self.pad_id = pad_id
        self.config = config
        self.kernel = resolve_kernel(config.kernel, next(model.parameters()).device)
        self.state = GhostState("probe", store or ProbeGradient(), self.kernel)
        self.device = next(model.parameters()).device

    def _run(
        self,
        pairs: Sequence[TokenizedPair],
        categories: Sequence[str],
        weight: float | Sequence[float],
        reference: Any = None,
        norms: bool = False,
    ) -> torch.Tensor:
        """One ghost forward + backward. ``reference``: None at theta_ref, else ``fn(model)`` running on the
        frozen reference (the trainer's ``with_reference``), whose log-probs the losses are relative to.
        ``norms``: also every pair's squared gradient norm, into ``self.state.norms`` (scoring/norms.py)."""
        batch = collate_pairs(pairs, self.pad_id).to(self.device)
        ref_logps = None
        if reference is not None:  # before ghost mode: the reference's calls are no part of the ghost pass
            with torch.no_grad():
                ref_logps = reference(
                    lambda m: response_logps(
                        m, batch, tile=self.config.vocab_tile, reduction=self.config.logp_reduction
                    )
                )
        self.state.set_batch(batch.attention_mask)
        n = len(pairs)
        self.state.norms = (
            PairNorms(torch.arange(2 * n, device=self.device) % n, n, self.kernel) if norms else None
        )
        for param in self.model.parameters():  # a .grad after the backward: a use outside ghost paths
            if param.requires_grad:
                param.grad = None
        with ghost_mode(self.model, self.state) as covered, torch.enable_grad():
            self.covered = covered
            if self.state.norms is not None:
                self.state.norms.tied = tied_embedding_and_head(self.model, self.state.shared)
            chosen, rejected = batch_logps(
                self.model, batch, self.config.vocab_tile, self.config.logp_reduction
            )
            losses = pair_losses(
                chosen, rejected, categories, self.config.relational, self.config.beta, ref_logps
            )
            if isinstance(weight, (int, float)):
                (losses.sum() * weight).backward()
            else:  # one weight per pair (a unit-normalised probe)
                (losses * torch.tensor(weight, dtype=losses.dtype, device=losses.device)).sum().backward()
        check_coverage(self.model, self.state)
        assert self.state.scores is not None
        return self.state.scores

    @property
    def covered_numel(self) -> int:
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.covered)

    def probe_step(
        self,
        pairs: Sequence[TokenizedPair],
        weight: float | Sequence[float],
        reference: Any = None,
        norms: bool = False,
    ) -> list[float] | None:
        """Add ``weight`` * grad of the summed relational losses of ``pairs`` to G (weight 0: a dummy step; a
        sequence: one weight per pair). ``norms``: also return each pair's gradient norm ||grad L_j||."""
        self.state.mode = "probe"
        # J is the relational loss on every probe pair
        self._run(pairs, ["inversion"] * len(pairs), weight, reference, norms=norms)
        if not norms:
            return None
        assert self.state.norms is not None
        out = self.state.norms.squared.clamp_min(0.0).sqrt().tolist()
        self.state.norms = None
        return out

    def probe_gradient(self, probe: Sequence[TokenizedPair], total: int | None = None) -> ProbeGradient:
        """G = grad of J = (sum of relational losses over the probe) / B, at the loaded weights."""
        self.state.mode = "probe"
        denominator = total or len(probe)
        for chunk in micro_batches(probe, self.config.micro_batch):
            self.probe_step(chunk, 1.0 / denominator)
        return self.finish_probe()

    def finish_probe(self) -> ProbeGradient:
        """After the last probe step: G = 0 for every trainable parameter the probe pass never reached, with a
        warning naming them (they add nothing to any score)."""
        never = check_coverage(self.model, self.state)
        if never:
            warnings.warn(
                f"{len(never)} trainable parameter(s) took no part in the probe pass, so their probe gradient "
                f"is 0 and they add nothing to any score: {names_listing(never)}",
                stacklevel=2,
            )
        self.state.store.zeros_for([p for p in self.model.parameters() if p.requires_grad])
        self.state.store.freeze(self.g_dtype())
        return self.state.store

    def g_dtype(self) -> torch.dtype:
        """The dtype G is kept in while scoring: fp32, or the model's 16-bit dtype for the Triton kernel (its
        tl.dot needs equal operand types) and with ``--g-dtype model``."""
        model_dtype = next(self.model.parameters()).dtype
        wanted = self.kernel == "triton" or self.config.g_dtype == "model"
        return model_dtype if wanted and model_dtype in (torch.bfloat16, torch.float16) else torch.float32

    def score(
        self, pairs: Sequence[TokenizedPair], categories: Sequence[str], reference: Any = None
    ) -> list[float]:
        """Raw scores of one micro-batch of conflict pairs: row scores of chosen + rejected."""
        self.state.mode = "score"
        rows = self._run(pairs, categories, 1.0, reference)
        n = len(pairs)
        return (rows[:n].double() + rows[n:].double()).tolist()

    def score_with_norms(
        self, pairs: Sequence[TokenizedPair], categories: Sequence[str], reference: Any = None
    ) -> tuple[list[float], list[float]]:
        """Raw scores and gradient norms ||grad L_i|| of one micro-batch, from the same ghost backward."""
        self.state.mode = "score"
        rows = self._run(pairs, categories, 1.0, reference, norms=True)
        n = len(pairs)
        assert self.state.norms is not None
        squared = self.state.norms.squared.clamp_min(0.0)  # exact up to rounding: never below 0
        self.state.norms = None
        return (rows[:n].double() + rows[n:].double()).tolist(), squared.sqrt().tolist()

    def probe_norm(self) -> float:
        """||G|| over every trainable parameter (summed over ranks' shards under ZeRO-3)."""
        return math.sqrt(max(0.0, self.state.store.squared_norm()))


def tied_embedding_and_head(model: nn.Module, shared: dict[int, list[str]]) -> set[int]:
    """The parameters ghost norms may see used twice: an embedding's weight tied to the LM head (their cross
    term is implemented). Any other parameter used by several modules is refused, naming them."""
    modules = dict(model.named_modules())
    tied = set()
    for key, owners in shared.items():
        kinds = [isinstance(modules.get(name), nn.Embedding) for name in owners]
        if len(owners) != 2 or sum(kinds) != 1:
            raise TraceError(
                f"gradient norms: one parameter is used by {', '.join(owners)}; only an embedding tied to the LM "
                "head is supported (its cross term); score with --score-metric dot, which needs no norms"
            )
        tied.add(key)
    return tied


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``auto``: Triton on CUDA, the torch reference elsewhere. ``triton`` on CPU needs TRITON_INTERPRET=1."""
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if kernel == "triton" and device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise TraceError(
                "--kernel triton on a CPU needs TRITON_INTERPRET=1 (slow; for tests); use --kernel torch"
            )
    return kernel


def normalize_weights(scored: list[Scored], mode: str, allow_empty: bool) -> None:
    """The paper's map on raw scores: max(0, raw), then mean 1 within each conflict category (default) or sum 1
    over all (joint). :func:`trace_ds.scoring.weights.assign_weights` with the paper's weighting (``Weighting``'s own defaults)."""
    assign_weights(scored, Weighting(normalize=mode), allow_empty)


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.stem
    return {
        "scores": out,
        "meta": scores_meta_path(out),
        "probe": out.with_name(f"{stem}.probe.jsonl"),
        "partial": out.with_name(f"{stem}.partial.jsonl"),
        "adapter": out.with_name(f"{stem}.initial_adapter"),
    }


# A gradient norm below this share of the largest one is rounding of a gradient that is exactly 0 (a pair
# whose two responses are the same tokens): its cosine is 0, and a probe pair of it gets no weight.
NEGLIGIBLE_NORM = 1e-6


def _scored(
    pair_id: str, category: str, result: tuple[float, float | None], probe_norm: float, floor: float
) -> Scored:
    raw, norm = result
    cosine = None if norm is None else (raw / (norm * probe_norm) if norm > floor and probe_norm > 0 else 0.0)
    return Scored(pair_id, category, raw, grad_norm=norm, cosine=cosine)


def _probe_pair_norms(
    scorer: GhostScorer,
    strategy: Any,
    probe: list[TokenizedPair],
    dummy: list[TokenizedPair],
    micro_batch: int,
) -> list[float]:
    """||grad L_j|| of every probe pair (ghost norms, sharded over ranks, gathered), in probe order."""
    mine: list[tuple[int, float]] = []
    for chunk in strategy.shard(list(enumerate(probe)), micro_batch):
        if chunk is None:
            scorer.probe_step(dummy, 0.0, norms=True)
            continue
        # weight 1: the norms are those of the pairs' own gradients (this pass's G is discarded afterwards)
        norms = scorer.probe_step([t for _, t in chunk], 1.0, norms=True)
        assert norms is not None
        mine += [(i, n) for (i, _), n in zip(chunk, norms, strict=True)]
    found = dict(item for part in strategy.all_gather_object(mine) for item in part)
    return [found[i] for i in range(len(probe))]


def load_partial(path: Path, fingerprint: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """Raw scores (and gradient norms) finished by an earlier run of the same settings (a torn last line is
    ignored)."""
    if not path.exists():
        return {}
    done: dict[str, tuple[float, float | None]] = {}
    lines = iter_jsonl_lenient(path)
    header = next(lines, None)
    if header is None or not isinstance(header[1], dict) or header[1].get("settings") != fingerprint:
        raise TraceError(
            f"{path}: partial scores from different settings; rerun with the same options, or delete it to start over"
        )
    for _, record in lines:
        # a line without its gradient norm (written before norms were scored) is scored again
        if (
            isinstance(record, dict)
            and "id" in record
            and "raw_score" in record
            and record.get("grad_norm") is not None
        ):
            done[record["id"]] = (float(record["raw_score"]), float(record["grad_norm"]))
    write_jsonl(path, [header[1], *({"id": k, "raw_score": v, "grad_norm": n} for k, (v, n) in done.items())])
    return done


def tokenize_all(pairs: list[Pair], tokenizer: Any, config: ScoreConfig) -> list[TokenizedPair]:
    return [tokenize_pair(pair, tokenizer, config.tokenize) for pair in pairs]


def run_score(config: ScoreConfig) -> dict[str, Any]:
    """The ``trace-ds score`` stage: one process, or every rank of a ``deepspeed``/``torchrun`` launch."""
    from trace_ds.runtime.engine import strategy_for

    with strategy_for(config.deepspeed, config.micro_batch, config.dtype, "score") as strategy:
        return _run_score(config, strategy)


def _run_score(config: ScoreConfig, strategy: Any) -> dict[str, Any]:
    from trace_ds.models.loading import (
        attach_lora,
        enable_gradient_checkpointing,
        load_causal_lm,
        load_tokenizer,
        pad_token_id,
    )

    started = time.perf_counter()
    paths = output_paths(config.out)
    pair_set = read_pairs(config.triaged, on_bad=config.on_bad_record)
    pairs = pair_set.pairs
    categories = [category_of(p) for p in pairs]
    built = config.probe is None
    probe = (
        build_probe(pairs, config.probe_size, config.seed, config.suppression_source)
        if built
        else read_pairs(config.probe).pairs
    )
    held_out = probe_source_ids(probe) if config.probe_holdout else set()
    conflict = [(p, c) for p, c in zip(pairs, categories, strict=True) if c in CONFLICT]
    targets = [(p, c) for p, c in conflict if p.id not in held_out]
    if not targets:
        raise TraceError(f"{config.triaged}: no conflict pair (inversion, suppression) to score")
    emptied = sorted({c for _, c in conflict} - {c for _, c in targets})
    if emptied:  # a held-out pair takes its category's mean weight: it needs scored pairs of that category
        raise TraceError(
            f"--probe-holdout holds out every {' and '.join(emptied)} pair of {config.triaged}, leaving none to "
            "score; lower --probe-size or pass a curated --probe file"
        )

    needs_tokenizer = any(p.shape != "tokenized" for p in pairs + probe)
    tokenizer = load_tokenizer(config.model, required=needs_tokenizer)
    model = load_causal_lm(config.model, config.dtype)
    if config.lora:
        model = attach_lora(model, config.lora)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pad_id = pad_token_id(tokenizer, model)
    module = strategy.prepare_inference(model)
    if config.lora:
        # Scoring never changes the adapter, so it is saved now, before any forward: under ZeRO-3, gathering
        # it after the passes fails (DeepSpeed still counts the parameters as in use by their modules).
        _save_adapter(module, paths["adapter"], strategy)
    strategy.memory_segment("load")
    fingerprint = config.fingerprint()
    done = strategy.broadcast_object(
        load_partial(paths["partial"], fingerprint) if strategy.is_main else None
    )
    todo = [(p, c) for p, c in targets if p.id not in done]
    if done and strategy.is_main:
        console.print(f"resuming: {len(done)} of {len(targets)} pairs already scored in {paths['partial']}")

    check_head(module, config.vocab_tile)
    scorer = GhostScorer(module, pad_id, config, store=strategy.probe_store())
    probe_tokens = tokenize_all(probe, tokenizer, config)
    dummy = probe_tokens[:1]
    t0 = time.perf_counter()
    probe_weights = [1.0 / len(probe_tokens)] * len(probe_tokens)  # J: the mean relational loss
    probe_norms: list[float] | None = None
    if config.probe_normalize == "unit":  # a first pass for ||g_j||, then G from g_j / ||g_j||
        probe_norms = _probe_pair_norms(scorer, strategy, probe_tokens, dummy, config.micro_batch)
        scorer.state.store = strategy.probe_store() or ProbeGradient()
        # a pair whose gradient is 0 in exact arithmetic (both responses the same tokens) gets rounding-sized
        # norms: dividing by one would blow rounding noise up into G, so it counts as no gradient
        floor = NEGLIGIBLE_NORM * max(probe_norms, default=0.0)
        probe_weights = [0.0 if n <= floor else 1.0 / (len(probe_tokens) * n) for n in probe_norms]
    indexed = list(enumerate(probe_tokens))
    for chunk in strategy.shard(indexed, config.micro_batch):
        if chunk is None:
            scorer.probe_step(dummy, 0.0)
        else:
            scorer.probe_step([t for _, t in chunk], [probe_weights[i] for i, _ in chunk])
    scorer.finish_probe()
    probe_norm = scorer.probe_norm()  # a collective under ZeRO-3: every rank
    probe_seconds = time.perf_counter() - t0

    if strategy.is_main and not paths["partial"].exists():
        write_jsonl(paths["partial"], [{"settings": fingerprint}])
    t0 = time.perf_counter()
    steps = strategy.shard(todo, config.micro_batch)
    with (
        _partial_sink(paths["partial"], strategy.is_main) as sink,
        progress("scoring", len(targets), completed=len(done), unit="pair", visible=strategy.is_main) as bar,
    ):
        mine: list[tuple[str, tuple[float, float]]] = []
        for count, chunk in enumerate(steps, start=1):
            if chunk is None:
                scorer.score_with_norms(dummy, ["inversion"])  # keeps every rank's module calls in step
            else:
                raw, norms = scorer.score_with_norms(
                    [tokenize_pair(p, tokenizer, config.tokenize) for p, _ in chunk], [c for _, c in chunk]
                )
                mine += [(pair.id, (v, n)) for (pair, _), v, n in zip(chunk, raw, norms, strict=True)]
            if count % config.save_every == 0 or count == len(steps):
                finished = [item for part in strategy.all_gather_object(mine) for item in part]
                mine = []
                done.update(finished)
                if sink is not None:
                    append_lines(
                        sink, (dumps({"id": i, "raw_score": v, "grad_norm": n}) for i, (v, n) in finished)
                    )
                bar.update(completed=len(done))
    score_seconds = time.perf_counter() - t0
    fallback = report_fallback(scorer.state, strategy.is_main)  # modules on the generic path, their cost

    meta: dict[str, Any] = {}
    if strategy.is_main:
        # Every conflict pair gets a line, in input order: a --probe-holdout pair is not scored (raw_score
        # null) and takes its category's mean weight, so the trainer finds a weight for every pair.
        floor = NEGLIGIBLE_NORM * max((n for _, n in done.values() if n is not None), default=0.0)
        scored = [
            Scored(p.id, c, None, probe_holdout=True)
            if p.id in held_out
            else _scored(p.id, c, done[p.id], probe_norm, floor)
            for p, c in conflict
        ]
        assign_weights(scored, config.weighting_choice(), config.allow_empty)
        if built:
            write_pairs(paths["probe"], probe)
        write_rejects(config.out, pair_set.rejects)
        write_jsonl(paths["scores"], (s.record() for s in scored))
        held = len(scored) - len(targets)
        meta = _metadata(
            config, paths, probe, built, scorer, strategy, len(targets), held, len(pair_set.rejects)
        )
        meta["probe_norm"] = probe_norm
        if probe_norms is not None:
            meta["probe_pair_norms"] = {"min": min(probe_norms), "max": max(probe_norms)}
        meta["timings"] = {
            "probe_gradient_s": round(probe_seconds, 3),
            "scoring_s": round(score_seconds, 3),
            "total_s": round(time.perf_counter() - started, 3),
            "pairs_per_s": round(len(todo) / score_seconds, 3) if score_seconds > 0 and todo else None,
            "ghost_fallback_s": fallback["seconds"] if fallback else 0.0,
        }
        if fallback:
            meta["ghost_fallback"] = fallback["classes"]
        write_json(paths["meta"], meta)
    if strategy.is_main:
        paths["partial"].unlink(missing_ok=True)
    return meta


def _metadata(
    config: ScoreConfig,
    paths: dict[str, Path],
    probe: list[Pair],
    built: bool,
    scorer: GhostScorer,
    strategy: Any,
    n_scored: int,
    n_held_out: int,
    n_rejects: int,
) -> dict[str, Any]:
    return {
        "model": config.model,
        "triaged": config.triaged,
        "probe": str(paths["probe"]) if built else config.probe,
        "probe_size": len(probe),
        "probe_built": built,
        "probe_holdout": config.probe_holdout,
        "relational": config.relational,
        "beta": config.beta,
        "logp_reduction": config.logp_reduction,
        "normalize": config.normalize,
        "score_metric": config.score_metric,
        "weighting": config.weighting,
        "weight_alpha": config.weight_alpha,
        "weight_min": config.weight_min,
        "probe_normalize": config.probe_normalize,
        "probe_suppression": config.suppression_source if built else None,
        "kernel": scorer.kernel,
        "dtype": config.dtype,
        "gradient_checkpointing": config.gradient_checkpointing,
        "world_size": strategy.world_size,
        "zero_stage": strategy.zero_stage,
        "lora": asdict(config.lora) if config.lora else None,
        "initial_adapter": str(paths["adapter"]) if config.lora else None,
        "scored_pairs": n_scored,
        "probe_holdout_pairs": n_held_out,
        "parameters_covered": scorer.covered_numel,
        "probe_gradient_numel_on_rank0": sum(t.numel() for t in scorer.state.store.tensors.values()),
        "probe_gradient_dtype": str(scorer.g_dtype()).removeprefix("torch."),  # kept, and gathered, in it
        "rejects": n_rejects,
    }


def _save_adapter(module: nn.Module, path: Path, strategy: Any) -> None:
    """The initial LoRA adapter the scores depend on; the trainer starts from it."""
    if strategy.zero_stage == 3:
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if strategy.is_main:
                module.save_pretrained(str(path))
    elif strategy.is_main:
        module.save_pretrained(str(path))
    strategy.barrier()


@contextlib.contextmanager
def _partial_sink(path: Path, is_main: bool) -> Iterator[Any]:
    if not is_main:
        yield None
        return
    with open(path, "a", encoding="utf-8") as sink:
        yield sink
