"""The generic exact ghost path: any module owning trainable parameters without a dedicated one (issue 11).

A module M with own trainable parameters P_M (and no path in ``ghost.py``) runs through
:class:`_GhostFallback`, which keeps P_M on the autograd context and saves M's tensor inputs. Its backward
recomputes M's forward from them and

* returns the input gradients autograd gives for that recompute with the incoming output gradient;
* in probe mode adds the full gradient of P_M to the :class:`ProbeGradient` store;
* in score mode adds, to each row r, <d L_r / d P_M, G_M> = sum over r's output positions t of
  <delta_t, (dy_t / dP_M) G_M>, without forming a per-row gradient.

Only real tokens count: output gradients are multiplied by the attention mask on per-token outputs (the
dedicated paths select the same tokens). The per-row scores are computed by the first of three methods
that works for the module class:

``jvp``
    one batched forward-mode pass with tangent G on P_M (inputs held fixed); eager, so data-dependent
    control flow (an MoE's routing loop) is fine. Needs forward-AD formulas for the module's ops.
``vmap``
    ``torch.func.vmap`` over rows of ``torch.func.vjp``: per-row gradients of P_M, dotted with G.
``rows``
    one row at a time with plain autograd: works for anything that runs on one row.

``TRACE_DS_GHOST_FALLBACK_METHOD`` starts the chain later (tests, or a module whose faster method is
wrong); ``TRACE_DS_GHOST_FALLBACK=Linear,RMSNorm`` (class names or their suffixes, ``*`` for all) puts
modules that have a dedicated path on this one instead, to compare the two. The classes that took the
fallback, the method and the backward time they cost are reported at the end of scoring.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from trace_ds.io import TraceError
from trace_ds.scoring.ghost_ops import GhostState

FORCE_ENV = "TRACE_DS_GHOST_FALLBACK"
METHOD_ENV = "TRACE_DS_GHOST_FALLBACK_METHOD"
METHODS = ("jvp", "vmap", "rows")
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)

_first_method: dict[type, int] = {}  # per class: the first method worth trying (earlier ones failed)
_rows_checked: set[type] = set()  # classes whose batched forward was checked against row-by-row once


def forced_fallback(module: nn.Module) -> bool:
    """Whether ``TRACE_DS_GHOST_FALLBACK`` puts this module on the fallback despite a dedicated path."""
    names = {n.strip() for n in os.environ.get(FORCE_ENV, "").split(",") if n.strip()}
    cls = type(module).__name__
    return "*" in names or any(cls == n or cls.endswith(n) for n in names)


def _start_method(cls: type) -> int:
    text = os.environ.get(METHOD_ENV, "").strip().lower()
    if text and text not in METHODS:
        raise TraceError(f"{METHOD_ENV}={text!r}: expected one of {', '.join(METHODS)}")
    return max(METHODS.index(text) if text else 0, _first_method.get(cls, 0))


# ---- what is reported ----


@dataclass
class ClassStats:
    modules: set[int] = field(default_factory=set)
    calls: int = 0
    seconds: float = 0.0
    methods: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it could not be used


def stats_of(state: GhostState) -> dict[str, ClassStats]:
    """Per module class: the fallback's use during this state's passes (kept on the state object)."""
    stats = vars(state).get("_fallback_stats")
    if stats is None:
        stats = vars(state)["_fallback_stats"] = {}
    return stats


def report_fallback(state: GhostState, show: bool) -> dict[str, Any] | None:
    """Print (if ``show``) which module classes took the fallback and the backward time they added; returns
    the same for the metadata, or None if no module took it."""
    stats = stats_of(state)
    if not stats:
        return None
    classes = {
        name: {
            "modules": len(s.modules),
            "method": "/".join(m for m in METHODS if m in s.methods) or None,
            "backward_s": round(s.seconds, 3),
            **({"skipped": dict(s.skipped)} if s.skipped else {}),
        }
        for name, s in sorted(stats.items())
    }
    seconds = sum(s.seconds for s in stats.values())
    if show:
        from trace_ds.console import console

        parts = ", ".join(
            f"{name} ({c['modules']} module{'s' if c['modules'] != 1 else ''}, {c['method']})"
            for name, c in classes.items()
        )
        console.print(
            f"ghost fallback (generic exact path, slower than a dedicated one) used for {parts}: "
            f"{seconds:.2f} s of backward time in these modules; a dedicated path in scoring/ghost.py would "
            "remove most of it"
        )
        for name, c in classes.items():
            for method, why in c.get("skipped", {}).items():
                console.print(f"  {name}: {method} not usable ({why})")
    return {"seconds": round(seconds, 3), "classes": classes}


# ---- the module-level plan and one call's bookkeeping ----


@dataclass
class _Plan:
    module: nn.Module
    original: Callable[..., Any]  # the forward before ghost mode patched it
    names: list[str]  # own trainable parameters
    params: list[nn.Parameter]
    children: list[nn.Parameter]  # trainable parameters of submodules (they have their own ghost paths)
    patched: list[tuple[nn.Module, Any]]  # submodules ghost mode patches, with their forward before it
    state: GhostState

    @property
    def cls(self) -> type:
        return type(self.module)

    @property
    def label(self) -> str:
        return type(self.module).__name__

    @property
    def where(self) -> str:
        name = getattr(self.state, "names", {}).get(id(self.module), "")
        return f"{name} ({self.label})" if name else self.label


@dataclass
class _Call:
    """One forward call: how to rebuild its arguments from saved tensors, and its outputs' structure."""

    plan: _Plan
    leaves: list[Any]
    spec: Any
    slots: list[int]  # positions of tensors in ``leaves``
    out_leaves: list[Any] = field(default_factory=list)
    out_spec: Any = None
    out_slots: list[int] = field(default_factory=list)
    layouts: list[str] = field(default_factory=list)  # per tensor output: tokens, flat, rows or const

    def run(self, tensors: Sequence[Any]) -> list[torch.Tensor]:
        """The module's tensor outputs for these tensor arguments (the others as in the call)."""
        leaves = list(self.leaves)
        for slot, tensor in zip(self.slots, tensors, strict=True):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out_leaves, _ = pytree.tree_flatten(self.plan.original(*args, **kwargs))
        return [leaf for leaf in out_leaves if isinstance(leaf, torch.Tensor)]

    def outputs(self, tensors: Sequence[torch.Tensor]) -> Any:
        leaves = list(self.out_leaves)
        for slot, tensor in zip(self.out_slots, tensors, strict=True):
            leaves[slot] = tensor
        return pytree.tree_unflatten(leaves, self.out_spec)


def _shape(state: GhostState) -> tuple[int, int]:
    if state.batch_shape is None:
        raise TraceError("internal: a ghost forward ran before GhostState.set_batch")
    return state.batch_shape


def _token_mask(state: GhostState) -> torch.Tensor:
    """(rows, length): 1 on the real tokens (the ones the dedicated paths select), 0 on padding."""
    return state.token_mask().view(_shape(state))


def _output_layout(plan: _Plan, tensor: torch.Tensor, rows: int, length: int) -> str:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return "const"
    if tensor.dim() >= 2 and tensor.shape[0] == rows and tensor.shape[1] == length:
        return "tokens"  # (rows, length, ...)
    if tensor.dim() >= 1 and tensor.shape[0] == rows * length:
        return "flat"  # (rows * length, ...): tokens flattened row-major
    if tensor.dim() >= 1 and tensor.shape[0] == rows:
        return "rows"  # (rows, ...), not per token
    raise TraceError(
        f"{plan.where} owns trainable parameters {plan.names} with no dedicated ghost path, and the generic "
        f"fallback cannot map its output of shape {tuple(tensor.shape)} to the batch's rows (expected (rows, "
        f"length, ...), (rows * length, ...) or (rows, ...) with rows={rows}, length={length}); freeze these "
        "parameters or add a ghost path for it in trace_ds/scoring/ghost.py"
    )


def _input_layout(tensor: torch.Tensor, rows: int, length: int) -> str:
    if tensor.dim() >= 1 and tensor.shape[0] == rows:
        return "rows"
    if tensor.dim() >= 1 and tensor.shape[0] == rows * length:
        return "flat"
    return "shared"  # the same for every row (e.g. rotary tables of shape (1, length, d))


def _row(tensor: torch.Tensor, layout: str, r: int, length: int) -> torch.Tensor:
    if layout in ("rows", "tokens"):
        return tensor[r : r + 1]
    if layout == "flat":
        return tensor[r * length : (r + 1) * length]
    return tensor


def _by_row(tensor: torch.Tensor, layout: str, rows: int, length: int) -> torch.Tensor:
    """A leading row axis for vmap; each row keeps the shape the module sees for one row."""
    if layout in ("rows", "tokens"):
        return tensor.unsqueeze(1)
    return tensor.reshape(rows, length, *tensor.shape[1:])


def _row_sums(values: torch.Tensor, rows: int) -> torch.Tensor:
    return values.float().reshape(rows, -1).sum(1)


@contextlib.contextmanager
def _plain(plan: _Plan) -> Iterator[None]:
    """Submodules run their own forwards (not their ghost functions) while this module's own gradients are
    recomputed: plain ops support forward AD and vmap, and nothing is added to G or the scores twice."""
    swapped = []
    for child, original in plan.patched:
        ghost = child.__dict__.get("forward")
        if ghost is None:
            continue
        swapped.append((child, ghost))
        if original is None:
            del child.forward
        else:
            child.forward = original
    try:
        yield
    finally:
        for child, ghost in swapped:
            child.forward = ghost


def _agree(batched: torch.Tensor, row: torch.Tensor) -> bool:
    if batched.shape != row.shape:
        return False
    if not batched.is_floating_point():
        return bool(torch.equal(batched, row))
    tol = 1e-4 if batched.dtype in (torch.float32, torch.float64) else 3e-2
    scale = float(batched.detach().abs().max()) if batched.numel() else 0.0
    return (
        bool((batched.detach() - row.detach()).abs().max() <= tol * max(scale, 1e-12))
        if row.numel()
        else True
    )


def _hides_gradient(leaf: Any) -> bool:
    """An argument object (not a tensor or a container pytree opens) holding a tensor that needs a gradient."""
    if isinstance(leaf, (torch.Tensor, *_PLAIN_LEAVES)):
        return False
    values = getattr(leaf, "__dict__", {}).values()
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _mixes_rows(plan: _Plan) -> TraceError:
    return TraceError(
        f"{plan.where} owns trainable parameters {plan.names} with no dedicated ghost path, and run one row at a "
        "time it does not give the rows of its batched output: it mixes rows, or its inputs have no row axis, "
        "so no exact per-row score exists for it; freeze these parameters or add a ghost path for it in "
        "trace_ds/scoring/ghost.py"
    )


# ---- the autograd function ----


class _GhostFallback(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, call: _Call, *tensors: torch.Tensor) -> tuple:
        plan = call.plan
        inputs = tensors[: len(call.slots)]
        leaves = list(call.leaves)
        for slot, tensor in zip(call.slots, inputs, strict=True):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, call.spec)
        out = plan.original(*args, **kwargs)
        out_leaves, call.out_spec = pytree.tree_flatten(out)
        rows, length = _shape(plan.state)
        outputs: list[torch.Tensor] = []
        for position, leaf in enumerate(out_leaves):
            if isinstance(leaf, torch.Tensor):
                call.out_slots.append(position)
                call.layouts.append(_output_layout(plan, leaf, rows, length))
                outputs.append(leaf)
                call.out_leaves.append(None)
            elif isinstance(leaf, _PLAIN_LEAVES):
                call.out_leaves.append(leaf)
            else:
                raise TraceError(
                    f"{plan.where} owns trainable parameters {plan.names} with no dedicated ghost path, and the "
                    f"generic fallback cannot map its output of type {type(leaf).__name__} (only tensors, in "
                    "tuples, lists, dicts or model outputs); freeze these parameters or add a ghost path for it "
                    "in trace_ds/scoring/ghost.py"
                )
        if not outputs:
            raise TraceError(f"{plan.where}: the ghost fallback found no tensor output to differentiate")
        ctx.mark_non_differentiable(
            *(o for o, kind in zip(outputs, call.layouts, strict=True) if kind == "const")
        )
        ctx.set_materialize_grads(False)
        # Parameters stay on the plan (not saved): G is keyed by the parameter's identity (see GhostLinear).
        ctx.save_for_backward(*inputs)
        ctx.call = call
        stats_of(plan.state).setdefault(plan.label, ClassStats()).modules.add(id(plan.module))
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outs: torch.Tensor | None) -> tuple:
        call: _Call = ctx.call
        inputs = list(ctx.saved_tensors)
        needs = [bool(ctx.needs_input_grad[1 + i]) for i in range(len(inputs))]
        stats = stats_of(call.plan.state).setdefault(call.plan.label, ClassStats())
        device = inputs[0].device if inputs else None
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        grads = _backward(call, inputs, needs, list(grad_outs), stats)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        return (None, *grads, *([None] * len(call.plan.params)))


def _backward(
    call: _Call,
    inputs: list[torch.Tensor],
    needs: list[bool],
    grad_outs: list[torch.Tensor | None],
    stats: ClassStats,
) -> list[torch.Tensor | None]:
    plan, state = call.plan, call.plan.state
    rows, length = _shape(state)
    mask = _token_mask(state)
    # (index, raw output gradient, output gradient on real tokens only)
    cots: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i, (grad, layout) in enumerate(zip(grad_outs, call.layouts, strict=True)):
        if grad is None or layout == "const":
            continue
        if layout == "tokens":
            keep = mask.reshape(rows, length, *[1] * (grad.dim() - 2))
        elif layout == "flat":
            keep = mask.reshape(rows * length, *[1] * (grad.dim() - 1))
        else:
            keep = None
        cots.append((i, grad, grad if keep is None else grad * keep.to(grad.dtype)))
    own = [(n, p) for n, p in zip(plan.names, plan.params, strict=True) if p.requires_grad]
    children = [p for p in plan.children if p.requires_grad]
    clean = all(torch.equal(raw, masked) for _, raw, masked in cots)  # padding carries no gradient (usual)
    probe = state.mode == "probe"
    # Collectives of a partitioned store must match across ranks: every own parameter, every call, in order.
    g_full = [] if probe else [state.store.full(p) for _, p in own]

    grad_x: list[torch.Tensor | None] = [None] * len(inputs)
    own_grads: list[torch.Tensor | None] | None = None
    batched: list[torch.Tensor] | None = None
    if cots and (any(needs) or children or (probe and own and clean)):
        # Input gradients (and the submodules' own ghost backward, once) from one batched recompute.
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(True) if need else t for t, need in zip(inputs, needs, strict=True)
            ]
            outs = call.run(leaves)
            pairs = [(outs[i], raw) for i, raw, _ in cots if outs[i].requires_grad]
            wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
            take_own = probe and bool(own) and clean
            targets = wanted + children + ([p for _, p in own] if take_own else [])
            if pairs and targets:
                found = torch.autograd.grad(
                    [o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True
                )
                it = iter(found[: len(wanted)])
                grad_x = [next(it) if need else None for need in needs]
                if take_own:
                    own_grads = list(found[len(wanted) + len(children) :])
            batched = [o.detach() for o in outs]

    if own:
        if probe:
            if own_grads is None:
                own_grads = _own_grads_batched(call, inputs, cots, own)
            for (_, p), g in zip(own, own_grads, strict=True):
                state.store.add(
                    p, torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None else g
                )
        else:
            with _plain(plan):
                state.scores += _own_scores(call, inputs, cots, own, g_full, batched, stats)
        if state.norms is not None and cots:
            with _plain(plan):
                _own_norms(call, inputs, cots, own, batched)
        state.touched.update(id(p) for _, p in own)
    return grad_x


def _own_grads_batched(
    call: _Call,
    inputs: list[torch.Tensor],
    cots: list[tuple[int, torch.Tensor, torch.Tensor]],
    own: list[tuple[str, nn.Parameter]],
) -> list[torch.Tensor | None]:
    """The full gradient of the own parameters on real tokens only (probe mode, padding with gradient)."""
    with torch.enable_grad(), _plain(call.plan):
        outs = call.run([t.detach() for t in inputs])
        pairs = [(outs[i], masked) for i, _, masked in cots if outs[i].requires_grad]
        if not pairs:
            return [None] * len(own)
        return list(
            torch.autograd.grad(
                [o for o, _ in pairs], [p for _, p in own], [g for _, g in pairs], allow_unused=True
            )
        )


def _own_scores(
    call: _Call,
    inputs: list[torch.Tensor],
    cots: list[tuple[int, torch.Tensor, torch.Tensor]],
    own: list[tuple[str, nn.Parameter]],
    g_full: list[torch.Tensor],
    batched: list[torch.Tensor] | None,
    stats: ClassStats,
) -> torch.Tensor:
    plan = call.plan
    rows, _ = _shape(plan.state)
    if not cots:
        return torch.zeros(rows, dtype=torch.float32, device=g_full[0].device if g_full else None)
    start = _start_method(plan.cls)
    for index in range(start, len(METHODS)):
        method = METHODS[index]
        try:
            if method == "jvp":
                scores = _scores_jvp(call, inputs, cots, own, g_full)
                _check_rows_once(call, inputs, batched)
            elif method == "vmap":
                scores = _scores_vmap(call, inputs, cots, own, g_full, batched)
            else:
                scores = _scores_rows(call, inputs, cots, own, g_full, batched)
        except TraceError:
            raise
        except Exception as err:  # this method cannot run this module: try the next one
            if method == METHODS[-1]:
                raise
            lines = str(err).strip().splitlines()
            stats.skipped[method] = f"{type(err).__name__}: {lines[0][:160] if lines else ''}"
            _first_method[plan.cls] = max(_first_method.get(plan.cls, 0), index + 1)
            continue
        stats.methods.add(method)
        return scores
    raise AssertionError("unreachable")


def _scores_jvp(
    call: _Call,
    inputs: list[torch.Tensor],
    cots: list[tuple[int, torch.Tensor, torch.Tensor]],
    own: list[tuple[str, nn.Parameter]],
    g_full: list[torch.Tensor],
) -> torch.Tensor:
    """sum_t <delta_t, (dy_t/dP) G> per row, from one forward-mode pass (tangent G on P, none on inputs)."""
    plan = call.plan
    rows, _ = _shape(plan.state)
    with torch.no_grad(), forward_ad.dual_level():
        duals = {
            n: forward_ad.make_dual(p.detach(), g.to(p.dtype)) for (n, p), g in zip(own, g_full, strict=True)
        }
        with _reparametrize_module(plan.module, duals):
            outs = call.run([t.detach() for t in inputs])
        tangents = [forward_ad.unpack_dual(o).tangent for o in outs]
    scores = torch.zeros(rows, dtype=torch.float32, device=cots[0][2].device)
    for i, _, masked in cots:
        if tangents[i] is not None:
            scores += _row_sums(masked.float() * tangents[i].float(), rows)
    return scores


def _row_layouts(call: _Call, inputs: list[torch.Tensor]) -> tuple[int, int, list[str]]:
    """The batch's rows and length, and how each input is laid out along them (the per-row methods)."""
    rows, length = _shape(call.plan.state)
    return rows, length, [_input_layout(t, rows, length) for t in inputs]


def _batched_outputs(
    call: _Call, inputs: list[torch.Tensor], batched: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """The module's batched outputs (what the per-row runs must agree with), computed here unless given."""
    if batched is not None:
        return batched
    with torch.no_grad():
        return call.run([t.detach() for t in inputs])


def _scores_vmap(
    call: _Call,
    inputs: list[torch.Tensor],
    cots: list[tuple[int, torch.Tensor, torch.Tensor]],
    own: list[tuple[str, nn.Parameter]],
    g_full: list[torch.Tensor],
    batched: list[torch.Tensor] | None,
) -> torch.Tensor:
    """Per-row gradients of P (vmap over rows of vjp), each dotted with G."""
    plan = call.plan
    rows, length, layouts = _row_layouts(call, inputs)
    names = [n for n, _ in own]
    rowed = [
        t.detach() if kind == "shared" else _by_row(t.detach(), kind, rows, length)
        for t, kind in zip(inputs, layouts, strict=True)
    ]
    in_dims = [None if kind == "shared" else 0 for kind in layouts]
    index = [i for i, _, _ in cots]
    row_cots = [_by_row(masked, call.layouts[i], rows, length) for i, _, masked in cots]

    def per_row(values: tuple, row_inputs: list, cotangents: list) -> tuple:
        def f(*vals: torch.Tensor) -> tuple:
            with _reparametrize_module(plan.module, dict(zip(names, vals, strict=True))):
                outs = call.run(row_inputs)
            return tuple(outs[i] for i in index)

        outs, vjp_fn = torch.func.vjp(f, *values)
        return vjp_fn(tuple(cotangents)), outs

    grads, outs = torch.func.vmap(per_row, in_dims=(None, in_dims, 0))(
        tuple(p.detach() for _, p in own), rowed, row_cots
    )
    batched = _batched_outputs(call, inputs, batched)
    for i, out in zip(index, outs, strict=True):
        if not _agree(_by_row(batched[i], call.layouts[i], rows, length), out):
            raise _mixes_rows(plan)
    scores = torch.zeros(rows, dtype=torch.float32, device=row_cots[0].device)
    for grad, g in zip(grads, g_full, strict=True):
        scores += grad.float().reshape(rows, -1).matmul(g.reshape(-1).float())
    return scores


def _row_grads(
    call: _Call,
    inputs: list[torch.Tensor],
    cots: list[tuple[int, torch.Tensor, torch.Tensor]],
    own: list[tuple[str, nn.Parameter]],
    batched: list[torch.Tensor] | None,
) -> Iterator[tuple[int, tuple[torch.Tensor | None, ...]]]:
    """One row at a time with plain autograd: (row, gradient of the row's outputs . delta w.r.t. each own
    parameter), for the rows whose outputs carry a gradient."""
    plan = call.plan
    rows, length, layouts = _row_layouts(call, inputs)
    params = [p for _, p in own]
    batched = _batched_outputs(call, inputs, batched)
    for r in range(rows):
        with torch.enable_grad():
            outs = call.run(
                [_row(t.detach(), kind, r, length) for t, kind in zip(inputs, layouts, strict=True)]
            )
            pairs = []
            for i, _, masked in cots:
                if len(outs) != len(batched) or not _agree(
                    _row(batched[i], call.layouts[i], r, length), outs[i]
                ):
                    raise _mixes_rows(plan)
                if outs[i].requires_grad:
                    pairs.append((outs[i], _row(masked, call.layouts[i], r, length)))
            if not pairs:
                continue
            yield (
                r,
                torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True),
            )


def _scores_rows(
    call: _Call,
    inputs: list[torch.Tensor],
    cots: list[tuple[int, torch.Tensor, torch.Tensor]],
    own: list[tuple[str, nn.Parameter]],
    g_full: list[torch.Tensor],
    batched: list[torch.Tensor] | None,
) -> torch.Tensor:
    """One row at a time with plain autograd: <grad of the row's output . delta, G>."""
    rows, _ = _shape(call.plan.state)
    scores = torch.zeros(rows, dtype=torch.float32, device=cots[0][2].device)
    for r, grads in _row_grads(call, inputs, cots, own, batched):
        scores[r] = sum(
            (
                (grad.float() * g.float()).sum()
                for grad, g in zip(grads, g_full, strict=True)
                if grad is not None
            ),
            torch.zeros((), device=scores.device),
        )
    return scores


def _own_norms(
    call: _Call,
    inputs: list[torch.Tensor],
    cots: list[tuple[int, torch.Tensor, torch.Tensor]],
    own: list[tuple[str, nn.Parameter]],
    batched: list[torch.Tensor] | None,
) -> None:
    """Each pair's gradient of the module's own parameters, formed (the fallback's modules are small: per-pair
    gradients of their parameters are affordable) from per-row gradients, squared into the pair norms."""
    norms = call.plan.state.norms
    assert norms is not None
    tied = [name for name, p in own if id(p) in norms.tied]
    if tied:
        raise TraceError(
            f"gradient norms: {call.plan.where}'s {', '.join(tied)} is tied to another module's weight and runs "
            "on the generic path, where the cross term of a tied weight is not implemented; score with "
            "--score-metric dot"
        )
    sums: dict[tuple[int, int], torch.Tensor] = {}
    for r, grads in _row_grads(call, inputs, cots, own, batched):
        pair = int(norms.pair_of_row[r])
        for k, grad in enumerate(grads):
            if grad is not None:
                key = (pair, k)
                sums[key] = sums[key] + grad.double() if key in sums else grad.double()
    per_pair = torch.zeros(norms.n_pairs, dtype=torch.float64, device=norms.squared.device)
    for (pair, _), total in sums.items():
        per_pair[pair] += total.square().sum()
    norms.squared += per_pair


def _check_rows_once(call: _Call, inputs: list[torch.Tensor], batched: list[torch.Tensor] | None) -> None:
    """The forward-mode method does not need row structure, but the per-row scores are only exact if the
    module does not mix rows: once per class, compare its batched output with a row-by-row run."""
    plan = call.plan
    if plan.cls in _rows_checked:
        return
    rows, length, layouts = _row_layouts(call, inputs)
    batched = _batched_outputs(call, inputs, batched)
    with torch.no_grad():
        for r in range(rows):
            try:
                outs = call.run(
                    [_row(t.detach(), kind, r, length) for t, kind in zip(inputs, layouts, strict=True)]
                )
            except Exception:  # cannot run on one row: nothing to compare (forward mode did not need it)
                break
            for i, layout in enumerate(call.layouts):
                if layout != "const" and (
                    i >= len(outs) or not _agree(_row(batched[i], layout, r, length), outs[i])
                ):
                    raise _mixes_rows(plan)
    _rows_checked.add(plan.cls)


# ---- entry point from ghost.py ----


def fallback_forward(module: nn.Module, state: GhostState) -> Callable:
    """The generic exact replacement forward for a module owning trainable parameters (see the module doc)."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    own_ids = {id(p) for _, p in own}
    children = [p for p in module.parameters() if p.requires_grad and id(p) not in own_ids]
    inner = [m for m in module.modules() if m is not module]
    if any(any(True for _ in m.parameters(recurse=False)) for m in inner) and any(
        hasattr(p, "ds_id") for p in module.parameters()
    ):
        raise TraceError(
            f"{type(module).__name__} owns trainable parameters {[n for n, _ in own]} with no dedicated ghost path "
            "and has submodules with parameters: under ZeRO-3 the generic fallback cannot recompute it (each "
            "recompute would gather the submodules' parameters a data-dependent number of times on each rank); "
            "freeze its own parameters, score without ZeRO-3, or add a ghost path for it in "
            "trace_ds/scoring/ghost.py"
        )
    # ghost mode visits parents first: the submodules still have the forwards it will replace
    patched = [
        (m, m.__dict__.get("forward"))
        for m in inner
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    plan = _Plan(module, module.forward, [n for n, _ in own], [p for _, p in own], children, patched, state)

    def forward(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        for leaf in leaves:
            if _hides_gradient(leaf):
                raise TraceError(
                    f"{plan.where} owns trainable parameters {plan.names} with no dedicated ghost path, and it "
                    f"receives a {type(leaf).__name__} holding tensors that need a gradient, which the generic "
                    "fallback cannot see into (their gradient would be lost); pass tensors, or tuples, lists or "
                    "dicts of them, freeze these parameters, or add a ghost path for it in "
                    "trace_ds/scoring/ghost.py"
                )
        taken = set(slots)
        call = _Call(plan, [None if i in taken else leaf for i, leaf in enumerate(leaves)], spec, slots)
        outputs = _GhostFallback.apply(call, *(leaves[i] for i in slots), *plan.params)
        return call.outputs(list(outputs))

    return forward
