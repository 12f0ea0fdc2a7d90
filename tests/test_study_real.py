"""``trace-ds study --real``: its per-seed configs and its summary (the run itself takes hours on the real
model; docs/results.md records it)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.pipeline.real_study import real_markdown, seed_config, summarise_arms
from trace_ds.pipeline.weighting_study import combos_named

BASE = {
    "workdir": "runs/real",
    "seed": 0,
    "score": {"probe_size": 24, "beta": 0.1, "logp_reduction": "mean"},
    "train": {"epochs": 1, "lr": 1e-4, "logp_reduction": "mean"},
    "methods": ["trace"],
}


def test_each_seed_gets_its_workdir_and_the_combination_settings(tmp_path: Path) -> None:
    combo = combos_named(["standardized-cosine-unit/dpo"])[0]
    path = seed_config(tmp_path, BASE, 2, combo, ["trace", "naive_dpo"])
    config = yaml.safe_load(path.read_text())
    assert config["seed"] == 2 and config["workdir"] == str(tmp_path / "seed-2")
    assert config["methods"] == ["trace", "naive_dpo"]
    assert config["score"] == {
        **BASE["score"], "weighting": "standardized", "score_metric": "cosine", "probe_normalize": "unit",
        "probe_suppression": "pool", "relational": "dpo",
    }  # fmt: skip
    assert config["train"] == {**BASE["train"], "relational": "dpo"}
    assert BASE["score"] == {"probe_size": 24, "beta": 0.1, "logp_reduction": "mean"}  # not modified


def _point(arm: str, seed: int, tpa: float) -> dict:
    return {"arm": arm, "seed": seed, "tpa_all": tpa, "tpa_shifted": tpa, "tpa_stable": 0.5, "ppl_stable": 10.0,
            "degenerate": 0.0}  # fmt: skip


def test_arms_are_summarised_over_seeds_and_paired_with_uniform() -> None:
    points = [
        *(_point("uniform", s, t) for s, t in ((0, 0.4), (1, 0.5), (2, 0.6))),
        *(_point("weighted", s, t) for s, t in ((0, 0.5), (1, 0.7), (2, 0.6))),
        *(_point("naive_dpo", s, t) for s, t in ((0, 0.2), (1, 0.2))),  # a seed missing: paired on two
    ]
    summary = summarise_arms(points)
    weighted = summary["weighted"]["tpa_all"]
    assert math.isclose(weighted["value"]["mean"], 0.6) and weighted["value"]["n"] == 3
    assert math.isclose(weighted["minus_uniform"]["mean"], 0.1)  # (0.1 + 0.2 + 0.0) / 3
    assert weighted["minus_uniform"]["ci95"] > 0
    dpo = summary["naive_dpo"]["tpa_all"]["minus_uniform"]
    assert dpo["n"] == 2 and math.isclose(dpo["mean"], -0.25)
    old = {"tpa_all": 0.3, "tpa_shifted": 0.0, "tpa_stable": 0.9, "ppl_stable": 9.0, "degenerate": 0.0}
    report = {"combo": "x", "seeds": [0, 1, 2], "ranks": 2, "seconds": 60.0, "arms": summary}
    for point in points[:2] + points[3:5]:  # seeds 0 and 1, twice each: counted once per seed
        point["old"] = {**old, "tpa_all": 0.3 + 0.1 * point["seed"]}
    text = real_markdown({**report, "points": points})
    assert "| weighted | 0.600 ± " in text and "(0.100 ± " in text
    assert "| old-policy model | 0.350 ± 0.635 | 0.000 ± 0.000 | 0.900 ± 0.000 | 9.000 ± 0.000 |" in text


@pytest.mark.parametrize("args", [["--real", "no-such/ipo"], ["--real", "uniform/ipo", "--screen"]])
def test_bad_real_requests_are_refused_before_anything_runs(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["study", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and "Error" in result.output, result.output
    assert not (tmp_path / "real").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noise", "0.2"], "include 0"),  # the efficacy study's arms run at noise 0
        (["--noise", "0,1.5"], r"fractions in \[0, 1\]"),
        (["--noise", "0,x"], "comma-separated fractions"),
        (["--confirm", "uniform/ipo", "--noise", "0.3", "--worker", "2/2"], "K from 0 to N-1"),
    ],
)
def test_bad_study_noise_and_worker_requests_are_refused(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, ["study", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not any(tmp_path.iterdir())
