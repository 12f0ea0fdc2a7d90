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

import ast
import contextlib
import functools
import inspect
import math
import os
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trace_ds.io import TraceError
from trace_ds.scoring.norms import PairNorms

Mode = Literal["probe", "score"]
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
            self.tensors[key] = torch.zeros(_full_shape(param), dtype=torch.float32, device=grad.device)
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
            self.tensors[key] = torch.zeros(_full_shape(param), dtype=torch.float32, device=rows.device)
        self.tensors[key].index_add_(0, index, rows.float())

    def _dense_index_add(self, param: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """index_add through :meth:`add` (stores that reduce each contribution over ranks need it whole)."""
        grad = torch.zeros(_full_shape(param), dtype=torch.float32, device=rows.device)
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
                    state.add_linear_scores(a, d, state.store.full(weight))
                if _param_needs(bias):
                    state.add_token_scores(d.float().matmul(state.store.full(bias).float()))
            if state.norms is not None:  # in either mode: the probe's own pairs' norms too (--probe-normalize)
                rows = state.token_rows()
                if _param_needs(weight):
                    state.norms.add_linear(weight, a, d, rows)
                if _param_needs(bias):
                    state.norms.add_vector(d.float(), rows)
            state.touched.update(id(p) for p in (weight, bias) if _param_needs(p))
        return grad_x, None, None, None


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
        if _param_needs(weight):
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
                state.norms.add_embedding(rows, kept, state.token_rows(), weight, _full_shape(weight)[0])
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


def _code_key(func: ast.FunctionDef) -> str:
    """A function's argument names and body as a syntax tree, without its docstring, annotations or name."""
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return repr([a.arg for a in func.args.args]) + "".join(ast.dump(stmt) for stmt in body)


def _canonical(source: str) -> dict[str, str]:
    return {n.name: _code_key(n) for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}


@functools.cache
def _class_matches(cls: type, source: str) -> bool:
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


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape


def _norm_kind(module: nn.Module) -> _NormKind | None:
    """The norm formula ``module`` computes, if it is one we have an exact path for."""
    own = dict(module.named_parameters(recurse=False))
    if list(own) != ["weight"] or len(_full_shape(own["weight"])) != 1:
        return None
    for kind in _NORM_KINDS:
        eps = getattr(module, kind.eps_attr, None)
        if isinstance(eps, (int, float)) and _class_matches(type(module), kind.source):
            return kind
    return None


def _embedding_scaled(module: nn.Embedding) -> bool | None:
    """False for a plain nn.Embedding, True for a scaled word embedding (Gemma), None for any other forward."""
    cls = type(module)
    if cls.forward is nn.Embedding.forward:
        return False
    parent_forward = getattr(super(cls, module).forward, "__func__", None)
    if (
        parent_forward is nn.Embedding.forward
        and isinstance(getattr(module, "embed_scale", None), torch.Tensor)
        and _class_matches(cls, _SCALED_EMBEDDING_SOURCE)
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
        if _param_needs(weight):
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
        return _GhostLinear.apply(x, module.weight, module.bias, state)

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
        scaled = _embedding_scaled(module)
        if scaled is not None:
            return _embedding_forward(module, scaled, state)
    norm = _norm_kind(module)
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
