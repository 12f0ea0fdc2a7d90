"""Scores -> weights (issue 21): the maps, the cosine metric and the probe variants of `trace-ds score`,
against hand computations and fp64 per-pair gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.config import ScoreConfig
from trace_ds.data.pairs import read_pairs
from trace_ds.data.tokenize import tokenize_pair
from trace_ds.io import TraceError
from trace_ds.scoring.probe import build_probe
from trace_ds.scoring.weights import Scored, Weighting, assign_weights, parse_map

from .helpers import read_lines, reference_loss, triaged_benchmark
from .test_score_cli import score_args


def scored(values: list[float | None], category: str = "inversion") -> list[Scored]:
    return [Scored(f"p{i}", category, v, probe_holdout=v is None) for i, v in enumerate(values)]


def test_paper_map_is_the_old_clamp_and_normalise() -> None:
    items = scored([2.0, -1.0, 6.0, None])
    assign_weights(items, Weighting(), allow_empty=False)
    # clamped [2, 0, 6] mean 8/3 for the held-out pair; total 32/3 over 4 pairs: weights x * 4 / (32/3)
    assert [s.weight for s in items] == pytest.approx([0.75, 0.0, 2.25, 1.0])


def test_standardized_map_is_bounded_and_mean_one() -> None:
    items = scored([0.0, 1.0, 2.0, 30.0])
    assign_weights(items, Weighting(weighting="standardized", alpha=0.5, w_min=0.1), allow_empty=False)
    values = [0.0, 1.0, 2.0, 30.0]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    raw = [max(0.1, 1 + 0.5 * (v - mean) / sd) for v in values]
    assert [s.weight for s in items] == pytest.approx([r * 4 / sum(raw) for r in raw])
    assert sum(s.weight for s in items) == pytest.approx(4.0) and min(s.weight for s in items) > 0


def test_prune_drops_the_lowest_fraction_and_negative_scores() -> None:
    items = scored([5.0, -1.0, 3.0, 4.0, 1.0, 2.0, 6.0, 7.0])
    assign_weights(items, Weighting(weighting="prune:0.25"), allow_empty=False)
    # the lowest 2 of 8 (-1, 1) and the negative one (already among them): 6 kept, weight 8/6 each
    kept = [s.weight > 0 for s in items]
    assert kept == [True, False, True, True, False, True, True, True]
    assert all(s.weight == pytest.approx(8 / 6) for s in items if s.weight > 0)


def test_uniform_and_cosine_metric() -> None:
    items = [Scored("a", "inversion", 10.0, cosine=-0.5), Scored("b", "inversion", -3.0, cosine=0.25)]
    assign_weights(items, Weighting(weighting="uniform"), allow_empty=False)
    assert [s.weight for s in items] == [1.0, 1.0]
    assign_weights(items, Weighting(metric="cosine"), allow_empty=False)  # cosine decides, not the raw score
    assert [s.weight for s in items] == [0.0, 2.0]


@pytest.mark.parametrize("text", ["prune", "prune:1", "prune:x", "top:0.5", "paper:0.5"])
def test_bad_weighting_options_are_refused(text: str) -> None:
    with pytest.raises(TraceError, match="--weighting"):
        parse_map(text)


def test_probe_variants_keep_their_shares(tmp_path: Path) -> None:
    triaged = triaged_benchmark(tmp_path, n_pairs=60, seed=5, n_eval_prompts=4, n_eval_pairs=4)
    pairs = read_pairs(str(triaged)).pairs
    drop = build_probe(pairs, 9, 0, "drop")
    assert sorted(p.extra["category"] for p in drop) == ["inversion"] * 5 + ["retention"] * 4
    with pytest.warns(UserWarning, match="same-prompt"):  # no synthetic suppression prompt recurs
        same = build_probe(pairs, 9, 0, "same-prompt")
    assert {p.extra["category"] for p in same} <= {"inversion", "retention"}
    assert [p.id for p in build_probe(pairs, 9, 0, "pool")] == [p.id for p in build_probe(pairs, 9, 0)]


@pytest.mark.slow
def test_unit_probe_and_cosine_scores_equal_fp64_per_pair_gradients(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`--probe-normalize unit --score-metric cosine`: G = (1/B) sum_j g_j / ||g_j|| from fp64 per-pair
    probe gradients; every pair's raw score <g_i, G>, grad_norm ||g_i|| and cosine against it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    triaged = triaged_benchmark(tmp_path, n_pairs=24, seed=7, n_eval_prompts=4, n_eval_pairs=4)
    out = tmp_path / "s.jsonl"
    args = score_args(tiny_model_dir, triaged, out, "--probe-normalize", "unit", "--score-metric", "cosine")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    meta = __import__("json").loads(out.with_name("s.meta.json").read_text())
    assert (meta["probe_normalize"], meta["score_metric"]) == ("unit", "cosine")

    cfg = ScoreConfig(model=str(tiny_model_dir), triaged=str(triaged), out=str(out), beta=0.5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    tok = {"max_length": 160, "max_prompt_length": 64}
    from trace_ds.data.tokenize import TokenizeConfig

    tcfg = TokenizeConfig(**tok)

    def grad(pair, category):  # type: ignore[no-untyped-def]
        loss = reference_loss(model, tokenize_pair(pair, tokenizer, tcfg), category, cfg)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    probe = read_pairs(str(out.with_name("s.probe.jsonl"))).pairs
    # a probe pair with no gradient (both responses the same tokens) adds nothing, as trace-ds gives it weight 0
    unit = [g / g.norm() if g.norm() > 0 else g for g in (grad(p, "inversion") for p in probe)]
    big_g = sum(unit) / len(unit)
    assert meta["probe_norm"] == pytest.approx(float(big_g.norm()), rel=1e-5)
    by_id = {p.id: p for p in read_pairs(str(triaged)).pairs}
    for record in read_lines(out):
        g = grad(by_id[record["id"]], record["category"])
        if g.norm() == 0:
            assert record["grad_norm"] < 1e-6 and record["cosine"] == 0.0
            continue
        assert record["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
        scale = float(g.norm() * big_g.norm())
        assert abs(record["raw_score"] - float(g @ big_g)) <= 1e-5 * scale
        assert record["cosine"] == pytest.approx(float(g @ big_g) / scale, abs=1e-5)
    weights = [r["weight"] for r in read_lines(out) if r["category"] == "inversion"]
    assert sum(weights) == pytest.approx(len(weights))


def test_the_screen_ranks_at_matched_utility_and_puts_unmatched_combinations_last() -> None:
    from trace_ds.pipeline.weighting_study import ranking

    def point(combo: str, tpa: float, ppl: float) -> dict:
        return {"combo": combo, "tpa_all": tpa, "ppl_stable": ppl}

    points = [
        point("a", 0.9, 130.0),  # the best TPA, but past the budget (100 * 1.1)
        point("a", 0.4, 105.0),
        point("b", 0.5, 109.0),
        point("c", 0.8, 120.0),  # no point within the budget
    ]
    rows = ranking(["a", "b", "c"], points, old_ppl=100.0)
    assert [(r["combo"], r["best"] and r["best"]["tpa_all"]) for r in rows] == [
        ("b", 0.5),
        ("a", 0.4),
        ("c", None),
    ]


def test_the_verdict_picks_the_best_combination_never_worse_than_uniform() -> None:
    from trace_ds.pipeline.weighting_study import verdict

    def cell(combo: str, noise: float, tpa: float, diff: tuple[float, float | None]) -> dict:
        return {"combo": combo, "noise": noise, "tpa_all": {"mean": tpa},
                "minus_uniform": {"mean": diff[0], "ci95": diff[1]}}  # fmt: skip

    cells = [
        cell("uniform", 0.0, 0.50, (0.0, 0.0)),
        cell("uniform", 0.3, 0.40, (0.0, 0.0)),
        cell("best-but-unsafe", 0.0, 0.90, (0.40, 0.05)),
        cell("best-but-unsafe", 0.3, 0.20, (-0.20, 0.05)),  # worse than uniform beyond the interval
        cell("pays-on-noise", 0.0, 0.49, (-0.01, 0.05)),  # within the interval on clean data
        cell("pays-on-noise", 0.3, 0.60, (0.20, 0.05)),
        cell("one-seed", 0.0, 0.95, (0.45, None)),  # no interval: undecided, not chosen
        cell("one-seed", 0.3, 0.95, (0.55, 0.05)),
    ]
    result = verdict(cells, "uniform")
    rows = {r["combo"]: r for r in result["rows"]}
    assert result["default"] == "pays-on-noise"
    assert rows["pays-on-noise"]["status"] == {"0": "safe (within the interval of uniform)", "0.3": "pays"}
    assert rows["one-seed"]["status"]["0"].startswith("undecided")
    assert not rows["best-but-unsafe"]["safe"] and not rows["one-seed"]["safe"]
    # nothing safe but uniform: uniform is the default
    assert verdict([c for c in cells if c["combo"] != "pays-on-noise"], "uniform")["default"] == "uniform"


def test_matched_utility_includes_the_old_model_as_the_frontier_s_lr_0_point() -> None:
    from trace_ds.pipeline.weighting_study import matched_or_old

    old = {"tpa_all": 0.40, "ppl_stable": 100.0}

    def point(tpa: float, ppl: float) -> dict:
        return {"tpa_all": tpa, "ppl_stable": ppl, "lr": 1e-4, "old": old}

    assert matched_or_old([point(0.6, 109.0), point(0.9, 120.0)])["tpa_all"] == 0.6
    assert matched_or_old([point(0.6, 109.0)])["within"] is True
    beyond = matched_or_old([point(0.9, 120.0)])  # nothing within the budget: not realigned
    assert (beyond["tpa_all"], beyond["lr"], beyond["at_old_model"], beyond["within"]) == (
        0.40,
        0.0,
        True,
        False,
    )
    worse = matched_or_old([point(0.3, 105.0)])  # within the budget, below the old model
    assert (worse["tpa_all"], worse["at_old_model"], worse["within"]) == (0.40, True, True)
    assert matched_or_old([]) is None


def test_confirmation_workers_share_seeds_and_noise_levels_evenly() -> None:
    """5 seeds x 3 noise levels on 2 workers: by seed alone one worker got 3 seeds of 5 (135 points against
    90). Each seed's first task (it builds the seed's data and model) is dealt out by seed; the rest by (seed,
    noise level), so that no two workers build the same triage or scoring stage."""
    from trace_ds.pipeline.weighting_study import combos_named, owners

    combos = combos_named(["paper-cosine-alg2/ipo", "uniform/ipo"])
    tasks = [
        (s, n, c, lr) for s in range(5) for n in (0.0, 0.2, 0.3) for c in combos for lr in (1e-4, 2e-4, 4e-4)
    ]
    owner_of = owners(tasks, "seed-noise", 2)
    counts = [owner_of.count(k) for k in (0, 1)]
    assert abs(counts[0] - counts[1]) <= 6 and sum(counts) == len(tasks)  # one (seed, level) group apart
    firsts = [next(i for i, t in enumerate(tasks) if t[0] == s) for s in range(5)]
    assert [owner_of[i] for i in firsts] == [0, 1, 0, 1, 0]
    for seed in range(5):
        for level in (0.0, 0.2, 0.3):
            group = {owner_of[i] for i, t in enumerate(tasks) if t[:2] == (seed, level) and i not in firsts}
            assert len(group) == 1  # one worker builds the group's triage and scorings


def test_a_worker_waits_for_the_point_another_worker_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import trace_ds.pipeline.weighting_study as study
    from trace_ds.io import TraceError

    monkeypatch.setattr(study, "WAIT_POLL_S", 0.02)
    mine = study.Ledger(tmp_path, "points-0.jsonl")
    other = study.Ledger(tmp_path, "points-1.jsonl")
    timer = threading.Timer(0.2, other.add, args=({"key": "k1", "tpa_all": 0.5},))
    timer.start()
    study.wait_for_point("k1", mine, tmp_path, ())
    timer.join()
    assert mine.points["k1"]["tpa_all"] == 0.5
    monkeypatch.setattr(study, "WAIT_LIMIT_S", 0.1)
    with pytest.raises(TraceError, match="waited"):
        study.wait_for_point("never", mine, tmp_path, ())
