"""Terminal output shared by the stages: one rich console (stderr), tables, progress reporting.

Progress: every stage reports through ``progress(...)`` (a ``StageProgress``). On a terminal it draws a rich
bar; off a terminal (SLURM, nohup, CI logs) it prints plain, throttled lines to stderr, from rank 0 only:

    [training] 120/400 (30%) 2.1 step/s elapsed 57s ETA 2m13s loss 0.4123 | 1843 tok/s
    [training] 400/400 (100%) 2.1 step/s elapsed 3m10s done loss 0.3012 | 1850 tok/s

A line is printed when ``TRACE_DS_PROGRESS_SECONDS`` (default 30) have passed or
``TRACE_DS_PROGRESS_PERCENT`` (default 5) percent of the total has been done since the last line, whichever
comes first, plus one final line (``done``, or ``stopped`` when the stage ends early). ``TRACE_DS_PROGRESS``
chooses the display: ``auto`` (default: rich on a terminal, plain otherwise), ``rich``, ``plain`` or ``off``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

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

from trace_ds.io import TraceError

console = Console(stderr=True)

PROGRESS_MODES = ("auto", "rich", "plain", "off")


@dataclass(frozen=True)
class ProgressSettings:
    """How progress is shown: ``mode`` (one of PROGRESS_MODES) and the plain lines' two bounds."""

    mode: str = "auto"
    seconds: float = 30.0  # a plain line at least this often (0: at every update; inf: no time bound)
    percent: float = 5.0  # ... or after this share of the total (0: at every update; 100: final line only)


def progress_settings(environ: Mapping[str, str] | None = None) -> ProgressSettings:
    """The settings from TRACE_DS_PROGRESS, TRACE_DS_PROGRESS_SECONDS and TRACE_DS_PROGRESS_PERCENT."""
    env = os.environ if environ is None else environ
    mode = env.get("TRACE_DS_PROGRESS", "").strip().lower() or "auto"
    if mode not in PROGRESS_MODES:
        raise TraceError(
            f"TRACE_DS_PROGRESS={env.get('TRACE_DS_PROGRESS')!r}: expected one of {', '.join(PROGRESS_MODES)}"
        )
    seconds = _env_number(env, "TRACE_DS_PROGRESS_SECONDS", 30.0, "seconds >= 0 (inf: no time bound)")
    percent = _env_number(env, "TRACE_DS_PROGRESS_PERCENT", 5.0, "a percentage in [0, 100]", upper=100.0)
    return ProgressSettings(mode, seconds, percent)


def _env_number(
    env: Mapping[str, str], name: str, default: float, expected: str, upper: float = math.inf
) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value) or not 0 <= value <= upper:
        raise TraceError(f"{name}={text!r}: expected {expected}")
    return value


def _rank() -> int:
    """This process's rank: torch.distributed's once initialised, else the launcher's RANK (0 alone)."""
    dist = sys.modules.get("torch.distributed")  # never imports torch just to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _stderr_is_tty() -> bool:
    """Whether stderr really is a terminal (not rich's view, which FORCE_COLOR turns on in a log file)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _duration(seconds: float) -> str:
    """``42s``, ``2m13s``, ``1h05m09s``."""
    total = int(seconds + 0.5)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _number(value: float, digits: int = 3) -> str:
    """A rate (3 significant digits) or loss (4), never in exponent form for ordinary sizes."""
    return f"{value:.0f}" if abs(value) >= 10**digits - 0.5 else f"{value:.{digits}g}"


class StageProgress:
    """One stage's progress (a context manager): a rich bar on a terminal, plain throttled lines otherwise,
    nothing on ranks other than 0 or when ``visible`` is false. Callers never branch on the display:

        with progress("training", total=steps, unit="step", visible=strategy.is_main) as bar:
            bar.update(completed=step, loss=loss, note="1843 tok/s")   # or bar.update(advance=n)

    The rate counts only the items done since the stage started (a resumed run's earlier items are not
    fast); ``clock``, ``stream``, ``settings``, ``terminal`` and ``rank`` are injectable for tests.
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        completed: int = 0,
        unit: str = "it",
        visible: bool = True,
        settings: ProgressSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        rank: int | None = None,
    ) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.completed = self._start_completed = completed
        self.loss: float | None = None
        self.note: str | None = None
        self.settings = settings if settings is not None else progress_settings()
        self._clock, self._stream = clock, stream
        mode = self.settings.mode
        if mode == "auto":
            mode = "rich" if (_stderr_is_tty() if terminal is None else terminal) else "plain"
        if not visible or (_rank() if rank is None else rank) != 0:
            mode = "off"
        self.mode = mode
        self._bar: Progress | None = None
        self._task: Any = None
        self._started = self._last_time = clock()
        self._last_completed = completed
        self._finished = False

    # ---- context manager ----
    def __enter__(self) -> StageProgress:
        self._started = self._last_time = self._clock()
        if self.mode == "rich":
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                self.description, total=self.total, completed=self.completed, rate=""
            )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.mode == "plain" and not self._finished:
            self._finish()

    # ---- reporting ----
    def update(
        self,
        *,
        completed: int | None = None,
        advance: int = 0,
        loss: float | None = None,
        note: str | None = None,
    ) -> None:
        """Set (``completed``) or advance the count; ``loss`` and ``note`` (e.g. ``1843 tok/s``) are shown
        with it until replaced."""
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if loss is not None:
            self.loss = float(loss)
        if note is not None:
            self.note = note
        if self.mode == "rich" and self._bar is not None:
            self._bar.update(self._task, completed=self.completed, rate=self._fields(self._clock()))
        elif self.mode == "plain" and not self._finished:
            now = self._clock()
            if self.total is not None and self.completed >= self.total:
                self._finish()
            elif self._due(now):
                self._emit(now, None)

    def advance(self, amount: int = 1, **fields: Any) -> None:
        self.update(advance=amount, **fields)

    def _due(self, now: float) -> bool:
        if now - self._last_time >= self.settings.seconds:
            return True
        if not self.total:
            return False
        return self.completed - self._last_completed >= self.settings.percent * self.total / 100

    def _finish(self) -> None:
        done = self.total is None or self.completed >= self.total
        self._emit(self._clock(), "done" if done else "stopped")
        self._finished = True

    def _rate(self, now: float) -> float:
        return (self.completed - self._start_completed) / max(now - self._started, 1e-9)

    def _fields(self, now: float) -> str:
        parts = [f"{_number(self._rate(now))} {self.unit}/s"]
        if self.loss is not None:
            parts.append(f"loss {_number(self.loss, 4)}")
        if self.note:
            parts.append(self.note)
        return " ".join(parts)

    def line(self, now: float, status: str | None = None) -> str:
        """One plain progress line (the format in the module docstring and docs/running_at_scale.md)."""
        rate = self._rate(now)
        if self.total is None:
            count = f"{self.completed}/?"
        else:
            share = 100 if self.total <= 0 else math.floor(100 * min(self.completed, self.total) / self.total)
            count = f"{self.completed}/{self.total} ({share}%)"
        if status is None:
            if self.total is None or rate <= 0:
                status = "ETA ?"
            else:
                status = f"ETA {_duration(max(self.total - self.completed, 0) / rate)}"
        text = f"[{self.description}] {count} {_number(rate)} {self.unit}/s elapsed {_duration(now - self._started)} {status}"
        if self.loss is not None:
            text += f" loss {_number(self.loss, 4)}"
        if self.note:
            text += f" | {self.note}"
        return text

    def _emit(self, now: float, status: str | None) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(self.line(now, status) + "\n")
        stream.flush()
        self._last_time, self._last_completed = now, self.completed


def progress(
    description: str,
    total: int | None,
    *,
    completed: int = 0,
    unit: str = "it",
    visible: bool = True,
    **injected: Any,
) -> StageProgress:
    """A stage's progress reporter (see StageProgress): ``with progress("sft", total=n, unit="step") as bar:``."""
    return StageProgress(description, total, completed=completed, unit=unit, visible=visible, **injected)


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
