"""2-rank ZeRO-3 scoring equals one process on every model family of trace_ds.models.tiny.FAMILIES, in ONE launch.

Covered: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, olmo2, granite (built with
Granite's multipliers while trace_ds.models.tiny.FAMILIES lacks it), mixtral and qwen3_moe, each a tiny random model
of trace_ds.models.tiny (transformers' own classes, every parameter perturbed); tied input/output embeddings for
llama, qwen3, gemma and gemma3_text, untied for the others (plain and scaled embeddings, dense and MoE, both
ways). One more job scores the Mixtral model with its experts and routers forced onto the generic fallback
(``TRACE_DS_GHOST_FALLBACK``, set by the worker for that job only) and compares it with the one-process
scores of the same model on its own paths. Every job: the same pair ids in input order, raw scores within
1e-5 of the largest, the same weights and the same parameters covered; no job took the generic fallback (the
MoE families' experts and routers have dedicated paths) but the forced one, for the forced classes.

In both MoE models one expert of layer 0 is made to win only for one token, present only in pairs that rank 0
scores (and in the probe pair rank 0 runs): rank 1 never routes a token to it, yet must run every collective
for it (G gathered in score mode, summed in probe mode) in the same order as rank 0, or the launch hangs or
the scores differ. The worker (tests/zero3_score_worker.py) asserts that the routing happened that way.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from trace_ds.io import free_port, write_jsonl
from trace_ds.models.tiny import FAMILIES, MOE_FAMILIES, build_tiny_family, default_corpus, train_tokenizer
from trace_ds.scoring.fallback import FORCE_ENV

from .helpers import read_lines
from .zero3_score_worker import routing_hits

REPO = Path(__file__).resolve().parents[1]
STEER_TOKEN = 140  # the one token routed to STEER_EXPERT in layer 0; other ids are drawn from [4, 140)
STEER_EXPERT = 3
# family -> experts implementation (absent: transformers' default, grouped_mm; "eager": its loop over the
# experts hit, which on rank 1 never visits STEER_EXPERT)
EXPERTS: dict[str, str] = {"qwen3_moe": "eager"}
# family -> tie_word_embeddings where it differs from trace_ds.models.tiny's default (tied there: qwen3, the Gemmas)
TIED: dict[str, bool] = {"llama": True, "gemma2": False}
# Granite's multipliers (as tests/test_families.py), used while trace_ds.models.tiny.FAMILIES has no "granite"
GRANITE = {
    "embedding_multiplier": 3.0,
    "logits_scaling": 2.0,
    "residual_multiplier": 0.5,
    "attention_multiplier": 0.2,
}
FORCED = ("mixtral", "Experts,TopKRouter")  # the extra job: this family, with these classes on the fallback


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` while inside. The tiny models gain nothing from more than one,
    and where another process keeps the cores busy each extra thread makes every op wait (a run of the
    one-process part took 29 s with 2 threads on 2 busy cores, 3 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
def test_zero3_two_ranks_score_the_families_like_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trace_ds.config import ScoreConfig
    from trace_ds.scoring.scorer import run_score

    monkeypatch.delenv(FORCE_ENV, raising=False)  # one process and every job but the forced one: own paths
    if "granite" not in FAMILIES:
        monkeypatch.setitem(FAMILIES, "granite", GRANITE)
    started = time.perf_counter()
    tokenizer = train_tokenizer(default_corpus(), tmp_path / "tokenizer", vocab_size=512)
    assert len(tokenizer) > STEER_TOKEN
    triaged, probe = write_inputs(tmp_path)
    jobs, one, tied = [], {}, {}
    with torch_threads(1):
        for seed, family in enumerate(FAMILIES):
            folder = tmp_path / family
            overrides = {"tie_word_embeddings": TIED[family]} if family in TIED else {}
            model = build_tiny_family(folder, family, tokenizer, seed=seed, **overrides)
            tied[family] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
            assert tied[family] == TIED.get(family, tied[family]), family
            if family in MOE_FAMILIES:
                steer_one_expert(model)
                model.save_pretrained(folder)
            score = {"model": str(folder), "triaged": str(triaged), "probe": str(probe), "micro_batch": 3}
            score |= {"beta": 0.5, "kernel": "torch", "allow_empty": True}
            job = {
                "name": family,
                "family": family,
                "experts": EXPERTS.get(family),
                "score": {**score, "out": str(tmp_path / "two" / family / "s.jsonl")},
            }
            if family in MOE_FAMILIES:
                job["one_rank_expert"] = [0, STEER_EXPERT]
            jobs.append(job)
            if family == FORCED[0]:
                # first in the launch: every later job then checks that the worker restored
                # TRACE_DS_GHOST_FALLBACK
                name = f"{family}-forced"
                out = str(tmp_path / "two" / name / "s.jsonl")
                jobs.insert(0, {**job, "name": name, "fallback": FORCED[1], "score": {**score, "out": out}})
            with routing_hits(job["experts"]) as hits:  # one process, the same settings, nothing forced
                one[family] = run_score(
                    ScoreConfig(**{**score, "out": str(tmp_path / "one" / family / "s.jsonl")})
                )
            if family in MOE_FAMILIES:  # the token is routed as intended, and every expert of layer 0 is used
                assert hits["model.layers.0.mlp.gate"] == {0, 1, 2, 3}, hits
    assert set(tied.values()) == {True, False}, tied
    assert len(jobs) == len(FAMILIES) + 1
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    one_process_s = time.perf_counter() - started

    command = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        str(REPO / "tests" / "zero3_score_worker.py"), "--deepspeed", str(REPO / "ds_configs" / "cpu.json"),
        "--jobs", str(tmp_path / "jobs.json"),
    ]  # fmt: skip
    # a hang (ranks out of step in their collectives) fails the collective after 120 s, and the test kills the
    # launcher and both ranks (their own process group) at 300 s
    # one thread per rank: two ranks of two threads each on two cores slow each other down many times over
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRACE_DS_DIST_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1"}
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
    print(
        f"one process ({len(FAMILIES)} families): {one_process_s:.1f} s; "
        f"one 2-rank launch ({len(jobs)} jobs): {launch_s:.1f} s"
    )
    print("\n".join(line for line in output.splitlines() if line.startswith("[worker]")))

    for job in jobs:
        name, family = job["name"], job["family"]
        a = read_lines(tmp_path / "one" / family / "s.jsonl")
        b = read_lines(tmp_path / "two" / name / "s.jsonl")
        assert [x["id"] for x in a] == [x["id"] for x in b], name
        scale = max(abs(x["raw_score"]) for x in a)
        assert scale > 0, name
        diff = max(abs(x["raw_score"] - y["raw_score"]) for x, y in zip(a, b, strict=True))
        assert diff <= 1e-5 * scale, (name, diff / scale)
        # ghost norms under ZeRO-3 (each rank its own pairs, parameters gathered) equal one process's
        norm_diff = max(
            abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(a, b, strict=True)
        )
        assert norm_diff <= 1e-5, (name, norm_diff)
        assert [x["cosine"] for x in a] == pytest.approx([y["cosine"] for y in b], rel=1e-4, abs=1e-6), name
        embeddings = "tied" if tied[family] else "untied"
        print(f"{name} ({embeddings}): largest difference {diff / scale:.1e} of the largest score")
        assert [x["weight"] for x in a] == pytest.approx([y["weight"] for y in b], rel=1e-4, abs=1e-6), name
        meta = json.loads((tmp_path / "two" / name / "s.meta.json").read_text())
        assert (meta["world_size"], meta["zero_stage"]) == (2, 3), name
        assert meta["probe_norm"] == pytest.approx(one[family]["probe_norm"], rel=1e-5), name
        assert meta["parameters_covered"] == one[family]["parameters_covered"], name
        # run_score writes "ghost_fallback" (class -> use) only when some module took the fallback
        if job.get("fallback"):  # the forced classes took it (2 ranks; the one process ran on its own paths)
            taken = set(meta.get("ghost_fallback", {}))
            for suffix in job["fallback"].split(","):
                assert any(cls.endswith(suffix) for cls in taken), (name, suffix, taken)
        else:  # no module took it, on either side (MoE experts and routers included)
            assert "ghost_fallback" not in meta, (name, meta["ghost_fallback"])
            assert "ghost_fallback" not in one[family], (name, one[family]["ghost_fallback"])
        if family in MOE_FAMILIES:
            ranks = json.loads((tmp_path / "two" / name / "s.routing.json").read_text())
            assert STEER_EXPERT in ranks[0]["model.layers.0.mlp.gate"], name
            assert STEER_EXPERT not in ranks[1]["model.layers.0.mlp.gate"], name
