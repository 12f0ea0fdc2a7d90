"""2-rank ZeRO-3 scoring equals one process on Qwen3 and the MoE families (Mixtral, Qwen3-MoE), in ONE launch.

Each family is a tiny random model of trace_ds.tiny (transformers' own classes, every parameter perturbed). In
both MoE models one expert of layer 0 is made to win only for one token, present only in pairs that rank 0
scores (and in the probe pair rank 0 runs): rank 1 never routes a token to it, yet must run every collective
for it (G gathered in score mode, summed in probe mode) in the same order as rank 0, or the launch hangs or
the scores differ. The worker (tests/zero3_score_worker.py) asserts that the routing happened that way.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trace_ds.io import free_port, write_jsonl
from trace_ds.tiny import MOE_FAMILIES, build_tiny_family, default_corpus, train_tokenizer

from .helpers import read_lines
from .zero3_score_worker import routing_hits

REPO = Path(__file__).resolve().parents[1]
STEER_TOKEN = 140  # the one token routed to STEER_EXPERT in layer 0; other ids are drawn from [4, 140)
STEER_EXPERT = 3
# family -> experts implementation (None: transformers' default, grouped_mm; "eager": its loop over the experts
# hit, which on rank 1 never visits STEER_EXPERT)
JOBS: dict[str, str | None] = {"qwen3": None, "mixtral": None, "qwen3_moe": "eager"}


def steer_one_expert(model: torch.nn.Module) -> None:
    """Layer 0's router sends STEER_TOKEN (and only it) to STEER_EXPERT: embedding dimension 0 is +1 for every
    token but STEER_TOKEN (-1), and the router's row for STEER_EXPERT reads -3 x that dimension (after the
    norm: a logit of about -15 for every other token, +15 for STEER_TOKEN; the others' stay below 1)."""
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, 0] = 1.0
        embedding[STEER_TOKEN, 0] = -1.0
        model.model.layers[0].mlp.gate.weight[STEER_EXPERT, 0] = -3.0


def tokenized(rng: random.Random, i: int, steer: bool, category: str) -> dict:
    def ids(k: int) -> list[int]:
        return [rng.randrange(4, STEER_TOKEN) for _ in range(k)]

    prompt, chosen, rejected = (
        [1, *ids(rng.randint(2, 5))],
        [*ids(rng.randint(2, 6)), 2],
        [*ids(rng.randint(2, 6)), 2],
    )
    if steer:  # in the prompt and in both responses (where its output has a gradient)
        prompt.insert(2, STEER_TOKEN)
        chosen.insert(0, STEER_TOKEN)
        rejected.insert(1, STEER_TOKEN)
    return {
        "id": f"{category[:3]}{i}",
        "prompt_input_ids": prompt,
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "category": category,
    }


def write_inputs(root: Path) -> tuple[Path, Path]:
    """12 conflict pairs and a 6-pair probe, micro-batch 3: each rank scores 2 micro-batches and runs 1 probe
    micro-batch (no zero-weight dummy, which would run probe pair 0 on rank 1). Rank r takes items r, r + 2, ...:
    STEER_TOKEN is in conflict pairs 0 and 4 and probe pair 0 only, all rank 0's."""
    rng = random.Random(0)
    triaged = [tokenized(rng, i, i in (0, 4), ("inversion", "suppression")[i % 2]) for i in range(12)]
    probe = [tokenized(rng, i, i == 0, "retention") for i in range(6)]
    write_jsonl(root / "triaged.jsonl", triaged)
    write_jsonl(root / "probe.jsonl", probe)
    return root / "triaged.jsonl", root / "probe.jsonl"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_zero3_two_ranks_score_the_families_like_one_process(tmp_path: Path) -> None:
    from trace_ds.config import ScoreConfig
    from trace_ds.scoring.scorer import run_score

    started = time.perf_counter()
    tokenizer = train_tokenizer(default_corpus(), tmp_path / "tokenizer", vocab_size=512)
    assert len(tokenizer) > STEER_TOKEN
    triaged, probe = write_inputs(tmp_path)
    jobs, one = [], {}
    for seed, (family, experts) in enumerate(JOBS.items()):
        folder = tmp_path / family
        model = build_tiny_family(folder, family, tokenizer, seed=seed)
        if family in MOE_FAMILIES:
            steer_one_expert(model)
            model.save_pretrained(folder)
        score = {"model": str(folder), "triaged": str(triaged), "probe": str(probe), "micro_batch": 3}
        score |= {"beta": 0.5, "kernel": "torch", "allow_empty": True}
        job = {
            "family": family,
            "experts": experts,
            "score": {**score, "out": str(tmp_path / "two" / family / "s.jsonl")},
        }
        if family in MOE_FAMILIES:
            job["one_rank_expert"] = [0, STEER_EXPERT]
        jobs.append(job)
        with routing_hits(experts) as hits:  # one process, the same settings
            one[family] = run_score(
                ScoreConfig(**{**score, "out": str(tmp_path / "one" / family / "s.jsonl")})
            )
        if family in MOE_FAMILIES:  # the token is routed as intended, and every expert of layer 0 is used
            assert hits["model.layers.0.mlp.gate"] == {0, 1, 2, 3}, hits
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    one_process_s = time.perf_counter() - started

    command = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        str(REPO / "tests" / "zero3_score_worker.py"), "--deepspeed", str(REPO / "ds_configs" / "cpu.json"),
        "--jobs", str(tmp_path / "jobs.json"),
    ]  # fmt: skip
    # a hang (ranks out of step in their collectives) fails the collective after 120 s, and the test kills the
    # launcher and both ranks (their own process group) at 300 s
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRACE_DS_DIST_TIMEOUT_S": "120"}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the 2-rank scoring launch timed out:\n{output[-4000:]}")
    launch_s = time.perf_counter() - started
    assert process.returncode == 0, output[-6000:]
    print(f"one process (3 families): {one_process_s:.1f} s; one 2-rank launch: {launch_s:.1f} s")

    for job in jobs:
        family = job["family"]
        a = read_lines(tmp_path / "one" / family / "s.jsonl")
        b = read_lines(tmp_path / "two" / family / "s.jsonl")
        assert [x["id"] for x in a] == [x["id"] for x in b], family
        scale = max(abs(x["raw_score"]) for x in a)
        assert scale > 0, family
        diff = max(abs(x["raw_score"] - y["raw_score"]) for x, y in zip(a, b, strict=True))
        assert diff <= 1e-5 * scale, (family, diff / scale)
        print(f"{family}: largest difference {diff / scale:.1e} of the largest score")
        assert [x["weight"] for x in a] == pytest.approx([y["weight"] for y in b], rel=1e-4, abs=1e-6), family
        meta = json.loads((tmp_path / "two" / family / "s.meta.json").read_text())
        assert (meta["world_size"], meta["zero_stage"]) == (2, 3), family
        assert meta["parameters_covered"] == one[family]["parameters_covered"], family
        if family in MOE_FAMILIES:
            # experts and routers went through the generic fallback, on both sides
            prefix = {"mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe"}[family]
            fallback = {f"{prefix}Experts", f"{prefix}TopKRouter"}
            assert set(meta["ghost_fallback"]) == fallback == set(one[family]["ghost_fallback"]), meta
            ranks = json.loads((tmp_path / "two" / family / "s.routing.json").read_text())
            assert STEER_EXPERT in ranks[0]["model.layers.0.mlp.gate"]
            assert STEER_EXPERT not in ranks[1]["model.layers.0.mlp.gate"]
        else:
            assert "ghost_fallback" not in meta, meta
