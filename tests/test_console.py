"""Progress reporting (trace_ds.console.progress): plain, throttled lines in a log file, rich bars on a terminal."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trace_ds.console import ProgressSettings, StageProgress, progress_settings
from trace_ds.io import TraceError

# The documented plain line (docs/running_at_scale.md, "Progress in log files").
LINE = re.compile(
    r"^\[(?P<stage>[\w-]+)\] (?P<done>\d+)/(?P<total>\d+|\?)(?: \((?P<percent>\d+)%\))? "
    r"(?P<rate>[\d.]+) (?P<unit>\w+)/s elapsed (?P<elapsed>\S+) "
    r"(?:ETA (?P<eta>\S+)|(?P<status>done|stopped))(?: loss (?P<loss>\S+))?(?: \| (?P<note>.*))?$"
)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plain(
    total: int | None, seconds: float, percent: float, **kwargs
) -> tuple[StageProgress, Clock, io.StringIO]:
    clock, stream = Clock(), io.StringIO()
    bar = StageProgress(
        kwargs.pop("description", "train"),
        total,
        unit=kwargs.pop("unit", "step"),
        settings=ProgressSettings("auto", seconds, percent),
        clock=clock,
        stream=stream,
        terminal=False,
        rank=kwargs.pop("rank", 0),
        **kwargs,
    )
    return bar, clock, stream


def lines(stream: io.StringIO) -> list[re.Match]:
    out = []
    for text in stream.getvalue().splitlines():
        match = LINE.match(text)
        assert match, f"not a progress line: {text!r}"
        out.append(match)
    return out


def test_time_bound_prints_at_most_every_n_seconds() -> None:
    bar, clock, stream = plain(total=1000, seconds=30, percent=100)
    with bar:
        assert bar.mode == "plain"
        for _ in range(100):  # one step every 7 s: a line at 35 s, 70 s, 105 s, ... never two within 30 s
            clock.now += 7
            bar.update(advance=1, loss=0.5)
        printed = lines(stream)
        assert [int(m["done"]) for m in printed] == [5 * k for k in range(1, 21)]
    final = lines(stream)[-1]
    assert len(lines(stream)) == 21 and final["status"] == "stopped" and final["done"] == "100"


def test_percent_bound_prints_every_n_percent_of_the_total() -> None:
    bar, clock, stream = plain(total=400, seconds=math.inf, percent=5)
    with bar:
        for _ in range(400):
            clock.now += 0.01
            bar.update(advance=1)
    printed = lines(stream)
    assert [int(m["done"]) for m in printed] == list(range(20, 401, 20))  # every 20 = 5% of 400, then final
    assert [m["percent"] for m in printed[:3]] == ["5", "10", "15"]
    assert printed[-1]["status"] == "done" and all(m["eta"] for m in printed[:-1])


def test_whichever_bound_comes_first_and_no_more_often() -> None:
    bar, clock, stream = plain(total=100, seconds=30, percent=10)
    with bar:
        clock.now += 1
        bar.update(completed=10)  # 10% after 1 s: the percent bound
        clock.now += 10
        bar.update(completed=12)  # neither bound
        clock.now += 25
        bar.update(completed=13)  # 35 s after the last line: the time bound
        clock.now += 1
        bar.update(completed=14)  # neither (the percent bound counts from the last line, at 13)
        bar.update(completed=22)  # 9 more than at the last line: still under 10%
        bar.update(completed=23)
    assert [int(m["done"]) for m in lines(stream)] == [10, 13, 23, 23]


def test_line_has_count_rate_eta_loss_and_note() -> None:
    bar, clock, stream = plain(total=400, seconds=30, percent=5, completed=100)  # a resumed run at 100
    with bar:
        clock.now += 10
        bar.update(completed=120, loss=0.41234, note="1843 tok/s")  # 20 steps in 10 s: 2 step/s
        text = stream.getvalue().splitlines()[0]
        assert text == "[train] 120/400 (30%) 2 step/s elapsed 10s ETA 2m20s loss 0.4123 | 1843 tok/s"
        match = lines(stream)[0]
        assert (match["done"], match["total"], match["rate"], match["eta"], match["loss"]) == (
            "120",
            "400",
            "2",
            "2m20s",
            "0.4123",
        )
        clock.now += 140
        bar.update(completed=400, loss=0.3)  # reaching the total prints the final line at once ...
        final = lines(stream)[-1]
        assert final["status"] == "done" and final["done"] == "400" and final["percent"] == "100"
        assert final["elapsed"] == "2m30s" and final["loss"] == "0.3"
    assert len(lines(stream)) == 2  # ... and leaving the block does not print it again


def test_no_loss_and_unknown_total() -> None:
    bar, clock, stream = plain(total=None, seconds=5, percent=5, unit="pair", description="scoring")
    with bar:
        clock.now += 5
        bar.update(advance=3)
    first, final = lines(stream)
    assert first["total"] == "?" and first["eta"] == "?" and first["loss"] is None and first["unit"] == "pair"
    assert final["status"] == "done"


@pytest.mark.parametrize("how", ["rank", "env", "hidden"])
def test_only_rank_zero_prints(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed

    # an earlier test of this process may have formed a one-rank group (whose rank 0 would win over RANK)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1" if how == "env" else "0")
    kwargs = {"rank": 1} if how == "rank" else {"rank": None} if how == "env" else {"visible": False}
    bar, clock, stream = plain(total=10, seconds=0, percent=0, **kwargs)
    with bar:
        for _ in range(10):
            clock.now += 60
            bar.update(advance=1, loss=1.0)
    assert bar.mode == "off" and stream.getvalue() == ""


def test_settings_from_the_environment() -> None:
    assert progress_settings({}) == ProgressSettings("auto", 30.0, 5.0)
    assert progress_settings(
        {"TRACE_DS_PROGRESS": "Plain", "TRACE_DS_PROGRESS_SECONDS": "0", "TRACE_DS_PROGRESS_PERCENT": "12.5"}
    ) == ProgressSettings("plain", 0.0, 12.5)
    assert progress_settings({"TRACE_DS_PROGRESS_SECONDS": "inf"}).seconds == math.inf
    for name, value in [
        ("TRACE_DS_PROGRESS", "bars"),
        ("TRACE_DS_PROGRESS_SECONDS", "-1"),
        ("TRACE_DS_PROGRESS_SECONDS", "soon"),
        ("TRACE_DS_PROGRESS_SECONDS", "nan"),
        ("TRACE_DS_PROGRESS_PERCENT", "101"),
    ]:
        with pytest.raises(TraceError, match=f"{name}='{value}': expected"):
            progress_settings({name: value})


def test_modes(capsys: pytest.CaptureFixture[str]) -> None:
    def mode(setting: str, terminal: bool) -> str:
        return StageProgress("x", 3, settings=ProgressSettings(setting), terminal=terminal, rank=0).mode

    assert mode("auto", True) == "rich" and mode("auto", False) == "plain"
    assert mode("plain", True) == "plain" and mode("rich", False) == "rich"
    assert mode("off", True) == "off" and mode("off", False) == "off"
    with StageProgress("x", 3, settings=ProgressSettings("rich"), rank=0) as bar:  # the rich bar still runs
        bar.update(advance=3, loss=0.25, note="9 tok/s")
    assert "loss 0.25" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sft_log_file_shows_progress_before_the_stage_ends(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real `trace-ds sft` with stderr in a file (not a terminal): progress lines while it runs."""
    from trace_ds.synth.generator import build_benchmark

    build_benchmark(tmp_path / "bench", n_pairs=48, seed=3, n_eval_prompts=4, n_eval_pairs=4)
    unset = ("TRACE_DS_PROGRESS", "RANK", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(TRACE_DS_PROGRESS_SECONDS="inf", TRACE_DS_PROGRESS_PERCENT="25")
    log = tmp_path / "sft.log"
    command = [
        sys.executable, "-m", "trace_ds.cli", "sft", "--model", str(tiny_model_dir),
        "--pairs", str(tmp_path / "bench" / "pairs.jsonl"), "--out", str(tmp_path / "sft"),
        "--epochs", "2", "--batch-size", "8", "--max-length", "96", "--max-prompt-length", "48",
    ]  # fmt: skip
    with open(log, "w") as stderr:  # a file, not a terminal: what SLURM, nohup and CI give
        result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, timeout=240)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    rows = text.splitlines()
    progress = [(i, LINE.match(row)) for i, row in enumerate(rows) if LINE.match(row)]
    assert [m["done"] for _, m in progress] == ["3", "6", "9", "12"], text  # 12 steps, every 25%
    *running, final = [m for _, m in progress]
    for match in running:
        assert match["stage"] == "sft" and match["total"] == "12" and match["unit"] == "step"
        assert match["eta"] and float(match["rate"]) > 0 and float(match["loss"]) > 0
    assert final["status"] == "done"
    summary = next(i for i, row in enumerate(rows) if row.startswith("SFT: 12 steps"))
    assert all(i < summary for i, _ in progress)  # printed while the stage ran, before its summary
