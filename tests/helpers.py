"""Small helpers shared by tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trace_ds.io import free_port, trace_ds_command


def read_lines(path: Path) -> list[dict]:
    """Every JSONL record of ``path``."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def kill_when_lines(command: list[str], watched: Path, min_lines: int, wait_s: float = 300) -> int:
    """Start ``command`` in its own process group, SIGKILL the whole group once ``watched`` has at least
    ``min_lines`` lines, and return how many lines it had then (a crash at the worst moment, for resume tests)."""
    process = subprocess.Popen(
        command,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + wait_s
    while time.time() < deadline and (
        not watched.exists() or len(watched.read_text().splitlines()) < min_lines
    ):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return len(watched.read_text().splitlines())


def deepspeed_command(ranks: int, *trace_ds_args: str) -> list[str]:
    """``deepspeed --num_gpus N trace-ds ...`` from this venv, on a free rendezvous port."""
    assert ranks > 1, "one rank runs without the launcher: use trace_ds.io.trace_ds_command"
    return trace_ds_command(ranks, *trace_ds_args)


def torchrun_node_commands(nnodes: int, *trace_ds_args: str) -> list[list[str]]:
    """One ``torchrun --nnodes N --node_rank I --nproc_per_node 1 -m trace_ds.cli ...`` per "node", all on this
    machine and one free rendezvous port (a multi-node rehearsal: start them concurrently)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = str(free_port())
    return [
        [
            torchrun,
            "--nnodes",
            str(nnodes),
            "--node_rank",
            str(node_rank),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "-m",
            "trace_ds.cli",
            *trace_ds_args,
        ]
        for node_rank in range(nnodes)
    ]
