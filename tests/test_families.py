"""Exact ghost scores on the model families users bring (dense and MoE), built from transformers' own classes.

Tiny random models (no hub) of each family, every parameter moved away from its initial value (norm weights
start at exactly 1, or 0 for Gemma's (1 + w), where a wrong formula can hide), with heads != length !=
head_dim so that a layout mix-up cannot cancel. Scores are checked against the fp64 per-pair autograd
reference of tests/helpers.py; ghost-mode logits against the plain model's, bitwise. The MoE families' experts
and routers have no dedicated path: they take the generic fallback (scoring/fallback.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from trace_ds.data.batching import collate_pairs
from trace_ds.data.tokenize import TokenizedPair
from trace_ds.io import TraceError
from trace_ds.scoring.ghost import ghost_forward_for, ghost_mode
from trace_ds.scoring.ghost_ops import GhostState, ProbeGradient
from trace_ds.scoring.scorer import GhostScorer

from .helpers import (
    cosine_errors,
    ghost_scores_and_norms,
    random_pairs,
    reference_scores,
    score_config,
)

VOCAB = 160
HEADS, KV_HEADS, HEAD_DIM = 3, 1, 16  # batches below are 8-15 tokens wide: never 1, 3 or 16
BOS, EOS, PAD = 1, 2, 0

# Family -> config options beyond the shared sizes. Sliding windows shorter than the sequences, softcapping
# and Granite's multipliers are on, so that what the model does outside its modules is exercised too.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"sliding_window": 5, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "gemma3_text": {"sliding_window": 5, "final_logit_softcapping": 3.0},
    "phi3": {},
    "olmo2": {},
    "granite": {
        "embedding_multiplier": 3.0,
        "logits_scaling": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
    },
    # MoE: 4 experts, top 2, every layer sparse; experts as transformers runs them by default (grouped_mm)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
    },
}
CASES = [(family, tied) for family in FAMILIES for tied in (False, True)]


def family_model(
    family: str,
    tied: bool = False,
    pad_id: int = PAD,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    head_dim: int = HEAD_DIM,
    seed: int = 0,
) -> nn.Module:
    """A tiny random ``family`` causal LM in eval mode, every parameter perturbed (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=pad_id,
        tie_word_embeddings=tied,
        **FAMILIES[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():  # vectors (norms, biases) by 0.2, matrices by 0.02
            scale = 0.2 if param.dim() == 1 else 0.02
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model.eval()


def categories_for(pairs: list) -> list[str]:
    return [("suppression", "inversion", "unlearning")[i % 3] for i in range(len(pairs))]


@contextlib.contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """MoE experts on transformers' eager loop while the fp64 reference runs (grouped_mm has no fp64 kernel);
    the ghost scores themselves use the model's default implementation."""
    config = model.config
    if getattr(config, "_experts_implementation", None) is None:
        yield
        return
    default = config._experts_implementation
    config._experts_implementation = "eager"
    try:
        yield
    finally:
        config._experts_implementation = default


def assert_exact(model: nn.Module, probe, pairs, pad_id: int = PAD, unreached: str | None = None) -> None:
    """Ghost scores within 1e-6 cosine units of the fp64 per-pair reference, and not trivially zero; ghost
    gradient norms ||g_i|| and ||G|| within 1e-6 of the reference's, relative. The probe pass reaches every
    trainable parameter (no coverage warning), or warns matching ``unreached``."""
    cfg = score_config(beta=0.5)
    categories = categories_for(pairs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_norms, got_g_norm = ghost_scores_and_norms(
            model, probe, pairs, categories, cfg, pad_id=pad_id
        )
    coverage = [str(w.message) for w in caught if "took no part" in str(w.message)]
    if unreached is None:
        assert not coverage, coverage
    else:
        assert len(coverage) == 1 and re.search(unreached, coverage[0]), coverage
    with eager_experts(model):
        want, norms, g_norm = reference_scores(model, probe, pairs, categories, cfg)
    errors = cosine_errors(got, want, norms, g_norm)
    assert max(errors) <= 1e-6, errors
    assert any(abs(w) > 1e-3 * n * g_norm for w, n in zip(want, norms, strict=True))
    assert_exact_norms(got_norms, norms, got_g_norm, g_norm)


def assert_exact_norms(got: list[float], want: list[float], got_g: float, want_g: float) -> None:
    """Ghost norms ||g_i|| (and ||G||) within 1e-6 of the fp64 per-pair gradients' norms, relative."""
    relative = [abs(a - b) / b for a, b in zip(got, want, strict=True)]
    assert max(relative) <= 1e-6 and min(want) > 0, relative
    assert abs(got_g - want_g) <= 1e-6 * want_g, (got_g, want_g)


@pytest.mark.parametrize(("family", "tied"), CASES)
def test_scores_equal_fp64_per_pair_autograd(family: str, tied: bool) -> None:
    model = family_model(family, tied)
    probe = random_pairs(4, seed=10, prefix="probe", vocab=VOCAB)
    pairs = random_pairs(6, seed=11, vocab=VOCAB)
    widths = {collate_pairs(pairs[i : i + 4], PAD).input_ids.shape[1] for i in range(0, len(pairs), 4)}
    widths |= {collate_pairs(probe, PAD).input_ids.shape[1]}
    assert not widths & {1, HEADS, KV_HEADS, HEAD_DIM}, widths  # a layout mix-up cannot go unnoticed
    assert_exact(model, probe, pairs)


def with_token(pairs: list[TokenizedPair], token: int) -> list[TokenizedPair]:
    """``token`` inside every prompt and response (where its delta is not zero: an EOS that ends a sequence
    predicts nothing and nothing attends to it)."""
    return [
        dataclasses.replace(
            p,
            prompt_ids=[*p.prompt_ids[:1], token, *p.prompt_ids[1:]],
            chosen_ids=[token, *p.chosen_ids],
            rejected_ids=[*p.rejected_ids[:-1], token, *p.rejected_ids[-1:]],
        )
        for p in pairs
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_exact_when_the_pad_id_is_a_real_token(family: str) -> None:
    """pad = eos, as many tokenizers have it: F.embedding gives the padding_idx row no gradient, so the
    embedding's use of EOS tokens adds nothing (the tied head's use of that row still does)."""
    model = family_model(family, tied=True, pad_id=EOS)
    assert model.get_input_embeddings().padding_idx == EOS
    probe = with_token(random_pairs(4, seed=30, prefix="probe", vocab=VOCAB), EOS)
    pairs = with_token(random_pairs(6, seed=31, vocab=VOCAB), EOS)
    assert_exact(model, probe, pairs, pad_id=EOS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ghost_mode_logits_equal_the_plain_models_bitwise(family: str, dtype: torch.dtype) -> None:
    """Every replacement forward is the module's own, op for op and cast for cast (bf16 tells Llama's, OLMo 2's
    and Gemma's cast orders apart); what the model does outside its modules (Gemma's softcapping, Granite's
    multipliers) still applies."""
    model = family_model(family, tied=family.startswith("gemma")).to(dtype)
    batch = collate_pairs(random_pairs(4, seed=12, vocab=VOCAB), PAD)
    state = GhostState("score", ProbeGradient())
    state.set_batch(batch.attention_mask)
    with torch.enable_grad():
        plain = batch.logits(model)
        with ghost_mode(model, state):
            ghost = batch.logits(model)
    assert ghost.dtype == dtype and torch.equal(ghost, plain)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        assert ghost.abs().max() <= cap


def short_pairs(n: int, seed: int, width: int, prefix: str = "p") -> list[TokenizedPair]:
    """Pairs of at most ``width`` tokens per sequence, the first chosen exactly ``width`` (so a batch holding
    it is ``width`` wide) and the rest shorter (padding)."""
    rng = random.Random(seed)

    def response(k: int) -> list[int]:
        return [*(rng.randrange(4, VOCAB) for _ in range(k - 1)), EOS]

    prompt = lambda: [BOS, rng.randrange(4, VOCAB)]  # noqa: E731
    return [
        TokenizedPair(
            f"{prefix}{i}",
            prompt(),
            response(width - 2 if i == 0 else rng.randint(1, width - 3)),
            response(rng.randint(1, width - 3)),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_per_head_norms_are_exact_when_heads_equal_the_length(family: str) -> None:
    """Qwen3 normalises q/k as (rows, length, heads, head_dim), Gemma 3 as (rows, heads, length, head_dim).
    With heads == length (== rows here) the shape cannot tell them apart; the token dimension comes from the
    projection output the norm's input is a view of. The batch holds padding, so a wrong choice is inexact;
    only the q/k norm weights are trained, so the scores are theirs alone."""
    heads = 8
    model = family_model(family, heads=heads, kv_heads=heads, head_dim=6)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(("q_norm.weight", "k_norm.weight")))
    probe = short_pairs(4, seed=40, width=heads, prefix="probe")
    pairs = short_pairs(4, seed=41, width=heads)
    for batch in (collate_pairs(probe, PAD), collate_pairs(pairs, PAD)):
        assert batch.input_ids.shape == (heads, heads) and not bool(batch.attention_mask.all())
    assert_exact(model, probe, pairs)


def test_a_tensor_not_in_the_batch_layout_is_refused() -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    state = GhostState("score", ProbeGradient())
    state.set_batch(torch.ones(2, 5, dtype=torch.long))  # rows 2, length 5
    norm = Qwen3RMSNorm(16)
    forward = ghost_forward_for(norm, state)
    assert forward is not None
    # tokens, per head before / after the transpose, flattened tokens
    for shape in [(2, 5, 16), (2, 5, 3, 16), (2, 3, 5, 16), (10, 16)]:
        forward(torch.randn(shape))
    for shape in [(3, 5, 16), (2, 4, 16), (9, 16), (2, 3, 4, 16), (5, 2, 16), (10, 2, 16)]:
        with pytest.raises(TraceError, match=r"shape .* rows=2, length=5: (it expects|no dimension)"):
            forward(torch.randn(shape))
    projected = torch.randn(2, 5, 5 * 16)  # a q projection's output, with heads == length == 5
    assert (
        state.token_dim(norm, projected.view(2, 5, 5, 16)) == 1
    )  # per head before the transpose: its strides
    assert state.token_dim(norm, projected.view(2, 5, 5, 16).transpose(1, 2)) == 2  # and after it
    for ambiguous in [torch.randn(2, 5, 5, 16), projected.view(2, 5, 5, 16).transpose(1, 2).contiguous()]:
        with pytest.raises(TraceError, match=r"2 dimensions have the length \(heads == length\?\)"):
            forward(ambiguous)  # nothing tells which dimension is the token's

    linear = ghost_forward_for(nn.Linear(16, 4), state)
    embedding = ghost_forward_for(nn.Embedding(10, 16), state)
    assert linear is not None and embedding is not None
    linear(torch.randn(10, 16))  # flattened tokens, as an MoE block's shared MLP gets them
    for shape in [(2, 5, 3, 16), (9, 16), (5, 2, 16)]:
        with pytest.raises(TraceError, match=r"expects the layout \(rows, length, features\)"):
            linear(torch.randn(shape))
    with pytest.raises(TraceError, match=r"expects the layout \(rows, length\) token ids"):
        embedding(torch.zeros(2, 6, dtype=torch.long))


def test_norms_and_embeddings_are_recognised_by_their_code_not_their_name() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from trace_ds.scoring.ghost import embedding_scaled, norm_kind

    class RenamedNorm(nn.Module):  # Llama's norm under another name, other comments and annotations
        def __init__(self, size: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            """Same code."""
            input_dtype = hidden_states.dtype
            hidden_states = hidden_states.to(torch.float32)  # fp32 as Llama
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight * hidden_states.to(input_dtype)

    class ChangedRMSNorm(LlamaRMSNorm):  # the right name, another computation
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states) * 2

    class ChangedScaledWordEmbedding(GemmaTextScaledWordEmbedding):
        def forward(self, input_ids: torch.Tensor):
            return super().forward(input_ids) + 1

    kind = norm_kind(RenamedNorm(8))
    assert kind is not None and kind.name == "llama"
    assert norm_kind(ChangedRMSNorm(8)) is None
    assert embedding_scaled(GemmaTextScaledWordEmbedding(10, 8, 0, embed_scale=2.0)) is True
    assert embedding_scaled(ChangedScaledWordEmbedding(10, 8, 0, embed_scale=2.0)) is None


def test_a_parameter_used_outside_its_modules_forward_is_refused() -> None:
    """A hook (or the model's own code) reading a weight directly gives it a gradient no ghost path sees."""
    model = family_model("llama")
    probe, pairs = (
        random_pairs(3, seed=20, prefix="probe", vocab=VOCAB),
        random_pairs(2, seed=21, vocab=VOCAB),
    )
    scorer = GhostScorer(model, PAD, score_config())
    scorer.probe_gradient(probe)
    hook = model.model.norm.register_forward_hook(lambda module, args, out: out * module.weight.mean())
    with pytest.raises(TraceError, match=r"model\.norm\.weight\b.*outside their ghost path"):
        scorer.score(pairs, ["inversion", "suppression"])
    with pytest.raises(TraceError, match=r"model\.norm\.weight\b.*outside their ghost path"):
        GhostScorer(model, PAD, score_config()).probe_gradient(probe)
    hook.remove()
    scorer.score(pairs, ["inversion", "suppression"])  # and without the hook all is well again


def test_a_parameter_that_takes_no_part_is_named_and_scores_stay_exact() -> None:
    model = family_model("qwen2")
    model.model.unused = nn.Linear(8, 8)  # trainable, never called: G = 0, no contribution
    probe, pairs = (
        random_pairs(4, seed=50, prefix="probe", vocab=VOCAB),
        random_pairs(4, seed=51, vocab=VOCAB),
    )
    assert_exact(
        model,
        probe,
        pairs,
        unreached=r"^2 trainable parameter\(s\) .*: model\.unused\.weight, model\.unused\.bias$",
    )
