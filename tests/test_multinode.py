"""Multi-node rehearsal: two torchrun "nodes" of one rank each on this machine give the one-node 2-rank results.

`trace-ds score` and then `trace-ds train` (on those scores) run twice with ZeRO-3 over gloo: once as
``deepspeed --num_gpus 2`` (one node, two ranks) and once as two concurrent ``torchrun --nnodes 2 --node_rank
{0,1} --nproc_per_node 1`` launches sharing one rendezvous (docs/running_at_scale.md, "Rehearsing on one
machine"). Same world size, same sharding: the scores and the per-step losses must agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import deepspeed_command, read_lines, torchrun_node_commands, triaged_benchmark

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = str(REPO / "ds_configs" / "cpu.json")
WAIT_S = 200  # per launch (4 launches stay under the test timeout); a healthy one takes under a minute here


def run_launches(commands: list[list[str]], logs: Path, wait_s: float = WAIT_S) -> None:
    """Start every command at once, each in its own process group (logs to ``logs``/<i>.log), and wait for all.
    On a timeout or any failure, SIGKILL every group that is still running and fail with each log's tail."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TRACE_DS_DIST_TIMEOUT_S": "90",
        "OMP_NUM_THREADS": "1",  # the same threads per rank in both launches (and no oversubscription)
    }
    logs.mkdir(parents=True, exist_ok=True)
    paths = [logs / f"{i}.log" for i in range(len(commands))]
    processes = []
    for command, path in zip(commands, paths, strict=True):
        with open(path, "wb") as sink:  # a file, not a pipe: no deadlock on a full pipe of the other node
            processes.append(
                subprocess.Popen(
                    command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    deadline = time.monotonic() + wait_s
    failure = "interrupted"  # e.g. by pytest-timeout: the finally below still kills every group
    try:
        while True:
            codes = [p.poll() for p in processes]  # poll every one (no short-circuit)
            if any(code not in (None, 0) for code in codes):
                failure = "a launch failed"  # do not wait for the others to hit the process-group timeout
                break
            if None not in codes:
                failure = None
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {wait_s} s"
                break
            time.sleep(0.2)
    finally:
        if failure is not None:
            for process in processes:  # the whole group: a launcher that exited may have left ranks behind
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    if failure is not None:
        tails = "\n".join(
            f"--- launch {i} (exit {p.returncode}): {' '.join(c[:8])} ...\n{path.read_text()[-3000:]}"
            for i, (p, c, path) in enumerate(zip(processes, commands, paths, strict=True))
        )
        pytest.fail(f"{failure}\n{tails}", pytrace=False)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_torchrun_nodes_equal_one_node_two_ranks(tiny_model_dir: Path, tmp_path: Path) -> None:
    triaged = triaged_benchmark(tmp_path, n_pairs=16, seed=5, n_eval_prompts=4, n_eval_pairs=4)
    tokenize = ["--max-length", "64", "--max-prompt-length", "32"]
    model = ["--model", str(tiny_model_dir), "--triaged", str(triaged)]
    score = ["score", *model, "--probe-size", "4", "--micro-batch", "2", "--beta", "0.5", "--allow-empty"]
    score += [*tokenize, "--deepspeed", CPU_CONFIG]

    one = tmp_path / "one_node"
    two = tmp_path / "two_nodes"
    run_launches([deepspeed_command(2, *score, "--out", str(one / "scores.jsonl"))], one / "score_logs")
    run_launches(torchrun_node_commands(2, *score, "--out", str(two / "scores.jsonl")), two / "score_logs")

    a, b = read_lines(one / "scores.jsonl"), read_lines(two / "scores.jsonl")
    assert a and [x["id"] for x in a] == [x["id"] for x in b]
    scale = max(abs(x["raw_score"]) for x in a)
    assert max(abs(x["raw_score"] - y["raw_score"]) for x, y in zip(a, b, strict=True)) <= 1e-5 * scale
    assert [x["weight"] for x in a] == pytest.approx([y["weight"] for y in b], rel=1e-4, abs=1e-6)
    for run in (one, two):
        assert json.loads((run / "scores.meta.json").read_text())["world_size"] == 2

    # both trainings read the one-node scores, so only the launch differs
    train = ["train", *model, "--scores", str(one / "scores.jsonl"), "--max-steps", "3", "--micro-batch", "2"]
    train += ["--lr", "1e-3", "--alpha-kl", "5", *tokenize, "--deepspeed", CPU_CONFIG]
    run_launches([deepspeed_command(2, *train, "--out", str(one / "train"))], one / "train_logs")
    run_launches(torchrun_node_commands(2, *train, "--out", str(two / "train")), two / "train_logs")

    a, b = read_lines(one / "train" / "metrics.jsonl"), read_lines(two / "train" / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    assert [m["pairs"] for m in a] == [m["pairs"] for m in b]
    for key in ("loss", "loss_inversion", "loss_suppression", "kl_retention", "grad_norm"):
        for x, y in zip(a, b, strict=True):
            assert (x[key] is None) == (y[key] is None), (key, x["step"])
            if x[key] is not None:
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (key, x["step"])
