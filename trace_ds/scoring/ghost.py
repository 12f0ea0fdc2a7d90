"""Exact per-sequence ghost dot products <grad_theta L_seq, G> for every trainable parameter, never
materialising a per-sample gradient.

Each supported module kind runs through a custom autograd function while scoring. Its backward computes
the input gradient as usual, skips the weight-gradient GEMM, and instead adds to a per-sequence score:

* linear ``y = W a (+ b)``: sum_t delta_t^T G_W a_t (the fused kernel), plus sum_t delta_t . G_b;
* embedding ``y = E[x]``: sum_t <G_E[x_t], delta_t> (gather-dot);
* RMSNorm ``y = w * n(x)``: sum_t <delta_t * n_t, G_w> (elementwise).

The same functions, in ``probe`` mode, accumulate the full weight gradient of the probe objective into
the :class:`ProbeGradient` store instead (that is G). A tied parameter is one entry of the store, and every
use of it adds to the same score, so it is counted exactly once. Hooking the computation inside autograd
(not module hooks) keeps this correct under gradient checkpointing, whose recomputed forward runs the same
functions and whose backward runs once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trace_ds.io import TraceError

Mode = Literal["probe", "score"]


class ProbeGradient:
    """G, one fp32 tensor per trainable parameter. ``full`` gives the whole tensor for a layer's backward;
    ``add`` accumulates a full-size gradient. Subclassed for ZeRO-3, where each rank keeps only its shard."""

    def __init__(self) -> None:
        self.tensors: dict[int, torch.Tensor] = {}

    def full(self, param: torch.Tensor) -> torch.Tensor:
        try:
            return self.tensors[id(param)]
        except KeyError:
            raise TraceError("no probe gradient for a parameter; run the probe pass first") from None

    def add(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        key = id(param)
        if key in self.tensors:
            self.tensors[key] += grad.float()
        else:
            self.tensors[key] = grad.detach().float().clone()

    def scale_(self, factor: float) -> None:
        for tensor in self.tensors.values():
            tensor.mul_(factor)

    def zeros_for(self, params: list[nn.Parameter]) -> None:
        """Make sure every parameter has an entry (a parameter the probe never reached has G = 0)."""
        for param in params:
            if id(param) not in self.tensors:
                self.tensors[id(param)] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)


@dataclass
class GhostState:
    """What the autograd functions need during one backward: which tokens count and where results go."""

    mode: Mode
    store: ProbeGradient
    kernel: str = "torch"
    token_index: torch.Tensor | None = None  # (T,) flat indices of the real tokens in (rows * length)
    lengths: torch.Tensor | None = None  # (rows,) real tokens per row, in row order
    scores: torch.Tensor | None = None  # (rows,) fp32, per-row score accumulator (score mode)
    touched: set[int] = field(default_factory=set)  # ids of parameters that took part (coverage check)

    def set_batch(self, attention_mask: torch.Tensor) -> None:
        flat = attention_mask.reshape(-1)
        self.token_index = torch.nonzero(flat, as_tuple=False).squeeze(-1)
        self.lengths = attention_mask.sum(-1)
        self.scores = torch.zeros(attention_mask.shape[0], dtype=torch.float32, device=attention_mask.device)

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """(rows, length, d) -> (T, d) real tokens only, in row order: padding is excluded by selection."""
        assert self.token_index is not None
        return tensor.reshape(-1, tensor.shape[-1]).index_select(0, self.token_index)

    def offsets(self) -> torch.Tensor:
        assert self.lengths is not None
        return torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])

    def add_token_scores(self, per_token: torch.Tensor) -> None:
        """Sum per-token values into their rows, deterministically (segment reduction, no atomics)."""
        assert self.scores is not None and self.lengths is not None
        self.scores += torch.segment_reduce(per_token.float(), "sum", lengths=self.lengths)


def _param_needs(param: torch.Tensor | None) -> bool:
    return param is not None and param.requires_grad


class _GhostLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: GhostState
    ) -> torch.Tensor:
        # Parameters are kept on ctx, not saved: a saved tensor comes back as a new object under activation
        # checkpointing, and G is keyed by the parameter's identity.
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.state = weight, bias, state
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        weight, bias, state = ctx.weight, ctx.bias, ctx.state
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        if _param_needs(weight) or _param_needs(bias):
            a, d = state.select(x), state.select(grad_out)
            if state.mode == "probe":
                if _param_needs(weight):
                    state.store.add(weight, d.float().t().matmul(a.float()))
                if _param_needs(bias):
                    state.store.add(bias, d.float().sum(0))
            else:
                if _param_needs(weight):
                    from trace_ds.kernels.ghost_dot import ghost_dot

                    g = state.store.full(weight)
                    state.scores += ghost_dot(
                        a,
                        d,
                        g.to(a.dtype) if a.dtype != torch.float32 else g,
                        state.offsets(),
                        backend=state.kernel,
                    )
                if _param_needs(bias):
                    state.add_token_scores(d.float().matmul(state.store.full(bias)))
            state.touched.update(id(p) for p in (weight, bias) if _param_needs(p))
        return grad_x, None, None, None


class _GhostEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, state: GhostState
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.state = weight, state
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (ids,) = ctx.saved_tensors
        weight, state = ctx.weight, ctx.state
        if _param_needs(weight):
            assert state.token_index is not None
            rows = ids.reshape(-1).index_select(0, state.token_index)
            d = state.select(grad_out).float()
            if state.mode == "probe":
                grad = torch.zeros(weight.shape, dtype=torch.float32, device=d.device).index_add_(0, rows, d)
                state.store.add(weight, grad)
            else:
                state.add_token_scores((state.store.full(weight).index_select(0, rows) * d).sum(-1))
            state.touched.add(id(weight))
        return None, None, None, None


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm without the weight, in fp32 then cast back (as LlamaRMSNorm does)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _GhostRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, state: GhostState
    ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.eps, ctx.state = weight, eps, state
        return weight * _rms_normalize(x, eps)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        weight, state = ctx.weight, ctx.state
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            normed = _rms_normalize(leaf, ctx.eps)
            (grad_x,) = torch.autograd.grad(weight.detach() * normed, leaf, grad_out)
        if _param_needs(weight):
            d, n = state.select(grad_out).float(), state.select(normed.detach()).float()
            if state.mode == "probe":
                state.store.add(weight, (d * n).sum(0))
            else:
                state.add_token_scores((d * n).matmul(state.store.full(weight)))
            state.touched.add(id(weight))
        return grad_x, None, None, None


def _linear_forward(module: nn.Linear, state: GhostState) -> Callable:
    return lambda x: _GhostLinear.apply(x, module.weight, module.bias, state)


def _embedding_forward(module: nn.Embedding, state: GhostState) -> Callable:
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise TraceError(
            f"embedding {module} uses max_norm/scale_grad_by_freq/sparse, which have no exact ghost path"
        )
    return lambda ids: _GhostEmbedding.apply(ids, module.weight, module.padding_idx, state)


def _rmsnorm_forward(module: nn.Module, state: GhostState) -> Callable:
    return lambda x: _GhostRMSNorm.apply(x, module.weight, float(module.variance_epsilon), state)


def _is_llama_rmsnorm(module: nn.Module) -> bool:
    """RMSNorms computing ``weight * normalize(x)`` (Llama, Mistral, Qwen2, ...). Gemma's ``(1 + w)`` is not."""
    name = type(module).__name__
    return name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and "Gemma" not in name


def ghost_forward_for(module: nn.Module, state: GhostState) -> Callable | None:
    """The replacement forward for a module that owns trainable parameters, or None if it owns none."""
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    if isinstance(module, nn.Linear):
        return _linear_forward(module, state)
    if isinstance(module, nn.Embedding):
        return _embedding_forward(module, state)
    if _is_llama_rmsnorm(module):
        return _rmsnorm_forward(module, state)
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    raise TraceError(
        f"{type(module).__name__} owns trainable parameters {names} with no exact ghost path "
        "(supported: nn.Linear, nn.Embedding, Llama-style RMSNorm); freeze them or add a path in scoring/ghost.py"
    )


@contextlib.contextmanager
def ghost_mode(model: nn.Module, state: GhostState) -> Iterator[list[nn.Parameter]]:
    """Route every module that owns trainable parameters through the ghost functions; yields the trainable
    parameters covered (each once, tied ones included once) and restores the original forwards on exit."""
    patched: list[tuple[nn.Module, Any]] = []
    covered: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            forward = ghost_forward_for(module, state)
            if forward is None:
                continue
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward  # instance attribute: module hooks (ZeRO-3's gathers) still run
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    covered[id(param)] = param
        trainable = {id(p): p for p in model.parameters() if p.requires_grad}
        if covered.keys() != trainable.keys():
            raise TraceError("internal: ghost coverage differs from the trainable parameters")
        yield list(covered.values())
    finally:
        for module, original in patched:
            if original is None:
                del module.forward
            else:
                module.forward = original
