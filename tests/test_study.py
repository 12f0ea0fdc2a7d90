"""``trace-ds study --quick``: the efficacy study end to end at CI size. Checks the report's structure and
that every arm's numbers come from its own run: its own trained model, evaluated in its own stage folder."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trace_ds.pipeline.study import ARMS, NOISE_ARMS, QUICK, metric_values, steps_per_pass

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HEADINGS = (
    "## Arms (noise 0)",
    "## Label noise",
    "## Do the scores predict the effect of a step? (first-order check)",
    "## Impact weights (noise 0)",
    "## Every run (the files each number was read from)",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("study") / "quick"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    result = subprocess.run(
        [sys.executable, "-m", "trace_ds.cli", "study", "--quick", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"trace-ds study --quick: {json.loads((out / 'study.json').read_text())['seconds']} s")
    return {"out": out, "data": json.loads((out / "study.json").read_text())}


def test_the_report_has_every_section_and_plot(study: dict) -> None:
    text = (study["out"] / "study.md").read_text()
    positions = [text.index(heading) for heading in HEADINGS]
    assert positions == sorted(positions)
    for plot in ("tpa_vs_noise.png", "arms.png", "weights.png"):
        assert (study["out"] / plot).stat().st_size > 1000 and f"]({plot})" in text
    data = study["data"]
    assert data["command"].startswith("trace-ds study --quick")
    assert data["spearman"]["n"] == 2 and -1.0 <= data["spearman"]["mean"] <= 1.0
    for checks in data["seeds"].values():
        assert checks["influence"]["pairs"] == QUICK.influence_sample
        assert set(checks["zero_weights"]) == {"inversion", "suppression"}
        assert all(0.0 < share <= 1.0 for share in checks["effective_share"].values())
    assert set(data["trace_minus"]) == {"old", *ARMS} - {"trace"}  # paired by seed against TRACE
    assert data["stage_seconds"]["total"] > 0 and "train" in data["stage_seconds"]


def test_every_arm_of_every_seed_and_noise_level_ran(study: dict) -> None:
    runs = study["data"]["runs"]
    found = {(r["seed"], r["noise"], r["arm"]) for r in runs}
    want = {(s, 0.0, a) for s in (0, 1) for a in ("old", *ARMS)} | {
        (s, 0.2, a) for s in (0, 1) for a in NOISE_ARMS
    }
    assert found == want and len(runs) == len(want)
    steps = steps_per_pass(QUICK, 1)
    assert all(r["steps"] == steps for r in runs if r["arm"] != "old")  # equal steps for every arm
    rescored = [r for r in runs if r["arm"] == "trace_rescore"]
    assert rescored and all(r["rescore_s"] > 0 for r in rescored)  # it re-scored inside its run
    assert all(r["rescore_s"] == 0 for r in runs if r["arm"] not in ("trace_rescore", "old"))


def test_each_number_comes_from_its_own_run(study: dict) -> None:
    runs = study["data"]["runs"]
    for row in runs:
        metrics_path = Path(row["metrics"])
        stage = "eval_old" if row["arm"] == "old" else f"eval_{row['arm']}"
        assert (
            metrics_path.parent.name.startswith(f"{stage}-") and f"seed-{row['seed']}" in metrics_path.parts
        )
        assert metric_values(metrics_path) == {
            k: row[k] for k in metric_values(metrics_path)
        }  # read, not made up
        if row["arm"] != "old":  # evaluated the model this arm trained
            assert json.loads(metrics_path.read_text())["model"] == row["model"]
            assert Path(row["model"]).parent.parent.name.startswith(f"train_{row['arm']}-")
    for seed in (0, 1):
        for noise in (0.0, 0.2):
            models = [
                r["model"] for r in runs if (r["seed"], r["noise"]) == (seed, noise) and r["arm"] != "old"
            ]
            assert len(set(models)) == len(models)
    noisy = {r["model"] for r in runs if r["noise"] == 0.2}
    assert not noisy & {r.get("model") for r in runs if r["noise"] == 0.0}  # noise reran training


def test_aggregates_are_the_mean_of_the_runs(study: dict) -> None:
    data = study["data"]
    for entry in data["aggregates"].values():
        rows = [r for r in data["runs"] if r["arm"] == entry["arm"] and r["noise"] == entry["noise"]]
        values = [r["tpa_all"] for r in rows if r["tpa_all"] is not None]
        assert entry["tpa_all"]["n"] == len(values) == 2
        assert math.isclose(entry["tpa_all"]["mean"], sum(values) / 2, abs_tol=1e-12)


def test_the_weighting_screen_and_confirmation_run_at_ci_size(study: dict) -> None:
    """`trace-ds study --screen --quick` then `--confirm --jobs 2` (issue 21) in the quick study's folder: every
    combination x learning rate a point with its own evaluation, per-topic TPA and weight shares; uniform
    weights are uniform; the confirmation pairs each combination with uniform by seed, its seeds shared out to
    two worker processes."""
    out = study["out"]
    confirm = [
        "--confirm",
        "standardized-cosine-unit/ipo",
        "--seeds",
        "0,1",
        "--lrs",
        "0.002",
        "--noise",
        "0",
    ]
    for args in (["--screen"], [*confirm, "--jobs", "2"]):
        _study(out, *args)
    # seed 0 at noise 0 and lr 0.002 is the screen's point (same cache key): read from its ledger, not rerun;
    # seed 1's two points were run by the workers, on one thread each
    own = [
        json.loads(line) for path in sorted((out / "confirm").glob("points-*.jsonl")) for line in path.open()
    ]
    assert sorted((p["seed"], p["threads"]) for p in own) == [(1, 1), (1, 1)]
    screen = json.loads((out / "screen" / "screen.json").read_text())
    assert len(screen["points"]) == 2 * 2 and len(screen["ranking"]) == 2
    assert (out / "screen" / "frontier.png").stat().st_size > 1000
    for point in screen["points"]:
        assert point["tpa_topics"] and 0.0 <= point["degenerate"] <= 1.0 and Path(point["metrics"]).exists()
        shares = point["weight_share"]["inversion"]
        assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-9)
    assert len({p["metrics"] for p in screen["points"]}) == 4  # each point its own evaluation
    uniform = next(p for p in screen["points"] if p["combo"] == "uniform/ipo")
    weights = [json.loads(line)["weight"] for line in Path(uniform["scores"]).read_text().splitlines()]
    assert weights and all(w == 1.0 for w in weights)
    cosine = next(p for p in screen["points"] if p["combo"] == "standardized-cosine-unit/ipo")
    meta = json.loads(Path(cosine["scores"]).with_name("scores.meta.json").read_text())
    assert (meta["score_metric"], meta["weighting"], meta["probe_normalize"]) == (
        "cosine",
        "standardized",
        "unit",
    )
    text = (out / "screen" / "screen.md").read_text()
    assert "## Ranking at matched utility" in text and "## TPA per topic" in text
    report = json.loads((out / "confirm" / "confirm.json").read_text())
    combos = {c["combo"] for c in report["cells"]}
    assert combos == {"standardized-cosine-unit/ipo", "uniform/ipo"}
    assert {c["noise"] for c in report["cells"]} == {0.0}
    assert len(report["points"]) == 2 * 2  # seeds x combinations (one noise level, one learning rate)
    # every seed counts: at its best point within the budget, or at the old model (the frontier's lr-0 point)
    assert all(
        c["seeds"] == 2 and c["tpa_all"]["n"] == 2 and c["seeds_within_budget"] <= 2 for c in report["cells"]
    )
    screen_metrics = {(p["combo"], p["lr"]): p["metrics"] for p in screen["points"]}
    for point in (p for p in report["points"] if p["seed"] == 0):
        assert point["metrics"] == screen_metrics[(point["combo"], point["lr"])]
    assert (out / "confirm" / "frontier-noise0.png").stat().st_size > 1000
    text = (out / "confirm" / "confirm.md").read_text()
    assert "| TPA shifted | TPA stable | perplexity, stable | degenerate |" in text
    assert "## TPA per topic at the matched points" in text and "## Verdict" in text
    assert report["verdict"]["default"] in combos
    assert all(
        set(c["tpa_topics"]) and set(c["weight_share"])
        for c in report["cells"]
        if c["seeds_at_old_model"] < c["seeds"]
    )


def test_a_copied_ledger_resumes_the_screen_without_its_stage_folders(study: dict, tmp_path: Path) -> None:
    """The points ledger is what carries a long study from one machine to the next: with only
    `screen/points.jsonl` copied, the screen reports the same points and trains nothing."""
    source = study["out"] / "screen"
    if not (source / "points.jsonl").exists():
        _study(study["out"], "--screen")
    copy = tmp_path / "copy"
    (copy / "screen").mkdir(parents=True)
    (copy / "screen" / "points.jsonl").write_bytes((source / "points.jsonl").read_bytes())
    _study(copy, "--screen")
    assert not list(copy.glob("seed-*/stages/train_*")), "a point in the ledger was trained again"
    again = json.loads((copy / "screen" / "screen.json").read_text())
    first = json.loads((source / "screen.json").read_text())
    assert [p["tpa_all"] for p in again["points"]] == [p["tpa_all"] for p in first["points"]]
    assert again["ranking"] == first["ranking"]


def _study(out: Path, *args: str) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    result = subprocess.run(
        [sys.executable, "-m", "trace_ds.cli", "study", "--quick", "--out", str(out), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    logs = "".join(p.read_text()[-2000:] for p in Path(out).glob("*/worker-*.log"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
