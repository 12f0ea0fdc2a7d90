"""Impact scores -> training weights: the score metric and the weight map, one place for scoring and in-run
re-scoring.

Metric: ``dot`` is the paper's raw score <g_i, G>; ``cosine`` divides it by ||g_i|| ||G|| (ghost norms), so
that a pair is weighted by the direction of its gradient, not its size (docs/method.md, "Weighting").

Maps, each within a conflict category (or over all of them, ``joint``), mean 1 (joint: sum 1):

* ``paper``: max(0, s), normalised (the paper's clamp and normalise; zero for every pair that would raise the
  probe loss to first order);
* ``standardized``: max(w_min, 1 + alpha z) with z the category's standardised score, normalised: every pair
  keeps some weight, the spread is bounded;
* ``prune:q``: the lowest fraction q of the category's scores, and every pair with a negative score, get 0;
  the rest weight 1, normalised;
* ``uniform``: 1 for every pair (impact weighting off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_ds.io import TraceError, read_json

CONFLICT = ("inversion", "suppression", "unlearning")  # unlearning: the w/o-triage baseline
METRICS = ("dot", "cosine")
MAPS = ("paper", "standardized", "prune", "uniform")


@dataclass
class Scored:
    id: str
    category: str
    raw_score: float | None  # None for a --probe-holdout pair: not scored (its own score would be biased)
    weight: float = 0.0
    probe_holdout: bool = False
    grad_norm: float | None = None  # ||grad L_i|| over every trainable parameter (ghost norms)
    cosine: float | None = None  # raw_score / (grad_norm ||G||)

    def record(self) -> dict[str, Any]:
        """The scores-file line; a held-out pair is marked ``"probe_holdout": true``."""
        out: dict[str, Any] = {
            "id": self.id,
            "category": self.category,
            "raw_score": self.raw_score,
            "weight": self.weight,
        }
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
            out["cosine"] = self.cosine
        if self.probe_holdout:
            out["probe_holdout"] = True
        return out


def parse_map(text: str) -> tuple[str, float]:
    """``paper`` / ``standardized`` / ``uniform`` / ``prune:Q`` (0 <= Q < 1) -> (map, Q)."""
    name, _, value = text.partition(":")
    if name not in MAPS or (name == "prune") != bool(value):
        raise TraceError(
            f"--weighting {text!r}: use paper, standardized, uniform or prune:Q (Q the fraction of each category "
            "dropped, lowest scores first, e.g. prune:0.25)"
        )
    if name != "prune":
        return name, 0.0
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction < 1.0:
        raise TraceError(f"--weighting {text!r}: the pruned fraction must be in [0, 1)")
    return name, fraction


def scores_meta_path(scores: str | Path) -> Path:
    """``<scores stem>.meta.json``: how a scores file was made, every weighting choice included."""
    path = Path(scores)
    return path.with_name(f"{path.stem}.meta.json")


def read_scores_meta(scores: str | Path) -> dict[str, Any]:
    """A scores file's meta, or {} for a file without one."""
    path = scores_meta_path(scores)
    return read_json(path) if path.exists() else {}


@dataclass(frozen=True)
class Weighting:
    """Every choice that turns scores into weights (recorded in the scores' meta as it is)."""

    metric: str = "dot"
    weighting: str = "paper"
    alpha: float = 0.5
    w_min: float = 0.1
    normalize: str = "per-category"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise TraceError(f"--score-metric {self.metric!r}: use dot or cosine")
        parse_map(self.weighting)
        if self.alpha <= 0 or not 0.0 <= self.w_min < 1.0:
            raise TraceError(
                f"--weight-alpha {self.alpha} / --weight-min {self.w_min}: alpha > 0, w_min in [0, 1)"
            )
        if self.normalize not in ("per-category", "joint"):
            raise TraceError(f"--normalize {self.normalize!r}: use per-category or joint")


def value_of(s: Scored, metric: str) -> float | None:
    return s.raw_score if metric == "dot" else s.cosine


def assign_weights(scored: list[Scored], weighting: Weighting, allow_empty: bool) -> None:
    """Weights for every scored pair, in place, by ``weighting`` (see the module docstring).

    A ``--probe-holdout`` pair (no score) counts as the mean mapped value of the scored pairs of its category,
    so it gets that category's mean weight (1 per-category) and the normalisation covers every pair."""
    name, fraction = parse_map(weighting.weighting)
    for category in CONFLICT:
        members = [s for s in scored if s.category == category]
        if members and all(value_of(s, weighting.metric) is None for s in members):
            raise TraceError(
                f"--probe-holdout holds out every {category} pair, so none is left to score and the held-out "
                "ones have no category mean to take; lower --probe-size or pass a curated --probe file"
            )
    groups = (
        {c: [s for s in scored if s.category == c] for c in CONFLICT}
        if weighting.normalize == "per-category"
        else {"all": scored}
    )
    for group_name, group in groups.items():
        if not group:
            continue
        known = [s for s in group if value_of(s, weighting.metric) is not None]
        raw = _map(name, fraction, [value_of(s, weighting.metric) for s in known], weighting)  # type: ignore[misc]
        mapped = {id(s): v for s, v in zip(known, raw, strict=True)}
        category_mean = {
            c: math.fsum(vs) / len(vs)
            for c in CONFLICT
            if (vs := [mapped[id(s)] for s in known if s.category == c])
        }
        full = [mapped.get(id(s), category_mean.get(s.category, 0.0)) for s in group]
        total = math.fsum(full)
        if total <= 0.0:
            if not allow_empty:
                raise TraceError(
                    f"every {group_name} score is <= 0: no {group_name} pair lowers the probe loss to first order, "
                    "so that category would get no update. Check the probe (does it cover this category? a larger "
                    "--probe-size or a curated --probe file); --beta only rescales the scores at the reference "
                    "weights, so it cannot change their sign. Or pass --allow-empty to continue with zero weights"
                )
            for s in group:
                s.weight = 0.0
            continue
        scale = len(group) / total if weighting.normalize == "per-category" else 1.0 / total
        for s, value in zip(group, full, strict=True):
            s.weight = value * scale


def _map(name: str, fraction: float, values: list[float], weighting: Weighting) -> list[float]:
    """Unnormalised weights of one group's known scores."""
    if name == "uniform":
        return [1.0] * len(values)
    if name == "paper":
        return [max(0.0, v) for v in values]
    if name == "standardized":
        mean = math.fsum(values) / len(values)
        spread = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
        if spread == 0.0:
            return [1.0] * len(values)
        return [max(weighting.w_min, 1.0 + weighting.alpha * (v - mean) / spread) for v in values]
    # prune: drop the lowest `fraction` (ties by position, stably) and every negative score
    cut = math.floor(fraction * len(values))
    order = sorted(range(len(values)), key=lambda i: values[i])
    dropped = set(order[:cut])
    kept = [0.0 if i in dropped or v < 0.0 else 1.0 for i, v in enumerate(values)]
    return kept
