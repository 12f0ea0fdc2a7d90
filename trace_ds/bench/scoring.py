"""``trace-ds bench scoring``: the ghost scorer against per-pair methods and the physical floor.

Each arm runs in its own process (so its peak RSS is its own) on the same model and pairs:

* ``ghost``: trace-ds's scorer (one batched forward + backward per micro-batch, ghost dot products);
* ``ghost+norms``: the same pass with every pair's exact gradient norm too (ghost norms, what
  ``trace-ds score`` runs: cosine scores need them); its cost over ``ghost`` is the price of the norms;
* ``reference-code``: what the public reference code does: one pair at a time, four extra no-grad passes
  (policy and a second full reference model, chosen and rejected), a full flattened per-pair gradient, a dot;
* ``per-pair``: a fair per-pair autograd method: one pair at a time, no wasted passes, per-parameter dots;
* ``floor``: a plain forward + backward of the same micro-batches with weight gradients (what one training
  step costs): the physical floor the ghost scorer is compared to.

Times exclude model loading and one warm-up micro-batch; the probe gradient (the same for every arm) is
timed separately. The arms' scores are checked against each other, so a fast wrong arm cannot win.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trace_ds.runtime.memory import lifetime_peak_rss_mib

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # every arm on the GPU when there is one


def _peak_mib() -> float:
    """Peak memory so far: CUDA's allocated bytes on a GPU, the process's resident set on the CPU."""
    if DEVICE == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return lifetime_peak_rss_mib()


def _now() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


ARMS = ("floor", "ghost", "ghost+norms", "per-pair", "reference-code")


def _model(settings: dict[str, Any]) -> torch.nn.Module:
    """The benchmark's random model: Llama by default, or another family of ``trace_ds.models.tiny.FAMILIES`` at the
    same width and depth. An MoE family gets ``experts`` experts, top 2, each half the dense MLP's width, so a
    token's MLP costs what the dense model's does (the MoE holds experts / 2 times the MLP weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trace_ds.models.tiny import FAMILIES, MOE_FAMILIES

    family, hidden, vocab = settings.get("family", "llama"), settings["hidden"], settings["vocab"]
    heads = max(hidden // 64, 1)
    intermediate = int(hidden * 8 / 3) // 16 * 16
    shape: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": settings["layers"],
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hidden // heads,
        "intermediate_size": intermediate, "max_position_embeddings": 1024, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
    }  # fmt: skip
    shape |= {k: v for k, v in FAMILIES[family].items() if k != "tie_word_embeddings"}
    if family in MOE_FAMILIES:
        experts = settings.get("experts", 8)
        count = "num_local_experts" if family == "mixtral" else "num_experts"
        shape |= {count: experts, "num_experts_per_tok": 2}
        shape["intermediate_size" if family == "mixtral" else "moe_intermediate_size"] = intermediate // 2
    config = AutoConfig.for_model(family, **shape)
    torch.manual_seed(settings["seed"])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _pairs(n: int, tokens: int, vocab: int, seed: int, prefix: str) -> list[Any]:
    from trace_ds.data.tokenize import TokenizedPair

    rng = random.Random(seed)
    half = tokens // 2

    def ids(k: int) -> list[int]:
        return [rng.randrange(4, vocab) for _ in range(k)]

    out = []
    for i in range(n):
        prompt = [1, *ids(half - 1 + rng.randint(-8, 8))]
        out.append(
            TokenizedPair(
                f"{prefix}{i}",
                prompt,
                [*ids(half - 1 + rng.randint(-8, 8)), 2],
                [*ids(half - 1 + rng.randint(-8, 8)), 2],
            )
        )
    return out


def probe_gradient_file(settings: dict[str, Any]) -> Path:
    """Compute G once (ghost probe pass) and save it by parameter name; every arm scores against it."""
    from trace_ds.config import ScoreConfig
    from trace_ds.scoring.scorer import GhostScorer

    model = _model(settings).to(DEVICE)
    probe = _pairs(settings["probe"], settings["tokens"], settings["vocab"], settings["seed"] + 2, "probe")
    config = ScoreConfig(
        model="bench", triaged="bench", out="bench", micro_batch=settings["batch"], kernel="auto", beta=0.1
    )
    t0 = _now()
    store = GhostScorer(model, 0, config).probe_gradient(probe)
    seconds = _now() - t0
    path = Path(settings["workdir"]) / "probe_gradient.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: store.full(p) for name, p in model.named_parameters()}, path)
    (path.parent / "probe_seconds.txt").write_text(f"{seconds}\n")
    return path


def run_arm(arm: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One arm in this process; returns its timings, peak RSS and scores."""
    from trace_ds.config import ScoreConfig
    from trace_ds.scoring.ghost_ops import ProbeGradient
    from trace_ds.scoring.scorer import GhostScorer, micro_batches

    torch.set_num_threads(settings["threads"])
    model = _model(settings).to(DEVICE)
    pairs = _pairs(settings["pairs"], settings["tokens"], settings["vocab"], settings["seed"] + 1, "p")
    categories = ["inversion" if i % 2 else "suppression" for i in range(len(pairs))]
    config = ScoreConfig(
        model="bench", triaged="bench", out="bench", micro_batch=settings["batch"], kernel="auto", beta=0.1
    )
    rss_model = _peak_mib()
    store = ProbeGradient()
    if arm != "floor":  # G is part of every scorer's memory; the floor (a training step) does not need it
        saved = torch.load(Path(settings["workdir"]) / "probe_gradient.pt", map_location=DEVICE)
        for name, param in model.named_parameters():
            store.tensors[id(param)] = saved[name]
    scorer = GhostScorer(model, 0, config, store=store)
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = list(micro_batches(list(zip(pairs, categories, strict=True)), settings["batch"]))

    def run(chunk: Any) -> list[float]:
        batch = [p for p, _ in chunk]
        cats = [c for _, c in chunk]
        if arm == "ghost":
            return scorer.score(batch, cats)
        if arm == "ghost+norms":
            return scorer.score_with_norms(batch, cats)[0]
        if arm == "floor":
            _floor_step(model, batch, cats, config)
            return []
        if arm == "per-pair":
            return [
                _per_pair_score(model, pair, cat, config, params, store)
                for pair, cat in zip(batch, cats, strict=True)
            ]
        return [
            _reference_code_score(model, reference, pair, cat, config, params, flat_g)
            for pair, cat in zip(batch, cats, strict=True)
        ]

    reference = flat_g = None
    if arm == "reference-code":
        import copy

        reference = copy.deepcopy(model)  # the reference code keeps a full second model as the reference
        flat_g = torch.cat([store.full(p).reshape(-1) for p in params])
    run(chunks[0])  # warm-up
    t0 = _now()
    scores: list[float] = []
    for chunk in chunks:
        scores += run(chunk)
    seconds = _now() - t0
    return {
        "arm": arm,
        "seconds": seconds,
        "pairs_per_s": len(pairs) / seconds,
        "peak_rss_mb": _peak_mib(),  # on a GPU: CUDA's peak allocated bytes
        "rss_after_model_load_mb": rss_model,
        "peak_beyond_model_mb": _peak_mib() - rss_model,
        "device": DEVICE,
        "scores": scores,
    }


def _losses(model: torch.nn.Module, pairs: list[Any], cats: list[str], config: Any) -> torch.Tensor:
    from trace_ds.data.batching import collate_pairs
    from trace_ds.scoring.scorer import batch_logps, pair_losses

    batch = collate_pairs(pairs, 0).to(DEVICE)
    chosen, rejected = batch_logps(model, batch, config.vocab_tile)
    return pair_losses(chosen, rejected, cats, config.relational, config.beta)


def _floor_step(model: torch.nn.Module, pairs: list[Any], cats: list[str], config: Any) -> None:
    model.zero_grad(set_to_none=True)
    _losses(model, pairs, cats, config).sum().backward()


def _per_pair_score(
    model: torch.nn.Module, pair: Any, cat: str, config: Any, params: list[Any], store: Any
) -> float:
    model.zero_grad(set_to_none=True)
    _losses(model, [pair], [cat], config).sum().backward()
    return float(sum((p.grad.float() * store.full(p)).sum() for p in params if p.grad is not None))


def _reference_code_score(
    model: Any, reference: Any, pair: Any, cat: str, config: Any, params: list[Any], flat_g: Any
) -> float:
    from trace_ds.data.batching import collate_pairs
    from trace_ds.scoring.scorer import batch_logps

    with torch.no_grad():  # four passes whose results are constant at theta_ref (delta = 0)
        single = collate_pairs([pair], 0).to(DEVICE)
        for net in (model, reference):
            batch_logps(net, single)
            batch_logps(net, single)
    model.zero_grad(set_to_none=True)
    _losses(model, [pair], [cat], config).sum().backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    return float(flat.double() @ flat_g.double())


def run_benchmark(
    settings: dict[str, Any], arms: tuple[str, ...] = ARMS, out: str | None = None
) -> dict[str, Any]:
    """Run every arm in a fresh process, one after another (nothing else should run meanwhile)."""
    from trace_ds.console import console

    results = {}
    subprocess.run(
        [sys.executable, "-m", "trace_ds.bench.scoring", "probe", json.dumps(settings)],
        check=True,
        capture_output=True,
    )
    for arm in arms:
        console.print(f"bench scoring: running arm [bold]{arm}[/] in its own process")
        proc = subprocess.run(
            [sys.executable, "-m", "trace_ds.bench.scoring", arm, json.dumps(settings)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
        results[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = summarise(results, settings)
    if out:
        from trace_ds.io import write_json

        write_json(out, report)
    return report


def summarise(results: dict[str, dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """Ratios against the floor and the ghost arm; agreement of scores between arms (cosine units)."""
    floor = results.get("floor")
    ghost = results.get("ghost")
    rows = []
    for r in results.values():
        row = {k: v for k, v in r.items() if k != "scores"}
        if floor:
            row["time_vs_floor"] = r["seconds"] / floor["seconds"]
            row["peak_rss_vs_floor"] = r["peak_rss_mb"] / floor["peak_rss_mb"]
            row["beyond_model_vs_floor"] = r["peak_beyond_model_mb"] / max(
                floor["peak_beyond_model_mb"], 1e-9
            )
        if ghost:
            row["time_vs_ghost"] = r["seconds"] / ghost["seconds"]
        rows.append(row)
    agreement = {}
    if ghost:
        for arm in ("ghost+norms", "per-pair", "reference-code"):
            if arm in results:
                a, b = (
                    torch.tensor(ghost["scores"], dtype=torch.float64),
                    torch.tensor(results[arm]["scores"], dtype=torch.float64),
                )
                agreement[arm] = float((a - b).abs().max() / b.abs().max())
    probe_seconds = float((Path(settings["workdir"]) / "probe_seconds.txt").read_text())
    return {
        "settings": settings,
        "probe_gradient_seconds": probe_seconds,
        "arms": rows,
        "max_relative_score_difference_vs_ghost": agreement,
    }


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| arm | seconds | pairs/s | time / floor | time / ghost | peak RSS MB | peak RSS / floor | peak beyond model MB | beyond model / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["arms"]:
        lines.append(
            f"| {row['arm']} | {row['seconds']:.2f} | {row['pairs_per_s']:.2f} | {row.get('time_vs_floor', float('nan')):.2f} | "
            f"{row.get('time_vs_ghost', float('nan')):.2f} | {row['peak_rss_mb']:.0f} | {row.get('peak_rss_vs_floor', float('nan')):.2f} | "
            f"{row['peak_beyond_model_mb']:.0f} | {row.get('beyond_model_vs_floor', float('nan')):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        probe_gradient_file(json.loads(sys.argv[2]))
    else:
        print(json.dumps(run_arm(sys.argv[1], json.loads(sys.argv[2]))))
