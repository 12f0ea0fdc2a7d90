"""``trace-ds study``: does each part of TRACE earn its cost? Seeds x arms x label noise, one report.

For every seed the synthetic benchmark's data, the tiny model's initial values and the triage noise change.
Each seed runs ``trace-ds run`` pipelines that share one work folder, so the data, the model and its SFT are
built once per seed and every arm trains from the same old-policy model:

- noise 0: every arm (TRACE, naive oracle DPO, w/o impact weighting, w/o KL, w/o triage, TRACE with in-run
  re-scoring), all at the same number of optimizer steps (one pass over the largest arm's data);
- each further noise level: TRACE and naive DPO on a triage whose given share of judged pairs got a wrong
  category (``triage: {noise: x}``).

Then, per seed, the first-order check of the scores (trace_ds/evaluate/influence.py: Spearman of each pair's
score against the probe-loss change of one SGD step on it alone), and the weight distribution. The report
(``study.md``, ``study.json``, plots) gives every metric as the mean over seeds with a 95% t-interval, and
every per-run number with the files it was read from. Rerunning resumes: finished stages are cached.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.config import PAPER_WEIGHTING
from trace_ds.console import console
from trace_ds.io import TraceError, read_json, write_json, write_text

ARMS = ("trace", "naive_dpo", "no_impact", "no_kl", "no_triage", "trace_rescore")
NOISE_ARMS = ("trace", "naive_dpo")
ARM_LABELS = {
    "old": "old-policy model",
    "trace": "TRACE",
    "naive_dpo": "naive oracle DPO",
    "no_impact": "w/o impact weighting",
    "no_kl": "w/o KL",
    "no_triage": "w/o triage",
    "trace_rescore": "TRACE + in-run re-scoring",
    "trace_mean": "TRACE, per-token mean log-probs",
}
MEAN_ARM = "trace_mean"  # TRACE scored and trained with --logp-reduction mean (which default suits IPO)
# the scoring stage each arm's weights come from (naive DPO and w/o impact weighting use uniform weights)
SCORED_BY = {"trace": "score", "no_kl": "score", "trace_rescore": "score", "no_triage": "score_no_triage"}
# two-sided 95% Student t quantiles by degrees of freedom (no scipy): the interval across seeds
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class StudySize:
    """What differs between the full study and ``--quick``; the rest is the demo's config."""

    pairs: int
    eval_prompts: int
    eval_pairs: int
    build_tiny: dict[str, Any]
    sft: dict[str, Any]
    score: dict[str, Any]
    train: dict[str, Any]
    global_batch: int  # pairs per optimizer step over all ranks
    eval: dict[str, Any]
    rescore_every: int
    influence_sample: int
    tokenize: dict[str, Any] = field(default_factory=lambda: {"max_length": 160, "max_prompt_length": 64})


FULL = StudySize(
    pairs=1200,  # the demo's benchmark at 1200 pairs: the whole study in under an hour on 2 CPU cores
    eval_prompts=300,
    eval_pairs=300,
    build_tiny={
        "vocab_size": 1024,
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 344,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    sft={"epochs": 3, "lr": 0.003, "batch_size": 32},
    score={"probe_size": 60, "beta": 0.1, "micro_batch": 16, **PAPER_WEIGHTING},
    train={"lr": 0.0005, "beta": 0.1, "alpha_kl": 20.0},
    global_batch=16,  # 8 per rank on 2 ranks; --ranks 1 trains the same updates in one process
    eval={"max_new_tokens": 48, "batch_size": 32},
    rescore_every=38,  # one pass is 75 steps at 1200 pairs on 2 ranks: one re-scoring half-way
    influence_sample=40,
)
QUICK = StudySize(
    pairs=120,
    eval_prompts=30,
    eval_pairs=30,
    build_tiny={
        "vocab_size": 512,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "tokenizer_documents": 600,
    },
    sft={"epochs": 1, "lr": 0.003, "batch_size": 32},
    score={"probe_size": 12, "beta": 0.1, "micro_batch": 32, **PAPER_WEIGHTING},
    train={"lr": 0.0005, "beta": 0.1, "alpha_kl": 20.0},
    global_batch=16,
    eval={"max_new_tokens": 8, "batch_size": 32},
    rescore_every=4,
    influence_sample=6,
)


@dataclass(frozen=True)
class StudyConfig:
    out: str = "runs/study"
    seeds: tuple[int, ...] = (0, 1, 2)
    noise: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    ranks: int = 2
    quick: bool = False
    size: StudySize = FULL
    mean_arm: bool = True  # also TRACE with per-token mean log-probs, at noise 0
    threads: int | None = None  # per process; None: 2 (1 with --quick, which shares CI's cores)
    # the weighting study's worker processes (weighting_study.run_points): how many, which one this is
    # (K, N), and the study's own command line, which each worker reruns with --worker K/N
    jobs: int = 1
    worker: tuple[int, int] | None = None
    worker_args: tuple[str, ...] = ()

    @classmethod
    def quick_mode(cls, out: str) -> StudyConfig:
        """The CI mode: 2 seeds, noise 0 and 0.2, tiny sizes, one rank (no launcher start-up): minutes."""
        return cls(out=out, seeds=(0, 1), noise=(0.0, 0.2), ranks=1, quick=True, size=QUICK, mean_arm=False)


@dataclass
class Run:
    seed: int
    noise: float
    arms: tuple[str, ...]
    config_path: Path
    reduction: str = "sum"  # log-prob reduction of scoring and training ("mean": the MEAN_ARM run)


def micro_batch(size: StudySize, ranks: int) -> int:
    """Pairs per rank per step: the size's global batch split over the ranks, so that any rank count trains
    the same updates (the per-pair losses are summed, then averaged over the global batch)."""
    if size.global_batch % ranks:
        raise TraceError(
            f"--ranks {ranks}: the study's global batch {size.global_batch} must divide evenly over the ranks"
        )
    return size.global_batch // ranks


def steps_per_pass(size: StudySize, ranks: int) -> int:
    """Optimizer steps of one pass over every judged pair (the largest arm's data): every arm trains this many."""
    per_rank = -(-size.pairs // ranks)
    return -(-per_rank // micro_batch(size, ranks))


def pipeline_config(
    config: StudyConfig, seed: int, noise: float, arms: tuple[str, ...], reduction: str = "sum"
) -> dict[str, Any]:
    size = config.size
    out = Path(config.out)
    ds_config = out / "ds_cpu_zero3.json"
    # only a non-default reduction is written: the stages of the sum runs keep their cache keys
    reduced = {"logp_reduction": reduction} if reduction != "sum" else {}
    return {
        "workdir": str(out / f"seed-{seed}"),
        "seed": seed,
        "data": {
            "synth": {
                "pairs": size.pairs,
                "seed": seed,
                "eval_prompts": size.eval_prompts,
                "eval_pairs": size.eval_pairs,
            }
        },
        "model": {"build_tiny": size.build_tiny, "sft": size.sft},
        "tokenize": size.tokenize,
        "triage": {"noise": noise},
        "score": {**size.score, **reduced},
        "train": {
            "micro_batch": micro_batch(size, config.ranks),
            **size.train,
            **reduced,
            "max_steps": steps_per_pass(size, config.ranks),
            "rescore_every": size.rescore_every,
        },
        "eval": size.eval,
        "methods": list(arms),
        "launch": {
            "ranks": config.ranks,
            "deepspeed": str(ds_config) if config.ranks > 1 else None,
            # --quick shares CI's cores with another test worker
            "threads": config.threads or (1 if config.quick else 2),
            "cpu_isa": "avx2",
        },
    }


def plan_runs(config: StudyConfig) -> list[Run]:
    """One pipeline per (seed, noise level): all arms at noise 0, TRACE and naive DPO at the others."""
    import yaml

    from trace_ds.runtime.engine import CPU_ZERO3_CONFIG

    out = Path(config.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    write_json(out / "ds_cpu_zero3.json", CPU_ZERO3_CONFIG)
    runs = []
    for seed in config.seeds:
        for noise in config.noise:
            arms = ARMS if noise == 0 else NOISE_ARMS
            path = out / "configs" / f"seed{seed}-noise{noise:g}.yaml"
            write_text(path, yaml.safe_dump(pipeline_config(config, seed, noise, arms), sort_keys=False))
            runs.append(Run(seed, noise, arms, path))
        if config.mean_arm:
            path = out / "configs" / f"seed{seed}-mean.yaml"
            text = yaml.safe_dump(pipeline_config(config, seed, 0.0, ("trace",), "mean"), sort_keys=False)
            write_text(path, text)
            runs.append(Run(seed, 0.0, ("trace",), path, "mean"))
    return runs


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Every pipeline (cached), the influence checks, then the report; returns the study.json dict."""
    from trace_ds.pipeline.runner import Pipeline, load_config

    started = time.perf_counter()
    runs = plan_runs(config)
    rows: list[dict[str, Any]] = []
    per_seed: dict[int, dict[str, Any]] = {}
    stage_dirs: dict[Path, str] = {}
    for index, run in enumerate(runs, start=1):
        console.rule(
            f"study: run {index}/{len(runs)} (seed {run.seed}, noise {run.noise:g}, {len(run.arms)} arms)"
        )
        pipeline = Pipeline(load_config(run.config_path), str(run.config_path))
        pipeline.run()
        stages = {s.name: s.directory for s in pipeline.stages}
        stage_dirs.update({directory: name for name, directory in stages.items()})
        rows += collect_rows(run, stages)
        if run.noise == 0 and run.reduction == "sum":
            per_seed[run.seed] = seed_checks(config, run.seed, stages)
    study = summarise(config, rows, per_seed, time.perf_counter() - started)
    study["stage_seconds"] = stage_seconds(stage_dirs)
    write_report(Path(config.out), study)
    return study


# ---- reading each run's own files ----


def _done(directory: Path) -> dict[str, Any]:
    return read_json(directory / "done.json")


def _paths(directory: Path) -> dict[str, Any]:
    return read_json(directory / "paths.json")


def _tpa(metrics: dict[str, Any], group: str) -> float | None:
    entry = (metrics.get("tpa") or {}).get(group)
    return entry["tpa"] if entry else None


def _perplexity(metrics: dict[str, Any], part: str | None) -> float | None:
    block = metrics.get("perplexity") or {}
    if part is not None:
        block = block.get(part) or {}
    return block.get("model")


METRICS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "tpa_all": lambda m: _tpa(m, "all"),
    "tpa_shifted": lambda m: _tpa(m, "shifted"),
    "tpa_stable": lambda m: _tpa(m, "stable"),
    "inversion_accuracy": lambda m: m["preference"].get("inversion_accuracy"),
    "retention_kl": lambda m: m["preference"].get("retention_kl"),
    "ppl_stable": lambda m: _perplexity(m, "stable"),
    "ppl_shifted": lambda m: _perplexity(m, "shifted"),
    "ppl_all": lambda m: _perplexity(m, None),
}


def metric_values(metrics_path: str | Path) -> dict[str, float | None]:
    """The study's metrics, read from one evaluation's metrics.json (the test re-reads them this way)."""
    metrics = read_json(metrics_path)
    return {name: read(metrics) for name, read in METRICS.items()}


def collect_rows(run: Run, stages: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per arm of this run (and the old model at noise 0), each from its own stage folders."""
    rows = []
    arms = ("old", *run.arms) if run.noise == 0 and run.reduction == "sum" else run.arms
    for arm in arms:
        evaluation = stages["eval_old" if arm == "old" else f"eval_{arm}"]
        name = MEAN_ARM if run.reduction == "mean" else arm
        row: dict[str, Any] = {"seed": run.seed, "noise": run.noise, "arm": name}
        metrics_path = _paths(evaluation)["metrics"]
        row.update(metric_values(metrics_path))
        row["eval_s"] = _done(evaluation)["seconds"]
        row["metrics"] = str(metrics_path)
        if arm != "old":
            train = stages[f"train_{arm}"]
            row["model"] = _paths(train)["model"]
            row["train_s"] = _done(train)["seconds"]
            steps = [
                json.loads(line) for line in Path(_paths(train)["metrics"]).read_text().splitlines() if line
            ]
            row["steps"] = len(steps)
            row["rescore_s"] = sum(m.get("rescore_s", 0.0) for m in steps)
            row["score_s"] = _done(stages[SCORED_BY[arm]])["seconds"] if arm in SCORED_BY else 0.0
        rows.append(row)
    return rows


def seed_checks(config: StudyConfig, seed: int, stages: dict[str, Path]) -> dict[str, Any]:
    """The noise-0 run's scores: the first-order influence check (cached in the seed's folder) and weights."""
    from trace_ds.data.tokenize import TokenizeConfig
    from trace_ds.evaluate.influence import influence_check
    from trace_ds.evaluate.report import zero_weight_summary

    score_paths = _paths(stages["score"])
    scores = score_paths["scores"]
    cache = Path(config.out) / f"seed-{seed}" / "influence.json"
    key = {"scores": scores, "sample": config.size.influence_sample, "seed": seed}
    influence = read_json(cache) if cache.exists() else None
    if influence is None or influence.get("key") != key:
        console.print(
            f"study: influence check of seed {seed}'s scores ({config.size.influence_sample} pairs)"
        )
        result = influence_check(
            _paths(stages["old_model"])["model"],
            _paths(stages["triage"])["triaged"],
            scores,
            score_paths["probe"][0],
            sample=config.size.influence_sample,
            seed=seed,
            beta=config.size.score["beta"],
            tokenize=TokenizeConfig(**config.size.tokenize),
        )
        influence = {"key": key, **result}
        write_json(cache, influence)
    weights = [json.loads(line) for line in Path(scores).read_text().splitlines() if line.strip()]
    by_category = {
        c: sorted(w["weight"] for w in weights if w["category"] == c) for c in ("inversion", "suppression")
    }
    return {
        "influence": {k: influence.get(k) for k in ("spearman", "pearson", "pairs", "lr")},
        "zero_weights": zero_weight_summary(scores)["categories"],
        "weights": by_category,
        "effective_share": {c: effective_share(values) for c, values in by_category.items()},
    }


def effective_share(weights: list[float]) -> float | None:
    """Kish's effective sample size (sum w)^2 / sum w^2 as a share of the pairs: 1 for uniform weights, small
    when a few pairs carry the category's update."""
    squares = math.fsum(w * w for w in weights)
    return math.fsum(weights) ** 2 / squares / len(weights) if squares > 0 else None


# ---- aggregation ----


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval half-width across seeds (None with one value)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = math.fsum(values) / n
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1}
    half = T_975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci95": half, "n": n}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """(arm, noise) -> metric -> mean and interval over seeds."""
    keys = [*METRICS, "train_s", "eval_s", "score_s", "rescore_s", "steps"]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["noise"]), []).append(row)
    out = {}
    for (arm, noise), members in groups.items():
        out[f"{arm}@{noise:g}"] = {
            "arm": arm,
            "noise": noise,
            "seeds": [m["seed"] for m in members],
            **{k: mean_interval([m[k] for m in members if m.get(k) is not None]) for k in keys},
        }
    return out


def stage_seconds(stage_dirs: dict[Path, str]) -> dict[str, float]:
    """Seconds each kind of stage took, summed over every run's own stage folders (each counted once, so a
    rerun that found them cached still reports the time they took), and the total."""
    kinds: dict[str, float] = {}
    for directory, name in stage_dirs.items():
        kind = "train" if name.startswith("train_") else "eval" if name.startswith("eval_") else name
        kinds[kind] = kinds.get(kind, 0.0) + float(_done(directory).get("seconds") or 0.0)
    kinds["total"] = math.fsum(kinds.values())
    return {k: round(v, 1) for k, v in kinds.items()}


PAIRED = ("tpa_all", "tpa_shifted", "tpa_stable", "ppl_stable")


def paired_differences(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm at noise 0: TRACE minus that arm, seed by seed (the same data and model), mean and interval."""
    at_zero = {(r["seed"], r["arm"]): r for r in rows if r["noise"] == 0}
    seeds = sorted({seed for seed, _ in at_zero})
    out: dict[str, dict[str, Any]] = {}
    for arm in (a for a in ("old", *ARMS, MEAN_ARM) if a != "trace"):
        pairs = [(at_zero.get((s, "trace")), at_zero.get((s, arm))) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a and b]
        if pairs:
            out[arm] = {
                key: mean_interval(
                    [a[key] - b[key] for a, b in pairs if a[key] is not None and b[key] is not None]
                )
                for key in PAIRED
            }
    return out


def summarise(
    config: StudyConfig, rows: list[dict[str, Any]], per_seed: dict[int, Any], seconds: float
) -> dict[str, Any]:
    spearman = [
        s["influence"]["spearman"] for s in per_seed.values() if s["influence"]["spearman"] is not None
    ]
    return {
        "command": "trace-ds study" + (" --quick" if config.quick else "") + f" --out {config.out}",
        "config": {**asdict(config), "steps_per_arm": steps_per_pass(config.size, config.ranks)},
        "seconds": round(seconds, 1),
        "runs": rows,
        "aggregates": aggregate(rows),
        "trace_minus": paired_differences(rows),
        "seeds": {str(k): v for k, v in per_seed.items()},
        "spearman": mean_interval(spearman),
    }


# ---- report ----


def _cell(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    mean = f"{entry['mean']:.{digits}f}"
    return mean if entry.get("ci95") is None else f"{mean} ± {entry['ci95']:.{digits}f}"


def render(study: dict[str, Any]) -> str:
    config, agg = study["config"], study["aggregates"]
    seeds = config["seeds"]
    lines = [
        "# TRACE efficacy study",
        "",
        f"Command: `{study['command']}`. Stage time {stage_minutes(study)} (this invocation: "
        f"{study['seconds'] / 60:.1f} min, finished stages are cached). Seeds {', '.join(map(str, seeds))}: each "
        "seed changes the benchmark's data, the tiny model's initial values and the triage noise. Every arm "
        f"trains {config['steps_per_arm']} optimizer steps from the same old-policy model of its seed. Cells: mean "
        "over seeds ± the half-width of a 95% t-interval.",
        "",
        "## Arms (noise 0)",
        "",
        "| arm | TPA all | TPA shifted | TPA stable | inversion accuracy | retention KL | perplexity, stable topics | perplexity, shifted topics | train s | score s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ("old", *ARMS, MEAN_ARM):
        entry = agg.get(f"{arm}@0")
        if entry is None:
            continue
        lines.append(
            f"| {ARM_LABELS[arm]} | {_cell(entry['tpa_all'])} | {_cell(entry['tpa_shifted'])} | "
            f"{_cell(entry['tpa_stable'])} | {_cell(entry['inversion_accuracy'])} | {_cell(entry['retention_kl'], 4)} | "
            f"{_cell(entry['ppl_stable'], 2)} | {_cell(entry['ppl_shifted'], 2)} | {_cell(entry['train_s'], 1)} | "
            f"{_cell(entry['score_s'], 1)} |"
        )
    lines += [
        "",
        "TRACE minus each arm, seed by seed (same data and old model), mean ± 95% t-interval:",
        "",
        "| arm | Δ TPA all | Δ TPA shifted | Δ TPA stable | Δ perplexity, stable topics |",
        "|---|---|---|---|---|",
    ]
    for arm, entry in study.get("trace_minus", {}).items():
        lines.append(
            f"| {ARM_LABELS[arm]} | {_cell(entry['tpa_all'])} | {_cell(entry['tpa_shifted'])} | "
            f"{_cell(entry['tpa_stable'])} | {_cell(entry['ppl_stable'], 2)} |"
        )
    lines += [
        "",
        "Train s of the re-scoring arm includes its re-scorings; score s is the offline scoring its weights came from "
        "(naive DPO and w/o impact weighting use none).",
        "",
        "## Label noise",
        "",
        "| noise | TRACE TPA shifted | naive DPO TPA shifted | TRACE TPA all | naive DPO TPA all | TRACE TPA all / clean |",
        "|---|---|---|---|---|---|",
    ]
    clean = (agg.get("trace@0") or {}).get("tpa_all", {}).get("mean")
    for noise in config["noise"]:
        trace, naive = agg.get(f"trace@{noise:g}"), agg.get(f"naive_dpo@{noise:g}")
        if trace is None or naive is None:
            continue
        ratio = trace["tpa_all"]["mean"] / clean if clean and trace["tpa_all"]["mean"] is not None else None
        lines.append(
            f"| {noise:g} | {_cell(trace['tpa_shifted'])} | {_cell(naive['tpa_shifted'])} | {_cell(trace['tpa_all'])} | "
            f"{_cell(naive['tpa_all'])} | {'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    lines += ["", "## Do the scores predict the effect of a step? (first-order check)", ""]
    lines.append(
        "Spearman ρ between each sampled pair's score and the probe-loss decrease of one small SGD step on that "
        f"pair alone (trace_ds/evaluate/influence.py): {_cell(study['spearman'])}."
    )
    lines += ["", "| seed | pairs | Spearman | Pearson | step size |", "|---|---|---|---|---|"]
    for seed, checks in study["seeds"].items():
        inf = checks["influence"]
        lines.append(
            f"| {seed} | {inf['pairs']} | {_fmt(inf['spearman'])} | {_fmt(inf['pearson'])} | {_fmt(inf['lr'], 'g')} |"
        )
    lines += [
        "",
        "## Impact weights (noise 0)",
        "",
        "Effective share: Kish's effective sample size (sum w)^2 / sum w^2 over the category's pairs, as a share "
        "of them (1: uniform weights; 0.2: the update rests on a fifth of the pairs' worth).",
        "",
        "| seed | category | pairs | weight 0 | zero share | largest weight | effective share |",
        "|---|---|---|---|---|---|---|",
    ]
    for seed, checks in study["seeds"].items():
        for category, entry in checks["zero_weights"].items():
            values = checks["weights"].get(category) or []
            lines.append(
                f"| {seed} | {category} | {entry['pairs']} | {entry['zero_weight']} | "
                f"{_fmt(entry['zero_weight_share'])} | {_fmt(max(values) if values else None, '.1f')} | "
                f"{_fmt((checks.get('effective_share') or {}).get(category))} |"
            )
    lines += ["", "## Plots", "", "![TPA against label noise](tpa_vs_noise.png)", "", "![Arms](arms.png)", ""]
    lines += ["![Impact weights](weights.png)", "", "## Every run (the files each number was read from)", ""]
    lines += [
        "| seed | noise | arm | TPA all | TPA shifted | steps | metrics |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in study["runs"]:
        lines.append(
            f"| {row['seed']} | {row['noise']:g} | {row['arm']} | {_fmt(row['tpa_all'])} | {_fmt(row['tpa_shifted'])} | "
            f"{row.get('steps', '-')} | `{row['metrics']}` |"
        )
    return "\n".join(lines) + "\n"


def stage_minutes(study: dict[str, Any]) -> str:
    """The summed stage times, total and by kind of stage, in minutes."""
    seconds = study.get("stage_seconds") or {}
    parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items() if k != "total")
    return f"{seconds.get('total', 0.0) / 60:.1f} min ({parts})"


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def write_report(out: Path, study: dict[str, Any]) -> None:
    write_json(out / "study.json", study)
    plot(out, study)
    write_text(out / "study.md", render(study))
    console.print(f"study report: {out / 'study.md'}")


def plot(out: Path, study: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = study["aggregates"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm in NOISE_ARMS:
        points = [
            (e["noise"], e["tpa_all"])
            for e in agg.values()
            if e["arm"] == arm and e["tpa_all"]["mean"] is not None
        ]
        points.sort(key=lambda p: p[0])
        ax.errorbar(
            [p[0] for p in points], [p[1]["mean"] for p in points],
            yerr=[p[1]["ci95"] or 0.0 for p in points], marker="o", capsize=3, label=ARM_LABELS[arm],
        )  # fmt: skip
    ax.set_xlabel("label noise (share of judged pairs with a wrong category)")
    ax.set_ylabel("TPA, all held-out prompts (↑)")
    ax.set_title("TPA against label noise (mean over seeds, 95% CI)")
    ax.legend(fontsize=8)
    _save(plt, fig, out / "tpa_vs_noise.png")

    arms = [a for a in ("old", *ARMS, MEAN_ARM) if f"{a}@0" in agg]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for offset, (metric, label) in enumerate(
        (("tpa_shifted", "shifted topics"), ("tpa_stable", "stable topics"))
    ):
        xs = [i + offset * 0.4 for i in range(len(arms))]
        entries = [agg[f"{a}@0"][metric] for a in arms]
        ax.bar(
            xs,
            [e["mean"] or 0.0 for e in entries],
            0.4,
            yerr=[e["ci95"] or 0.0 for e in entries],
            capsize=3,
            label=label,
        )
    ax.set_xticks([i + 0.2 for i in range(len(arms))], [ARM_LABELS[a] for a in arms], rotation=20, fontsize=7)
    ax.set_ylabel("TPA (↑)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Arms at noise 0 (mean over seeds, 95% CI)")
    ax.legend(fontsize=8)
    _save(plt, fig, out / "arms.png")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, category in zip(axes, ("inversion", "suppression"), strict=True):
        values = [w for checks in study["seeds"].values() for w in checks["weights"][category]]
        ax.hist(values, bins=30)
        ax.set_title(f"{category} weights (all seeds)")
        ax.set_xlabel("impact weight (mean 1 per category)")
    _save(plt, fig, out / "weights.png")


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
