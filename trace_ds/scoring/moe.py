"""Exact ghost paths for mixture-of-experts layers: fused expert tensors and top-k routers (issue 11).

transformers 5 holds a layer's experts as two stacked parameters, ``gate_up_proj`` (experts, 2 I, H) and
``down_proj`` (experts, H, I), and calls them as ``experts(h, top_k_index, top_k_weights)`` on the flattened
tokens; each token t is sent to k experts, and its output is sum_k w_tk * down_e(act(gate_e x_t) * up_e x_t).
Per expert e these are two linear layers over the token slots routed to e, so the score of a row is, per
expert, the ghost dot sum_s delta_s^T G_e a_s over that row's slots, with the routing weight inside delta
(delta_down = w_s * dL/dy_t). The backward recomputes each expert's slots with autograd (the input gradients
and the deltas), runs the fused kernel per expert on the slots sorted by row, and never forms a per-expert,
per-row gradient. G is read one expert at a time (:meth:`ProbeGradient.piece`; under ZeRO-3 only that
expert's slice is gathered), for every expert, in order, on every rank, whether or not the rank routed a
token to it: the collectives must match across ranks.

The router's weight is used by one ``F.linear`` over the flattened tokens: the linear ghost path, followed by
the router's own softmax and top-k. Both module kinds are recognised by their code (as the norms in
``ghost.py``), so another family with the same code (OLMoE, Qwen2-MoE) takes these paths too; any other MoE
code takes the generic fallback. The forward of the experts is the model's own (eager loop, ``grouped_mm``
or ``batched_mm``), so logits are unchanged bitwise; the backward recompute follows the eager loop's ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trace_ds.scoring.ghost_ops import GhostLinear, GhostState, class_matches, param_needs, row_offsets

_EXPERTS_SOURCE = """
def forward(self, hidden_states, top_k_index, top_k_weights):
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, self.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))

    return final_hidden_states
"""

# transformers' implementations of that forward (``config._experts_implementation``): the same maths
_IMPLEMENTATIONS = (None, "eager", "grouped_mm", "batched_mm")
# attributes transformers' ``use_experts_implementation`` sets, at the values the recompute assumes
_LAYOUT = {"has_bias": False, "has_gate": True, "is_transposed": False, "is_concatenated": True}


def _mixtral_router(module: nn.Module, hidden: torch.Tensor, linear: Callable) -> tuple:
    """Mixtral: softmax in fp32, top-k, renormalised (kept in fp32)."""
    hidden_states = hidden.reshape(-1, module.hidden_dim)
    router_logits = linear(hidden_states)
    router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, module.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    return router_logits, router_top_value, router_indices


def _qwen_router(module: nn.Module, hidden: torch.Tensor, linear: Callable) -> tuple:
    """Qwen2/3-MoE, OLMoE: softmax in fp32, top-k, renormalised if norm_topk_prob, cast to the logits' dtype."""
    hidden_states = hidden.reshape(-1, module.hidden_dim)
    router_logits = linear(hidden_states)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, module.top_k, dim=-1)
    if module.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    return router_logits, router_top_value, router_indices


@dataclass(frozen=True)
class _RouterKind:
    compute: Callable[[nn.Module, torch.Tensor, Callable], tuple]
    source: str


_ROUTER_KINDS = (
    _RouterKind(
        _mixtral_router,
        """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
""",
    ),
    _RouterKind(
        _qwen_router,
        """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
""",
    ),
)


def _own_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False)]


def _router_kind(module: nn.Module) -> _RouterKind | None:
    if _own_names(module) != ["weight"] or not all(hasattr(module, a) for a in ("hidden_dim", "top_k")):
        return None
    return next((k for k in _ROUTER_KINDS if class_matches(type(module), k.source)), None)


def _is_fused_experts(module: nn.Module) -> bool:
    if sorted(_own_names(module)) != ["down_proj", "gate_up_proj"] or not hasattr(module, "act_fn"):
        return False
    if any(getattr(module, attr, value) != value for attr, value in _LAYOUT.items()):
        return False
    if getattr(module, "has_post_expert_norm", False):
        return False
    config = getattr(module, "config", None)
    if getattr(config, "_experts_implementation", None) not in _IMPLEMENTATIONS:
        return False
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        return False
    return class_matches(type(module), _EXPERTS_SOURCE)


def moe_forward_for(module: nn.Module, state: GhostState) -> Callable | None:
    """The ghost forward for a fused experts module or a top-k router of known code, else None."""
    if _is_fused_experts(module):

        def experts(
            hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
        ) -> torch.Tensor:
            state.check_tokens(module, hidden)
            state.check_tokens(module, top_k_index)
            state.check_tokens(module, top_k_weights)
            return _GhostExperts.apply(
                hidden, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj, module, state
            )

        return experts
    kind = _router_kind(module)
    if kind is None:
        return None

    def linear(hidden: torch.Tensor) -> torch.Tensor:
        state.check_tokens(module, hidden)
        return GhostLinear.apply(hidden, module.weight, None, state)

    return lambda hidden_states: kind.compute(module, hidden_states, linear)


class _GhostExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        module: nn.Module,
        state: GhostState,
    ) -> torch.Tensor:
        ctx.save_for_backward(hidden, top_k_index, top_k_weights)
        ctx.params, ctx.module, ctx.state = (gate_up, down), module, state  # by identity (see GhostLinear)
        return type(module).forward(module, hidden, top_k_index, top_k_weights)  # the model's own forward

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        hidden, top_k_index, top_k_weights = ctx.saved_tensors
        (gate_up, down), module, state = ctx.params, ctx.module, ctx.state
        rows, length = state.batch_shape or (0, 0)
        k = top_k_index.shape[1]
        grad_hidden = torch.zeros_like(hidden)
        grad_weights = torch.zeros_like(top_k_weights)
        scored = [p for p in (gate_up, down) if param_needs(p)]
        real = state.token_mask()
        slot_expert = top_k_index.reshape(-1)
        for expert in range(module.num_experts):  # every expert, in order, on every rank (G's collectives)
            g = [state.store.piece(p, expert) for p in scored] if state.mode == "score" else []
            slots = torch.nonzero(slot_expert == expert).squeeze(-1)  # token-major, so in row order
            token, position = slots // k, slots % k
            with torch.enable_grad():
                x = hidden.index_select(0, token).detach().requires_grad_(True)
                w = top_k_weights[token, position].detach().requires_grad_(True)
                up_out = F.linear(x, gate_up[expert].detach())
                gate, up = up_out.chunk(2, dim=-1)
                inner = module.act_fn(gate) * up
                down_out = F.linear(inner, down[expert].detach())
                out = (down_out * w[:, None]).to(hidden.dtype)
                grad_x, grad_w, delta_up, delta_down = torch.autograd.grad(
                    out, (x, w, up_out, down_out), grad_out.index_select(0, token)
                )
            grad_hidden.index_add_(0, token, grad_x)
            grad_weights[token, position] = grad_w
            keep = real.index_select(0, token)
            pairs = [(gate_up, x, delta_up), (down, inner, delta_down)]
            terms = [(p, a.detach()[keep], d[keep]) for p, a, d in pairs if param_needs(p)]
            row_of = token[keep] // length
            if state.mode == "probe":
                for param, a, d in terms:
                    state.store.add_piece(param, expert, d.float().t().matmul(a.float()))
            else:
                offsets = row_offsets(row_of, rows)
                for (_, a, d), g_expert in zip(terms, g, strict=True):
                    state.add_linear_scores(a, d, g_expert, offsets)
            if state.norms is not None:  # one expert's slice: disjoint entries, their squares add
                for _, a, d in terms:
                    state.norms.add_matrix(a, d, row_of)
        state.touched.update(id(p) for p in scored)
        return grad_hidden, None, grad_weights, None, None, None, None
