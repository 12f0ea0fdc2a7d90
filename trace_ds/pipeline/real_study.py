"""``trace-ds study --real COMBO``: issue 21's confirmation on the real chat model (SmolLM2-135M-Instruct).

The screen and the confirmation run on the synthetic benchmark; this checks their verdict where the text is
natural language and the judge is the real scenario's rule judge (the one that demands the referral that fits
the topic and counts degenerate text as violating). Per seed (default 0, 1, 2: the training data's order and
the probe's sample; the scenario itself is the demo's, the same for every seed), three arms at the demo's
settings (``trace_ds.pipeline.real_demo``: per-token mean log-probs, beta 0.1, lr 1e-4, one epoch):

* TRACE with uniform weights;
* TRACE with the chosen combination's weighting (its score metric, probe and weight map) and relational head;
* naive oracle DPO.

Each seed is two ``trace-ds run`` pipelines sharing one workdir (the old model's evaluation is built once);
every stage is cached, and each finished arm is kept in the points ledger (``real/points.jsonl``), so an
interrupted run resumes. The report (``real/real.md``, ``.json``) gives each arm's mean and 95% t-interval over
seeds, and each arm minus uniform paired by seed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from trace_ds.console import console
from trace_ds.io import write_json, write_text
from trace_ds.pipeline.weighting_study import Combo, Ledger, combos_named, eval_measures, mean_ci

REAL_SEEDS = (0, 1, 2)
ARMS = ("uniform", "weighted", "naive_dpo")


def seed_config(folder: Path, base: dict[str, Any], seed: int, combo: Combo, methods: list[str]) -> Path:
    """The demo's config at this seed, TRACE scored and trained with the combination's settings."""
    config = {**base, "seed": seed, "workdir": str(folder / f"seed-{seed}"), "methods": methods}
    config["score"] = {**base["score"], **combo.score, "relational": combo.head}
    config["train"] = {**base["train"], "relational": combo.head}
    path = folder / "configs" / f"seed{seed}-{combo.name.replace('/', '_')}.yaml"
    write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def run_real(out: str, combo: Combo, seeds: tuple[int, ...], ranks: int) -> dict[str, Any]:
    from trace_ds.pipeline.real_demo import SCENARIO, prepare_real_demo

    folder = Path(out) / "real"
    started = time.perf_counter()
    base_path = prepare_real_demo(str(folder), 0, SCENARIO["n_pairs"], ["trace"], ranks)
    base = yaml.safe_load(base_path.read_text(encoding="utf-8"))
    uniform = combos_named([f"uniform/{combo.head}"])[0]
    ledger = Ledger(folder)
    points = []
    for index, seed in enumerate(seeds, start=1):
        console.rule(f"study real: seed {seed} ({index}/{len(seeds)}): {combo.name}, uniform, naive DPO")
        runs = ((combo, ["trace", "naive_dpo"], {"trace": "weighted", "naive_dpo": "naive_dpo"}),
                (uniform, ["trace"], {"trace": "uniform"}))  # fmt: skip
        for chosen, methods, arms in runs:
            points += _arms(seed_config(folder, base, seed, chosen, methods), seed, arms, ledger)
    report = {
        "combo": combo.name,
        "seeds": list(seeds),
        "ranks": ranks,
        "points": points,
        "arms": summarise_arms(points),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(folder / "real.json", report)
    write_text(folder / "real.md", real_markdown(report))
    return report


def _arms(config_path: Path, seed: int, arms: dict[str, str], ledger: Ledger) -> list[dict[str, Any]]:
    """Each method of one pipeline as an arm's point: from the ledger when every one is there, else run."""
    from trace_ds.pipeline.runner import Pipeline, load_config

    pipeline = Pipeline(load_config(config_path), str(config_path))
    stages = {s.name: s for s in pipeline.stages}
    keys = {method: stages[f"eval_{method}"].key for method in arms}
    if all(k in ledger.points for k in keys.values()):
        return [ledger.points[k] for k in keys.values()]
    started = time.perf_counter()
    pipeline.run()
    seconds = round(time.perf_counter() - started, 1)
    points = []
    for method, arm in arms.items():
        if keys[method] in ledger.points:
            points.append(ledger.points[keys[method]])
            continue
        point = {
            "arm": arm,
            "seed": seed,
            "key": keys[method],
            **eval_measures(stages[f"eval_{method}"].directory, stages["eval_old"].directory),
            "pipeline_seconds": seconds,
        }
        ledger.add(point)
        points.append(point)
    return points


MEASURES = ("tpa_all", "tpa_shifted", "tpa_stable", "ppl_stable", "degenerate")


def summarise_arms(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm and measure: mean and 95% t-interval over seeds, and the arm minus uniform paired by seed."""
    by_arm = {arm: {p["seed"]: p for p in points if p["arm"] == arm} for arm in ARMS}
    summary: dict[str, dict[str, Any]] = {}
    for arm, per_seed in by_arm.items():
        entry: dict[str, Any] = {}
        for measure in MEASURES:
            values = [p[measure] for p in per_seed.values() if p.get(measure) is not None]
            paired = [
                p[measure] - u[measure]
                for seed, p in per_seed.items()
                if (u := by_arm["uniform"].get(seed))
                and p.get(measure) is not None
                and u.get(measure) is not None
            ]
            entry[measure] = {"value": mean_ci(values), "minus_uniform": mean_ci(paired)}
        summary[arm] = entry
    return summary


def real_markdown(report: dict[str, Any]) -> str:
    from trace_ds.pipeline.weighting_study import format_interval

    seeds = ", ".join(map(str, report["seeds"]))
    lines = [
        f"# Real-model confirmation: {report['combo']} (SmolLM2-135M-Instruct, seeds {seeds})",
        "",
        f"Mean ± 95% t-interval over seeds; in brackets, minus TRACE with uniform weights, paired by seed. "
        f"{report['ranks']} rank(s); wall time {report['seconds'] / 60:.1f} min.",
        "",
        "| arm | " + " | ".join(MEASURES) + " |",
        "|---|" + "---|" * len(MEASURES),
    ]
    old = {p["seed"]: p["old"] for p in report["points"] if p.get("old")}  # one evaluation per seed
    if old:
        cells = [
            format_interval(mean_ci([o[m] for o in old.values() if o.get(m) is not None])) for m in MEASURES
        ]
        lines.append("| old-policy model | " + " | ".join(cells) + " |")
    for arm, entry in report["arms"].items():
        cells = [
            format_interval(entry[m]["value"])
            + ("" if arm == "uniform" else f" ({format_interval(entry[m]['minus_uniform'])})")
            for m in MEASURES
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])
