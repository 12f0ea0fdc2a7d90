"""Terminal output shared by the stages: one rich console (stderr), tables, progress bars."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


def progress(description: str = "") -> Progress:
    """A progress bar with count, rate-friendly columns and ETA (disabled automatically off a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def key_value_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("item")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(str(key), _fmt(value))
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def print_triage_report(report: Mapping[str, Any]) -> None:
    """The triage report as a table: counts per category, unjudged, rejects, judge violation rates."""
    judged = report["judged"] or 1
    table = Table(title="Triage report", header_style="bold")
    table.add_column("category")
    table.add_column("pairs", justify="right")
    table.add_column("share of judged", justify="right")
    for name, count in report["categories"].items():
        table.add_row(name, str(count), f"{100 * count / judged:.1f}%")
    table.add_row("[bold]judged", str(report["judged"]), "")
    table.add_row("unjudged", str(report["unjudged"]), "")
    for reason, count in report.get("unjudged_reasons", {}).items():
        table.add_row(f"  {reason}", str(count), "")
    table.add_row("rejected records", str(report.get("rejects", 0)), "")
    table.add_row("verdicts for unknown ids", str(report["verdicts_for_unknown_ids"]), "")
    rates = report["violation_rates"]
    for side in ("chosen", "rejected"):
        rate = rates.get(side)
        table.add_row(f"judge: {side} violates", "-" if rate is None else f"{100 * rate:.1f}%", "")
    if "noise" in report:
        table.add_row("noise flips", str(report["noise"]["flipped"]), f"rate {report['noise']['rate']}")
    console.print(table)
