"""The report folder: ``report.md`` and ``report.json`` (the same content) and PNG plots, from evaluation
metrics, impact scores and training logs, with the config, the versions and the environment they ran in.

Everything the Markdown shows is first put into one dict, written as ``report.json``; the Markdown is rendered
from that dict, so the two never disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_ds.io import write_json, write_text

TPA_GAIN_TARGET = 0.15  # TRACE's TPA must beat the old model's by this much (issue target)
RETENTION_TOLERANCE = 0.05  # "within a few points" on retention (stable) topics
PERPLEXITY_TOLERANCE = 0.10  # utility: perplexity at most 10% above the old model's (on stable-topic text)
NO_TPA = "not computed (no judge for this policy)"
MAX_SMOOTHING_WINDOW = 50
ARROWS = {"higher": "↑", "lower": "↓"}


@dataclass(frozen=True)
class Metric:
    """One row of the results table: where the value is in an evaluation's metrics and which way is better."""

    key: str
    label: str
    better: str  # "higher" or "lower"
    digits: int
    value: Callable[[dict[str, Any]], Any]
    tpa_group: str | None = None  # a TPA row: the value carries a 95% interval, or is not computed
    optional: bool = False  # a row shown only where some evaluation has a value (the rest are "-")


def _tpa(group: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: (m.get("tpa") or {}).get(group)


def _preference(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda m: m["preference"].get(key)


def _perplexity_group(group: str) -> Callable[[dict[str, Any]], Any]:
    """Perplexity on one group's held-out text (``general_<group>.txt``); None where the data has none."""
    return lambda m: ((m.get("perplexity") or {}).get(group) or {}).get("model")


METRICS: tuple[Metric, ...] = (
    Metric("tpa_all", "TPA, all held-out prompts [95% CI]", "higher", 3, _tpa("all"), "all"),
    Metric("tpa_shifted", "TPA, shifted topics [95% CI]", "higher", 3, _tpa("shifted"), "shifted"),
    Metric("tpa_stable", "TPA, stable topics [95% CI]", "higher", 3, _tpa("stable"), "stable"),
    Metric(
        "degenerate",
        "degenerate generations (empty, looping, role-play; counted non-compliant)",
        "lower",
        3,
        lambda m: ((m.get("tpa") or {}).get("all") or {}).get("degenerate"),
        optional=True,
    ),
    Metric(
        "inversion_accuracy",
        "inversion accuracy (margin > 0)",
        "higher",
        3,
        _preference("inversion_accuracy"),
    ),
    Metric("inversion_margin", "inversion margin", "higher", 2, _preference("inversion_margin")),
    Metric(
        "suppression_logp_change",
        "suppressed responses' log-prob change",
        "lower",
        2,
        _preference("suppression_logp_change"),
    ),
    Metric("retention_kl", "retention KL to the old model", "lower", 4, _preference("retention_kl")),
    Metric(
        "perplexity",
        "perplexity on held-out general text",
        "lower",
        2,
        lambda m: m["perplexity"]["model"] if m.get("perplexity") else None,
    ),
    Metric(
        "perplexity_stable",
        "perplexity on held-out stable-topic text (utility target)",
        "lower",
        2,
        _perplexity_group("stable"),
        optional=True,
    ),
    Metric(
        "perplexity_shifted",
        "perplexity on held-out shifted-topic text",
        "lower",
        2,
        _perplexity_group("shifted"),
        optional=True,
    ),
)


def _lines(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tpa_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return NO_TPA
    if not entry["prompts"]:
        return "- (no prompts)"
    low, high = entry["ci95"]
    return f"{_fmt(entry['tpa'])} [{_fmt(low)}, {_fmt(high)}]"


def write_report(
    out: Path,
    evaluations: dict[str, dict[str, Any]],
    scores_path: str,
    training: dict[str, str],
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``evaluations``: name -> metrics (``old`` is the model before realignment); ``training``: method ->
    its ``metrics.jsonl``; ``config``: the pipeline's config, recorded as given. Writes ``report.md``,
    ``report.json`` and the plots into ``out``; returns the target check (with ``report``: the Markdown path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trace_ds.runtime.fingerprint import environment_fingerprint, fingerprint_id, package_versions

    out.mkdir(parents=True, exist_ok=True)
    environment = environment_fingerprint()
    data: dict[str, Any] = {
        "trace_ds_version": environment["packages"]["trace-ds"],
        "metrics": [{"key": m.key, "label": m.label, "better": m.better} for m in METRICS],
        "results": {name: _results(m) for name, m in evaluations.items()},
        "tpa_judges": {name: m.get("tpa_judge") for name, m in evaluations.items()},
        "check": target_check(evaluations),
        "zero_weight": zero_weight_summary(scores_path),
        "evaluations": {
            name: {
                "tpa": m.get("tpa"),
                "tpa_judge": m.get("tpa_judge"),
                "tpa_note": m.get("tpa_note"),
                "preference": m["preference"],
                "perplexity": m.get("perplexity"),
                "environment_id": fingerprint_id(m["environment"]) if m.get("environment") else None,
            }
            for name, m in evaluations.items()
        },
        "loss_smoothing": {},
        "plots": [],
        "config": config,
        "packages": package_versions(),
        "environment": environment,
        "environment_id": fingerprint_id(environment),
    }
    plots: list[Path] = []
    if any(m.get("tpa") for m in evaluations.values()):
        plots.append(_plot_tpa(plt, out, evaluations))
    plots.append(_plot_preference(plt, out, evaluations))
    plots.append(_plot_scores(plt, out, scores_path))
    for method, metrics_path in training.items():
        if Path(metrics_path).exists():
            path, window = _plot_losses(plt, out, method, metrics_path)
            plots.append(path)
            data["loss_smoothing"][method] = {"kind": "trailing moving average", "window_steps": window}
    data["plots"] = [p.name for p in plots]
    write_text(out / "report.md", render_markdown(data))
    write_json(out / "report.json", json.loads(json.dumps(data, default=str)))
    return {"report": str(out / "report.md"), **data["check"]}


def _results(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each table metric's value: TPA rows as ``{"tpa", "ci95", "prompts"}`` or None (not computed)."""
    return {m.key: m.value(metrics) for m in METRICS}


def target_check(evaluations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """TRACE against the old model: TPA gain, TPA drop on stable topics, perplexity change. A target that
    cannot be checked (no TPA judge, no stable prompts, no perplexity) is ``None``, never met or missed.

    The utility target (perplexity at most PERPLEXITY_TOLERANCE above the old model's) is judged on held-out
    stable-topic text where both evaluations have it (``perplexity.stable``): the new policy is meant to change
    what the model says on shifted topics, not its language elsewhere. Otherwise on all held-out general text;
    ``perplexity_text`` says which (``stable`` or ``all``)."""
    if "trace" not in evaluations:
        return {}
    old, trace = evaluations["old"], evaluations["trace"]
    old_tpa, trace_tpa = old.get("tpa"), trace.get("tpa")
    checked = bool(old_tpa and trace_tpa)

    def difference(a: dict | None, b: dict | None, group: str) -> float | None:
        x, y = (a or {}).get(group, {}).get("tpa"), (b or {}).get(group, {}).get("tpa")
        return None if x is None or y is None else x - y

    gain = difference(trace_tpa, old_tpa, "all") if checked else None
    drop = difference(old_tpa, trace_tpa, "stable") if checked else None
    stable = _perplexity_group("stable")
    text = "stable" if stable(old) is not None and stable(trace) is not None else "all"
    ppl_old, ppl_trace = (
        (stable(old), stable(trace))
        if text == "stable"
        else tuple(m["perplexity"]["model"] if m.get("perplexity") else None for m in (old, trace))
    )
    change = (ppl_trace / ppl_old - 1.0) if ppl_old and ppl_trace else None
    shifted = _perplexity_group("shifted")
    shifted_old, shifted_trace = shifted(old), shifted(trace)
    return {
        "prompts": trace_tpa["all"]["prompts"] if trace_tpa else None,
        "tpa_checked": checked,
        "tpa_note": None if checked else f"TPA targets not checked: TPA {NO_TPA}",
        "tpa_gain": gain,
        "tpa_gain_target": TPA_GAIN_TARGET,
        "tpa_target_met": None if gain is None else gain >= TPA_GAIN_TARGET,
        "retention_tpa_drop": drop,
        "retention_tolerance": RETENTION_TOLERANCE,
        "retention_target_met": None if drop is None else drop <= RETENTION_TOLERANCE,
        "perplexity_text": text,
        "perplexity_old": ppl_old,
        "perplexity_trace": ppl_trace,
        "perplexity_change": change,
        "perplexity_tolerance": PERPLEXITY_TOLERANCE,
        "perplexity_target_met": None if change is None else change <= PERPLEXITY_TOLERANCE,
        "perplexity_shifted_change": (
            shifted_trace / shifted_old - 1.0 if shifted_old and shifted_trace else None
        ),
    }


ZERO_WEIGHT_WHY = {  # per weight map (the scores' meta; files without it were made with the paper's)
    "paper": "A conflict pair's weight is max(0, s) normalised, where s = <grad L_i, grad J> is its impact score "
    "at the old model's weights and J the probe objective (docs/method.md). A pair gets weight 0 exactly when "
    "s <= 0: a small step that lowers its loss would not lower the probe's loss, so training skips it.",
    "prune": "A conflict pair's weight is 0 when its {metric} score is among the lowest {fraction} of its "
    "category or below 0, and the same for every other pair, normalised (`--weighting {weighting}`; the score "
    "s = <grad L_i, grad J> at the old model's weights, J the probe objective: docs/method.md). A pair with "
    "s <= 0 would not lower the probe's loss with a small step that lowers its own, so training skips it.",
    "standardized": "No pair gets weight 0 under `--weighting standardized` (every weight is at least "
    "--weight-min); a 0 here is a category whose every score is <= 0 (`--allow-empty`).",
    "uniform": "No pair gets weight 0 under `--weighting uniform`; a 0 here is a category whose every score is "
    "<= 0 (`--allow-empty`).",
}
ZERO_WEIGHT_ADVICE = (
    "That is TRACE filtering pairs that disagree with the probe, not a failure; a large share of pairs with "
    "s <= 0 means the probe and those pairs pull in different directions. What can change it:",
    "the probe: a larger one (`trace-ds score --probe-size N`, default 64; in the pipeline `score: {probe_size: N}`) "
    "averages grad J over more pairs; a curated one (`--probe FILE`, new-orientation pairs that show the new "
    "policy well) replaces the probe built from the triaged data, whose mistakes it inherits;",
    "the triage: pairs a noisy judge put in the wrong category tend to oppose the probe; a better judge, or "
    "`trace-ds triage --min-confidence` to leave low-confidence verdicts unjudged (the pipeline's triage "
    "stage uses the defaults);",
    "not beta or the relational loss (`--beta`, `--relational`): at the old model's weights they only rescale "
    "the scores (IPO -(1/beta) grad delta, DPO -(beta/2) grad delta, NPO grad log p), so the sign of every "
    "score, and with it which pairs get weight 0, stays the same; with `--normalize joint` they change only "
    "the balance between the categories;",
    "to see whether dropping these pairs helped, compare `trace` with the `no_impact` baseline (every weight 1).",
)


def zero_weight_summary(scores_path: str | Path) -> dict[str, Any]:
    """Per conflict category of the scores file: pairs, pairs of weight 0, their share, and how many raw
    scores are <= 0 (the paper's clamp max(0, s) zeroes exactly those); ``--probe-holdout`` pairs (no raw score)
    counted apart. ``why`` says how the file's weight map (its meta) gives a pair weight 0."""
    from trace_ds.scoring.weights import parse_map, read_scores_meta

    meta = read_scores_meta(scores_path)
    weighting = meta.get("weighting", "paper")
    name, fraction = parse_map(weighting)
    why = ZERO_WEIGHT_WHY[name].format(
        metric=meta.get("score_metric", "dot"), fraction=f"{fraction:.0%}", weighting=weighting
    )
    rows = _lines(scores_path)
    categories: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = categories.setdefault(
            row["category"], {"pairs": 0, "zero_weight": 0, "raw_score_at_most_0": 0, "not_scored": 0}
        )
        entry["pairs"] += 1
        entry["zero_weight"] += row.get("weight") == 0
        raw = row.get("raw_score")
        if raw is None:
            entry["not_scored"] += 1
        else:
            entry["raw_score_at_most_0"] += raw <= 0
    for entry in categories.values():
        entry["zero_weight_share"] = entry["zero_weight"] / entry["pairs"] if entry["pairs"] else None
    return {
        "scores": str(scores_path),
        "weighting": weighting,
        "categories": categories,
        "advice": [f"{why} {ZERO_WEIGHT_ADVICE[0]}", *ZERO_WEIGHT_ADVICE[1:]],
    }


# ---- Markdown ---------------------------------------------------------------------------------------


def render_markdown(data: dict[str, Any]) -> str:
    """report.md from the report.json dict."""
    names = list(data["results"])
    judges = sorted({str(j) for j in data["tpa_judges"].values() if j})
    if judges:
        judged = (
            f"TPA is the share of generations that judge `{'`, `'.join(judges)}` finds compliant with the NEW "
            "policy (95% Wilson intervals)."
        )
    else:
        judged = (
            f"TPA is {NO_TPA}: `trace-ds eval` scores TPA only on the synthetic benchmark's own prompts; judge "
            "the written generations (`trace-ds judge run --generations`, or `judge export` / `judge parse "
            "--generations`, then `trace-ds tpa`)."
        )
    lines = [
        "# trace-ds realignment report",
        "",
        f"trace-ds {data['trace_ds_version']}. Measured on the held-out split of the evaluation data. {judged}",
        "Preference metrics compare each model with the old-policy model (the reference): inversion accuracy",
        "is the share of held-out inversion pairs whose implicit reward margin is positive.",
        "",
        "## Results",
        "",
        "↑: higher is better, ↓: lower is better.",
        "",
        "| metric | better | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for metric in METRICS:
        if metric.optional and all(data["results"][name][metric.key] is None for name in names):
            continue
        cells = []
        for name in names:
            value = data["results"][name][metric.key]
            cells.append(_tpa_cell(value) if metric.tpa_group else _fmt(value, metric.digits))
        lines.append(
            f"| {metric.label} | {ARROWS[metric.better]} {metric.better} | " + " | ".join(cells) + " |"
        )
    lines += ["", *_per_topic_markdown(data, names)]
    lines += [*_targets_markdown(data["check"]), *_zero_weight_markdown(data["zero_weight"])]
    lines += ["## Plots", ""]
    if "tpa.png" not in data["plots"]:
        lines += [f"No TPA plot: TPA {NO_TPA}.", ""]
    if data["loss_smoothing"]:
        windows = ", ".join(f"{m}: {s['window_steps']}" for m, s in data["loss_smoothing"].items())
        lines += [
            "Loss curves: a trailing moving average (window in steps: "
            f"{windows}) over the raw per-step values, drawn faint behind it.",
            "",
        ]
    lines += [*(f"![{Path(p).stem}]({p})" for p in data["plots"]), "", *_run_markdown(data)]
    return "\n".join(lines)


def _per_topic_markdown(data: dict[str, Any], names: list[str]) -> list[str]:
    """TPA per topic (the benchmark's prompts name theirs), each model a column; nothing without topics."""
    tpa = {name: (data["evaluations"].get(name) or {}).get("tpa") or {} for name in names}
    topics = sorted({key for groups in tpa.values() for key in groups if key.startswith("topic:")})
    if not topics:
        return []
    lines = [
        "## TPA per topic",
        "",
        "| topic | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for topic in topics:
        cells = [_tpa_cell(tpa[name].get(topic)) if tpa[name] else NO_TPA for name in names]
        lines.append(f"| {topic.removeprefix('topic:')} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _targets_markdown(check: dict[str, Any]) -> list[str]:
    if not check:
        return []

    def verdict(met: bool | None) -> str:
        return "not checked" if met is None else ("met" if met else "missed")

    lines = ["## Targets", ""]
    if not check["tpa_checked"]:
        lines.append(f"- {check['tpa_note']}.")
    else:
        gain, drop = check["tpa_gain"], check["retention_tpa_drop"]
        lines.append(
            f"- TPA gain of TRACE over the old-policy model: {_points(gain, signed=True)} on {check['prompts']} "
            f"held-out prompts (target +{100 * TPA_GAIN_TARGET:.0f}): **{verdict(check['tpa_target_met'])}**."
        )
        where = (
            "- (no stable prompts)"
            if drop is None
            else f"{_points(abs(drop))} {'below' if drop >= 0 else 'above'}"
        )
        lines.append(
            f"- TPA on stable (retention) topics: {where} the old model "
            f"(at most {100 * RETENTION_TOLERANCE:.0f} below): **{verdict(check['retention_target_met'])}**."
        )
    change = check["perplexity_change"]
    on_stable = check.get("perplexity_text") == "stable"
    text = "held-out stable-topic text" if on_stable else "held-out general text"
    lines.append(
        f"- Utility perplexity on {text}: old {_fmt(check['perplexity_old'], 2)}, TRACE "
        f"{_fmt(check['perplexity_trace'], 2)} ({_percent(change)}, tolerance "
        f"+{100 * PERPLEXITY_TOLERANCE:.0f}%): **{verdict(check['perplexity_target_met'])}**."
    )
    if on_stable:
        lines.append(
            "  Judged on stable topics only: the new policy changes the answers on shifted topics, so their "
            f"text is no measure of utility (shifted-topic text: {_percent(check.get('perplexity_shifted_change'))}"
            ", not a target)."
        )
    return [*lines, ""]


def _percent(change: float | None) -> str:
    return "-" if change is None else f"{100 * change:+.1f}%"


def _points(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "- (no prompts)"
    return f"{100 * value:+.1f} points" if signed else f"{100 * value:.1f} points"


def _zero_weight_markdown(summary: dict[str, Any]) -> list[str]:
    lines = [
        "## Pairs with zero weight",
        "",
        f"From `{summary['scores']}` (retention pairs carry no weight: they always train, on the KL head).",
        "",
        "| category | scored pairs | weight 0 | share | raw score <= 0 |",
        "|---|---|---|---|---|",
    ]
    for category, entry in summary["categories"].items():
        share = entry["zero_weight_share"]
        lines.append(
            f"| {category} | {entry['pairs']} | {entry['zero_weight']} | "
            f"{'-' if share is None else f'{100 * share:.1f}%'} | {entry['raw_score_at_most_0']} |"
        )
    held_out = sum(entry["not_scored"] for entry in summary["categories"].values())
    if held_out:
        lines += [
            "",
            f"{held_out} pairs were not scored (`--probe-holdout`) and take their category's mean weight.",
        ]
    intro, *options = summary["advice"]
    return [*lines, "", intro, "", *(f"- {option}" for option in options), ""]


def _run_markdown(data: dict[str, Any]) -> list[str]:
    environment = data["environment"]
    cpu, gpu = environment["cpu"], environment["gpu"]
    flags = cpu["flags"]
    rows = {
        "CPU": cpu["model"],
        "CPU flags (sha256, 12 hex)": cpu["flags_sha256"],
        "SIMD flags present": (", ".join(f for f, present in flags.items() if present) or "none")
        if flags is not None
        else None,
        "torch CPU capability": environment["torch"]["cpu_capability"],
        "torch threads": environment["torch"]["num_threads"],
        "nproc / cpu_count": f"{cpu['nproc']} / {cpu['cpu_count']}",
        "environment variables": ", ".join(f"{k}={v}" for k, v in environment["env"].items() if v is not None)
        or "none set",
        "platform": environment["platform"]["platform"],
        "Python": environment["python"]["version"],
        "GPU": "none"
        if gpu is None
        else f"{', '.join(d['name'] for d in gpu['devices'])} (driver {gpu['driver']}, CUDA {gpu['cuda']})",
    }
    eval_ids = {name: e["environment_id"] for name, e in data["evaluations"].items()}
    lines = [
        "## Run",
        "",
        f"trace-ds {data['trace_ds_version']}; environment `{data['environment_id']}` (report.json has the "
        "full fingerprint). Evaluations ran in: "
        + ", ".join(f"{name} `{eid or 'not recorded'}`" for name, eid in eval_ids.items())
        + ".",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {'-' if value is None else value} |" for key, value in rows.items()),
        "",
        "Packages: "
        + ", ".join(f"{name} {version or 'not installed'}" for name, version in data["packages"].items()),
        "",
        "### Config",
        "",
    ]
    if data["config"] is None:
        return [*lines, "Not recorded (the report was written without a config).", ""]
    return [*lines, "```yaml", _yaml(data["config"]).rstrip(), "```", ""]


def _yaml(config: dict[str, Any]) -> str:
    try:
        import yaml

        return yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False)
    except Exception:
        return json.dumps(config, indent=2, default=str)


# ---- plots ------------------------------------------------------------------------------------------


def _plot_tpa(plt: Any, out: Path, evaluations: dict[str, dict[str, Any]]) -> Path:
    groups = ["all", "shifted", "stable"]
    judged = {name: m for name, m in evaluations.items() if m.get("tpa")}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(judged)
    for index, (name, m) in enumerate(judged.items()):
        xs = [g + index * width for g in range(len(groups))]
        values = [m["tpa"][g]["tpa"] or 0.0 for g in groups]
        bounds = [
            [b if b == b else v for b in m["tpa"][g]["ci95"]] for v, g in zip(values, groups, strict=True)
        ]  # NaN: no prompts
        errors = [
            [max(0.0, v - lo) for v, (lo, _) in zip(values, bounds, strict=True)],
            [max(0.0, hi - v) for v, (_, hi) in zip(values, bounds, strict=True)],
        ]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel("target-policy agreement (↑)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("TPA per model (95% CI; higher is better)")
    return _save(plt, fig, out / "tpa.png")


def _plot_preference(plt: Any, out: Path, evaluations: dict[str, dict[str, Any]]) -> Path:
    from trace_ds.evaluate.metrics import wilson_interval

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(evaluations)
    values, low, high = [], [], []
    for name in names:
        preference = evaluations[name]["preference"]
        accuracy, count = preference["inversion_accuracy"] or 0.0, preference["pairs"]["inversion"]
        lo, hi = wilson_interval(round(accuracy * count), count)
        values.append(accuracy)
        low.append(max(0.0, accuracy - lo) if lo == lo else 0.0)
        high.append(max(0.0, hi - accuracy) if hi == hi else 0.0)
    ax.bar(names, values, yerr=[low, high], capsize=3)
    ax.set_ylabel("held-out inversion accuracy (↑)")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        "New-policy preference accuracy (margin > 0 vs old model, 95% CI; higher is better)", fontsize=9
    )
    return _save(plt, fig, out / "preference_accuracy.png")


def _plot_scores(plt: Any, out: Path, scores_path: str) -> Path:
    rows = _lines(scores_path)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, category in zip(axes, ("inversion", "suppression"), strict=True):
        values = [
            r["raw_score"] for r in rows if r["category"] == category and r.get("raw_score") is not None
        ]
        ax.hist(values, bins=40)
        ax.axvline(0, color="k", linewidth=0.8)
        positive = sum(v > 0 for v in values)
        ax.set_title(
            f"{category}: {positive}/{len(values)} positive, {len(values) - positive} weight 0", fontsize=9
        )
        ax.set_xlabel("raw impact score (<= 0: weight 0)")
    return _save(plt, fig, out / "score_distribution.png")


def smoothing_window(steps: int) -> int:
    """Steps per moving-average window: about a tenth of the run, at least 1, at most MAX_SMOOTHING_WINDOW."""
    return max(1, min(MAX_SMOOTHING_WINDOW, steps // 10))


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of values[max(0, i - window + 1) : i + 1]."""
    return [
        math.fsum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(values))
    ]


def _plot_losses(plt: Any, out: Path, method: str, metrics_path: str) -> tuple[Path, int]:
    metrics = _lines(metrics_path)
    window = smoothing_window(len(metrics))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, label in (
        ("loss_inversion", "relational (inversion)"),
        ("loss_suppression", "NPO (suppression)"),
        ("kl_retention", "KL (retention)"),
        ("loss", "step loss"),
    ):
        points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None and math.isfinite(m[key])]
        if not points:
            continue
        steps, values = (list(v) for v in zip(*points, strict=True))
        (raw,) = ax.plot(steps, values, linewidth=0.8, alpha=0.25)
        smoothed = moving_average(values, window)
        suffix = f"moving average, {window} steps" if window > 1 else "raw: too few steps to smooth"
        ax.plot(steps, smoothed, linewidth=1.4, color=raw.get_color(), label=f"{label} ({suffix})")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (↓)")
    ax.legend(fontsize=7)
    ax.set_title(f"Loss per head: {method} (faint: raw per step)")
    return _save(plt, fig, out / f"losses_{method}.png"), window


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
