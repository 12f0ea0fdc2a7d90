"""``trace-ds study --screen`` / ``--confirm``: which impact weighting earns its cost, at matched utility.

Issue 21's study. Every *combination* is a weight map x score metric x probe x relational head
(``COMBOS``); each is trained at several learning rates (``--lrs``), because a weighting that only moves the
model further (or less far) would otherwise win or lose on the learning rate, not on its choice of pairs. Each
(combination, learning rate) is one point on the TPA vs stable-topic-perplexity plane; the arms are compared on
that frontier at **matched utility**: a combination's score is its best TPA among the points whose stable-topic
perplexity is within ``UTILITY_TOLERANCE`` of the old-policy model's.

* ``--screen``: every combination x learning rate on one seed at noise 0 (the main study's seed folder is
  shared: data, model and SFT are built once and cached); ranked at matched utility.
* ``--confirm A,B,C``: those combinations and uniform weights at every seed (``--seeds``, default 0-4) and
  label-noise level (0, 0.2, 0.3), each at every learning rate; per seed the matched-utility TPA, then mean and
  95% t-interval over seeds, and each combination minus uniform, paired by seed.

Both are ``trace-ds run`` pipelines: every stage is cached, so an interrupted study resumes where it stopped,
and a changed setting reruns only what depends on it. Each writes a report (``screen.md`` / ``confirm.md``,
``.json``, a frontier plot) with per-topic TPA, the degenerate share and each topic's share of the weight.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_ds.console import console
from trace_ds.io import read_json, write_json, write_text
from trace_ds.pipeline.study import T_975, StudyConfig, metric_values, pipeline_config

UTILITY_TOLERANCE = 0.10  # a point may raise stable-topic perplexity by at most 10% over the old model's
CONFIRM_NOISE = (0.0, 0.2, 0.3)
# up to the demo's 5e-4: in the first screen 1e-3 raised stable-topic perplexity 12-60% for every combination,
# past the utility budget, and 5e-4 was past it for most; the frontier needs points on both sides of it
LRS = (1.25e-4, 2.5e-4, 5e-4)
PROBES = {  # name -> score overrides, every probe option explicit (a changed default must not move a combination)
    "alg2": {"probe_normalize": "none", "probe_suppression": "pool"},
    "unit": {"probe_normalize": "unit", "probe_suppression": "pool"},
    "unit-same-prompt": {"probe_normalize": "unit", "probe_suppression": "same-prompt"},
}
MAPS = ("paper", "standardized", "prune:0.25", "uniform")
METRICS = ("dot", "cosine")
HEADS = ("ipo", "dpo")


@dataclass(frozen=True)
class Combo:
    """One weighting combination: its name, the score settings it changes, and the relational head."""

    name: str
    score: dict[str, Any]
    head: str

    @property
    def uniform(self) -> bool:
        return self.score.get("weighting") == "uniform"


def all_combos() -> list[Combo]:
    """Every weight map x metric x probe x head; uniform weights do not depend on the metric or the probe,
    so they appear once per head."""
    combos = []
    for head in HEADS:
        combos.append(Combo(f"uniform/{head}", {"weighting": "uniform"}, head))
        for weighting in MAPS[:-1]:
            for metric in METRICS:
                for probe, settings in PROBES.items():
                    name = f"{weighting}-{metric}-{probe}/{head}"
                    combos.append(
                        Combo(name, {"weighting": weighting, "score_metric": metric, **settings}, head)
                    )
    return combos


QUICK_COMBOS = ("standardized-cosine-unit/ipo", "uniform/ipo")  # --quick (CI): the code path, not evidence


def combos_named(names: list[str]) -> list[Combo]:
    from trace_ds.io import TraceError

    known = {c.name: c for c in all_combos()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TraceError(
            f"unknown combination(s) {unknown}; e.g. {', '.join(list(known)[:4])} (see docs/results.md)"
        )
    return [known[n] for n in names]


def combo_config(config: StudyConfig, combo: Combo, lr: float, seed: int, noise: float) -> dict[str, Any]:
    """The main study's pipeline for this seed and noise, with TRACE only, the combination's score settings,
    its head for scoring and training, and the learning rate."""
    from trace_ds.runtime.engine import CPU_ZERO3_CONFIG

    ds_config = Path(config.out) / "ds_cpu_zero3.json"  # the main study's file (same path: same stage keys)
    if not ds_config.exists():
        write_json(ds_config, CPU_ZERO3_CONFIG)
    base = pipeline_config(config, seed, noise, ("trace",))
    base["score"] = {**base["score"], **combo.score, "relational": combo.head}
    base["train"] = {**base["train"], "relational": combo.head, "lr": lr}
    base["train"].pop("rescore_every", None)
    return base


def _pipeline(config: StudyConfig, combo: Combo, lr: float, seed: int, noise: float, folder: Path) -> Any:
    """The point's ``trace-ds run`` pipeline (its config written under ``folder/configs``), not yet run."""
    import yaml

    from trace_ds.pipeline.runner import Pipeline, load_config

    path = folder / "configs" / f"seed{seed}-noise{noise:g}-{combo.name.replace('/', '_')}-lr{lr:g}.yaml"
    write_text(path, yaml.safe_dump(combo_config(config, combo, lr, seed, noise), sort_keys=False))
    return Pipeline(load_config(path), str(path))


def point_key(config: StudyConfig, task: Task, folder: Path) -> str:
    """A task's ledger key: its evaluation stage's cache key."""
    seed, noise, combo, lr = task
    stages = {s.name: s for s in _pipeline(config, combo, lr, seed, noise, folder).stages}
    return str(stages["eval_trace"].key)


def _point(
    config: StudyConfig, combo: Combo, lr: float, seed: int, noise: float, folder: Path, ledger: Ledger
) -> dict[str, Any]:
    """Run (or read from the ledger or the stage cache) one pipeline and return its point: metrics, per-topic
    TPA, weight shares."""
    pipeline = _pipeline(config, combo, lr, seed, noise, folder)
    stages = {s.name: s for s in pipeline.stages}
    key = stages["eval_trace"].key  # covers every setting and input upstream, and the judges' versions
    if key in ledger.points:
        return ledger.points[key]
    started = time.perf_counter()
    pipeline.run()
    point = _read_point(combo, lr, seed, noise, {name: s.directory for name, s in stages.items()})
    point.update(key=key, seconds=round(time.perf_counter() - started, 1), threads=config.threads)
    ledger.add(point)
    return point


class Ledger:
    """Every finished point, one JSON line each in ``<folder>/points*.jsonl`` (one file per worker process),
    keyed by its evaluation stage's cache key. A point found here is not run again, even on a machine without
    the stage folders: copy the ledger files there and the study resumes from them (docs/results.md)."""

    def __init__(self, folder: Path, name: str = "points.jsonl", also: tuple[Path, ...] = ()) -> None:
        """``also``: other studies' folders whose points count here too (the confirmation's seed 0 at noise 0
        is the screen's point, same key)."""
        from trace_ds.io import iter_jsonl

        self.path = folder / name
        self.points: dict[str, dict[str, Any]] = {}
        for path in sorted(p for f in (*also, folder) for p in f.glob("points*.jsonl")):
            for _, record in iter_jsonl(path):
                self.points[record["key"]] = record

    def add(self, point: dict[str, Any]) -> None:
        from trace_ds.io import append_lines, dumps

        self.points[point["key"]] = point
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as sink:
            append_lines(sink, [dumps(point)])


def eval_measures(eval_dir: Path, old_dir: Path) -> dict[str, Any]:
    """One evaluation stage's measures for a study point: TPA, perplexity, degenerate share, per-topic TPA,
    and the old-policy model's evaluation beside them (shared by the weighting and the real-model studies)."""
    metrics_path = read_json(eval_dir / "paths.json")["metrics"]
    metrics = read_json(metrics_path)
    old_path = read_json(old_dir / "paths.json")["metrics"]
    return {
        **metric_values(metrics_path),
        "degenerate": ((metrics.get("tpa") or {}).get("all") or {}).get("degenerate"),
        "tpa_topics": topic_tpa(metrics),
        "old": {**metric_values(old_path), "tpa_topics": topic_tpa(read_json(old_path))},
        "metrics": str(metrics_path),
    }


def _read_point(combo: Combo, lr: float, seed: int, noise: float, stages: dict[str, Path]) -> dict[str, Any]:
    scores = read_json(stages["score"] / "paths.json")["scores"]
    data = read_json(stages["data"] / "paths.json")
    return {
        "combo": combo.name,
        "lr": lr,
        "seed": seed,
        "noise": noise,
        **eval_measures(stages["eval_trace"], stages["eval_old"]),
        "weight_share": weight_share_by_topic(
            scores, data.get("truth") or str(Path(data["pairs"]).parent / "truth.jsonl")
        ),
        "scores": str(scores),
    }


Task = tuple[int, float, "Combo", float]  # seed, noise, combination, learning rate


def run_points(
    config: StudyConfig, folder: Path, tasks: list[Task], label: str, jobs: int = 1, group: str = "seed-noise"
) -> list[dict[str, Any]]:
    """Every task's point, in order. With ``jobs`` > 1 the tasks are first shared out to that many worker
    processes (``trace-ds study --worker K/N``, one thread each), grouped so that no two workers build the
    same stage (:func:`owners`): by seed and noise level once the seed's first task has built its shared
    stages, or by combination (one seed). Then every point is read back here from the ledger."""
    if jobs > 1 and config.worker is None:
        _run_workers(config, folder, tasks, label, jobs, group)
    name = f"points-{config.worker[0]}.jsonl" if config.worker else "points.jsonl"
    also = tuple(f for f in (Path(config.out) / "screen",) if f != folder)
    ledger = Ledger(folder, name, also=also)
    order = list(range(len(tasks)))
    firsts = _seed_firsts(tasks)
    if config.worker:
        owner_of = owners(tasks, group, config.worker[1])
        mine = [i for i in order if owner_of[i] == config.worker[0]]
        # a seed's first task builds its data, model and old-model evaluation: run this worker's first ones
        # first, and wait for the other workers' before using their seeds
        order = [i for i in mine if i in firsts.values()] + [i for i in mine if i not in firsts.values()]
    points = []
    seed_keys: dict[int, str] = {}  # each seed's first point's key, built once
    for index in order:
        seed, noise, combo, lr = tasks[index]
        if config.worker and group == "seed-noise" and index != firsts[seed]:
            if seed not in seed_keys:
                seed_keys[seed] = point_key(config, tasks[firsts[seed]], folder)
            wait_for_point(seed_keys[seed], ledger, folder, also)
        console.rule(
            f"study {label}: {index + 1}/{len(tasks)}: {combo.name}, lr {lr:g}, seed {seed}, noise {noise:g}"
        )
        points.append(_point(config, combo, lr, seed, noise, folder, ledger))
    return points


WAIT_LIMIT_S = 4 * 3600.0  # a worker waits this long for another's seed before it gives up
WAIT_POLL_S = 10.0


def wait_for_point(key: str, ledger: Ledger, folder: Path, also: tuple[Path, ...]) -> None:
    """Block until the point ``key`` is in some worker's ledger file (another worker is building its seed)."""
    from trace_ds.io import TraceError

    deadline = time.monotonic() + WAIT_LIMIT_S
    while key not in ledger.points:
        found = Ledger(folder, "points.jsonl", also=also).points.get(key)
        if found is not None:
            ledger.points[key] = found
            return
        if time.monotonic() > deadline:
            raise TraceError(
                f"study worker: waited {WAIT_LIMIT_S / 3600:.0f} h for another worker's point {key} (the seed's "
                f"shared stages); see {folder}/worker-K.log, then rerun the same command to resume"
            )
        time.sleep(WAIT_POLL_S)


def _seed_firsts(tasks: list[Task]) -> dict[int, int]:
    """Each seed's first task (index): the one that builds the seed's shared stages."""
    firsts: dict[int, int] = {}
    for index, task in enumerate(tasks):
        firsts.setdefault(task[0], index)
    return firsts


def owners(tasks: list[Task], group: str, workers: int) -> list[int]:
    """Each task's worker: its group's rank among the groups, modulo the workers.

    * ``combo`` (the screen, one seed): the first task belongs to worker 0 and runs before the others start.
    * ``seed-noise`` (the confirmation): each seed's first task is dealt out by seed, the rest by (seed, noise
      level), so that 2 workers share 5 seeds x 3 levels evenly (by seed alone one of them got 3 seeds of
      the 5); a worker runs its seeds' first tasks first and waits for another's (:func:`run_points`)."""
    if group == "seed-noise":
        first_of = _seed_firsts(tasks)
        seeds, firsts = list(first_of), set(first_of.values())
        groups = list(dict.fromkeys((t[0], t[1]) for t in tasks))
        return [
            seeds.index(t[0]) % workers if i in firsts else groups.index((t[0], t[1])) % workers
            for i, t in enumerate(tasks)
        ]
    names = list(dict.fromkeys(t[2].name for t in tasks))
    return [0 if i == 0 else names.index(t[2].name) % workers for i, t in enumerate(tasks)]


def _run_workers(
    config: StudyConfig, folder: Path, tasks: list[Task], label: str, jobs: int, group: str
) -> None:
    import subprocess
    import sys
    from dataclasses import replace

    from trace_ds.io import TraceError

    if (
        group == "combo"
    ):  # the seed's data, model and old-model evaluation, built once before the others start
        run_points(replace(config, worker=(0, jobs)), folder, tasks[:1], label)
    workers = []
    for k in range(jobs):
        command = [sys.executable, "-m", "trace_ds.cli", *config.worker_args, "--worker", f"{k}/{jobs}"]
        log = folder / f"worker-{k}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"worker {k}/{jobs}: {' '.join(command)} (log {log})")
        with open(log, "a", encoding="utf-8") as sink:
            workers.append(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT))
    failed = [k for k, w in enumerate(workers) if w.wait() != 0]
    if failed:
        raise TraceError(
            f"study workers {failed} failed: see {folder}/worker-K.log; rerun the same command to resume "
            "(finished points are in the ledger)"
        )


def topic_tpa(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {
        k.removeprefix("topic:"): v["tpa"]
        for k, v in (metrics.get("tpa") or {}).items()
        if k.startswith("topic:")
    }


def weight_share_by_topic(scores: str, truth: str | None) -> dict[str, dict[str, float]]:
    """Per conflict category, each topic's share of the category's total weight (uniform weights give each
    topic its share of the pairs): where the update's weight went."""
    if not truth or not Path(truth).exists():
        return {}
    topic = {r["id"]: r["topic"] for r in map(json.loads, Path(truth).read_text().splitlines()) if r}
    totals: dict[str, dict[str, float]] = {}
    for line in Path(scores).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by = totals.setdefault(record["category"], {})
            name = topic.get(record["id"], "?")
            by[name] = by.get(name, 0.0) + float(record["weight"])
    return {
        c: {t: w / sum(by.values()) for t, w in sorted(by.items())}
        for c, by in totals.items()
        if sum(by.values())
    }


def matched(points: list[dict[str, Any]], old_ppl: float | None) -> dict[str, Any] | None:
    """The point with the best TPA (all prompts) among those within the utility budget; None if none is."""
    budget = None if old_ppl is None else old_ppl * (1 + UTILITY_TOLERANCE)
    inside = [
        p
        for p in points
        if p["tpa_all"] is not None and (budget is None or (p["ppl_stable"] or math.inf) <= budget)
    ]
    return max(inside, key=lambda p: p["tpa_all"]) if inside else None


def ranking(names: list[str], points: list[dict[str, Any]], old_ppl: float | None) -> list[dict[str, Any]]:
    """Each combination's matched-utility point, best TPA first; combinations with no point within the budget
    last (they cannot be compared at this utility)."""
    rows = [{"combo": n, "best": matched([p for p in points if p["combo"] == n], old_ppl)} for n in names]
    return sorted(rows, key=lambda r: (r["best"] is None, -(r["best"] or {}).get("tpa_all", 0.0)))


def run_screen(config: StudyConfig, lrs: tuple[float, ...], combos: list[Combo]) -> dict[str, Any]:
    folder = Path(config.out) / "screen"
    seed = config.seeds[0]
    started = time.perf_counter()
    tasks = [(seed, 0.0, c, lr) for c in combos for lr in lrs]
    points = run_points(config, folder, tasks, "screen", config.jobs, group="combo")
    if config.worker:
        return {"points": points}
    old = points[0]["old"]
    report = {
        "seed": seed,
        "lrs": list(lrs),
        "utility_tolerance": UTILITY_TOLERANCE,
        "old": old,
        "points": points,
        "ranking": ranking([c.name for c in combos], points, old["ppl_stable"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(folder / "screen.json", report)
    write_text(folder / "screen.md", screen_markdown(report))
    leaders = [r["combo"] for r in report["ranking"][:5]]
    shown = list(dict.fromkeys([*leaders, *(c.name for c in combos if c.uniform), "paper-dot-alg2/ipo"]))
    _frontier_plot(
        folder / "frontier.png", points, old, f"Screen, seed {seed}: the 5 best, uniform, paper", shown
    )
    return report


def run_confirm(
    config: StudyConfig, lrs: tuple[float, ...], combos: list[Combo], noise: tuple[float, ...]
) -> dict[str, Any]:
    folder = Path(config.out) / "confirm"
    started = time.perf_counter()
    if not any(c.uniform for c in combos):
        combos = [*combos, *combos_named(["uniform/ipo"])]
    tasks = [(s, n, c, lr) for s in config.seeds for n in noise for c in combos for lr in lrs]
    points = run_points(config, folder, tasks, "confirm", config.jobs, group="seed-noise")
    if config.worker:
        return {"points": points}
    uniform = next(c.name for c in combos if c.uniform)
    cells = confirm_cells(points, [c.name for c in combos], uniform, config.seeds, noise)
    report = {
        "seeds": list(config.seeds), "noise": list(noise), "lrs": list(lrs),
        "utility_tolerance": UTILITY_TOLERANCE, "cells": cells, "verdict": verdict(cells, uniform),
        "points": points, "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    write_json(folder / "confirm.json", report)
    write_text(folder / "confirm.md", confirm_markdown(report))
    for level in noise:  # each (combination, learning rate) at its mean over seeds
        mine = [p for p in points if p["noise"] == level]
        means = [
            {"combo": c.name, "lr": lr, **{
                m: statistics.fmean(v) if (v := [p[m] for p in mine if (p["combo"], p["lr"]) == (c.name, lr)
                                               and p[m] is not None]) else None
                for m in ("ppl_stable", "tpa_all")}}
            for c in combos for lr in lrs
        ]  # fmt: skip
        old = {"ppl_stable": statistics.fmean(p["old"]["ppl_stable"] for p in mine), "tpa_all": statistics.fmean(
            p["old"]["tpa_all"] for p in mine)}  # fmt: skip
        title = f"Confirmation, noise {level:g}: mean over seeds {', '.join(map(str, config.seeds))}"
        _frontier_plot(folder / f"frontier-noise{level:g}.png", means, old, title)
    return report


def matched_or_old(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One seed's point at matched utility on the frontier's upper envelope, which includes the old-policy model
    itself (learning rate 0: within the budget by definition): the best TPA within the budget, or the old
    model's when no trained point is within the budget or none beats it (``at_old_model``). A combination that
    cannot realign without spending the utility budget is then scored as not realigning, not left out of
    the mean and the pairing."""
    if not points:
        return None
    old = points[0]["old"]
    best = matched(points, old["ppl_stable"])
    if best is not None and best["tpa_all"] >= old["tpa_all"]:
        return {**best, "within": True}
    return {**old, "lr": 0.0, "at_old_model": True, "within": best is not None}


def confirm_cells(
    points: list[dict[str, Any]],
    names: list[str],
    uniform: str,
    seeds: tuple[int, ...],
    noise: tuple[float, ...],
) -> list[dict[str, Any]]:
    """Per noise level and combination: each seed's matched-utility point, then mean and 95% interval over
    seeds of TPA and what it was bought with, the paired difference to uniform weights, and per-topic means."""
    cells = []
    for level in noise:
        per_combo: dict[str, dict[int, dict[str, Any] | None]] = {}
        for combo in names:
            for seed in seeds:
                mine = [p for p in points if (p["combo"], p["seed"], p["noise"]) == (combo, seed, level)]
                per_combo.setdefault(combo, {})[seed] = matched_or_old(mine)
        for combo in names:
            best = per_combo[combo]
            chosen = [b for b in best.values() if b]
            paired = [
                b["tpa_all"] - u["tpa_all"]
                for seed, b in best.items()
                if b and (u := per_combo[uniform][seed])
            ]
            # the matched points' other measures: what the TPA was bought with
            others = {
                m: mean_ci([b[m] for b in chosen if b.get(m) is not None])
                for m in ("tpa_shifted", "tpa_stable", "ppl_stable", "degenerate")
            }
            cells.append({
                "noise": level, "combo": combo, "tpa_all": mean_ci([b["tpa_all"] for b in chosen]),
                "minus_uniform": mean_ci(paired), **others, "seeds": len(chosen),
                "seeds_within_budget": sum(1 for b in chosen if b["within"]),
                "seeds_at_old_model": sum(1 for b in chosen if b.get("at_old_model")),
                "lrs_chosen": {seed: b["lr"] if b else None for seed, b in best.items()},
                "tpa_topics": mean_by_key([b["tpa_topics"] for b in chosen]),
                "weight_share": mean_by_key([b.get("weight_share", {}).get("inversion", {}) for b in chosen]),
            })  # fmt: skip
    return cells


def verdict(cells: list[dict[str, Any]], uniform: str) -> dict[str, Any]:
    """The decision rule that picks the default weighting, applied to the confirmation's cells.

    A combination is *safe* at a noise level when its paired difference to uniform weights (at matched
    utility, :func:`matched_or_old`) is not below zero beyond the 95% interval (mean + half-width >= 0); it
    *pays* there when the interval is above zero (mean - half-width > 0). The default is the safe-everywhere
    combination with the best TPA averaged over the noise levels; uniform weights are safe by construction,
    so they are the answer when nothing else is."""
    levels = sorted({c["noise"] for c in cells})
    rows = []
    for name in dict.fromkeys(c["combo"] for c in cells):
        mine = {c["noise"]: c for c in cells if c["combo"] == name}
        status = {}
        for level in levels:
            diff = mine[level]["minus_uniform"]
            if name == uniform:
                status[level] = "reference"
            elif diff["ci95"] is None:
                status[level] = "undecided (fewer than two seeds paired)"
            elif diff["mean"] - diff["ci95"] > 0:
                status[level] = "pays"
            elif diff["mean"] + diff["ci95"] < 0:
                status[level] = "unsafe (worse than uniform beyond the interval)"
            else:
                status[level] = "safe (within the interval of uniform)"
        means = [mine[level]["tpa_all"]["mean"] for level in levels]
        mean_tpa = statistics.fmean(means) if None not in means else None
        safe = all(s.startswith(("reference", "pays", "safe")) for s in status.values())
        rows.append({"combo": name, "status": {f"{k:g}": v for k, v in status.items()}, "mean_tpa": mean_tpa,
                     "safe": safe})  # fmt: skip
    eligible = [r for r in rows if r["safe"] and r["mean_tpa"] is not None]
    default = max(eligible, key=lambda r: r["mean_tpa"])["combo"] if eligible else uniform
    return {"rows": rows, "default": default}


def mean_by_key(rows: list[dict[str, float | None]]) -> dict[str, float]:
    """Per key (a topic), the mean over the rows that have a value for it."""
    keys = sorted({k for row in rows for k in row})
    return {
        k: statistics.fmean(values)
        for k in keys
        if (values := [v for r in rows if (v := r.get(k)) is not None])
    }


def mean_ci(values: list[float]) -> dict[str, float | int | None]:
    """Mean and the half-width of a two-sided 95% t-interval over seeds (None below two values)."""
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = T_975[min(len(values) - 1, max(T_975))] * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half, "n": len(values)}


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_interval(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "-"
    return _fmt(entry["mean"]) + ("" if entry["ci95"] is None else f" ± {_fmt(entry['ci95'])}")


def screen_markdown(report: dict[str, Any]) -> str:
    old = report["old"]
    lines = [
        f"# Weighting screen (seed {report['seed']}, noise 0)",
        "",
        f"Old-policy model: TPA all {_fmt(old['tpa_all'])}, stable-topic perplexity {_fmt(old['ppl_stable'], 2)}; "
        f"utility budget: stable-topic perplexity at most {_fmt((old['ppl_stable'] or 0) * (1 + report['utility_tolerance']), 2)} "
        f"(+{100 * report['utility_tolerance']:.0f}%). Learning rates: {', '.join(f'{x:g}' for x in report['lrs'])}. "
        f"Wall time: {report['seconds'] / 60:.1f} min.",
        "",
        "## Ranking at matched utility (best TPA within the budget; one seed: a screen, not a result)",
        "",
        "| rank | combination | lr | TPA all | TPA shifted | TPA stable | perplexity, stable | degenerate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, row in enumerate(report["ranking"], start=1):
        b = row["best"]
        if b is None:
            lines.append(f"| {rank} | {row['combo']} | - | no point within the budget | | | | |")
            continue
        lines.append(
            f"| {rank} | {row['combo']} | {b['lr']:g} | {_fmt(b['tpa_all'])} | {_fmt(b['tpa_shifted'])} | "
            f"{_fmt(b['tpa_stable'])} | {_fmt(b['ppl_stable'], 2)} | {_fmt(b['degenerate'])} |"
        )
    topics = sorted({t for p in report["points"] for t in p["tpa_topics"]})
    lines += ["", "## TPA per topic at each combination's matched-utility point", ""]
    lines += ["| combination | " + " | ".join(topics) + " |", "|---|" + "---|" * len(topics)]
    lines.append("| old-policy model | " + " | ".join(_fmt(old["tpa_topics"].get(t)) for t in topics) + " |")
    for row in report["ranking"]:
        if row["best"]:
            lines.append(
                f"| {row['combo']} | "
                + " | ".join(_fmt(row["best"]["tpa_topics"].get(t)) for t in topics)
                + " |"
            )
    lines += ["", "## Share of each category's weight per topic (inversion)", ""]
    shares = {
        r["combo"]: (r["best"] or {}).get("weight_share", {}).get("inversion", {}) for r in report["ranking"]
    }
    wtopics = sorted({t for s in shares.values() for t in s})
    lines += ["| combination | " + " | ".join(wtopics) + " |", "|---|" + "---|" * len(wtopics)]
    for name, share in shares.items():
        if share:
            lines.append(f"| {name} | " + " | ".join(_fmt(share.get(t), 2) for t in wtopics) + " |")
    lines += [
        "",
        "## Every point",
        "",
        "| combination | lr | TPA all | perplexity, stable | degenerate | s |",
        "|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        lines.append(
            f"| {p['combo']} | {p['lr']:g} | {_fmt(p['tpa_all'])} | {_fmt(p['ppl_stable'], 2)} | {_fmt(p['degenerate'])} | {p['seconds']} |"
        )
    return "\n".join([*lines, "", "![frontier](frontier.png)", ""])


def confirm_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Weighting confirmation (seeds {', '.join(map(str, report['seeds']))})",
        "",
        f"Per seed: the best TPA within the utility budget (stable-topic perplexity at most +{100 * report['utility_tolerance']:.0f}% "
        f"over that seed's old model) over the learning rates {', '.join(f'{x:g}' for x in report['lrs'])} and the old "
        "model itself (learning rate 0: a seed with no trained point within the budget, or none above the old model, "
        "counts at the old model's TPA); then mean ± 95% t-interval over seeds, and minus uniform weights paired by "
        f"seed. Wall time of this invocation: {report['seconds'] / 60:.1f} min.",
        "",
        "| noise | combination | TPA all (matched utility) | minus uniform | TPA shifted | TPA stable | "
        "perplexity, stable | degenerate | seeds with a trained point within budget / at the old model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cells"]:
        extra = " | ".join(
            format_interval(c[m]) if m in c else "-"
            for m in ("tpa_shifted", "tpa_stable", "ppl_stable", "degenerate")
        )
        lines.append(
            f"| {c['noise']:g} | {c['combo']} | {format_interval(c['tpa_all'])} | {format_interval(c['minus_uniform'])} | "
            f"{extra} | {c['seeds_within_budget']} / {c.get('seeds_at_old_model', 0)} |"
        )
    topics = sorted({t for c in report["cells"] for t in c.get("tpa_topics", {})})
    if topics:
        lines += ["", "## TPA per topic at the matched points (mean over seeds)", ""]
        lines += ["| noise | combination | " + " | ".join(topics) + " |", "|---|---|" + "---|" * len(topics)]
        for c in report["cells"]:
            values = " | ".join(_fmt(c["tpa_topics"].get(t)) for t in topics)
            lines.append(f"| {c['noise']:g} | {c['combo']} | {values} |")
        wtopics = sorted({t for c in report["cells"] for t in c.get("weight_share", {})})
        lines += ["", "## Each topic's share of the inversion weight (mean over seeds)", ""]
        lines += [
            "| noise | combination | " + " | ".join(wtopics) + " |",
            "|---|---|" + "---|" * len(wtopics),
        ]
        for c in report["cells"]:
            values = " | ".join(_fmt(c["weight_share"].get(t), 2) for t in wtopics)
            lines.append(f"| {c['noise']:g} | {c['combo']} | {values} |")
    if "verdict" in report:
        levels = [f"{n:g}" for n in report["noise"]]
        lines += [
            "",
            "## Verdict (the rule in `weighting_study.verdict`)",
            "",
            "Safe: the paired difference to uniform weights at matched utility is not below 0 beyond its 95% "
            "interval; pays: it is above 0 beyond the interval. Default: the safe-everywhere combination with the "
            "best TPA averaged over the noise levels (uniform weights when no other is safe everywhere).",
            "",
            "| combination | " + " | ".join(f"noise {n}" for n in levels) + " | mean TPA over noise levels |",
            "|---|" + "---|" * (len(levels) + 1),
        ]
        for row in report["verdict"]["rows"]:
            cols = " | ".join(row["status"][n] for n in levels)
            lines.append(f"| {row['combo']} | {cols} | {_fmt(row['mean_tpa'])} |")
        lines += ["", f"**Default by this rule: `{report['verdict']['default']}`.**"]
    plots = [f"![noise {n:g}](frontier-noise{n:g}.png)" for n in report["noise"]]
    return "\n".join([*lines, "", *plots, ""])


def _frontier_plot(
    path: Path,
    points: list[dict[str, Any]],
    old: dict[str, Any],
    title: str,
    highlight: list[str] | None = None,
) -> None:
    """TPA against stable-topic perplexity, one line per combination over its learning rates. ``highlight``:
    only these in colour and in the legend, the rest as thin grey lines (38 coloured lines are unreadable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    for name in dict.fromkeys(p["combo"] for p in points):
        mine = sorted(
            (p for p in points if p["combo"] == name and p["ppl_stable"] is not None), key=lambda p: p["lr"]
        )
        xs, ys = [p["ppl_stable"] for p in mine], [p["tpa_all"] for p in mine]
        if highlight is None or name in highlight:
            ax.plot(xs, ys, marker="o", linewidth=1.5, label=name, zorder=3)
        else:
            ax.plot(xs, ys, marker=".", linewidth=0.6, color="0.8", zorder=1)
    if old["ppl_stable"] is not None:
        ax.axvline(old["ppl_stable"] * (1 + UTILITY_TOLERANCE), color="grey", linestyle="--", linewidth=1)
        ax.scatter([old["ppl_stable"]], [old["tpa_all"]], color="black", marker="x", label="old-policy model")
    ax.set_xlabel("perplexity on held-out stable-topic text (↓); dashed: the utility budget")
    ax.set_ylabel("TPA, all held-out prompts (↑)")
    ax.set_title(title + ("" if highlight is None else "; grey: the other combinations"))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
