"""Exact per-sequence ghost dot products <grad_theta L_seq, G> for every trainable parameter, never
materialising a per-sample gradient.

Each supported module kind runs through a custom autograd function while scoring. Its backward computes
the input gradient as usual, skips the weight-gradient GEMM, and instead adds to a per-sequence score:

* linear ``y = W a (+ b)``: sum_t delta_t^T G_W a_t (the fused kernel), plus sum_t delta_t . G_b;
* embedding ``y = E[x]``: sum_t <G_E[x_t], delta_t> (gather-dot) over tokens other than ``padding_idx``
  (F.embedding gives that row no gradient); a scaled embedding (Gemma) multiplies outside the function, so
  delta is the gradient w.r.t. the raw lookup;
* RMSNorm ``y = f(n(x), w)`` with dy/dw = n (Llama's ``w * n``, OLMo 2's cast after the product, Gemma's
  ``(1 + w) * n``): sum_t <delta_t * n_t, G_w>, over every entry of the token (all heads of a q/k norm).

Every replacement forward computes exactly what the module's own forward does (same ops, same casts), so
logits in ghost mode equal the plain model's bitwise; a norm or embedding subclass is recognised by its
code, not its name. Each op checks that the tensor it receives has the batch's (rows, length) layout (a
norm: rows first and one token dimension anywhere before the features) and refuses anything else.

The same functions, in ``probe`` mode, accumulate the full weight gradient of the probe objective into
the :class:`ProbeGradient` store instead (that is G). A tied parameter is one entry of the store, and every
use of it adds to the same score, so it is counted exactly once. Hooking the computation inside autograd
(not module hooks) keeps this correct under gradient checkpointing, whose recomputed forward runs the same
functions and whose backward runs once. :func:`check_coverage` checks after each backward that no trainable
parameter got a gradient outside these paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trace_ds.io import TraceError
from trace_ds.scoring.ghost_ops import (
    GhostLinear,
    GhostState,
    class_matches,
    full_shape,
    param_needs,
)


class _GhostEmbedding(torch.autograd.Function):
    """The raw lookup E[x]; a subclass's own scaling is applied outside, so delta here is d loss / d E[x]."""

    @staticmethod
    def forward(
        ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, state: GhostState
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx, ctx.state = weight, padding_idx, state
        if state.norms is not None and state.token_index is not None:  # a tied head's cross term needs them
            state.norms.input_ids = ids.reshape(-1).index_select(0, state.token_index)
            state.norms.token_rows = state.token_rows()
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (ids,) = ctx.saved_tensors
        weight, padding_idx, state = ctx.weight, ctx.padding_idx, ctx.state
        if param_needs(weight):
            assert state.token_index is not None
            rows = ids.reshape(-1).index_select(0, state.token_index)
            d = state.select(grad_out).float()
            # F.embedding gives the padding_idx row no gradient: a real token equal to it (pad = eos is
            # common) adds nothing to the embedding's G or score (a tied head's use of that row still does).
            if state.mode == "probe":
                if padding_idx is not None:
                    d = d.masked_fill((rows == padding_idx)[:, None], 0.0)
                state.store.index_add(weight, rows, d)
            else:
                per_token = (state.store.select_rows(weight, rows).float() * d).sum(-1)
                if padding_idx is not None:
                    per_token = per_token.masked_fill(rows == padding_idx, 0.0)
                state.add_token_scores(per_token)
            if state.norms is not None:
                kept = d if padding_idx is None else d.masked_fill((rows == padding_idx)[:, None], 0.0)
                state.norms.add_embedding(rows, kept, state.token_rows(), weight, full_shape(weight)[0])
            state.touched.add(id(weight))
        return None, None, None, None


# ---- RMSNorms: each family's forward, op for op and cast for cast, returning (y, n) with y = f(n, w) ----


def _llama_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama, Mistral, Qwen2/3, Phi-3, Granite: normalise in fp32, cast to the input dtype, then times w."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    normed = (hidden * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, normed


def _olmo2_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMo 2: w times the fp32 normalised x, then cast to the input dtype."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    normed = hidden * torch.rsqrt(variance + eps)
    return (weight * normed).to(x.dtype), normed


def _offset_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma, Gemma 2, Gemma 3: (1 + w) in fp32 times the fp32 normalised x, then cast to the input dtype."""
    hidden = x.float()
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).type_as(x), normed


@dataclass(frozen=True)
class _NormKind:
    """An RMSNorm formula, recognised by the source of the module's methods (compared as syntax trees, so
    comments, docstrings, annotations and formatting do not matter): a class whose code is not exactly one of
    these gets no norm path, whatever its name."""

    name: str
    compute: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    eps_attr: str
    source: str


_NORM_KINDS = (
    _NormKind(
        "llama",
        _llama_norm,
        "variance_epsilon",
        """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
""",
    ),
    _NormKind(
        "olmo2",
        _olmo2_norm,
        "variance_epsilon",
        """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * hidden_states).to(input_dtype)
""",
    ),
    _NormKind(
        "offset",
        _offset_norm,
        "eps",
        """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""",
    ),
)

# Gemma's *ScaledWordEmbedding: the lookup times embed_scale (a buffer) in the weight's dtype.
_SCALED_EMBEDDING_SOURCE = """
def forward(self, input_ids):
    return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)
"""


def norm_kind(module: nn.Module) -> _NormKind | None:
    """The norm formula ``module`` computes, if it is one we have an exact path for."""
    own = dict(module.named_parameters(recurse=False))
    if list(own) != ["weight"] or len(full_shape(own["weight"])) != 1:
        return None
    for kind in _NORM_KINDS:
        eps = getattr(module, kind.eps_attr, None)
        if isinstance(eps, (int, float)) and class_matches(type(module), kind.source):
            return kind
    return None


def embedding_scaled(module: nn.Embedding) -> bool | None:
    """False for a plain nn.Embedding, True for a scaled word embedding (Gemma), None for any other forward."""
    cls = type(module)
    if cls.forward is nn.Embedding.forward:
        return False
    parent_forward = getattr(super(cls, module).forward, "__func__", None)
    if (
        parent_forward is nn.Embedding.forward
        and isinstance(getattr(module, "embed_scale", None), torch.Tensor)
        and class_matches(cls, _SCALED_EMBEDDING_SOURCE)
    ):
        return True
    return None


class _GhostNorm(torch.autograd.Function):
    """y = f(n(x), w) for one of the norm formulas above: dy/dw = n elementwise, so a token's term is
    <delta_t * n_t, G_w> summed over its other leading dims (heads, for per-head q/k norms)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        kind: _NormKind,
        eps: float,
        token_dim: int,
        state: GhostState,
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.kind, ctx.eps, ctx.token_dim, ctx.state = weight, kind, eps, token_dim, state
        return kind.compute(x, weight, eps)[0]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        weight, state = ctx.weight, ctx.state
        with torch.enable_grad():  # the input gradient through the family's own ops, w held constant
            leaf = x.detach().requires_grad_(True)
            out, normed = ctx.kind.compute(leaf, weight.detach(), ctx.eps)
            (grad_x,) = torch.autograd.grad(out, leaf, grad_out)
        if param_needs(weight):
            d = state.select_tokens(grad_out, ctx.token_dim).float()
            n = state.select_tokens(normed.detach(), ctx.token_dim).float()
            dn = d * n  # (T, K, features)
            if state.mode == "probe":
                state.store.add(weight, dn.sum((0, 1)))
            else:
                state.add_token_scores(dn.sum(1).matmul(state.store.full(weight).float()))
            if state.norms is not None:
                state.norms.add_vector(dn.sum(1), state.token_rows())
            state.touched.add(id(weight))
        return grad_x, None, None, None, None, None


def _linear_forward(module: nn.Linear, state: GhostState) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        state.check_tokens(module, x)
        return GhostLinear.apply(x, module.weight, module.bias, state)

    return forward


def _embedding_forward(module: nn.Embedding, scaled: bool, state: GhostState) -> Callable:
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise TraceError(
            f"embedding {module} uses max_norm/scale_grad_by_freq/sparse, which have no exact ghost path"
        )

    def forward(ids: torch.Tensor) -> torch.Tensor:
        state.check_tokens(module, ids, features=False)
        out = _GhostEmbedding.apply(ids, module.weight, module.padding_idx, state)
        if scaled:  # the subclass's own forward, op for op, on the ghost lookup
            out = out * module.embed_scale.to(module.weight.dtype)
        return out

    return forward


def _norm_forward(module: nn.Module, kind: _NormKind, state: GhostState) -> Callable:
    eps = getattr(module, kind.eps_attr)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _GhostNorm.apply(x, module.weight, kind, eps, state.token_dim(module, x), state)

    return forward


def ghost_forward_for(module: nn.Module, state: GhostState) -> Callable | None:
    """The replacement forward for a module that owns trainable parameters, or None if it owns none. Each path
    computes exactly what the module's own forward does (a subclass that changes the forward gets a path only
    when that change is reproduced here, as for Gemma's scaled embeddings)."""
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    from trace_ds.scoring.fallback import fallback_forward, forced_fallback

    if forced_fallback(module):  # TRACE_DS_GHOST_FALLBACK: a dedicated path's module on the fallback (tests)
        return fallback_forward(module, state)
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return _linear_forward(module, state)
    if isinstance(module, nn.Embedding):
        scaled = embedding_scaled(module)
        if scaled is not None:
            return _embedding_forward(module, scaled, state)
    norm = norm_kind(module)
    if norm is not None:
        return _norm_forward(module, norm, state)
    from trace_ds.scoring.moe import moe_forward_for

    moe = moe_forward_for(module, state)
    if moe is not None:
        return moe
    return fallback_forward(module, state)  # any other owner: the generic exact path (scoring/fallback.py)


_ACTIVE: dict[int, GhostState] = {}  # id(module) -> the state of the ghost mode it is in


def active_state(module: nn.Module) -> GhostState | None:
    """The ghost state ``module`` runs under, or None outside ghost mode (or for a module that owns no
    trainable parameter). The vocabulary-chunked head asks: it computes lm_head's ghost dot itself."""
    return _ACTIVE.get(id(module))


@contextlib.contextmanager
def ghost_mode(model: nn.Module, state: GhostState) -> Iterator[list[nn.Parameter]]:
    """Route every module that owns trainable parameters through the ghost functions; yields the trainable
    parameters covered (each once, tied ones included once) and restores the original forwards on exit."""
    patched: list[tuple[nn.Module, Any]] = []
    covered: dict[int, nn.Parameter] = {}
    owners: dict[int, list[str]] = {}
    try:
        for name, module in model.named_modules():
            state.names[id(module)] = name
            forward = ghost_forward_for(module, state)
            if forward is None:
                continue
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward  # instance attribute: module hooks (ZeRO-3's gathers) still run
            _ACTIVE[id(module)] = state
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    covered[id(param)] = param
                    owners.setdefault(id(param), []).append(name)
        state.shared = {key: names for key, names in owners.items() if len(names) > 1}
        trainable = {id(p): p for p in model.parameters() if p.requires_grad}
        if covered.keys() != trainable.keys():
            raise TraceError("internal: ghost coverage differs from the trainable parameters")
        yield list(covered.values())
    finally:
        for module, original in patched:
            _ACTIVE.pop(id(module), None)
            if original is None:
                del module.forward
            else:
                module.forward = original


def check_coverage(model: nn.Module, state: GhostState) -> list[str]:
    """After a backward in ghost mode (the caller cleared the trainable parameters' ``.grad`` before it): a
    parameter whose ``.grad`` is set was used outside its module's forward (a hook, the model's own code), so
    the scores would miss that use; a parameter a ghost path reached that is not a trainable parameter of the
    model means the two disagree. Both are errors naming the parameters. Returns the names of trainable
    parameters no ghost backward has reached so far (their G is 0 / they add nothing)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    leaked = [name for name, p in named if p.grad is not None]
    if leaked:
        raise TraceError(
            f"trainable parameter(s) {names_listing(leaked)} received a gradient outside their ghost path: they are "
            "used outside their module's forward (by a hook, or by the model's own code, e.g. a head that reads "
            "the embedding matrix directly), and the exact scorer would miss that use. Freeze them "
            "(requires_grad=False) or route every use through the module"
        )
    stray = state.touched - {id(p) for _, p in named}
    if stray:
        raise TraceError(
            f"internal: ghost paths reached {len(stray)} parameter(s) that are not trainable parameters of the "
            "model being scored (was a module's weight replaced while scoring?)"
        )
    return [name for name, p in named if id(p) not in state.touched]


def names_listing(names: list[str], limit: int = 20) -> str:
    """``a, b, c`` (the first ``limit`` names, then how many more)."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
