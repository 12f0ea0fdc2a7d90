"""``trace-ds bench train`` at toy sizes: the report's structure (no timing assertions)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest

from trace_ds.bench.train import markdown_tables, run_train_benchmark

HAVE_TRL = importlib.util.find_spec("trl") is not None
TOY = {
    "layers": 2,
    "hidden": 64,
    "vocab": 512,
    "pairs": 16,
    "tokens": 32,
    "micro_batch": 4,
    "steps": 3,
    "memory_zero": [2],
    "memory_ranks": [1],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One toy benchmark: the speed runs (TRL too when installed) and a one-entry memory matrix."""
    work = tmp_path_factory.mktemp("bench_train")
    arms = ["trace-ds", "trl"] if HAVE_TRL else ["trace-ds"]
    out = work / "report.json"
    result = run_train_benchmark({**TOY, "arms": arms, "workdir": str(work / "w")}, str(out))
    assert out.is_file()
    return result


def _check_run(row: dict[str, Any], arm: str, zero: int, ranks: int) -> None:
    assert (row["arm"], row["zero"], row["ranks"]) == (arm, zero, ranks)
    assert (row["steps"], row["timed_steps"]) == (TOY["steps"], TOY["steps"] - 1)
    assert row["tokens"] > 0 and row["seconds"] > 0 and row["tokens_per_s"] > 0
    assert len(row["step_seconds"]) == TOY["steps"] - 1 and row["median_step_tokens_per_s"] > 0
    assert len(row["peak_rss_mb_per_rank"]) == ranks and all(v > 0 for v in row["peak_rss_mb_per_rank"])
    assert len(row["losses"]) == TOY["steps"] and all(math.isfinite(v) for v in row["losses"])
    assert row["engine"].startswith("DeepSpeedEngine") and f"ZeRO-{zero}" in row["engine"]
    assert row["device"] == "cpu" and row["peak_cuda_mb_per_rank"] == [None] * ranks  # no GPU here


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trace_ds_arm_and_memory_matrix(report: dict[str, Any]) -> None:
    assert set(report) == {"settings", "versions", "speed", "speed_median", "comparison", "memory"}
    assert report["versions"]["torch"] and report["versions"]["deepspeed"]
    rows = {row["arm"]: row for row in report["speed"]}
    _check_run(rows["trace-ds"], "trace-ds", 0, 1)
    assert report["speed_median"]["trace-ds"]["tokens_per_s"] == rows["trace-ds"]["tokens_per_s"]
    assert [(m["zero"], m["ranks"]) for m in report["memory"]] == [(2, 1)]
    _check_run(report["memory"][0], "trace-ds", 2, 1)
    table = markdown_tables(report)
    assert "| trace-ds | 1 | 0 | 1 | 2 |" in table
    assert "| | 2 | 1 |" in table
    assert "peak CUDA MB" not in table and table.endswith("DeepSpeed accelerator of the runs: cpu.")
    assert Path(report["settings"]["workdir"], "ds_zero2.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    not HAVE_TRL, reason="TRL is not installed (pip install 'trl>=0.12'): the trl arm was not run"
)
def test_trl_arm_does_the_same_work(report: dict[str, Any]) -> None:
    rows = {row["arm"]: row for row in report["speed"]}
    _check_run(rows["trl"], "trl", 0, 1)
    assert rows["trl"]["tokens"] == rows["trace-ds"]["tokens"]  # same pairs, same order, same batches
    assert report["comparison"]["tokens_per_s_ratio_trace_ds_over_trl"] > 0
    assert len(report["comparison"]["per_run_ratios"]) == 1
    assert report["comparison"]["max_abs_loss_difference"] < 1e-4  # same DPO loss, optimizer and schedule
    assert "trace-ds / TRL tokens/s" in markdown_tables(report)


def test_a_gpu_run_adds_its_cuda_peaks_to_the_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a GPU run's report (runs on DeepSpeed's cuda accelerator, CUDA peaks per rank) prints: measured
    here on a hand-made report, since this machine has no GPU."""
    from trace_ds.bench.train import accelerator

    run = {
        "arm": "trace-ds", "zero": 0, "ranks": 1, "device": "cuda", "timed_steps": 3, "tokens": 900,
        "seconds": 1.5, "tokens_per_s": 600.0, "median_step_tokens_per_s": 610.0, "peak_rss_mb_per_rank": [2000.0],
        "peak_rss_mb_before_steps_per_rank": [1900.0], "other_cpu_s": 0.1, "peak_cuda_mb_per_rank": [5120.4],
        "peak_cuda_mb_before_steps_per_rank": [1024.0],
    }  # fmt: skip
    table = markdown_tables(
        {"speed": [run], "speed_median": {"trace-ds": run}, "memory": [{**run, "ranks": 2}]}
    )
    assert "| peak CUDA MB per rank | peak CUDA MB before step 1 |" in table
    assert "| 0.1 | 5120 | 1024 |" in table
    assert table.endswith("DeepSpeed accelerator of the runs: cuda.")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the environment decides when set
    assert accelerator() == "cpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    assert accelerator() == "cpu"  # no GPU for torch here
