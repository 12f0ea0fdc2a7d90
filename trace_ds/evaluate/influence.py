"""A first-order check of impact scores against real SGD steps (docs/method.md, "Impact scores").

TRACE's raw score of a conflict pair i is s_i = <grad L_i, grad J> at the reference weights theta_ref, so one
SGD step of size eta on pair i alone changes the probe loss by

    dJ_i = J(theta_ref - eta grad L_i) - J(theta_ref) = -eta s_i + O(eta^2).

:func:`influence_check` takes a seeded, category-stratified sample of scored conflict pairs, makes that step for
each pair (plain autograd, one process, no DeepSpeed, no ghost paths), measures dJ_i exactly and reports how
well the scores rank the measured changes (Spearman of s_i against -dJ_i) and how close -dJ_i / (eta s_i) is
to 1. It tests the scores file end to end: the ghost scorer, the probe, the loss heads and the reductions.

J is the scorer's probe objective, the mean relational loss over the probe pairs, with r = logp_theta -
logp_ref where logp_ref are the probe's log-probs at theta_ref, computed once. L_i is the pair's scored loss
(relational on an inversion, NPO on both responses of a suppression, NPO on the chosen response of an
``unlearning`` pair) with reference log-probs from theta_ref, which at theta_ref is exactly what the scorer
differentiates. Log-probs are computed in the model's dtype (fp32) and the losses and J in float64.

Run it as ``python -m trace_ds.evaluate.influence --model M --triaged T --scores S [--probe P] [--out F]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trace_ds.config import DEFAULT_VOCAB_TILE
from trace_ds.data.batching import collate_pairs
from trace_ds.data.pairs import read_pairs
from trace_ds.data.tokenize import TokenizeConfig, TokenizedPair, tokenize_pair
from trace_ds.io import TraceError, iter_jsonl_lenient, write_json
from trace_ds.scoring.weights import scores_meta_path
from trace_ds.training.losses import relational_loss

# lr=None (the default) calibrates the step: no fixed eta suits every model and loss. Measured (scores of 20 pairs
# each): on a tiny random Llama (IPO, sum) eta = 1e-5 gives Spearman 0.998 and -dJ_i / (eta s_i) within 7% of 1,
# but on the demo's SFT model (scores up to 1e6) the same eta gives ratios from 0.1 to 5.6 and eta = 1e-4 a
# Spearman of -0.13, while eta = 1e-7 gives 1.0; and DPO's scores (beta/2 instead of 1/beta per margin) need a
# step relative to max |s_i| 100 times smaller than IPO's. So the step starts where the largest predicted change
# max_i eta |s_i| is CALIBRATION_START of J(theta_ref) and halves until the CALIBRATION_PAIRS sampled pairs of
# largest |s_i| (the largest steps) each give -dJ_i / (eta s_i) within CALIBRATION_TOLERANCE of 1: the largest
# step in the linear regime, so the small scores stay as far above the fp32 noise of J as they can.
CALIBRATION_START = 0.1
CALIBRATION_TOLERANCE = 0.02
CALIBRATION_PAIRS = 3
CALIBRATION_HALVINGS = 16

RESULT_KEYS = (
    "pairs",
    "spearman",
    "pearson",
    "sign_agreement",
    "first_order_ratio",
    "by_category",
    "lr",
    "lr_calibration",
    "probe_pairs",
    "probe_loss",
    "seconds",
    "settings",
    "points",
)


def influence_check(
    model: str,
    triaged: str,
    scores: str,
    probe: str,
    *,
    sample: int = 40,
    lr: float | None = None,
    seed: int = 0,
    beta: float = 0.1,
    relational: str = "ipo",
    logp_reduction: str = "sum",
    vocab_tile: int = DEFAULT_VOCAB_TILE,
    tokenize: TokenizeConfig | None = None,
    micro_batch: int = 16,
) -> dict[str, Any]:
    """Compare the impact scores in ``scores`` with the probe-loss change of one SGD step of size ``lr`` on each of
    ``sample`` sampled conflict pairs (seeded, stratified by category in proportion). ``lr`` None calibrates the
    step (the largest at which the pairs of largest |s_i| are first order within 2%; see CALIBRATION_START).

    ``model`` is the reference the scores were computed at; ``probe`` the probe pairs they were computed against
    (``<scores stem>.probe.jsonl`` for a built probe, else the ``--probe`` file). ``beta``, ``relational`` and
    ``logp_reduction`` must be the scoring run's (checked against ``<scores stem>.meta.json`` when present).

    Returns a dict with the keys of :data:`RESULT_KEYS`: ``pairs`` (how many were checked), ``spearman`` (rank
    correlation of s_i and -dJ_i, average ranks for ties), ``pearson``, ``sign_agreement`` (share of pairs
    where s_i and -dJ_i have the same sign), ``first_order_ratio`` (median, min and max of -dJ_i / (lr s_i)
    over pairs with s_i != 0: 1 to first order), ``by_category`` (pairs, spearman and the ratio median per
    category), ``lr`` (the step used), ``lr_calibration`` (None for a given ``lr``, else the pairs it used, the
    tolerance, whether it was met and every step tried with its worst |ratio - 1|), ``probe_pairs``,
    ``probe_loss`` (J at theta_ref), ``seconds``, ``settings`` and ``points``:
    ``[{id, category, raw_score, probe_loss_change}]`` in scores-file order.
    """
    from trace_ds.models.loading import load_causal_lm, load_tokenizer, pad_token_id
    from trace_ds.scoring.probe import category_of
    from trace_ds.training.vocab_head import check_head

    started = time.perf_counter()
    if sample < 1:
        raise TraceError(f"sample={sample}: must be at least 1")
    if micro_batch < 1:
        raise TraceError(f"micro_batch={micro_batch}: must be at least 1")
    if lr is not None and not lr > 0:
        raise TraceError(f"lr={lr}: must be positive")
    settings = {"beta": beta, "relational": relational, "logp_reduction": logp_reduction}
    _check_meta(Path(scores), settings)
    tokenize = tokenize or TokenizeConfig()

    records = _read_scores(Path(scores))
    chosen = stratified_sample(records, sample, seed)
    pairs = {p.id: p for p in read_pairs(triaged).pairs}
    missing = [r["id"] for r in chosen if r["id"] not in pairs]
    if missing:
        raise TraceError(f"{scores}: {len(missing)} scored pair(s) are not in {triaged}, e.g. {missing[0]!r}")
    for record in chosen:
        category = category_of(pairs[record["id"]])
        if category != record["category"]:
            raise TraceError(
                f"pair {record['id']!r} is {category} in {triaged} but {record['category']} in {scores}: "
                "the scores belong to another triage"
            )
    probe_pairs = read_pairs(probe).pairs
    if not probe_pairs:
        raise TraceError(f"{probe}: no probe pairs")

    targets = [pairs[r["id"]] for r in chosen]
    needs_tokenizer = any(p.shape != "tokenized" for p in targets + probe_pairs)
    tokenizer = load_tokenizer(model, required=needs_tokenizer)
    net = load_causal_lm(model, "float32")
    pad_id = pad_token_id(tokenizer, net)
    check_head(net, vocab_tile)

    objective = ProbeObjective(
        net,
        [tokenize_pair(p, tokenizer, tokenize) for p in probe_pairs],
        pad_id,
        micro_batch=micro_batch,
        beta=beta,
        relational=relational,
        logp_reduction=logp_reduction,
        vocab_tile=vocab_tile,
    )
    j_ref = objective.value()
    stepper = _Stepper(net, objective, j_ref)

    def gradient(record: dict[str, Any], pair: Any) -> list[torch.Tensor]:
        return pair_gradient(
            net,
            stepper.params,
            tokenize_pair(pair, tokenizer, tokenize),
            record["category"],
            pad_id,
            beta=beta,
            relational=relational,
            logp_reduction=logp_reduction,
            vocab_tile=vocab_tile,
        )

    calibration: dict[str, Any] | None = None
    if lr is None:
        lr, calibration = _calibrate(stepper, chosen, targets, gradient)
    points = []
    for record, pair in zip(chosen, targets, strict=True):
        points.append(
            {
                "id": record["id"],
                "category": record["category"],
                "raw_score": record["raw_score"],
                "probe_loss_change": stepper.change(gradient(record, pair), lr),
            }
        )
    return {
        **summarise(points, lr),
        "lr": lr,
        "lr_calibration": calibration,
        "probe_pairs": len(probe_pairs),
        "probe_loss": j_ref,
        "seconds": round(time.perf_counter() - started, 3),
        "settings": {**settings, "sample": sample, "seed": seed, "vocab_tile": vocab_tile},
        "points": points,
    }


class _Stepper:
    """dJ of one SGD step from the saved weights theta_ref, which it restores after each step."""

    def __init__(self, model: nn.Module, objective: ProbeObjective, j_ref: float):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.saved = [p.detach().clone() for p in self.params]
        self.objective = objective
        self.j_ref = j_ref

    def change(self, grads: Sequence[torch.Tensor], lr: float) -> float:
        """J(theta_ref - lr grads) - J(theta_ref)."""
        try:
            with torch.no_grad():
                for param, grad in zip(self.params, grads, strict=True):
                    param.add_(grad, alpha=-lr)
            return self.objective.value() - self.j_ref
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, self.saved, strict=True):
                    param.copy_(value)


def _calibrate(
    stepper: _Stepper, chosen: list[dict[str, Any]], targets: list[Any], gradient: Any
) -> tuple[float, dict[str, Any]]:
    """The largest step (from CALIBRATION_START * J / max |s|, halving) at which the sampled pairs of largest |s|
    are first order within CALIBRATION_TOLERANCE; the best one tried when none is."""
    ranked = sorted(range(len(chosen)), key=lambda i: -abs(chosen[i]["raw_score"]))[:CALIBRATION_PAIRS]
    ranked = [i for i in ranked if chosen[i]["raw_score"] != 0]
    if not ranked:
        raise TraceError("every sampled raw score is 0: no step size can be calibrated; pass lr")
    grads = [gradient(chosen[i], targets[i]) for i in ranked]
    scores = [float(chosen[i]["raw_score"]) for i in ranked]
    lr = CALIBRATION_START * abs(stepper.j_ref) / abs(scores[0])
    tried = []
    for _ in range(CALIBRATION_HALVINGS + 1):
        ratios = [-stepper.change(g, lr) / (lr * s) for g, s in zip(grads, scores, strict=True)]
        worst = max(abs(r - 1) for r in ratios)
        tried.append({"lr": lr, "worst_ratio_error": worst})
        if worst <= CALIBRATION_TOLERANCE:
            break
        lr /= 2
    best = min(tried, key=lambda t: t["worst_ratio_error"])
    return best["lr"], {
        "pairs": [chosen[i]["id"] for i in ranked],
        "tolerance": CALIBRATION_TOLERANCE,
        "met": best["worst_ratio_error"] <= CALIBRATION_TOLERANCE,
        "tried": tried,
    }


class ProbeObjective:
    """J(theta) = (sum over the probe of the relational loss) / B with r = logp_theta - logp_ref, logp_ref the
    probe's log-probs at the weights the object was built at; losses and their sum in float64."""

    def __init__(
        self,
        model: nn.Module,
        probe: Sequence[TokenizedPair],
        pad_id: int,
        *,
        micro_batch: int,
        beta: float,
        relational: str,
        logp_reduction: str,
        vocab_tile: int,
    ):
        self.model = model
        self.beta = beta
        self.relational = relational
        self.logp_reduction = logp_reduction
        self.vocab_tile = vocab_tile
        self.count = len(probe)
        device = next(model.parameters()).device
        self.batches = [
            collate_pairs(probe[start : start + micro_batch], pad_id).to(device)
            for start in range(0, len(probe), micro_batch)
        ]
        self.reference = [self._logps(batch) for batch in self.batches]

    def _logps(self, batch: Any) -> torch.Tensor:
        from trace_ds.scoring.scorer import batch_logps

        with torch.no_grad():
            chosen, rejected = batch_logps(self.model, batch, self.vocab_tile, self.logp_reduction)
        return torch.stack([chosen, rejected]).double()

    def value(self) -> float:
        """J at the model's current weights (the same micro-batches every time, so fp32 noise is not added by
        a different batch composition)."""
        total = torch.zeros((), dtype=torch.float64)
        for batch, reference in zip(self.batches, self.reference, strict=True):
            reward = self._logps(batch) - reference
            losses = relational_loss(reward[0] - reward[1], self.beta, self.relational)  # type: ignore[arg-type]
            total += losses.sum().cpu()
        return float(total) / self.count


def pair_gradient(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    pair: TokenizedPair,
    category: str,
    pad_id: int,
    *,
    beta: float,
    relational: str,
    logp_reduction: str,
    vocab_tile: int,
) -> list[torch.Tensor]:
    """grad L_i at the model's weights, with the reference log-probs taken at those weights (r = 0 in value),
    exactly the loss the scorer differentiates (trace_ds.scoring.scorer.pair_losses)."""
    from trace_ds.scoring.scorer import batch_logps, pair_losses

    batch = collate_pairs([pair], pad_id).to(next(model.parameters()).device)
    with torch.enable_grad():
        logp_chosen, logp_rejected = batch_logps(model, batch, vocab_tile, logp_reduction)
        loss = pair_losses(logp_chosen, logp_rejected, [category], relational, beta).sum()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _check_meta(scores: Path, settings: dict[str, Any]) -> None:
    """Refuse settings other than the scoring run's (its meta file, when there is one)."""
    meta_path = scores_meta_path(scores)
    if not meta_path.exists():
        return
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("lora"):
        raise TraceError(
            f"{scores} was scored with --lora (the adapters' gradients); the influence check steps the full model"
        )
    if meta.get("probe_normalize", "none") != "none":
        raise TraceError(
            f"{scores} was scored against unit-normalised probe pairs (--probe-normalize unit), not the gradient of "
            "the mean probe loss that the influence check steps: score with --probe-normalize none to check it"
        )
    for key, value in settings.items():
        if key in meta and meta[key] != value:
            raise TraceError(
                f"{key}={value!r}, but {scores} was scored with {key}={meta[key]!r} ({meta_path}): pass the scoring "
                "run's setting"
            )


def _read_scores(path: Path) -> list[dict[str, Any]]:
    """The scored conflict pairs of a scores file (raw_score not null), in file order."""
    if not path.exists():
        raise TraceError(f"{path}: no such scores file")
    out = []
    for position, record in iter_jsonl_lenient(path):
        if not isinstance(record, dict) or not {"id", "category", "raw_score"} <= record.keys():
            raise TraceError(f"{position}: not a scores line ({{id, category, raw_score, weight}})")
        if record["raw_score"] is not None:
            out.append(record)
    if not out:
        raise TraceError(f"{path}: no scored pair (every raw_score is null)")
    return out


def stratified_sample(records: list[dict[str, Any]], sample: int, seed: int) -> list[dict[str, Any]]:
    """``sample`` records (all when fewer), each category's share in proportion to its size (largest
    remainders; every category gets at least one when there is room), drawn with ``random.Random(seed)``, in
    file order."""
    by_category: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_category.setdefault(record["category"], []).append(index)
    total = len(records)
    want = min(sample, total)
    exact = {c: want * len(members) / total for c, members in by_category.items()}
    counts = {c: math.floor(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: (counts[c] - exact[c], c))[: want - sum(counts.values())]:
        counts[c] += 1
    if want >= len(by_category):
        for c in by_category:
            if counts[c] == 0:
                donor = max(counts, key=lambda d: (counts[d], d))
                counts[donor] -= 1
                counts[c] = 1
    rng = random.Random(seed)
    picked = [i for c in sorted(by_category) for i in rng.sample(by_category[c], counts[c])]
    return [records[i] for i in sorted(picked)]


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan for fewer than 2 points or a constant sequence."""
    n = len(x)
    if n != len(y):
        raise ValueError("pearson: sequences of different lengths")
    if n < 2:
        return math.nan
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the average ranks (exact with ties)."""
    return pearson(average_ranks(x), average_ranks(y))


def summarise(points: Sequence[dict[str, Any]], lr: float) -> dict[str, Any]:
    """The agreement statistics of ``points`` (see :func:`influence_check`)."""

    def stats(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
        scores = [p["raw_score"] for p in group]
        gains = [-p["probe_loss_change"] for p in group]
        ratios = sorted(g / (lr * s) for s, g in zip(scores, gains, strict=True) if s != 0)
        return {
            "pairs": len(group),
            "spearman": spearman(scores, gains),
            "pearson": pearson(scores, gains),
            "sign_agreement": (
                sum((s > 0) == (g > 0) for s, g in zip(scores, gains, strict=True)) / len(group)
                if group
                else math.nan
            ),
            "first_order_ratio": {
                "median": _median(ratios),
                "min": ratios[0] if ratios else math.nan,
                "max": ratios[-1] if ratios else math.nan,
            },
        }

    overall = stats(points)
    categories = sorted({p["category"] for p in points})
    overall["by_category"] = {
        c: {
            key: value
            for key, value in stats([p for p in points if p["category"] == c]).items()
            if key in ("pairs", "spearman", "first_order_ratio")
        }
        for c in categories
    }
    return overall


def _median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m trace_ds.evaluate.influence",
        description="First-order check of impact scores: one SGD step per sampled pair, probe-loss change.",
    )
    parser.add_argument("--model", required=True, help="the reference model the scores were computed at")
    parser.add_argument("--triaged", required=True)
    parser.add_argument("--scores", required=True)
    parser.add_argument("--probe", help="probe pairs (default: <scores stem>.probe.jsonl)")
    parser.add_argument("--sample", type=int, default=40)
    parser.add_argument("--lr", type=float, help="the SGD step (default: calibrated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--relational", choices=("ipo", "dpo"), default="ipo")
    parser.add_argument("--logp-reduction", choices=("sum", "mean"), default="sum")
    parser.add_argument("--vocab-tile", type=int, default=DEFAULT_VOCAB_TILE)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    scores = Path(args.scores)
    result = influence_check(
        args.model,
        args.triaged,
        args.scores,
        args.probe or str(scores.with_name(f"{scores.stem}.probe.jsonl")),
        sample=args.sample,
        lr=args.lr,
        seed=args.seed,
        beta=args.beta,
        relational=args.relational,
        logp_reduction=args.logp_reduction,
        vocab_tile=args.vocab_tile,
        tokenize=TokenizeConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length),
        micro_batch=args.micro_batch,
    )
    if args.out:
        write_json(args.out, result)
    summary = {k: result[k] for k in ("pairs", "spearman", "pearson", "sign_agreement", "first_order_ratio")}
    print(json.dumps({**summary, "lr": result["lr"], "seconds": result["seconds"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
