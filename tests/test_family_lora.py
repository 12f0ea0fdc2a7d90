"""LoRA on every model family of trace_ds.models.tiny.FAMILIES (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo2,
Mixtral, Qwen3-MoE), each a tiny random model built with transformers' own classes (docs/compatibility.md).

With only the adapters trainable, the ghost scores equal the fp64 per-pair autograd reference of tests/helpers.py
(the adapters' B matrices moved away from zero first: at peft's init B = 0 and every gradient through A is 0).
Then the real flow, in one process: ``trace-ds score --lora`` saves the initial adapter, ``trace-ds train --lora
--merge-lora`` trains it for two steps and exports the merged model, which plain transformers reloads with the
trained model's logits.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from trace_ds.config import LoraConfig
from trace_ds.data.batching import collate_pairs
from trace_ds.io import TraceError, write_jsonl
from trace_ds.models.loading import attach_lora, load_causal_lm
from trace_ds.models.tiny import FAMILIES, MOE_FAMILIES, PAD_ID

from .helpers import (
    cosine_errors,
    ghost_scores_and_norms,
    random_pairs,
    read_lines,
    reference_scores,
    score_config,
)
from .test_families import assert_exact_norms, categories_for, eager_experts
from .test_family_training import build_families

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# LoRA targets of the families that lack some of trace-ds's default --lora-targets (LoraConfig.target_modules:
# q/k/v/o_proj and gate/up/down_proj); every other family takes the default list as it is. Phi-3 fuses q/k/v
# into one qkv_proj and gate/up into one gate_up_proj. The MoE families' experts hold their projections as fused
# 3-D parameters (experts.gate_up_proj, experts.down_proj), not nn.Linear modules, and their routers (gate) are
# not nn.Linear either: only the attention projections can take adapters.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "mixtral": ATTENTION,
    "qwen3_moe": ATTENTION,
}
RANK = 4
BETA = 0.1
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8  # build_tiny_family's sizes: no batch below is 1, 2, 4 or 8 wide


def lora_targets(family: str) -> tuple[str, ...]:
    return LORA_TARGETS.get(family, LoraConfig().target_modules)


def linear_names(model: nn.Module) -> set[str]:
    return {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }


def adapter_numel(model: nn.Module, targets: tuple[str, ...], r: int) -> int:
    """Elements of the rank-``r`` A and B matrices on every linear module named in ``targets``."""
    return sum(
        r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_families(tmp_path_factory.mktemp("lora_families"))


@pytest.fixture(scope="module")
def triaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two text pairs of each category (one optimizer step holds all six)."""
    from trace_ds.judge.triage import run_triage
    from trace_ds.synth.generator import build_benchmark

    root = tmp_path_factory.mktemp("lora_pairs")
    build_benchmark(root / "bench", n_pairs=24, seed=7, n_eval_prompts=3, n_eval_pairs=6)
    run_triage(
        str(root / "bench" / "pairs.jsonl"), str(root / "bench" / "verdicts.jsonl"), str(root / "all.jsonl")
    )
    rows = read_lines(root / "all.jsonl")
    categories = ("inversion", "suppression", "retention")
    write_jsonl(
        root / "triaged.jsonl",
        [r for category in categories for r in [r for r in rows if r["category"] == category][:2]],
    )
    return root / "triaged.jsonl"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_targets_default_or_family_specific(family: str, families: dict[str, Path]) -> None:
    """The default --lora-targets attach to every family not in LORA_TARGETS; on the others attach_lora refuses
    them naming exactly the missing modules, and so does `trace-ds plan`. The chosen targets attach, and
    `trace-ds plan --lora` counts the
    adapters' elements as attach_lora makes them."""
    from trace_ds.runtime.plan import model_shape

    model = load_causal_lm(str(families[family]))
    default = LoraConfig().target_modules
    missing = [target for target in default if target not in linear_names(model)]
    if family in LORA_TARGETS:
        assert missing, f"{family} has every default target: drop it from LORA_TARGETS"
        with pytest.raises(TraceError, match=rf"--lora-targets {','.join(missing)}: no such module"):
            attach_lora(model, LoraConfig(r=RANK))
        with pytest.raises(TraceError, match=rf"--lora-targets {','.join(sorted(missing))}: no such linear"):
            model_shape(str(families[family]), LoraConfig(r=RANK))  # the plan refuses them too
    else:
        assert not missing
    targets = lora_targets(family)
    numel = adapter_numel(model, targets, RANK)
    adapted = attach_lora(model, LoraConfig(r=RANK, target_modules=targets))
    trainable = {name: p.numel() for name, p in adapted.named_parameters() if p.requires_grad}
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable), sorted(trainable)
    assert {t for t in targets if any(f".{t}.lora_" in name for name in trainable)} == set(targets)
    assert sum(trainable.values()) == numel > 0
    assert model_shape(str(families[family]), LoraConfig(r=RANK, target_modules=targets)).lora_params == numel


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_scores_equal_fp64_per_pair_autograd(family: str, families: dict[str, Path]) -> None:
    model = attach_lora(
        load_causal_lm(str(families[family])), LoraConfig(r=RANK, target_modules=lora_targets(family), seed=1)
    )
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B away from zero, as after some training: the gradients through A count too
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)

    probe = random_pairs(4, seed=10, prefix="probe")
    pairs = random_pairs(6, seed=11)
    widths = {collate_pairs(pairs[i : i + 4], PAD_ID).input_ids.shape[1] for i in range(0, len(pairs), 4)}
    widths |= {collate_pairs(probe, PAD_ID).input_ids.shape[1]}
    assert not widths & {1, HEADS, KV_HEADS, HEAD_DIM}, widths  # a layout mix-up cannot go unnoticed

    cfg = score_config(beta=0.5)
    categories = categories_for(pairs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_norms, got_g_norm = ghost_scores_and_norms(
            model, probe, pairs, categories, cfg, pad_id=PAD_ID
        )
    coverage = [str(w.message) for w in caught if "took no part" in str(w.message)]
    assert not coverage, coverage  # the probe pass reaches every adapter
    with eager_experts(model):
        want, norms, g_norm = reference_scores(model, probe, pairs, categories, cfg)
    errors = cosine_errors(got, want, norms, g_norm)
    print(f"{family}: max cosine error {max(errors):.2e}")
    assert max(errors) <= 1e-6, errors
    assert any(abs(w) > 1e-3 * n * g_norm for w, n in zip(want, norms, strict=True))
    assert_exact_norms(got_norms, norms, got_g_norm, g_norm)  # ||g_i|| over the adapters only


def heads_only_first_step_loss(scores: list[dict], pairs: int) -> float:
    """At step 1 the adapters' B is still peft's zero: the policy is the reference and every reward is 0. IPO
    gives (0 - 1/(2 beta))^2 per inversion pair, NPO -(2/beta) log sigmoid(0) per suppressed response (two per
    pair), the KL 0; weighted by the scores file, over the step's ``pairs`` (weight-0 pairs are not drawn)."""
    per_pair = {"inversion": (1 / (2 * BETA)) ** 2, "suppression": 2 * (2 / BETA) * math.log(2)}
    return sum(s["weight"] * per_pair[s["category"]] for s in scores) / pairs


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_training_merged_export_reloads_in_transformers(
    family: str, families: dict[str, Path], triaged: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from trace_ds.config import ScoreConfig, TrainConfig
    from trace_ds.data.pairs import read_pairs
    from trace_ds.data.stream import TrainRecord
    from trace_ds.scoring.scorer import run_score
    from trace_ds.training.train import Trainer

    targets = lora_targets(family)
    initial = AutoModelForCausalLM.from_pretrained(families[family]).eval()
    scores = tmp_path / "scores" / "scores.jsonl"
    lora = LoraConfig(r=RANK, target_modules=targets, seed=3)
    score = ScoreConfig(
        model=str(families[family]), triaged=str(triaged), out=str(scores), probe_size=3, micro_batch=6,
        beta=BETA, allow_empty=True, lora=lora,
    )  # fmt: skip
    meta = run_score(score)
    assert list(meta["lora"]["target_modules"]) == list(targets)
    assert meta["parameters_covered"] == adapter_numel(initial, targets, RANK)
    assert Path(meta["initial_adapter"]).is_dir()
    assert "ghost_fallback" not in meta  # the adapters are nn.Linear: no module takes the generic fallback

    out = tmp_path / "run"
    config = TrainConfig(
        model=str(families[family]), triaged=str(triaged), scores=str(scores), out=str(out), max_steps=2,
        micro_batch=6, lr=1e-2, warmup_ratio=0.0, beta=BETA, lora=True, merge_lora=True,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.run()
    scored = [s for s in read_lines(scores) if s["weight"] > 0]
    metrics = read_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["pairs"] == 2 + len(scored) > 2
    assert metrics[0]["loss"] == pytest.approx(heads_only_first_step_loss(scored, 2 + len(scored)), rel=1e-6)
    assert math.isfinite(metrics[1]["loss"]) and metrics[1]["loss"] != metrics[0]["loss"]

    # the export's own check ran: adapter and merged model reloaded, each with the trained logits
    export = json.loads((out / "final" / "export.json").read_text())
    assert export["kind"] == "lora-adapter" and export["logit_relative_error"] <= export["tolerance"]
    assert export["merged"]["kind"] == "merged-model"
    assert export["merged"]["logit_relative_error"] <= export["merged"]["tolerance"]

    # the merged model reloads with plain transformers, with the trained model's logits on the training batch
    exported = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert type(exported).__name__ == type(initial).__name__
    records = [TrainRecord(p, str(p.extra["category"]), 1.0) for p in read_pairs(str(triaged)).pairs]
    batch, _, _ = trainer._batch(records)
    trained_module = trainer.engine.module.eval()
    with torch.no_grad():
        trained = batch.logits(trained_module)
        reloaded = batch.logits(exported)
        before = batch.logits(initial)
    mask = batch.attention_mask.bool()
    scale = trained[mask].abs().max()
    error = float((reloaded - trained)[mask].abs().max() / scale)
    print(f"{family}: merged export's logits within {error:.2e} of the largest trained logit")
    assert error <= 1e-5, family
    assert (before - trained)[mask].abs().max() > 1e-3 * scale, f"{family}: training did not move the model"
    # only the targeted weights changed (W + scale * B A; not their biases), every other one is the checkpoint's
    start = dict(initial.named_parameters())
    for name, param in exported.named_parameters():
        module, kind = name.rsplit(".", 2)[-2:]
        targeted = module in targets and kind == "weight"
        assert torch.equal(param, start[name]) != targeted, name
    if family in MOE_FAMILIES:  # the user's config is exported as it was
        assert exported.config.output_router_logits is True
