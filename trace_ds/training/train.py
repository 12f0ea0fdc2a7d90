"""Stage 3: the hybrid update. Stream -> route -> losses -> one reduction -> DeepSpeed step -> metrics.

Every rank runs the same sequence of module calls: one concatenated policy forward and one reference
forward per micro-batch, whatever the micro-batch holds (a rank without data runs a zero-weight dummy),
and every rank makes the same number of optimizer steps. Routing is by masks inside that one forward.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trace_ds.config import BEST_METRICS, TrainConfig
from trace_ds.console import console, progress
from trace_ds.data.batching import PairBatch, collate_pairs
from trace_ds.data.pairs import iter_pairs, read_pairs
from trace_ds.data.stream import TRAINED_CONFLICT, PairStream, TrainRecord, load_weights
from trace_ds.data.tokenize import tokenize_pair
from trace_ds.io import TraceError, dumps, read_json, write_json, write_text
from trace_ds.scoring.weights import read_scores_meta
from trace_ds.training.losses import conflict_losses, reduce_logps, reduce_step_loss, sequence_logps, token_kl
from trace_ds.training.vocab_head import check_head, response_logps

if TYPE_CHECKING:
    from trace_ds.training.rescore import Rescorer

# Sums reduced across ranks for logging (one tensor, one all-reduce per step).
STAT_KEYS = (
    "pairs", "inversion", "inversion_loss", "inversion_margin", "inversion_correct",
    "suppression", "suppression_loss", "suppression_reward",
    "retention", "retention_kl", "retention_margin", "retention_correct", "tokens", "step_loss",
)  # fmt: skip


RESCORED_WEIGHTS = "rescored_weights.json"  # in a checkpoint: the weights of the latest in-run re-scoring
_FAULT_NAN_STEP = int(os.environ.get("TRACE_DS_FAULT_NAN_AT_STEP", "0"))


def lr_lambda(total_steps: int, warmup_ratio: float) -> Any:
    """Linear warm-up then cosine decay to 0, as a multiplier of the base learning rate."""
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def compute_losses(
    policy: nn.Module,
    with_reference: Any,
    batch: PairBatch,
    categories: list[str],
    weights: torch.Tensor,
    config: Any,
    reference_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair conflict losses, their weights, per-pair retention KL, and the stats vector.

    ``weights`` is 0 for a padding (dummy) pair; the KL of such a pair is masked out the same way.
    ``with_reference(fn)`` returns ``fn(model)`` run on the frozen reference (the base model with the adapters
    off, under LoRA). The KL head runs on the chosen rows of live retention pairs only (one row when there are
    none, so every rank still makes the same calls); with precomputed ``reference_logps`` (2B,) the reference
    runs on those rows only. ``config.vocab_tile`` > 0: the vocabulary-chunked head (trace_ds/training/vocab_head.py),
    no [tokens, vocabulary] logits; 0: full logits.
    """
    from trace_ds.training.vocab_head import head_module, run_head

    n = batch.num_pairs
    device = batch.input_ids.device
    is_inv = torch.tensor([c == "inversion" for c in categories], device=device)
    is_sup = torch.tensor([c == "suppression" for c in categories], device=device)
    is_ret = torch.tensor([c == "retention" for c in categories], device=device)
    live = weights.to(device) > 0
    rows = torch.nonzero(is_ret & live, as_tuple=False).squeeze(-1)
    rows = rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=device)
    tile = getattr(config, "vocab_tile", 0)
    reduction = getattr(config, "logp_reduction", "sum")
    if tile > 0 and head_module(policy) is not None:
        with torch.no_grad():
            if reference_logps is None:  # every row, keeping the hidden states of the KL rows
                ref = with_reference(
                    lambda m: run_head(m, batch, tile=tile, kl_rows=rows, keep_reference=True)
                )
                ref_logps = reduce_logps(ref.logps, batch.loss_mask, reduction)
            else:
                ref = with_reference(
                    lambda m: run_head(
                        m, batch, rows, tile=tile, kl_rows=torch.arange(rows.numel(), device=device),
                        keep_reference=True,
                    )
                )  # fmt: skip
                ref_logps = reference_logps.to(device)
        result = run_head(policy, batch, tile=tile, kl_rows=rows, reference=ref.reference)
        logps = reduce_logps(result.logps, batch.loss_mask, reduction)
        assert result.kl is not None
        kl = result.kl[:n]
    else:
        logits = batch.logits(policy)
        logps = reduce_logps(
            sequence_logps(logits, batch.labels, batch.loss_mask), batch.loss_mask, reduction
        )
        with torch.no_grad():
            if reference_logps is None:
                ref_logits = with_reference(lambda m: batch.logits(m))
                ref_logps = reduce_logps(
                    sequence_logps(ref_logits, batch.labels, batch.loss_mask), batch.loss_mask, reduction
                )
                ref_logits = ref_logits.index_select(0, rows)
            else:
                ref_logps = reference_logps.to(device)
                ref_logits = with_reference(lambda m: batch.logits(m, rows))
        kl = torch.zeros(n, dtype=torch.float32, device=device).index_put(
            (rows,), token_kl(logits.index_select(0, rows), ref_logits, batch.loss_mask.index_select(0, rows))
        )
    rewards = logps - ref_logps
    r_chosen, r_rejected = rewards[:n], rewards[n:]
    is_unl = torch.tensor([c == "unlearning" for c in categories], device=device)
    conflict = conflict_losses(r_chosen, r_rejected, categories, config.beta, config.relational)
    zero = torch.zeros_like(conflict)
    head = conflict.detach()
    is_sup = is_sup | is_unl  # logged with suppression (NPO heads)
    conflict_weights = torch.where(is_inv | is_sup, weights.to(device), zero)
    retention_kl = torch.where(is_ret & live, kl, zero)

    margin = (r_chosen - r_rejected).detach()
    inv, sup, ret = (is_inv & live).float(), (is_sup & live).float(), (is_ret & live).float()
    stats = torch.stack(
        [
            live.float().sum(),
            inv.sum(), (head * inv).sum(), (margin * inv).sum(), ((margin > 0).float() * inv).sum(),
            sup.sum(), (head * sup).sum(), (torch.where(is_unl, r_chosen, (r_chosen + r_rejected) / 2).detach() * sup).sum(),
            ret.sum(), (kl.detach() * ret).sum(), (margin * ret).sum(), ((margin > 0).float() * ret).sum(),
            (batch.attention_mask.sum() * live.any()).float(),
            torch.zeros((), device=device),
        ]
    ).double()  # fmt: skip
    return conflict, conflict_weights, retention_kl, stats


def summarise_stats(stats: torch.Tensor) -> dict[str, float | None]:
    s = dict(zip(STAT_KEYS, stats.tolist(), strict=True))

    def mean(key: str, count: str) -> float | None:
        return s[key] / s[count] if s[count] else None

    return {
        "pairs": s["pairs"],
        "pairs_inversion": s["inversion"],
        "pairs_suppression": s["suppression"],
        "pairs_retention": s["retention"],
        "loss_inversion": mean("inversion_loss", "inversion"),
        "margin_inversion": mean("inversion_margin", "inversion"),
        "accuracy_inversion": mean("inversion_correct", "inversion"),
        "loss_suppression": mean("suppression_loss", "suppression"),
        "reward_suppression": mean("suppression_reward", "suppression"),
        "kl_retention": mean("retention_kl", "retention"),
        "margin_retention": mean("retention_margin", "retention"),
        "accuracy_retention": mean("retention_correct", "retention"),
        "tokens": s["tokens"],
        "loss": s["step_loss"],
    }


class StepData:
    """Pulls this rank's records for each optimizer step.

    One stream (the default): a step never crosses an epoch boundary, so an epoch trains each pair exactly
    once. The last step of an epoch holds what is left of it (a short step; a rank with nothing left runs a
    zero-weight dummy, and the loss is divided by the pairs the step really has), and the next epoch starts
    with the next step. Whether the epoch is over is read from the stream's state
    (:meth:`PairStream.epoch_done`), which is the same on every rank after every step, so all ranks switch
    epochs at the same step without communicating. ``epochs`` ends the data after that many epochs (None:
    no limit, the run is bounded by --max-steps; its epochs end with a short step all the same).

    With ``proportions`` (per-category batching, the paper's Algorithm 1) each category has its own stream,
    each step draws its pairs per category in those proportions, and every stream cycles through epochs on
    its own (so the run is bounded by --max-steps): a category whose epoch runs out mid-step fills its share
    from its next epoch, so the shares hold at every step. Each category stream still gives each of its pairs
    once per epoch of its own."""

    def __init__(
        self, streams: dict[str, PairStream], epochs: int | None, proportions: dict[str, float] | None = None
    ):
        self.streams = streams
        self.epochs = epochs
        self.proportions = proportions
        self._its: dict[str, Iterator[TrainRecord] | None] = dict.fromkeys(streams)

    def epoch(self) -> int:
        return max(stream.epoch() for stream in self.streams.values())

    def take(self, count: int) -> list[TrainRecord]:
        if self.proportions is None:
            return self._take_within_epoch("all", count)
        records: list[TrainRecord] = []
        for name, share in split_counts(count, self.proportions).items():
            records += self._take_cycling(name, share)
        return records

    def _take_within_epoch(self, name: str, count: int) -> list[TrainRecord]:
        """Up to ``count`` records of the current epoch; the next epoch starts only at the next step."""
        stream = self.streams[name]
        if stream.epoch_done():
            if self.epochs is not None and stream.epoch() + 1 >= self.epochs:
                return []
            stream.next_epoch()
            self._its[name] = None
        if self._its[name] is None:
            self._its[name] = iter(stream)
        # islice asks for at most `count` items: one more `next` would advance the stream into the next round
        return list(itertools.islice(self._its[name], count))  # type: ignore[arg-type]

    def _take_cycling(self, name: str, count: int) -> list[TrainRecord]:
        stream = self.streams[name]
        records: list[TrainRecord] = []
        while len(records) < count:
            if self._its[name] is None:
                self._its[name] = iter(stream)
            try:
                records.append(next(self._its[name]))  # type: ignore[arg-type]
            except StopIteration:
                self._its[name] = None
                if self.epochs is not None and stream.epoch() + 1 >= self.epochs:
                    break
                stream.next_epoch()
        return records

    def state_dict(self) -> dict[str, Any]:
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, stream in self.streams.items():
            stream.load_state_dict(state[name])
            self._its[name] = None

    def counts(self) -> dict[str, Any]:
        return {name: stream.counts() for name, stream in self.streams.items()}


def split_counts(count: int, proportions: dict[str, float]) -> dict[str, int]:
    """``count`` split by ``proportions`` (largest remainder, ties in the given order): exact and never negative."""
    raw = {name: count * share for name, share in proportions.items()}
    counts = {name: math.floor(value) for name, value in raw.items()}
    leftover = count - sum(counts.values())
    for name in sorted(raw, key=lambda n: -(raw[n] - counts[n]))[:leftover]:
        counts[name] += 1
    return counts


class Trainer:
    """Owns the engines, the data and the loop; every DeepSpeed call goes through ``strategy``."""

    def __init__(self, config: TrainConfig):
        from trace_ds.runtime.engine import Strategy, load_ds_config

        self.config = config
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        ds_config = load_ds_config(config.deepspeed, config.micro_batch, config.grad_accum, config.dtype)
        self.strategy = Strategy.create(ds_config, "train")
        self.stop_requested = False

    # ---- set-up ----
    def setup(self) -> None:
        from trace_ds.models.loading import (
            enable_gradient_checkpointing,
            load_causal_lm,
            load_tokenizer,
            pad_token_id,
        )

        cfg, strategy = self.config, self.strategy
        self.weights = load_weights(cfg.scores)
        meta = read_scores_meta(cfg.scores)
        self.tokenizer = load_tokenizer(cfg.model, required=False)
        random.seed(cfg.seed + strategy.rank)
        torch.manual_seed(cfg.seed + strategy.rank)
        model = load_causal_lm(cfg.model, cfg.dtype)
        if cfg.lora:
            model = _load_initial_adapter(model, meta, cfg.scores)
        elif meta.get("lora"):
            raise TraceError(
                f"{cfg.scores} was scored with LoRA adapters; train with --lora (from its initial adapter)"
            )
        scored_with = meta.get("logp_reduction", "sum")  # scores written before the option summed
        if meta and scored_with != cfg.logp_reduction:
            raise TraceError(
                f"{cfg.scores} was scored with --logp-reduction {scored_with}, and this run trains with "
                f"--logp-reduction {cfg.logp_reduction}: the impact weights are for the loss they were computed "
                "with; use the same reduction in both stages"
            )
        scored_head = meta.get("relational")
        if scored_head is not None and scored_head != cfg.relational:
            raise TraceError(
                f"{cfg.scores} was scored with --relational {scored_head}, and this run trains with --relational "
                f"{cfg.relational}: score and train with the same relational head (the study compares heads as "
                "whole arms)"
            )
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        self.pad_id = pad_token_id(self.tokenizer, model)
        self.rescorer: Rescorer | None = None
        self.rescored_at: int | None = None
        self._rescore_line: dict[str, Any] = {}
        self.stream_weights = self.weights
        if cfg.rescore_every:
            from trace_ds.training.rescore import Rescorer

            self.rescorer = Rescorer(self, meta)
            # every conflict pair stays in the stream (its weight may become non-zero at a re-scoring); the
            # weight a step uses is looked up in self.weights when the batch is built
            self.stream_weights = dict.fromkeys(self.weights, 1.0)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        names = [name for name, _ in cfg.category_proportions] if cfg.category_proportions else ["all"]
        streams = {
            name: PairStream(
                cfg.triaged, self.stream_weights, rank=strategy.rank, world_size=strategy.world_size,
                buffer_size=cfg.buffer_size, seed=cfg.seed, only_category=None if name == "all" else name,
            )
            for name in names
        }  # fmt: skip
        self.stream = streams[names[0]]
        proportions = dict(cfg.category_proportions) if cfg.category_proportions else None
        self.data = StepData(streams, None if cfg.max_steps is not None else cfg.epochs or 1, proportions)
        if proportions:
            empty = [
                name
                for name, stream in streams.items()
                if proportions[name] > 0 and stream.count_eligible() == 0
            ]
            if empty:
                raise TraceError(
                    f"--category-proportions asks for {empty} pairs but {cfg.triaged} has none to train on"
                )
        self.total_steps = self._total_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.total_steps, cfg.warmup_ratio)
        )
        self.engine = strategy.prepare_train(model, optimizer, scheduler)
        check_head(self.engine, cfg.vocab_tile)
        if cfg.lora:
            self.reference = None
        else:
            with strategy.building_reference(cfg.offload_reference):
                reference = load_causal_lm(cfg.model, cfg.dtype)
            self.reference = strategy.prepare_reference(reference, cfg.offload_reference)
        strategy.memory_segment("load")
        self.ref_logps: dict[str, tuple[float, float]] = (
            self._precompute() if cfg.precompute_ref_logps else {}
        )
        self.step = 0
        self.best: dict[str, Any] = {}
        self.eval_records = self._eval_records()

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        eligible = self.stream.count_eligible()
        if eligible == 0:
            raise TraceError(f"{cfg.triaged}: no pair to train on (every conflict pair has weight 0?)")
        # Every epoch ends with its own (possibly short) step; rank 0's share is the largest.
        per_rank = ceil_div(eligible, self.strategy.world_size)
        return (cfg.epochs or 1) * ceil_div(per_rank, cfg.micro_batch * cfg.grad_accum)

    def _precompute(self) -> dict[str, tuple[float, float]]:
        """Reference log-probs of every trainable pair, computed once (sharded) and cached in the run folder.
        The relational and NPO heads then need no reference forward; the KL head still does, on the chosen
        rows of retention pairs only."""
        cfg, strategy = self.config, self.strategy
        cache = self.out / "reference_logps.jsonl"
        key = {
            "model": cfg.model,
            "triaged": cfg.triaged,
            "scores": cfg.scores,
            "tokenize": asdict(cfg.tokenize),
            "logp_reduction": cfg.logp_reduction,
        }
        if cache.exists():
            lines = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
            if lines and lines[0].get("key") == key:
                return {r["id"]: (r["chosen"], r["rejected"]) for r in lines[1:]}
        stream = PairStream(
            cfg.triaged,
            self.stream_weights,
            rank=strategy.rank,
            world_size=strategy.world_size,
            buffer_size=1,
            seed=cfg.seed,
        )
        mine = list(stream)
        steps = ceil_div(ceil_div(stream.count_eligible(), strategy.world_size), cfg.micro_batch)
        found: dict[str, tuple[float, float]] = {}
        with torch.no_grad():
            for index in range(steps):
                chunk = (
                    mine[index * cfg.micro_batch : (index + 1) * cfg.micro_batch]
                    or mine[:1]
                    or self._any_dummy()
                )
                batch, _, _ = self._batch(chunk)
                logps = self.with_reference(
                    lambda m, b=batch: response_logps(m, b, tile=cfg.vocab_tile, reduction=cfg.logp_reduction)
                ).tolist()
                n = len(chunk)
                found.update({r.pair.id: (logps[i], logps[n + i]) for i, r in enumerate(chunk)})
        merged = {k: v for part in strategy.all_gather_object(found) for k, v in part.items()}
        if strategy.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            rows = [{"key": key}] + [{"id": k, "chosen": c, "rejected": r} for k, (c, r) in merged.items()]
            write_text(cache, "".join(dumps(row) + "\n" for row in rows))
        return merged

    def _reference_logps(self, records: list[TrainRecord]) -> torch.Tensor | None:
        """Precomputed reference log-probs for a micro-batch (chosen rows then rejected rows), if all known."""
        if not self.ref_logps or any(r.pair.id not in self.ref_logps for r in records):
            return None
        values = [self.ref_logps[r.pair.id] for r in records]
        return torch.tensor([c for c, _ in values] + [r for _, r in values], dtype=torch.float32)

    def _eval_records(self) -> list[TrainRecord]:
        if self.config.eval_pairs is None:
            return []
        pairs = read_pairs(self.config.eval_pairs).pairs
        return [TrainRecord(p, str(p.extra.get("category")), 1.0) for p in pairs]

    def with_reference(self, fn: Any) -> Any:
        """``fn(model)`` on the frozen reference: the reference engine, or the base model with the adapters
        disabled under LoRA."""
        if self.reference is None:  # LoRA: the base model with the adapters disabled
            with self.engine.module.disable_adapter():
                return fn(self.engine.module)
        return fn(self.reference)

    def _weight(self, record: TrainRecord) -> float:
        """The weight a step uses: the record's, or with re-scoring the latest scores' (a dummy stays 0)."""
        if self.rescorer is None or record.weight == 0.0 or record.category not in TRAINED_CONFLICT:
            return record.weight
        return self.weights[record.pair.id]

    def _batch(self, records: list[TrainRecord]) -> tuple[PairBatch, list[str], torch.Tensor]:
        tokens = [tokenize_pair(r.pair, self.tokenizer, self.config.tokenize) for r in records]
        batch = collate_pairs(tokens, self.pad_id).to(self.strategy.device)
        weights = torch.tensor([self._weight(r) for r in records], dtype=torch.float32)
        return batch, [r.category for r in records], weights

    def rescore(self) -> None:
        """New impact weights at the current weights (trace_ds/training/rescore.py); logged with the next step."""
        assert self.rescorer is not None
        result = self.rescorer.rescore(self.step)
        self.weights = result.weights()
        self.rescored_at = self.step
        self._rescore_line = result.summary()
        if self.strategy.is_main:
            console.print(f"re-scored every conflict pair at step {self.step} in {result.seconds:.1f} s")

    # ---- the loop ----
    def run(self) -> dict[str, Any]:
        cfg, strategy = self.config, self.strategy
        self.setup()
        if cfg.resume:
            self.load_checkpoint()
        metrics_path = self.out / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        if strategy.is_main:
            _truncate_metrics(metrics_path, self.step)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        per_step = cfg.micro_batch * cfg.grad_accum
        dummy: list[TrainRecord] | None = None
        try:
            with (
                progress(
                    "training", self.total_steps, completed=self.step, unit="step", visible=strategy.is_main
                ) as bar,
                open(metrics_path, "a", encoding="utf-8") as metrics_file,
            ):
                while self.step < self.total_steps:
                    every = cfg.rescore_every
                    if every and self.step and self.step % every == 0 and self.rescored_at != self.step:
                        self.rescore()
                    started = time.perf_counter()
                    records = self.data.take(per_step)
                    if records and dummy is None:
                        dummy = [TrainRecord(records[0].pair, records[0].category, 0.0)]
                    pairs_in_step = strategy.all_reduce_sum(
                        torch.tensor([float(len(records))], dtype=torch.float64)
                    )
                    if pairs_in_step.item() == 0:
                        if self.data.epochs is None:  # cycling epochs (--max-steps): an epoch had no pair
                            raise TraceError(
                                f"{cfg.triaged}: no pair to train on (every conflict pair has weight 0?)"
                            )
                        break  # every rank is out of data
                    if dummy is None:  # this rank never had data: borrow any pair as a zero-weight dummy
                        dummy = self._any_dummy()
                    stats = self._train_step(records, dummy, int(pairs_in_step.item()))
                    self.step += 1
                    elapsed = time.perf_counter() - started
                    line = {
                        "step": self.step,
                        "epoch": self.data.epoch(),
                        **self._step_metrics(stats, elapsed),
                        **self._rescore_line,
                    }
                    self._rescore_line = {}
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        line.update(self.evaluate())
                    if strategy.is_main:
                        metrics_file.write(dumps(line) + "\n")
                        metrics_file.flush()
                        if cfg.tensorboard:
                            self._tensorboard(line)
                    bar.update(
                        completed=self.step, loss=line["loss"], note=f"{line['tokens_per_s']:.0f} tok/s"
                    )
                    stop = strategy.all_reduce_max(1.0 if self.stop_requested else 0.0) > 0
                    new_best = bool(
                        cfg.eval_every and self.step % cfg.eval_every == 0 and self._is_best(line)
                    )
                    if stop or new_best or (cfg.save_every and self.step % cfg.save_every == 0):
                        self.save_checkpoint(line)
                    if stop:
                        console.print(
                            f"SIGTERM: checkpoint written at step {self.step}; resume with --resume"
                        )
                        return {"stopped_at": self.step}
            summary = {"steps": self.step, "stream": self.data.counts()}
            strategy.memory_segment("steps")
            self.export(summary)
            return summary
        finally:
            signal.signal(signal.SIGTERM, previous)
            strategy.close()

    def _any_dummy(self) -> list[TrainRecord]:
        records = self.eval_records or []
        if records:
            return [TrainRecord(records[0].pair, records[0].category, 0.0)]
        first = next(iter_pairs(self.config.triaged))
        return [TrainRecord(first, str(first.extra.get("category")), 0.0)]

    def _train_step(
        self, records: list[TrainRecord], dummy: list[TrainRecord], pairs_in_step: int
    ) -> torch.Tensor:
        cfg, strategy = self.config, self.strategy
        stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            chunk = records[micro * cfg.micro_batch : (micro + 1) * cfg.micro_batch] or dummy
            batch, categories, weights = self._batch(chunk)
            conflict, conflict_w, kl, micro_stats = compute_losses(
                self.engine,
                self.with_reference,
                batch,
                categories,
                weights,
                cfg,
                self._reference_logps(chunk),
            )
            # The one reduction; x world_size because DeepSpeed averages gradients over ranks, while the step
            # loss is a sum over the global step's pairs divided by their number.
            loss = (
                reduce_step_loss(conflict, conflict_w, kl, cfg.alpha_kl, pairs_in_step) * strategy.world_size
            )
            if self.step + 1 == _FAULT_NAN_STEP:  # fault injection for the NaN-guard test (docs/testing.md)
                loss = loss * float("nan")
            if strategy.all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) > 0:
                raise TraceError(
                    f"the loss became {loss.item()} at step {self.step + 1}: training stopped. The last good "
                    f"checkpoint is {self._latest_tag() or 'none'} in {self.ckpt_dir}; lower --lr or check the data"
                )
            self.engine.backward(loss, scale_wrt_gas=False)
            if micro == cfg.grad_accum - 1:
                self._grad_norm = strategy.grad_norm(self.engine)
                self._lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves in step())
            self.engine.step()
            micro_stats[STAT_KEYS.index("step_loss")] = loss.detach().double() / strategy.world_size
            stats += micro_stats.cpu()
        return strategy.all_reduce_sum(stats)

    def _step_metrics(self, stats: torch.Tensor, elapsed: float) -> dict[str, Any]:
        summary = summarise_stats(stats)
        norm = self.engine.get_global_grad_norm()
        norm = norm if norm is not None else self._grad_norm
        return {
            "loss": summary.pop("loss"),
            **{k: v for k, v in summary.items() if k != "tokens"},
            "lr": self._lr,
            "grad_norm": float(norm) if norm is not None else None,
            "tokens_per_s": summary["tokens"] / max(elapsed, 1e-9),
        }

    # ---- evaluation ----
    def evaluate(self) -> dict[str, Any]:
        """Per-category loss, reward margin and accuracy on the held-out pairs (every rank, same calls)."""
        cfg, strategy = self.config, self.strategy
        records = self.eval_records[strategy.rank :: strategy.world_size]
        steps = ceil_div(ceil_div(len(self.eval_records), strategy.world_size), cfg.micro_batch)
        stats = torch.zeros(len(STAT_KEYS), dtype=torch.float64)
        self.engine.eval()
        with torch.no_grad():
            for index in range(steps):
                chunk = records[index * cfg.micro_batch : (index + 1) * cfg.micro_batch]
                live = chunk or [TrainRecord(self.eval_records[0].pair, self.eval_records[0].category, 0.0)]
                batch, categories, weights = self._batch(live)
                *_, micro = compute_losses(self.engine, self.with_reference, batch, categories, weights, cfg)
                stats += micro.cpu()
        self.engine.train()
        stats = strategy.all_reduce_sum(stats)
        summary = summarise_stats(stats)
        s = dict(zip(STAT_KEYS, stats.tolist(), strict=True))
        total = s["inversion"] + s["suppression"] + s["retention"]
        loss = (s["inversion_loss"] + s["suppression_loss"] + cfg.alpha_kl * s["retention_kl"]) / max(
            total, 1.0
        )
        out = {
            f"eval_{k}": v
            for k, v in summary.items()
            if k not in ("tokens", "loss") and not k.startswith("pairs")
        }
        out["eval_loss"] = loss
        out["eval_inversion_accuracy"] = summary["accuracy_inversion"]
        out["eval_inversion_margin"] = summary["margin_inversion"]
        return out

    def _is_best(self, line: dict[str, Any]) -> bool:
        metric = self.config.best_metric
        value = line.get(metric)
        if value is None:
            return False
        better = BEST_METRICS[metric] == "min"
        current = self.best.get("value")
        if current is None or (value < current if better else value > current):
            self.best = {"metric": metric, "value": value, "step": self.step}
            return True
        return False

    # ---- checkpoints ----
    def _latest_tag(self) -> str | None:
        latest = self.ckpt_dir / "latest"
        return latest.read_text().strip() if latest.exists() else None

    def save_checkpoint(self, line: dict[str, Any]) -> None:
        """DeepSpeed checkpoint + this rank's stream and RNG state; ``latest`` is written last, atomically, and
        older checkpoints are removed only after that (the best one is kept)."""
        strategy = self.strategy
        tag = f"step_{self.step:08d}"
        if (
            self.config.eval_every
            and line.get(self.config.best_metric) is not None
            and self.best.get("step") == self.step
        ):
            self.best["tag"] = tag
        client = {"step": self.step, "best": self.best, "config": _jsonable(asdict(self.config))}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        rank_state = {
            "stream": self.data.state_dict(),
            "python_random": random.getstate(),
            "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        _atomic_torch_save(rank_state, self.ckpt_dir / tag / f"trace_state_rank{strategy.rank}.pt")
        if strategy.is_main and self.rescored_at is not None:  # floats as JSON: restored exactly
            write_json(
                self.ckpt_dir / tag / RESCORED_WEIGHTS, {"step": self.rescored_at, "weights": self.weights}
            )
        strategy.barrier()
        if strategy.is_main:
            write_text(self.ckpt_dir / "latest", tag)
            if self.best.get("tag"):
                write_json(self.ckpt_dir / "best.json", self.best)
            self._rotate(keep={tag, self.best.get("tag")})
        strategy.barrier()

    def _rotate(self, keep: set[str | None]) -> None:
        import shutil

        tags = sorted(p.name for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        recent = set(tags[-self.config.keep_last :])
        for name in tags:
            if name not in recent and name not in keep:
                shutil.rmtree(self.ckpt_dir / name, ignore_errors=True)

    def load_checkpoint(self) -> None:
        tag = self._latest_tag()
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise TraceError(f"--resume: could not load checkpoint {tag} from {self.ckpt_dir}")
        self.step = int(client["step"])
        self.best = client.get("best") or {}
        state_file = self.ckpt_dir / str(tag) / f"trace_state_rank{self.strategy.rank}.pt"
        if not state_file.exists():
            raise TraceError(
                f"--resume: {state_file} is missing (was the checkpoint made with another world size?)"
            )
        state = torch.load(state_file, weights_only=False)
        self.data.load_state_dict(state["stream"])
        random.setstate(state["python_random"])
        torch.set_rng_state(state["torch_cpu"])
        if state["torch_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["torch_cuda"])
        rescored = self.ckpt_dir / str(tag) / RESCORED_WEIGHTS
        if self.rescorer is not None and rescored.exists():
            saved = read_json(rescored)
            self.weights = {str(k): float(v) for k, v in saved["weights"].items()}
            self.rescored_at = int(saved["step"])
        if self.strategy.is_main:
            console.print(f"resumed from {self.ckpt_dir / str(tag)} at step {self.step}")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _tensorboard(self, line: dict[str, Any]) -> None:
        if not hasattr(self, "_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise TraceError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from err
            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        for key, value in line.items():
            if isinstance(value, (int, float)) and key != "step":
                self._writer.add_scalar(key, value, self.step)

    # ---- export ----
    def export(self, summary: dict[str, Any]) -> None:
        from trace_ds.training.export import export_trained

        summary["export"] = export_trained(self, self.out / "final")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint's step (they will be recomputed)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    write_text(path, "".join(line + "\n" for line in keep))


def _load_initial_adapter(model: nn.Module, meta: dict[str, Any], scores: str) -> nn.Module:
    """LoRA training starts from the adapter the scores were computed with (saved by ``trace-ds score``)."""
    from peft import PeftModel

    adapter = meta.get("initial_adapter")
    if not meta.get("lora") or not adapter or not Path(adapter).is_dir():
        raise TraceError(
            f"--lora: {scores} was not scored with LoRA (no initial adapter beside it); score with --lora first, "
            "so the weights and the trained adapters start from the same values"
        )
    return PeftModel.from_pretrained(model, adapter, is_trainable=True)


def run_train(config: TrainConfig) -> dict[str, Any]:
    return Trainer(config).run()
