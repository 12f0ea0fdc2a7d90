"""Ghost scores against an fp64 per-pair autograd reference on tiny Llama models, and their invariances."""

from __future__ import annotations

import copy

import pytest
import torch

from trace_ds.config import LoraConfig
from trace_ds.io import TraceError
from trace_ds.scoring.scorer import GhostScorer, Scored, normalize_weights

from .helpers import cosine_errors, ghost_scores, random_pairs, reference_loss, reference_scores
from .helpers import score_config as config

VOCAB = 97


def tiny_model(tied: bool, seed: int = 0, lora: bool = False) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from trace_ds.models.loading import attach_lora
    from trace_ds.models.tiny import tiny_llama_config

    config = tiny_llama_config(
        VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random norm weights, so the RMSNorm path is exercised away from w = 1
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.eval()
    if lora:
        model = attach_lora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=1))
        with torch.no_grad():  # non-zero B as after some training, so grads through A are exercised too
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    return model


CASES = {
    "untied": {"tied": False},
    "tied": {"tied": True},
    "lora": {"tied": False, "lora": True},
    "lora-tied-dpo": {"tied": True, "lora": True, "relational": "dpo"},
    "mean": {"tied": False, "logp_reduction": "mean"},
    "tied-mean-dpo": {"tied": True, "logp_reduction": "mean", "relational": "dpo"},
    "lora-mean": {"tied": False, "lora": True, "logp_reduction": "mean"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scores_equal_fp64_per_pair_autograd(case: str) -> None:
    """Both log-prob reductions (--logp-reduction sum | mean), IPO and DPO, full and LoRA."""
    options = dict(CASES[case])
    relational = options.pop("relational", "ipo")
    reduction = options.pop("logp_reduction", "sum")
    model = tiny_model(**options)
    cfg = config(relational=relational, beta=0.5, logp_reduction=reduction)
    probe = random_pairs(5, seed=10, prefix="probe")
    pairs = random_pairs(9, seed=11)
    categories = [("suppression", "inversion", "unlearning")[i % 3] for i in range(len(pairs))]
    got = ghost_scores(model, probe, pairs, categories, cfg)
    want, norms, g_norm = reference_scores(model, probe, pairs, categories, cfg)
    errors = cosine_errors(got, want, norms, g_norm)
    assert max(errors) <= 1e-5, errors
    assert any(abs(w) > 1e-3 * n * g_norm for w, n in zip(want, norms, strict=True))  # not trivially zero


def test_sum_of_scores_is_the_batch_gradient_dot_and_linear_in_g() -> None:
    model = tiny_model(tied=False)
    cfg = config()
    probe, pairs = random_pairs(4, 20, "probe"), random_pairs(6, 21)
    categories = ["inversion", "suppression"] * 3
    scores = ghost_scores(model, probe, pairs, categories, cfg)
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    batch_loss = sum(reference_loss(model64, p, c, cfg) for p, c in zip(pairs, categories, strict=True))
    probe_loss = sum(reference_loss(model64, p, "inversion", cfg) for p in probe) / len(probe)
    g_batch = torch.autograd.grad(batch_loss, params)
    g_probe = torch.autograd.grad(probe_loss, params)
    expected = float(sum((a * b).sum() for a, b in zip(g_batch, g_probe, strict=True)))
    assert sum(scores) == pytest.approx(expected, rel=1e-5, abs=1e-9)

    scorer = GhostScorer(model, 0, cfg)
    scorer.probe_gradient(probe)
    scorer.state.store.scale_(3.0)
    tripled = scorer.score(pairs, categories)
    assert tripled == pytest.approx([3 * s for s in scores], rel=1e-5, abs=1e-9)


def test_padding_and_batch_composition_do_not_change_scores() -> None:
    model = tiny_model(tied=True)
    probe, pairs = random_pairs(4, 30, "probe"), random_pairs(8, 31)
    categories = ["inversion", "suppression"] * 4
    together = ghost_scores(model, probe, pairs, categories, config(micro_batch=8))
    alone = ghost_scores(model, probe, pairs, categories, config(micro_batch=1))
    reordered = ghost_scores(model, probe, pairs[::-1], categories[::-1], config(micro_batch=3))[::-1]
    _, norms, g_norm = reference_scores(model, probe, pairs, categories, config())
    for other in (alone, reordered):  # equal up to fp32 summation order, in cosine units
        errors = cosine_errors(together, other, norms, g_norm)
        assert max(errors) <= 1e-5, errors


def test_weights_clamp_and_normalise_per_category_or_jointly() -> None:
    def scored() -> list[Scored]:
        return [
            Scored("a", "inversion", 2.0),
            Scored("b", "inversion", -1.0),
            Scored("c", "inversion", 4.0),
            Scored("d", "suppression", 1e-6),
            Scored("e", "suppression", 3e-6),
        ]

    per_category = scored()
    normalize_weights(per_category, "per-category", allow_empty=False)
    assert [s.weight for s in per_category] == pytest.approx([1.0, 0.0, 2.0, 0.5, 1.5])
    joint = scored()
    normalize_weights(joint, "joint", allow_empty=False)
    assert sum(s.weight for s in joint) == pytest.approx(1.0)
    assert joint[3].weight < 1e-6  # the scale gap that per-category normalisation removes

    empty = [Scored("a", "inversion", 1.0), Scored("d", "suppression", -1.0)]
    with pytest.raises(TraceError, match="every suppression score is <= 0"):
        normalize_weights(empty, "per-category", allow_empty=False)
    normalize_weights(empty, "per-category", allow_empty=True)
    assert [s.weight for s in empty] == [1.0, 0.0]


def test_model_level_scores_with_the_triton_kernel() -> None:
    """--kernel triton runs the fused kernel (under TRITON_INTERPRET=1 here) for every linear layer."""
    model = tiny_model(tied=False)
    probe, pairs = random_pairs(3, 40, "probe"), random_pairs(4, 41)
    categories = ["inversion", "suppression"] * 2
    with_torch = ghost_scores(model, probe, pairs, categories, config(kernel="torch"))
    with_triton = ghost_scores(model, probe, pairs, categories, config(kernel="triton"))
    _, norms, g_norm = reference_scores(model, probe, pairs, categories, config())
    errors = cosine_errors(with_torch, with_triton, norms, g_norm)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_scores(lora: bool) -> None:
    from trace_ds.models.loading import enable_gradient_checkpointing

    model = tiny_model(tied=False, lora=lora)
    probe, pairs = random_pairs(3, 50, "probe"), random_pairs(5, 51)
    categories = ["inversion", "suppression", "inversion", "suppression", "inversion"]
    plain = ghost_scores(model, probe, pairs, categories)
    enable_gradient_checkpointing(model)
    checkpointed = ghost_scores(model, probe, pairs, categories)
    _, norms, g_norm = reference_scores(model, probe, pairs, categories, config())
    errors = cosine_errors(plain, checkpointed, norms, g_norm)
    assert max(errors) <= 1e-6, errors


def test_the_offsets_check_is_off_by_default_and_on_in_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's offsets check costs one host sync per layer: scoring runs without it unless
    TRACE_DS_GHOST_CHECKS=1 (tests/conftest.py sets it, so every scoring test runs with it on)."""
    from trace_ds.scoring.ghost_ops import CHECKS_ENV, GhostState

    assert GhostState(mode="score", store=None).check_offsets  # type: ignore[arg-type]
    monkeypatch.delenv(CHECKS_ENV)
    assert not GhostState(mode="score", store=None).check_offsets  # type: ignore[arg-type]
