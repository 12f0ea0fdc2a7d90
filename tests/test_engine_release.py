"""The stages of one launch release their DeepSpeed engines: a ZeRO-3 model is kept alive by two DeepSpeed
module-level holders (FWD_MODULE_STACK, with some submodules under gradient checkpointing, and a class-level
lru_cache), and through its hooks its engine, optimizer and reduce buffer (about 2 GB per rank after the real
demo's training, before Strategy._release_engines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trace_ds.io import write_json
from trace_ds.runtime.engine import CPU_ZERO3_CONFIG

from .helpers import triaged_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_engine_outlives_its_stage(tiny_model_dir: Path, tmp_path: Path) -> None:
    triaged = triaged_benchmark(tmp_path, n_pairs=16, seed=3, n_eval_prompts=2, n_eval_pairs=4)
    write_json(tmp_path / "ds.json", CPU_ZERO3_CONFIG)
    args = [
        str(tiny_model_dir),
        str(triaged),
        str(tmp_path / "scores.jsonl"),
        str(tmp_path),
        str(tmp_path / "ds.json"),
    ]
    command = [sys.executable, str(REPO / "tests" / "release_worker.py"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=360, start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    alive = json.loads(result.stdout.strip().splitlines()[-1])["alive"]
    assert alive == {"score": 0, "score_checkpointed": 0, "train": 0, "train_checkpointed": 0}
