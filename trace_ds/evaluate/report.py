"""The report folder: a Markdown summary and PNG plots, from evaluation metrics, scores and training logs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trace_ds.io import write_text

TPA_GAIN_TARGET = 0.15  # TRACE's TPA must beat the old model's by this much (issue target)
RETENTION_TOLERANCE = 0.05  # "within a few points" on retention (stable) topics
PERPLEXITY_TOLERANCE = 0.10  # utility: held-out perplexity at most 10% above the old model's


def _lines(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tpa_cell(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{_fmt(entry['tpa'])} [{_fmt(low)}, {_fmt(high)}]"


def write_report(
    out: Path, evaluations: dict[str, dict[str, Any]], scores_path: str, training: dict[str, str]
) -> dict[str, Any]:
    """``evaluations``: name -> metrics (``old`` is the model before realignment). Returns the target check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    old = evaluations["old"]
    names = list(evaluations)
    rows = [
        "| model | TPA all [95% CI] | TPA shifted topics | TPA stable topics | inversion accuracy | suppression logp change | retention KL | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        m = evaluations[name]
        p = m["preference"]
        ppl = m["perplexity"]["model"] if m.get("perplexity") else None
        rows.append(
            f"| {name} | {_tpa_cell(m['tpa']['all'])} | {_tpa_cell(m['tpa']['shifted'])} | {_tpa_cell(m['tpa']['stable'])} | "
            f"{_fmt(p['inversion_accuracy'])} | {_fmt(p['suppression_logp_change'], 2)} | {_fmt(p['retention_kl'], 4)} | {_fmt(ppl, 2)} |"
        )
    check: dict[str, Any] = {}
    if "trace" in evaluations:
        trace = evaluations["trace"]
        gain = trace["tpa"]["all"]["tpa"] - old["tpa"]["all"]["tpa"]
        retention_drop = old["tpa"]["stable"]["tpa"] - trace["tpa"]["stable"]["tpa"]
        ppl_old = old["perplexity"]["model"] if old.get("perplexity") else None
        ppl_trace = trace["perplexity"]["model"] if trace.get("perplexity") else None
        check = {
            "prompts": trace["tpa"]["all"]["prompts"],
            "tpa_gain": gain,
            "tpa_gain_target": TPA_GAIN_TARGET,
            "tpa_target_met": gain >= TPA_GAIN_TARGET,
            "retention_tpa_drop": retention_drop,
            "retention_target_met": retention_drop <= RETENTION_TOLERANCE,
            "perplexity_old": ppl_old,
            "perplexity_trace": ppl_trace,
            "perplexity_change": (ppl_trace / ppl_old - 1.0) if ppl_old and ppl_trace else None,
        }
        check["perplexity_target_met"] = (
            check["perplexity_change"] is not None and check["perplexity_change"] <= PERPLEXITY_TOLERANCE
        )
    plots = []
    plots.append(_plot_tpa(plt, out, evaluations))
    plots.append(_plot_preference(plt, out, evaluations))
    plots.append(_plot_scores(plt, out, scores_path))
    for method, metrics_path in training.items():
        if Path(metrics_path).exists():
            plots.append(_plot_losses(plt, out, method, metrics_path))
    verdict = []
    if check:
        verdict = [
            "## Targets",
            "",
            f"- TPA gain of TRACE over the old-policy model: {100 * check['tpa_gain']:+.1f} points on {check['prompts']} held-out prompts "
            f"(target +{100 * TPA_GAIN_TARGET:.0f}): **{'met' if check['tpa_target_met'] else 'missed'}**.",
            f"- TPA on stable (retention) topics: {100 * check['retention_tpa_drop']:.1f} points below the old model "
            f"(tolerance {100 * RETENTION_TOLERANCE:.0f}): **{'met' if check['retention_target_met'] else 'missed'}**.",
            f"- Utility perplexity on held-out general text: old {_fmt(check['perplexity_old'], 2)}, TRACE {_fmt(check['perplexity_trace'], 2)} "
            f"({100 * (check['perplexity_change'] or 0):+.1f}%, tolerance +{100 * PERPLEXITY_TOLERANCE:.0f}%): "
            f"**{'met' if check['perplexity_target_met'] else 'missed'}**.",
            "",
        ]
    text = "\n".join(
        [
            "# trace-ds realignment report",
            "",
            "Measured on the held-out split of the evaluation data; TPA is the share of greedy generations the",
            "benchmark's judge finds compliant with the NEW policy (95% Wilson intervals). Preference metrics",
            "compare each model with the old-policy model (the reference): accuracy is the share of held-out",
            "inversion pairs whose implicit reward margin is positive.",
            "",
            *rows,
            "",
            *verdict,
            "## Plots",
            "",
            *(f"![{p.stem}]({p.name})" for p in plots),
            "",
        ]
    )
    write_text(out / "report.md", text)
    (out / "report.json").write_text(
        json.dumps(
            {
                "check": check,
                "evaluations": {
                    k: {"tpa": v["tpa"], "preference": v["preference"], "perplexity": v.get("perplexity")}
                    for k, v in evaluations.items()
                },
            },
            indent=2,
        )
    )
    return {"report": str(out / "report.md"), **check}


def _plot_tpa(plt: Any, out: Path, evaluations: dict[str, dict[str, Any]]) -> Path:
    groups = ["all", "shifted", "stable"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(evaluations)
    for index, (name, m) in enumerate(evaluations.items()):
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
    ax.set_ylabel("target-policy agreement")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("TPA per model (95% CI)")
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
    ax.set_ylabel("held-out inversion accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("New-policy preference accuracy (margin > 0 vs old model, 95% CI)")
    return _save(plt, fig, out / "preference_accuracy.png")


def _plot_scores(plt: Any, out: Path, scores_path: str) -> Path:
    rows = _lines(scores_path)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, category in zip(axes, ("inversion", "suppression"), strict=True):
        values = [r["raw_score"] for r in rows if r["category"] == category]
        ax.hist(values, bins=40)
        ax.axvline(0, color="k", linewidth=0.8)
        ax.set_title(f"{category}: {sum(v > 0 for v in values)}/{len(values)} positive")
        ax.set_xlabel("raw impact score")
    return _save(plt, fig, out / "score_distribution.png")


def _plot_losses(plt: Any, out: Path, method: str, metrics_path: str) -> Path:
    metrics = _lines(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, label in (
        ("loss_inversion", "relational (inversion)"),
        ("loss_suppression", "NPO (suppression)"),
        ("kl_retention", "KL (retention)"),
        ("loss", "step loss"),
    ):
        points = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, linewidth=1)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title(f"Loss per head: {method}")
    return _save(plt, fig, out / f"losses_{method}.png")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
