"""Small helpers shared by tests."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from trace_ds.config import PAPER_WEIGHTING, ScoreConfig
from trace_ds.data.tokenize import TokenizedPair
from trace_ds.io import free_port, trace_ds_command
from trace_ds.training.losses import npo_loss, relational_loss, sequence_logps, suppression_loss


def triaged_benchmark(root: Path, n_pairs: int, seed: int, n_eval_prompts: int, n_eval_pairs: int) -> Path:
    """A synthetic benchmark written to ``root/bench`` and triaged into ``root/triaged.jsonl`` (returned)."""
    from trace_ds.judge.triage import run_triage
    from trace_ds.synth.generator import build_benchmark

    bench = root / "bench"
    build_benchmark(
        bench, n_pairs=n_pairs, seed=seed, n_eval_prompts=n_eval_prompts, n_eval_pairs=n_eval_pairs
    )
    out = root / "triaged.jsonl"
    run_triage(str(bench / "pairs.jsonl"), str(bench / "verdicts.jsonl"), str(out))
    return out


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


# ---- impact scores: the ghost scorer and its fp64 per-pair autograd reference (docs/method.md) ----


def random_pairs(n: int, seed: int, prefix: str = "p", vocab: int = 97, low: int = 4) -> list[TokenizedPair]:
    """``n`` tokenized pairs: BOS (1) + a random prompt, responses ending with EOS (2); other ids drawn from
    ``[low, vocab)`` (``low`` <= 3 lets the special ids appear inside sequences too)."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(low, vocab) for _ in range(k)]

    return [
        TokenizedPair(
            f"{prefix}{i}",
            [1, *ids(rng.randint(1, 6))],
            [*ids(rng.randint(1, 7)), 2],
            [*ids(rng.randint(1, 7)), 2],
        )
        for i in range(n)
    ]


def paper_flags(probe_file: bool = False) -> list[str]:
    """The paper's weighting as ``trace-ds score`` flags (the default is the weighting study's pick); with a
    --probe file there is no built probe to choose a suppression source for."""
    options = {k: v for k, v in PAPER_WEIGHTING.items() if not (probe_file and k == "probe_suppression")}
    return [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", value)]


def score_config(**kwargs) -> ScoreConfig:
    """An in-memory ScoreConfig (micro-batch 4, the torch kernel unless given)."""
    return ScoreConfig(
        model="in-memory",
        triaged="in-memory",
        out="unused",
        micro_batch=kwargs.pop("micro_batch", 4),
        kernel=kwargs.pop("kernel", "torch"),
        **kwargs,
    )


def ghost_scores(
    model: torch.nn.Module,
    probe: Sequence[TokenizedPair],
    pairs: Sequence[TokenizedPair],
    categories: Sequence[str],
    cfg: ScoreConfig | None = None,
    pad_id: int = 0,
) -> list[float]:
    """Raw scores from the ghost scorer (its pass without norms), micro-batch by micro-batch."""
    return _ghost_pass(model, probe, pairs, categories, cfg, pad_id, norms=False)[0]


def ghost_scores_and_norms(
    model: torch.nn.Module,
    probe: Sequence[TokenizedPair],
    pairs: Sequence[TokenizedPair],
    categories: Sequence[str],
    cfg: ScoreConfig | None = None,
    pad_id: int = 0,
) -> tuple[list[float], list[float], float]:
    """Raw scores, ghost gradient norms ||g_i|| and ||G|| from the ghost scorer, micro-batch by micro-batch."""
    return _ghost_pass(model, probe, pairs, categories, cfg, pad_id, norms=True)


def _ghost_pass(model, probe, pairs, categories, cfg, pad_id: int, norms: bool):  # type: ignore[no-untyped-def]
    from trace_ds.scoring.scorer import GhostScorer

    cfg = cfg or score_config()
    scorer = GhostScorer(model, pad_id=pad_id, config=cfg)
    scorer.probe_gradient(probe)
    scores: list[float] = []
    grad_norms: list[float] = []
    for start in range(0, len(pairs), cfg.micro_batch):
        chunk, cats = pairs[start : start + cfg.micro_batch], categories[start : start + cfg.micro_batch]
        if norms:
            got, got_norms = scorer.score_with_norms(chunk, cats)
            grad_norms += got_norms
        else:
            got = scorer.score(chunk, cats)
        scores += got
    return scores, grad_norms, scorer.probe_norm()


def reference_loss(model, pair: TokenizedPair, category: str, cfg: ScoreConfig) -> torch.Tensor:
    """Per-pair loss with plain autograd, one pair at a time, no padding (test reference only)."""
    logps = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + response])
        logits = model(input_ids=ids).logits
        labels = torch.zeros_like(ids)
        labels[0, :-1] = ids[0, 1:]
        mask = torch.zeros(ids.shape, dtype=torch.float64)
        mask[0, len(pair.prompt_ids) - 1 : ids.shape[1] - 1] = 1
        total = sequence_logps(logits, labels, mask)[0]
        logps.append(total / mask.sum() if cfg.logp_reduction == "mean" else total)
    rc, rr = (lp - lp.detach() for lp in logps)
    if category == "suppression":
        return suppression_loss(rc, rr, cfg.beta)
    if category == "unlearning":
        return npo_loss(rc, cfg.beta)
    return relational_loss(rc - rr, cfg.beta, cfg.relational)


def reference_scores(model, probe, pairs, categories, cfg: ScoreConfig):
    """fp64 per-pair gradients g_i and G; returns scores, ||g_i|| and ||G||."""
    model64 = copy.deepcopy(model).double()
    params = [p for p in model64.parameters() if p.requires_grad]
    probe_loss = sum(reference_loss(model64, p, "inversion", cfg) for p in probe) / len(probe)
    grad_j = torch.autograd.grad(probe_loss, params, allow_unused=True)
    grad_j = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_j, strict=True)]
    g_norm = torch.sqrt(sum((g * g).sum() for g in grad_j))
    scores, norms = [], []
    for pair, category in zip(pairs, categories, strict=True):
        grads = torch.autograd.grad(reference_loss(model64, pair, category, cfg), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        scores.append(float(sum((g * G).sum() for g, G in zip(grads, grad_j, strict=True))))
        norms.append(float(torch.sqrt(sum((g * g).sum() for g in grads))))
    return scores, norms, float(g_norm)


def cosine_errors(
    got: Sequence[float], want: Sequence[float], norms: Sequence[float], g_norm: float
) -> list[float]:
    """|s - s_ref| / (||g_i|| ||G||) per pair: the error in cosine units (docs/method.md, Checks)."""
    return [abs(a - b) / (n * g_norm) for a, b, n in zip(got, want, norms, strict=True)]


def score_on_two_ranks(args: list[str], out: Path, extra_env: dict[str, str] | None = None) -> None:
    """``trace-ds score ARGS --out OUT`` on 2 CPU ranks under ZeRO-3 (ds_configs/cpu.json), in its own process
    session and under a hard timeout."""
    config = Path(__file__).resolve().parents[1] / "ds_configs" / "cpu.json"
    command = deepspeed_command(2, "score", *args, "--out", str(out), "--deepspeed", str(config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **(extra_env or {})}
    run = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=540, start_new_session=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def assert_same_raw_scores(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    """Two score files list the same pairs, with raw scores equal within ``rel`` of the largest score and
    gradient norms within ``rel`` of each pair's own."""
    assert [x["id"] for x in a] == [x["id"] for x in b]
    scale = max(abs(x["raw_score"]) for x in a)
    assert max(abs(x["raw_score"] - y["raw_score"]) for x, y in zip(a, b, strict=True)) <= rel * scale
    if all("grad_norm" in x for x in a + b):  # in-run re-scoring writes no norms (dot scores only)
        assert (
            max(abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(a, b, strict=True))
            <= rel
        )
