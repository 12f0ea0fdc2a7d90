"""The first-order influence check (trace_ds/evaluate/influence.py): the ghost scores of a tiny model predict the
probe-loss change of one real SGD step per pair."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from trace_ds.evaluate.influence import (
    RESULT_KEYS,
    average_ranks,
    influence_check,
    pearson,
    spearman,
    stratified_sample,
)
from trace_ds.io import TraceError, write_jsonl

CATEGORIES = ("retention", "inversion", "suppression")


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny random Llama, 36 pre-tokenized triaged pairs (12 per category) and their scores from
    ``trace-ds score``'s own code (a built probe of 9 pairs)."""
    from trace_ds.config import PAPER_WEIGHTING, ScoreConfig
    from trace_ds.models.tiny import build_tiny_llama
    from trace_ds.scoring.scorer import run_score

    root = tmp_path_factory.mktemp("influence")
    build_tiny_llama(root / "model", vocab_size=120, hidden_size=32, intermediate_size=48)
    rng = random.Random(0)

    def ids(k: int) -> list[int]:
        return [rng.randrange(4, 120) for _ in range(k)]

    write_jsonl(
        root / "triaged.jsonl",
        (
            {
                "id": f"p{i}",
                "prompt_input_ids": [1, *ids(rng.randint(2, 6))],
                "chosen_input_ids": [*ids(rng.randint(1, 6)), 2],
                "rejected_input_ids": [*ids(rng.randint(1, 6)), 2],
                "category": CATEGORIES[i % 3],
            }
            for i in range(36)
        ),
    )
    run_score(
        ScoreConfig(
            model=str(root / "model"),
            triaged=str(root / "triaged.jsonl"),
            out=str(root / "scores.jsonl"),
            probe_size=9,
            micro_batch=8,
            kernel="torch",
            allow_empty=True,
            **PAPER_WEIGHTING,  # the check steps the plain mean probe loss (unit probes are refused, below)
        )
    )
    return {
        "model": str(root / "model"),
        "triaged": str(root / "triaged.jsonl"),
        "scores": str(root / "scores.jsonl"),
        "probe": str(root / "scores.probe.jsonl"),
    }


def test_scores_rank_the_measured_probe_loss_changes(scored: dict[str, str]) -> None:
    result = influence_check(**scored, sample=16, seed=3)
    assert tuple(result) == RESULT_KEYS
    assert result["pairs"] == 16 and len(result["points"]) == 16
    assert {c: v["pairs"] for c, v in result["by_category"].items()} == {"inversion": 8, "suppression": 8}
    for point in result["points"]:
        assert set(point) == {"id", "category", "raw_score", "probe_loss_change"}
    assert result["probe_pairs"] == 9 and result["probe_loss"] == pytest.approx(1 / (4 * 0.1**2))
    assert result["lr_calibration"]["met"] and result["lr"] == result["lr_calibration"]["tried"][-1]["lr"]
    # measured on this model: spearman 0.997, pearson 0.999999, ratio median 0.996 (0.957-1.021), lr 1.26e-5
    assert result["spearman"] > 0.95 and result["pearson"] > 0.99 and result["sign_agreement"] >= 0.9
    assert abs(result["first_order_ratio"]["median"] - 1) < 0.02
    assert json.loads(json.dumps(result)) == result  # plain JSON


def test_one_step_matches_minus_lr_times_the_score_to_first_order(scored: dict[str, str]) -> None:
    """dJ_i = -lr s_i + O(lr^2): at the calibrated step the pair of largest |s| is within 2%, and the relative
    error shrinks about linearly with the step (second order), until the fp32 noise of J (measured: 4.0%, 0.93%,
    0.12% at 8, 2 and 1/2 times the calibrated step)."""
    lr = influence_check(**scored, sample=4)["lr"]
    errors = []
    for step in (8 * lr, 2 * lr, lr / 2):
        points = influence_check(**scored, sample=4, lr=step)["points"]
        top = max(points, key=lambda p: abs(p["raw_score"]))
        predicted = -step * top["raw_score"]
        errors.append(abs(top["probe_loss_change"] - predicted) / abs(predicted))
    assert errors[2] < 0.02
    assert errors[1] < errors[0] / 2.5 and errors[2] < errors[1] / 2.5, errors


def test_spearman_uses_average_ranks_for_ties() -> None:
    assert average_ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): Pearson of the ranks (scipy.stats.spearmanr gives 0.9486833)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.9933992677987828)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1], [2]))


def test_sample_is_stratified_in_proportion_and_seeded() -> None:
    records = [{"id": f"i{k}", "category": "inversion", "raw_score": 1.0} for k in range(30)]
    records += [{"id": f"s{k}", "category": "suppression", "raw_score": 1.0} for k in range(10)]
    picked = stratified_sample(records, 8, seed=0)
    assert [r["category"] for r in picked].count("inversion") == 6 and len(picked) == 8
    assert picked == stratified_sample(records, 8, seed=0) != stratified_sample(records, 8, seed=1)
    few = stratified_sample(records[:38], 2, seed=0)  # 30 : 8 rounds to 2 : 0; each category keeps one
    assert sorted(r["category"] for r in few) == ["inversion", "suppression"]
    assert len(stratified_sample(records, 100, seed=0)) == 40


def test_settings_other_than_the_scoring_runs_are_refused(scored: dict[str, str]) -> None:
    with pytest.raises(TraceError, match="scored with relational='ipo'"):
        influence_check(**scored, sample=2, relational="dpo")
    with pytest.raises(TraceError, match="lr=0"):
        influence_check(**scored, lr=0.0)
    meta = json.loads(Path(scored["scores"]).with_name("scores.meta.json").read_text())
    assert meta["relational"] == "ipo" and meta["logp_reduction"] == "sum"
    unit = Path(scored["scores"]).with_name("unit.jsonl")
    unit.write_text(Path(scored["scores"]).read_text())
    unit.with_name("unit.meta.json").write_text(json.dumps({**meta, "probe_normalize": "unit"}))
    with pytest.raises(TraceError, match="--probe-normalize none"):
        influence_check(**{**scored, "scores": str(unit)}, sample=2)
