"""The ghost pass's shared state and its linear op, below every module that hooks a model for scoring.

:class:`GhostState` carries one scoring pass (the batch's token layout, the per-sequence scores, the probe
gradient store :class:`ProbeGradient`); :class:`GhostLinear` is the linear layer's custom autograd function.
``ghost.py`` (dense layers, norms, embeddings, and the dispatch), ``moe.py`` (experts) and ``fallback.py``
(any other module) all build on these, so none of them imports another for them.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trace_ds.io import TraceError
from trace_ds.scoring.norms import PairNorms

Mode = Literal["probe", "score"]


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape


CHECKS_ENV = "TRACE_DS_GHOST_CHECKS"


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

    def rows(self, param: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """G[start:stop] along the first dimension (a vocabulary tile of lm_head, one expert of a fused expert
        tensor). The partitioned store gathers only those rows; every rank must ask for the same rows in the
        same order."""
        return self.full(param)[start:stop]

    def add_rows(self, param: torch.Tensor, start: int, grad: torch.Tensor) -> None:
        """Add ``grad`` to G[start:start + len(grad)] (see :meth:`rows`)."""
        key = id(param)
        if key not in self.tensors:
            self.tensors[key] = torch.zeros(full_shape(param), dtype=torch.float32, device=grad.device)
        self.tensors[key][start : start + grad.shape[0]] += grad.float()

    def select_rows(self, param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """G[index] for a 1-D tensor of row ids (the embedding rows of a batch's tokens): the partitioned
        store gathers only the rows some rank asked for, never the whole (V, d) tensor."""
        return self.full(param).index_select(0, index)

    def piece(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """G[index] of a stacked parameter (one expert)."""
        return self.rows(param, index, index + 1)[0]

    def add_piece(self, param: torch.Tensor, index: int, grad: torch.Tensor) -> None:
        self.add_rows(param, index, grad.unsqueeze(0))

    def index_add(self, param: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """G[index[i]] += rows[i] (the embedding's probe gradient), without a dense (V, d) temporary."""
        key = id(param)
        if key not in self.tensors:
            self.tensors[key] = torch.zeros(full_shape(param), dtype=torch.float32, device=rows.device)
        self.tensors[key].index_add_(0, index, rows.float())

    def _dense_index_add(self, param: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """index_add through :meth:`add` (stores that reduce each contribution over ranks need it whole)."""
        grad = torch.zeros(full_shape(param), dtype=torch.float32, device=rows.device)
        self.add(param, grad.index_add_(0, index, rows.float()))

    def freeze(self, dtype: torch.dtype) -> None:
        """After the probe pass: keep G in the dtype the scoring passes read it in, cast once for the whole
        stage (not per layer and micro-batch). fp32 unless the kernel needs the model's 16-bit dtype (the
        Triton kernel's tl.dot takes equal operand types) or ``--g-dtype model`` asks for it (half the bytes
        kept and, under ZeRO-3, gathered)."""
        if dtype != torch.float32:
            for key in list(self.tensors):  # one tensor at a time: never a whole second copy of G
                self.tensors[key] = self.tensors[key].to(dtype)

    def squared_norm(self) -> float:
        """||G||^2 over every entry (a partitioned store sums its ranks' shards)."""
        return math.fsum(float(t.double().square().sum()) for t in self.tensors.values())

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
    batch_shape: tuple[int, int] | None = None  # (rows, length) of the batch being run
    touched: set[int] = field(default_factory=set)  # ids of parameters a ghost backward reached (coverage)
    names: dict[int, str] = field(default_factory=dict)  # module id -> its name in the model (messages)
    # the kernel's offsets check costs one host sync per layer: off unless TRACE_DS_GHOST_CHECKS=1 (tests)
    check_offsets: bool = field(default_factory=lambda: os.environ.get(CHECKS_ENV, "") == "1")
    # per-pair squared gradient norms of a score pass (scoring/norms.py), None when not asked for
    norms: PairNorms | None = None
    # parameters owned by several ghost-routed modules (a tied embedding and head): names of their owners
    shared: dict[int, list[str]] = field(default_factory=dict)

    def set_batch(self, attention_mask: torch.Tensor) -> None:
        flat = attention_mask.reshape(-1)
        self.token_index = torch.nonzero(flat, as_tuple=False).squeeze(-1)
        self.lengths = attention_mask.sum(-1)
        self.scores = torch.zeros(attention_mask.shape[0], dtype=torch.float32, device=attention_mask.device)
        self.batch_shape = (int(attention_mask.shape[0]), int(attention_mask.shape[1]))

    # ---- layouts: every ghost op checks what it receives against the batch, never reshapes blindly ----

    def _batch(self) -> tuple[int, int]:
        if self.batch_shape is None:
            raise TraceError("internal: a ghost forward ran before GhostState.set_batch")
        return self.batch_shape

    def _layout_error(self, module: nn.Module, tensor: torch.Tensor, problem: str) -> TraceError:
        rows, length = self._batch()
        name = self.names.get(id(module), "")
        where = f"{name} ({type(module).__name__})" if name else type(module).__name__
        return TraceError(
            f"{where} received a tensor of shape {tuple(tensor.shape)} while scoring a batch of rows={rows}, "
            f"length={length}: {problem}, so its ghost path cannot tell which entries belong to which token. "
            "Models whose layers lay tokens out this way are not supported by the exact scorer"
        )

    def check_tokens(self, module: nn.Module, tensor: torch.Tensor, features: bool = True) -> None:
        """``tensor`` is (rows, length, features) or, flattened in row order, (rows * length, features) (an
        MoE block's shared MLP sees that); (rows, length) token ids when ``features`` is False."""
        rows, length = self._batch()
        if not features:
            if tuple(tensor.shape) != (rows, length):
                raise self._layout_error(module, tensor, "it expects the layout (rows, length) token ids")
        elif tuple(tensor.shape[:-1]) not in ((rows, length), (rows * length,)):
            raise self._layout_error(
                module, tensor, "it expects the layout (rows, length, features) or (rows * length, features)"
            )

    def token_dim(self, module: nn.Module, tensor: torch.Tensor) -> int:
        """The dimension of ``tensor`` (rows first, features last, other dims such as heads anywhere between)
        that runs over the batch's tokens: (rows, length, d), (rows, length, heads, d) as Qwen3's q/k norms
        receive, (rows, heads, length, d) as Gemma 3's. Exactly one dimension may have the batch's length;
        when heads == length, the tensor must be a view of a (rows, length, features) tensor (a projection's
        output), whose strides say which dimension steps over tokens."""
        rows, length = self._batch()
        if tensor.dim() == 2 and tensor.shape[0] == rows * length:
            return 0  # (rows * length, features): tokens flattened in row order
        if tensor.dim() < 3 or tensor.shape[0] != rows:
            raise self._layout_error(
                module, tensor, "it expects (rows, ..., length, ..., features) or (rows * length, features)"
            )
        dims = [i for i in range(1, tensor.dim() - 1) if tensor.shape[i] == length]
        if len(dims) == 1 or (dims and length == 1):  # length 1: every candidate selects the same entries
            return dims[0]
        if not dims:
            raise self._layout_error(module, tensor, "no dimension between rows and features has the length")
        resolved = _token_dim_of_view(tensor, rows, length)
        if resolved is None:
            raise self._layout_error(
                module,
                tensor,
                f"{len(dims)} dimensions have the length (heads == length?) and the tensor is not a view of a "
                "(rows, length, features) projection output whose strides would say which one runs over tokens",
            )
        return resolved

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        """(rows, length, d) or (rows * length, d) -> (T, d) real tokens only, in row order: padding is
        excluded by selection (layouts checked by :meth:`check_tokens`)."""
        assert self.token_index is not None and self.batch_shape is not None
        assert tensor.shape[:-1].numel() == self.batch_shape[0] * self.batch_shape[1]
        return tensor.reshape(-1, tensor.shape[-1]).index_select(0, self.token_index)

    def select_tokens(self, tensor: torch.Tensor, token_dim: int) -> torch.Tensor:
        """Tokens along ``token_dim`` (see :meth:`token_dim`; 0: flattened) -> (T, K, d): the real tokens in
        row order, K the product of the other leading dimensions (1 for (rows, length, d), heads for a
        per-head norm)."""
        assert self.token_index is not None and self.batch_shape is not None
        rows, length = self.batch_shape
        moved = tensor if token_dim == 0 else tensor.movedim(token_dim, 1)
        assert moved.shape[: 1 if token_dim == 0 else 2].numel() == rows * length
        return moved.reshape(rows * length, -1, tensor.shape[-1]).index_select(0, self.token_index)

    def token_mask(self) -> torch.Tensor:
        """(rows * length,) bool, row-major: True on the real tokens (the ones :meth:`select` keeps)."""
        rows, length = self._batch()
        assert self.token_index is not None
        mask = torch.zeros(rows * length, dtype=torch.bool, device=self.token_index.device)
        return mask.index_fill_(0, self.token_index, True)

    def token_rows(self) -> torch.Tensor:
        """(T,) the batch row of each real token, in the order :meth:`select` keeps them."""
        assert self.token_index is not None
        return self.token_index // self._batch()[1]

    def offsets(self) -> torch.Tensor:
        assert self.lengths is not None
        return torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])

    def add_linear_scores(
        self, a: torch.Tensor, d: torch.Tensor, g: torch.Tensor, offsets: torch.Tensor | None = None
    ) -> None:
        """scores[r] += sum over r's tokens of d_t^T G a_t (the fused kernel); ``offsets`` (rows + 1) delimit
        each row's entries of (a, d), by default the batch's real tokens in row order."""
        from trace_ds.kernels.ghost_dot import ghost_dot

        assert self.scores is not None
        if self.kernel == "triton" and g.dtype != a.dtype:  # tl.dot: equal operand types (the torch path
            g = g.to(a.dtype)  # computes in fp32 whatever it gets); G is frozen in a.dtype for this kernel
        self.scores += ghost_dot(
            a,
            d,
            g,
            self.offsets() if offsets is None else offsets,
            backend=self.kernel,
            check_offsets=self.check_offsets,
        )

    def add_token_scores(self, per_token: torch.Tensor) -> None:
        """Sum per-token values into their rows, deterministically (segment reduction, no atomics)."""
        assert self.scores is not None and self.lengths is not None
        self.scores += torch.segment_reduce(per_token.float(), "sum", lengths=self.lengths)


def row_offsets(row_of: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows + 1,) cumulated counts of entries per row, for entries sorted by row (``row_of``: each entry's
    row): the segment offsets the fused kernel takes."""
    counts = torch.bincount(row_of, minlength=rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _token_dim_of_view(tensor: torch.Tensor, rows: int, length: int) -> int | None:
    """For ``tensor`` a view of a contiguous (rows, length, F) tensor (a q/k projection reshaped per head,
    transposed or not): the one leading dimension that steps over whole tokens of it, provided the batch
    dimension steps over its rows and the other dimensions stay inside one token's F features. Otherwise
    None (the layout cannot be told from this tensor)."""
    base = tensor._base
    if base is None or base.dim() != 3 or tuple(base.shape[:2]) != (rows, length) or not base.is_contiguous():
        return None
    row_stride, token_stride = base.stride(0), base.stride(1)
    dims = [
        i
        for i in range(1, tensor.dim() - 1)
        if tensor.shape[i] == length and tensor.stride(i) == token_stride
    ]
    if len(dims) != 1 or (rows > 1 and tensor.stride(0) != row_stride):
        return None
    inner = [i for i in range(1, tensor.dim()) if i != dims[0]]
    offset = tensor.storage_offset() - base.storage_offset()
    if offset < 0 or any(tensor.stride(i) < 0 for i in inner):
        return None
    reach = offset + sum((tensor.shape[i] - 1) * tensor.stride(i) for i in inner)
    return dims[0] if reach < token_stride else None


def param_needs(param: torch.Tensor | None) -> bool:
    return param is not None and param.requires_grad


class GhostLinear(torch.autograd.Function):
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
        if param_needs(weight) or param_needs(bias):
            a, d = state.select(x), state.select(grad_out)
            if state.mode == "probe":
                if param_needs(weight):
                    state.store.add(weight, d.float().t().matmul(a.float()))
                if param_needs(bias):
                    state.store.add(bias, d.float().sum(0))
            else:
                if param_needs(weight):
                    state.add_linear_scores(a, d, state.store.full(weight))
                if param_needs(bias):
                    state.add_token_scores(d.float().matmul(state.store.full(bias).float()))
            if (
                state.norms is not None
            ):  # in either mode: the probe's own pairs' norms too (--probe-normalize)
                rows = state.token_rows()
                if param_needs(weight):
                    state.norms.add_linear(weight, a, d, rows)
                if param_needs(bias):
                    state.norms.add_vector(d.float(), rows)
            state.touched.update(id(p) for p in (weight, bias) if param_needs(p))
        return grad_x, None, None, None


def _code_key(func: ast.FunctionDef) -> str:
    """A function's argument names and body as a syntax tree, without its docstring, annotations or name."""
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return repr([a.arg for a in func.args.args]) + "".join(ast.dump(stmt) for stmt in body)


def _canonical(source: str) -> dict[str, str]:
    return {n.name: _code_key(n) for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}


@functools.cache
def class_matches(cls: type, source: str) -> bool:
    """Whether ``cls``'s methods named in ``source`` have exactly that code."""
    for name, key in _canonical(source).items():
        try:
            code = textwrap.dedent(inspect.getsource(getattr(cls, name)))
        except (AttributeError, OSError, TypeError):
            return False
        tree = ast.parse(code).body
        if len(tree) != 1 or not isinstance(tree[0], ast.FunctionDef) or _code_key(tree[0]) != key:
            return False
    return True
