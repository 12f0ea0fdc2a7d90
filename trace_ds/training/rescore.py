"""In-run re-scoring (``trace-ds train --rescore-every K``): impact scores again at the current weights.

The paper scores once, at theta_ref. As training moves, a pair's first-order effect on the probe loss
changes: s_i(theta_t) = <grad L_i(theta_t), grad J(theta_t)>, where both losses now take their rewards
against the frozen reference (r = logp_theta - logp_ref, no longer 0). Every K steps the trainer runs the
probe pass at theta_t (G changes with theta), re-scores EVERY conflict pair with the same ghost machinery as
``trace-ds score`` (a pair whose weight was 0 may have become useful), normalises as the offline scores were,
and trains on with the new weights. It runs on the training engine's own module inside the launch (under
ZeRO-3 the parameters stay partitioned and G lives in shards), with the same micro-batch sharding and dummy
steps as scoring, so every rank makes the same module calls.

At step 0 theta_t = theta_ref and the reference's log-probs equal the policy's, so the scores equal the
offline ones (tests/test_rescore.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_ds.config import PAPER_WEIGHTING, ScoreConfig
from trace_ds.data.pairs import Pair, read_pairs
from trace_ds.data.tokenize import TokenizedPair, tokenize_pair
from trace_ds.io import TraceError, iter_jsonl, write_jsonl
from trace_ds.scoring.probe import category_of
from trace_ds.scoring.scorer import CONFLICT, GhostScorer, Scored, normalize_weights


@dataclass
class Rescored:
    """One re-scoring: the new weights (every conflict pair) and what the metrics log says of it."""

    step: int
    scored: list[Scored]
    seconds: float

    def weights(self) -> dict[str, float]:
        return {s.id: s.weight for s in self.scored}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rescored_at": self.step, "rescore_s": round(self.seconds, 3)}
        for category in ("inversion", "suppression", "unlearning"):
            group = [s for s in self.scored if s.category == category]
            if group:
                out[f"rescore_zero_{category}"] = sum(1 for s in group if s.weight == 0.0) / len(group)
        return out


class Rescorer:
    """Re-scores the trainer's conflict pairs against the probe the offline scores used."""

    def __init__(self, trainer: Any, meta: dict[str, Any]):
        cfg = trainer.config
        self.trainer = trainer
        probe = meta.get("probe")
        if not probe or not Path(probe).is_file():
            raise TraceError(
                f"--rescore-every: the probe file of {cfg.scores} ({probe!r}, from its .meta.json) is not there; "
                "re-scoring runs the probe pass again and needs it: rescore with `trace-ds score`"
            )
        self.normalize = meta.get("normalize", "per-category")
        # the probe file is given, so how a built one got its suppression pairs does not enter re-scoring
        paper = {key: value for key, value in PAPER_WEIGHTING.items() if key != "probe_suppression"}
        unsupported = {key: meta[key] for key, default in paper.items() if meta.get(key, default) != default}
        if unsupported:
            raise TraceError(
                f"--rescore-every re-scores with the paper's weighting (dot scores, clamp and normalise, the plain "
                f"probe), and {cfg.scores} was made with {unsupported}: in-run re-scoring of other weightings is "
                "not implemented yet; train without --rescore-every, or score with --score-metric dot --weighting "
                "paper --probe-normalize none"
            )
        self.settings = ScoreConfig(
            model=cfg.model,
            triaged=cfg.triaged,
            out=str(Path(cfg.out) / "rescores" / "scores.jsonl"),
            probe=probe,
            relational=cfg.relational,
            beta=cfg.beta,
            micro_batch=cfg.micro_batch,
            dtype=cfg.dtype,
            tokenize=cfg.tokenize,
            vocab_tile=cfg.vocab_tile,
            logp_reduction=cfg.logp_reduction,
            gradient_checkpointing=cfg.gradient_checkpointing,
            **paper,
        )
        held_out = {
            str(record.get("id"))
            for _, record in iter_jsonl(cfg.scores)
            if isinstance(record, dict) and record.get("probe_holdout")
        }
        pairs = read_pairs(cfg.triaged).pairs
        self.targets = [(p, c) for p in pairs if (c := category_of(p)) in CONFLICT]
        self.held_out = held_out
        self.probe = read_pairs(probe).pairs

    def _tokens(self, pairs: list[Pair]) -> list[TokenizedPair]:
        return [tokenize_pair(p, self.trainer.tokenizer, self.settings.tokenize) for p in pairs]

    def _passes(self, module: Any) -> list[tuple[str, float]]:
        """The probe pass (G at the current weights), then this rank's share of the conflict pairs."""
        trainer, settings, strategy = self.trainer, self.settings, self.trainer.strategy
        scorer = GhostScorer(module, trainer.pad_id, settings, store=strategy.probe_store())
        probe = self._tokens(self.probe)
        dummy = probe[:1]
        for chunk in strategy.shard(probe, settings.micro_batch):
            weight = 1.0 / len(probe) if chunk else 0.0
            scorer.probe_step(chunk or dummy, weight, trainer.with_reference)
        scorer.finish_probe()
        todo = [(p, c) for p, c in self.targets if p.id not in self.held_out]
        mine: list[tuple[str, float]] = []
        for chunk in strategy.shard(todo, settings.micro_batch):
            if chunk is None:  # a dummy step keeps every rank's module calls in step
                scorer.score(dummy, ["inversion"], trainer.with_reference)
                continue
            raw = scorer.score(
                self._tokens([p for p, _ in chunk]), [c for _, c in chunk], trainer.with_reference
            )
            mine += [(p.id, value) for (p, _), value in zip(chunk, raw, strict=True)]
        return mine

    def rescore(self, step: int) -> Rescored:
        """Probe pass and scoring passes at the current weights; every rank returns the same result."""
        trainer = self.trainer
        strategy = trainer.strategy
        started = time.perf_counter()
        module = trainer.engine.module
        module.eval()  # as the offline scorer's model (no dropout)
        try:
            with strategy.gradient_hooks_paused(trainer.engine):
                mine = self._passes(module)
        finally:
            module.train()
        done = {k: v for part in strategy.all_gather_object(mine) for k, v in part}
        scored = [
            Scored(p.id, c, None, probe_holdout=True)
            if p.id in self.held_out
            else Scored(p.id, c, done[p.id])
            for p, c in self.targets
        ]
        # a category all <= 0 mid-run gets zero weights (the run goes on; the offline check refused it at theta_ref)
        normalize_weights(scored, self.normalize, allow_empty=True)
        result = Rescored(step, scored, time.perf_counter() - started)
        if strategy.is_main:
            write_jsonl(
                Path(trainer.out) / "rescores" / f"step_{step:08d}.jsonl", (s.record() for s in scored)
            )
        return result
