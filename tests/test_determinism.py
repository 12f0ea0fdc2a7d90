"""Pinned CPU numerics (launch.threads / launch.cpu_isa): set before torch loads, inherited by launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trace_ds.io import TraceError
from trace_ds.runtime.determinism import CPU_ISA_ENV, cpu_numerics_env, pin_cpu_numerics


def test_environment_per_setting() -> None:
    assert cpu_numerics_env(None, None) == {}
    assert cpu_numerics_env(3, None) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert cpu_numerics_env(None, "avx2") == CPU_ISA_ENV["avx2"]
    for threads in (0, -1, True, 1.5):
        with pytest.raises(TraceError, match="threads"):
            cpu_numerics_env(threads, None)  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="cpu_isa"):
        cpu_numerics_env(None, "sse2")


def test_isa_cannot_change_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401  (this test process has torch loaded)

    for name in CPU_ISA_ENV["avx2"]:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TraceError, match="before torch is imported"):
        pin_cpu_numerics(None, "avx2")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_config_pins_this_process_and_its_launches(tmp_path: Path) -> None:
    """`trace-ds run` applies launch.threads/cpu_isa before torch loads: torch then runs AVX2 kernels on one
    thread, and a process it starts sees the same environment."""
    probe = (
        "import json, os, torch; print(json.dumps({'threads': torch.get_num_threads(), "
        "'isa': torch.backends.cpu.get_cpu_capability(), 'cbwr': os.environ.get('MKL_CBWR')}))"
    )
    script = (
        "import subprocess, sys\n"
        "from trace_ds.cli.pipeline import load_pipeline\n"
        f"load_pipeline({str(tmp_path / 'c.yaml')!r})\n"
        f"print(subprocess.run([sys.executable, '-c', {probe!r}], capture_output=True, text=True).stdout)\n"
        f"exec({probe!r})\n"
    )
    import yaml

    from tests.test_pipeline import SMALL

    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {**SMALL, "workdir": str(tmp_path / "w"), "launch": {"ranks": 1, "threads": 1, "cpu_isa": "avx2"}}
        )
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (*CPU_ISA_ENV["avx2"], "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    child, parent = (json.loads(line) for line in out.stdout.split("\n") if line.startswith("{"))
    expected = {"threads": 1, "isa": "AVX2", "cbwr": CPU_ISA_ENV["avx2"]["MKL_CBWR"]}
    assert child == parent == expected
