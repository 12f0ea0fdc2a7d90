"""The generic exact ghost fallback (trace_ds/scoring/fallback.py): modules owning trainable parameters
without a dedicated path, against the fp64 per-pair autograd reference and against the dedicated paths."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trace_ds.io import TraceError, write_jsonl
from trace_ds.scoring import fallback
from trace_ds.scoring.ghost import ghost_mode
from trace_ds.scoring.ghost_ops import GhostState, ProbeGradient
from trace_ds.scoring.scorer import GhostScorer

from .helpers import (
    assert_same_raw_scores,
    cosine_errors,
    ghost_scores,
    ghost_scores_and_norms,
    random_pairs,
    reference_scores,
    score_config,
    score_on_two_ranks,
)
from .test_scoring import tiny_model

METHODS = fallback.METHODS


@pytest.fixture(autouse=True)
def fresh_fallback_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no learnt method preference and no forced class or method."""
    monkeypatch.setattr(fallback, "_first_method", {})
    monkeypatch.setattr(fallback, "_rows_checked", set())
    monkeypatch.delenv(fallback.FORCE_ENV, raising=False)
    monkeypatch.delenv(fallback.METHOD_ENV, raising=False)


class ScaledSiLU(nn.Module):
    """silu(x) times a learnable per-channel gain: a module no dedicated ghost path knows."""

    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.empty(width).uniform_(0.5, 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) * self.gain


class GatedSiLU(nn.Module):
    """Own parameter plus a trainable child nn.Linear (which keeps its dedicated path): a nested owner."""

    def __init__(self, width: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(width).uniform_(0.5, 1.5))
        self.mix = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) * self.alpha + 0.3 * self.mix(x * self.alpha)


class TinyMoE(nn.Module):
    """Top-1 routing with a loop over the experts actually hit (data-dependent: vmap cannot trace it), the
    router's probability scaling each expert's output (so the router gets a gradient); tokens flattened."""

    def __init__(self, hidden: int, inter: int, experts: int):
        super().__init__()
        self.router = nn.Parameter(torch.randn(experts, hidden) * 0.5)
        self.w_in = nn.Parameter(torch.randn(experts, inter, hidden) * 0.2)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, inter) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weight, choice = torch.softmax(flat @ self.router.t(), -1).max(-1)
        out = torch.zeros_like(flat)
        for expert in torch.unique(choice).tolist():
            index = (choice == expert).nonzero().squeeze(-1)
            hidden = F.silu(flat[index] @ self.w_in[expert].t()) @ self.w_out[expert].t()
            out = out.index_add(0, index, hidden * weight[index, None])
        return out.reshape(x.shape)


def custom_model() -> nn.Module:
    """The tiny Llama with an nn.LayerNorm (weight and bias) as its final norm and a ScaledSiLU in every MLP."""
    model = tiny_model(tied=False)
    torch.manual_seed(3)
    norm = nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
    model.model.norm = norm
    for layer in model.model.layers:
        layer.mlp.act_fn = ScaledSiLU(48)
    return model


def scored(model: nn.Module, method: str | None = None, seed: int = 10, n: int = 9):
    cfg = score_config(beta=0.5)
    probe, pairs = random_pairs(5, seed=seed, prefix="probe"), random_pairs(n, seed=seed + 1)
    categories = [("suppression", "inversion", "unlearning")[i % 3] for i in range(len(pairs))]
    want, norms, g_norm = reference_scores(model, probe, pairs, categories, cfg)
    return probe, pairs, categories, cfg, want, norms, g_norm


def run_scorer(model, probe, pairs, categories, cfg) -> tuple[list[float], GhostScorer]:
    scorer = GhostScorer(model, pad_id=0, config=cfg)
    scorer.probe_gradient(probe)
    out: list[float] = []
    for start in range(0, len(pairs), cfg.micro_batch):
        out += scorer.score(
            pairs[start : start + cfg.micro_batch], categories[start : start + cfg.micro_batch]
        )
    return out, scorer


def fallback_norms(model, probe, pairs, categories, cfg) -> list[float]:
    """Ghost gradient norms ||g_i|| (the fallback's modules form their own per-pair gradients)."""
    return ghost_scores_and_norms(model, probe, pairs, categories, cfg)[1]


@pytest.mark.parametrize("method", METHODS)
def test_modules_without_a_path_score_like_the_fp64_reference(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fallback.METHOD_ENV, method)
    model = custom_model()
    probe, pairs, categories, cfg, want, norms, g_norm = scored(model)
    got, scorer = run_scorer(model, probe, pairs, categories, cfg)
    assert max(cosine_errors(got, want, norms, g_norm)) <= 1e-6
    assert any(abs(w) > 1e-3 * n * g_norm for w, n in zip(want, norms, strict=True))  # not trivially zero
    got_norms = fallback_norms(model, probe, pairs, categories, cfg)
    assert max(abs(a - b) / b for a, b in zip(got_norms, norms, strict=True)) <= 1e-6
    stats = fallback.stats_of(scorer.state)
    assert sorted(stats) == ["LayerNorm", "ScaledSiLU"]
    assert all(s.methods == {method} for s in stats.values())
    assert len(stats["ScaledSiLU"].modules) == 2 and stats["ScaledSiLU"].seconds > 0

    # only the fallback's own parameters trainable: the scores are theirs alone, still exact
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, ScaledSiLU)):
            module.requires_grad_(True)
    probe, pairs, categories, cfg, want, norms, g_norm = scored(model)
    got, _ = run_scorer(model, probe, pairs, categories, cfg)
    assert max(cosine_errors(got, want, norms, g_norm)) <= 1e-6
    got_norms = fallback_norms(model, probe, pairs, categories, cfg)
    assert max(abs(a - b) / b for a, b in zip(got_norms, norms, strict=True)) <= 1e-6


def test_nested_owner_scores_its_children_once() -> None:
    """A module owning a parameter and a trainable child nn.Linear: the child keeps its dedicated path (run
    once, in the fallback's recompute), the own parameter goes row by row."""
    model = tiny_model(tied=True)
    torch.manual_seed(4)
    model.model.layers[0].mlp.act_fn = GatedSiLU(48)
    probe, pairs, categories, cfg, want, norms, g_norm = scored(model, seed=20)
    got, scorer = run_scorer(model, probe, pairs, categories, cfg)
    assert max(cosine_errors(got, want, norms, g_norm)) <= 1e-6
    assert fallback.stats_of(scorer.state)["GatedSiLU"].methods == {"jvp"}


@pytest.mark.parametrize(("case", "method"), [("tied", m) for m in METHODS] + [("lora", "jvp")])
def test_forced_fallback_equals_the_dedicated_paths(
    case: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRACE_DS_GHOST_FALLBACK puts Linear, Embedding and RMSNorm on the fallback: same G, same scores."""
    model = tiny_model(tied=case == "tied", lora=case == "lora")
    cfg = score_config(beta=0.5)
    probe, pairs = random_pairs(4, seed=30, prefix="probe"), random_pairs(6, seed=31)
    categories = ["inversion", "suppression", "unlearning"] * 2
    dedicated, plain = run_scorer(model, probe, pairs, categories, cfg)
    assert not fallback.stats_of(plain.state)
    monkeypatch.setenv(fallback.FORCE_ENV, "Linear,Embedding,RMSNorm")
    monkeypatch.setenv(fallback.METHOD_ENV, method)
    forced, scorer = run_scorer(model, probe, pairs, categories, cfg)
    stats = fallback.stats_of(scorer.state)
    # with LoRA only the adapters' nn.Linear modules are trainable
    assert set(stats) == ({"Linear"} if case == "lora" else {"Linear", "Embedding", "LlamaRMSNorm"})
    assert all(s.methods == {method} for s in stats.values())
    _, norms, g_norm = reference_scores(model, probe, pairs, categories, cfg)
    assert max(cosine_errors(forced, dedicated, norms, g_norm)) <= 1e-6
    if case == "lora":  # per-pair gradients of the forced modules' own parameters: the same norms
        got_norms = fallback_norms(model, probe, pairs, categories, cfg)
        assert max(abs(a - b) / b for a, b in zip(got_norms, norms, strict=True)) <= 1e-6
    else:  # a tied weight on the generic path: its cross term is not implemented, refused by name
        with pytest.raises(TraceError, match="tied"):
            fallback_norms(model, probe, pairs, categories, cfg)
    g_plain, g_forced = plain.state.store.tensors, scorer.state.store.tensors
    assert g_plain.keys() == g_forced.keys()
    for key, tensor in g_plain.items():
        torch.testing.assert_close(g_forced[key], tensor, rtol=1e-5, atol=1e-7)


def test_forced_fallback_with_gradient_checkpointing(monkeypatch: pytest.MonkeyPatch) -> None:
    from trace_ds.models.loading import enable_gradient_checkpointing

    model = custom_model()
    probe, pairs = random_pairs(3, 50, "probe"), random_pairs(5, 51)
    categories = ["inversion", "suppression", "inversion", "suppression", "inversion"]
    monkeypatch.setenv(fallback.FORCE_ENV, "RMSNorm")
    plain = ghost_scores(model, probe, pairs, categories)
    enable_gradient_checkpointing(model)
    checkpointed = ghost_scores(model, probe, pairs, categories)
    _, norms, g_norm = reference_scores(model, probe, pairs, categories, score_config())
    assert max(cosine_errors(plain, checkpointed, norms, g_norm)) <= 1e-6


def test_data_dependent_routing_goes_row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MoE block whose expert loop depends on the routing: forward mode handles it; starting at vmap,
    vmap fails on the data-dependent loop and the row-by-row path takes over; both exact."""
    model = tiny_model(tied=True)
    torch.manual_seed(5)
    model.model.layers[1].mlp = TinyMoE(32, 24, 3)
    probe, pairs, categories, cfg, want, norms, g_norm = scored(model, seed=40)
    got, scorer = run_scorer(model, probe, pairs, categories, cfg)
    assert max(cosine_errors(got, want, norms, g_norm)) <= 1e-6
    assert fallback.stats_of(scorer.state)["TinyMoE"].methods == {"jvp"}

    monkeypatch.setenv(fallback.METHOD_ENV, "vmap")
    got, scorer = run_scorer(model, probe, pairs, categories, cfg)
    assert max(cosine_errors(got, want, norms, g_norm)) <= 1e-6
    stats = fallback.stats_of(scorer.state)["TinyMoE"]
    assert stats.methods == {"rows"} and "vmap" in stats.skipped
    assert fallback._first_method[TinyMoE] == METHODS.index("rows")  # not retried on every call


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager", "batched_mm"])
def test_moe_dedicated_paths_equal_the_forced_fallback(
    implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny Mixtral: its router and fused experts take the dedicated paths (trace_ds/scoring/moe.py) with each
    of transformers' experts implementations, exactly; forced onto the fallback (TRACE_DS_GHOST_FALLBACK) they
    give the same G and scores. There, grouped_mm experts (no forward-AD formula) move on to vmap, and the eager
    loop over the experts hit runs in forward mode, or row by row when started at vmap (which cannot trace it)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.config._experts_implementation = "eager"  # the fp64 reference: grouped_mm has no fp64 kernel
    probe, pairs, categories, cfg, want, norms, g_norm = scored(model, seed=60, n=4)
    model.config._experts_implementation = implementation

    dedicated, plain = run_scorer(model, probe, pairs, categories, cfg)
    assert not fallback.stats_of(plain.state)
    assert max(cosine_errors(dedicated, want, norms, g_norm)) <= 1e-6

    monkeypatch.setenv(fallback.FORCE_ENV, "Experts,TopKRouter")
    starts = {"grouped_mm": [(None, "vmap")], "eager": [(None, "jvp"), ("vmap", "rows")]}
    for start, method in starts.get(implementation, [(None, None)]):
        monkeypatch.setattr(fallback, "_first_method", {})
        if start:
            monkeypatch.setenv(fallback.METHOD_ENV, start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # functorch: no batching rule for grouped_mm (slow, still exact)
            forced, scorer = run_scorer(model, probe, pairs, categories, cfg)
        assert max(cosine_errors(forced, dedicated, norms, g_norm)) <= 1e-6, (implementation, start)
        stats = fallback.stats_of(scorer.state)
        assert set(stats) == {"MixtralTopKRouter", "MixtralExperts"}
        if method:
            assert stats["MixtralExperts"].methods == {method}, (implementation, start, stats)
        g_plain, g_forced = plain.state.store.tensors, scorer.state.store.tensors
        assert g_plain.keys() == g_forced.keys()
        for key, tensor in g_plain.items():
            scale = float(tensor.abs().max())  # fp32 sums in another order: relative to the largest entry
            torch.testing.assert_close(g_forced[key], tensor, rtol=1e-5, atol=1e-5 * scale)


def _one_backward(module: nn.Module, state: GhostState, x: torch.Tensor, grad_out: torch.Tensor):
    with ghost_mode(module, state):
        leaf = x.clone().requires_grad_(True)
        module(leaf).backward(grad_out)
    return leaf.grad


@pytest.mark.parametrize("method", METHODS)
def test_padding_counts_nothing_and_the_input_gradient_is_autograds(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output gradients that are NOT zero on padded positions: the fallback still counts real tokens only
    (as the dedicated path selects them) and returns autograd's input gradient, padding included."""
    torch.manual_seed(6)
    layer = nn.Linear(5, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    x, grad_out = torch.randn(3, 4, 5), torch.randn(3, 4, 3)
    g = {id(layer.weight): torch.randn(3, 5), id(layer.bias): torch.randn(3)}
    results = {}
    for forced in (False, True):
        if forced:
            monkeypatch.setenv(fallback.FORCE_ENV, "Linear")
            monkeypatch.setenv(fallback.METHOD_ENV, method)
        probe = GhostState("probe", ProbeGradient())
        probe.set_batch(mask)
        _one_backward(layer, probe, x, grad_out)
        store = ProbeGradient()
        store.tensors = dict(g)
        score = GhostState("score", store)
        score.set_batch(mask)
        grad_x = _one_backward(layer, score, x, grad_out)
        results[forced] = (probe.store.tensors, score.scores, grad_x)
    (g_ded, s_ded, x_ded), (g_fb, s_fb, x_fb) = results[False], results[True]
    keep = mask[..., None].float()
    want = torch.stack(
        [
            ((grad_out[r] * keep[r]).t() @ x[r] * g[id(layer.weight)]).sum()
            + ((grad_out[r] * keep[r]).sum(0) * g[id(layer.bias)]).sum()
            for r in range(3)
        ]
    )
    torch.testing.assert_close(s_fb, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_fb, s_ded, rtol=1e-5, atol=1e-6)
    for key in g:
        torch.testing.assert_close(g_fb[key], g_ded[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_fb, grad_out @ layer.weight.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_fb, x_ded, rtol=1e-6, atol=1e-6)


class ReturnsObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> object:
        return type("Box", (), {"value": x * self.w})()


class NoRowAxis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum(0)


class MixesRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + x.mean(0, keepdim=True)


class TakesABox(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor, box: object) -> torch.Tensor:
        return x * self.w + box.value  # type: ignore[attr-defined]


def test_an_argument_hiding_a_gradient_is_refused() -> None:
    module = TakesABox()
    state = GhostState("score", ProbeGradient())
    state.set_batch(torch.ones(3, 4, dtype=torch.long))
    box = type("Box", (), {})()
    box.value = torch.randn(3, 4, 5, requires_grad=True)
    with (
        ghost_mode(module, state),
        pytest.raises(TraceError, match="receives a Box holding tensors that need"),
    ):
        module(torch.randn(3, 4, 5), box)


@pytest.mark.parametrize(
    ("module", "method", "message"),
    [
        (ReturnsObject(), "jvp", "cannot map its output of type Box"),
        (NoRowAxis(), "jvp", "cannot map its output of shape \\(4, 5\\)"),
        (MixesRows(), "jvp", "it mixes rows"),
        (MixesRows(), "vmap", "it mixes rows"),
        (MixesRows(), "rows", "it mixes rows"),
    ],
)
def test_modules_the_fallback_cannot_score_are_refused(
    module: nn.Module, method: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fallback.METHOD_ENV, method)
    store = ProbeGradient()
    store.tensors = {id(module.w): torch.randn(5)}
    state = GhostState("score", store)
    state.set_batch(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TraceError, match=message) as info:
        _one_backward(module, state, torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    assert type(module).__name__ in str(info.value) and "ghost.py" in str(info.value)


def tiny_run_inputs(root: Path, n: int = 9) -> tuple[Path, Path]:
    """A bare tiny Llama folder and pre-tokenized triaged pairs (no tokenizer needed)."""
    import random

    from trace_ds.models.tiny import build_tiny_llama

    build_tiny_llama(root / "model", vocab_size=120, hidden_size=32, intermediate_size=48)
    rng = random.Random(0)
    records = []
    for i in range(n):
        ids = [rng.randrange(4, 120) for _ in range(10)]
        records.append(
            {
                "id": f"p{i}",
                "prompt_input_ids": [1, *ids[: 2 + i % 4]],
                "chosen_input_ids": [*ids[6 : 7 + i % 3], 2],
                "rejected_input_ids": [*ids[8:], 2],
                "category": ("retention", "inversion", "suppression")[i % 3],
            }
        )
    write_jsonl(root / "triaged.jsonl", records)
    return root / "model", root / "triaged.jsonl"


def test_scoring_run_reports_the_fallback_modules(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trace-ds score` prints which classes took the fallback and their time, and records it in the meta."""
    from trace_ds.config import ScoreConfig
    from trace_ds.scoring.scorer import run_score

    model, triaged = tiny_run_inputs(tmp_path)
    monkeypatch.setenv(fallback.FORCE_ENV, "RMSNorm")
    config = ScoreConfig(
        model=str(model),
        triaged=str(triaged),
        out=str(tmp_path / "scores.jsonl"),
        probe_size=3,
        micro_batch=4,
        kernel="torch",
        allow_empty=True,
    )
    meta = run_score(config)
    printed = " ".join(capsys.readouterr().err.split())
    assert "ghost fallback (generic exact path" in printed and "LlamaRMSNorm (5 modules, jvp)" in printed
    saved = json.loads((tmp_path / "scores.meta.json").read_text())
    assert saved == meta and saved["timings"]["ghost_fallback_s"] > 0
    assert saved["ghost_fallback"]["LlamaRMSNorm"]["modules"] == 5


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["jvp", "rows"])
def test_zero3_two_ranks_on_the_fallback_equal_one_process_on_the_dedicated_paths(
    method: str, tmp_path: Path
) -> None:
    """Every module forced onto the fallback under 2-rank ZeRO-3 (partitioned parameters and G): the scores
    of one process on the dedicated paths."""

    from click.testing import CliRunner

    from trace_ds.cli import main

    from .helpers import read_lines as lines

    model, triaged = tiny_run_inputs(tmp_path, n=24)
    args = ["--model", str(model), "--triaged", str(triaged), "--probe-size", "6", "--micro-batch", "3"]
    args += ["--beta", "0.5", "--allow-empty", "--kernel", "torch"]
    one = tmp_path / "one" / "s.jsonl"
    result = CliRunner().invoke(main, ["score", *args, "--out", str(one)])
    assert result.exit_code == 0, result.output

    two = tmp_path / "two" / "s.jsonl"
    forced = {fallback.FORCE_ENV: "Linear,Embedding,RMSNorm", fallback.METHOD_ENV: method}
    score_on_two_ranks(args, two, forced)
    assert_same_raw_scores(lines(one), lines(two))
    meta = json.loads((tmp_path / "two" / "s.meta.json").read_text())
    assert (meta["world_size"], meta["zero_stage"]) == (2, 3)
    assert set(meta["ghost_fallback"]) == {"Linear", "Embedding", "LlamaRMSNorm"}
    # ZeRO-3 swaps F.linear for its own autograd function, which has no forward-AD formula: nn.Linear
    # moves on to vmap there (the chain at work); the others stay on the method asked for
    later = METHODS[METHODS.index(method) :]
    assert all(c["method"] in later for c in meta["ghost_fallback"].values()), meta["ghost_fallback"]
    assert meta["ghost_fallback"]["LlamaRMSNorm"]["method"] == method
