"""The vocabulary-chunked LM head: summed response log-probs, the retention KL and the lm_head's ghost dot,
without ever holding [tokens, vocabulary] logits (issue 12).

At a 128k vocabulary, 16 sequences x 1024 tokens of fp32 log-softmax are 8.4 GB per forward. Here the decoder
runs as usual, but the head only sees the positions that predict a response token, and walks the vocabulary in
tiles of ``tile`` rows of ``lm_head.weight``: the forward keeps a running log-sum-exp (and, for the KL, a
running sum of q (y_q - y_p)) per token; the backward recomputes each tile's logits and turns them into the
input gradient (accumulated over tiles in fp32), the weight gradient of that tile's rows, or, while scoring,
the tile's ghost dot sum_t delta_t^T G_tile h_t, reading G one tile at a time (``ProbeGradient.rows``).

The head runs *inside* a call of the ``lm_head`` module (its forward is swapped for the duration of the call),
so under ZeRO-3 DeepSpeed's module hooks gather its weight for the forward and again for the backward, and a
tied weight is the embedding's own parameter. The family's logit transforms (Gemma 2/3's final soft-capping,
Granite's logits scaling) are applied per tile in the model's dtype, as the model's forward does; any other
change a model's forward makes to the logits is caught by :func:`check_head` (one short sequence through both
paths), which refuses the model with the fix (``--vocab-tile 0``: the full-logits path) in the message.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trace_ds.config import DEFAULT_VOCAB_TILE as DEFAULT_TILE  # 8192 x 4096 bf16: 64 MiB of weight per tile
from trace_ds.data.batching import PairBatch, text_batch
from trace_ds.io import TraceError


@dataclass(frozen=True)
class LogitTransform:
    """What a family's forward does to ``lm_head``'s output, in the model's dtype and order."""

    softcap: float | None = None  # Gemma 2 / 3: cap * tanh(z / cap)
    divide: float | None = None  # Granite: z / logits_scaling

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.divide is not None:
            z = z / self.divide
        if self.softcap is not None:
            z = z / self.softcap
            z = torch.tanh(z)
            z = z * self.softcap
        return z

    @property
    def identity(self) -> bool:
        return self.softcap is None and self.divide is None


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a DeepSpeed engine and/or a peft model."""
    inner = getattr(model, "module", model)  # DeepSpeedEngine
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner


def logit_transform(model: nn.Module) -> LogitTransform:
    config = causal_lm(model).config
    softcap = getattr(config, "final_logit_softcapping", None)
    scaling = getattr(config, "logits_scaling", None)
    return LogitTransform(
        softcap=float(softcap) if softcap else None,
        divide=float(scaling) if scaling not in (None, 1, 1.0) else None,
    )


def head_module(model: nn.Module) -> nn.Linear | None:
    """``lm_head`` if it is a plain ``nn.Linear`` (the chunked path's assumption), else None (a LoRA-wrapped
    or custom head takes the full-logits path)."""
    head = causal_lm(model).get_output_embeddings()
    if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward:
        return head
    return None


@contextlib.contextmanager
def _forward_swapped(module: nn.Module, forward: Callable) -> Iterator[None]:
    """``module.forward`` replaced by ``forward`` for one call (module hooks, ZeRO-3's gathers, still run);
    a forward ghost mode installed is put back afterwards."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """ZeRO-3 parameters read outside their module's forward (the reference's head weight in the KL's
    backward) are gathered for the block; plain tensors need nothing."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def _foreign(*params: torch.Tensor | None) -> list[torch.Tensor]:
    """The reference's head parameters (the first two) that are not the policy's own (the last two): with LoRA
    the reference's head is the policy's frozen head, which its module call has gathered already (gathering
    it again would release it on exit)."""
    ref, own = params[:2], params[2:]
    return [p for p in ref if p is not None and not any(p is q for q in own)]


def _tiles(vocab: int, tile: int) -> Iterator[tuple[int, int]]:
    for start in range(0, vocab, tile):
        yield start, min(start + tile, vocab)


def _tile_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int
) -> torch.Tensor:
    return F.linear(hidden, weight[start:stop], None if bias is None else bias[start:stop])


@dataclass
class _Ghost:
    """The scoring state while the head runs in ghost mode: where the tile dots and G come from."""

    state: Any  # trace_ds.scoring.ghost_ops.GhostState
    offsets: torch.Tensor  # (rows + 1,) the head's tokens per batch row, cumulated


def _weight_backward(
    ghost: _Ghost | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    hidden: torch.Tensor,
    tile_grad: Callable[[int, int], torch.Tensor],
    vocab: int,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Walk the tiles: ``tile_grad(start, stop)`` is d loss / d (tile's pre-transform logits), in the model's
    dtype. Returns the input gradient (accumulated in fp32) and the weight and bias gradients (None in ghost
    mode, where the tile's ghost dot or probe gradient is taken instead)."""
    want_w, want_b = weight.requires_grad, bias is not None and bias.requires_grad
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_w = torch.zeros_like(weight) if want_w and ghost is None else None
    grad_b = torch.zeros_like(bias) if want_b and ghost is None and bias is not None else None
    norms = ghost.state.norms if ghost is not None else None
    head_norm = norms.head(weight, hidden, ghost.offsets) if norms is not None and want_w else None  # type: ignore[union-attr]
    for start, stop in _tiles(vocab, tile):
        dz = tile_grad(start, stop)
        grad_h.add_(dz.matmul(weight[start:stop].to(dz.dtype)))
        if ghost is None:
            if grad_w is not None:
                grad_w[start:stop] = dz.t().matmul(hidden.to(dz.dtype)).to(weight.dtype)
            if grad_b is not None:
                grad_b[start:stop] = dz.float().sum(0).to(bias.dtype)  # type: ignore[union-attr]
            continue
        state = ghost.state
        if state.mode == "probe":
            if want_w:
                state.store.add_rows(weight, start, dz.float().t().matmul(hidden.float()))
            if want_b:
                state.store.add_rows(bias, start, dz.float().sum(0))
        else:
            if want_w:
                state.add_linear_scores(hidden, dz, state.store.rows(weight, start, stop), ghost.offsets)
            if want_b:
                per_token = dz.float().matmul(state.store.rows(bias, start, stop).float())
                state.scores += torch.segment_reduce(per_token, "sum", offsets=ghost.offsets)
        if head_norm is not None:
            head_norm.add_tile(dz, start)
        if norms is not None and want_b:  # a bias's tiles are disjoint entries: their squares add
            norms.add_vector(
                dz.float(), head_norm.row_of_entry if head_norm else norms.rows_of(ghost.offsets)
            )
    if head_norm is not None:
        head_norm.finish()
    if ghost is not None:
        ghost.state.touched.update(id(p) for p in (weight, bias) if p is not None and p.requires_grad)
    return grad_h, grad_w, grad_b


def _pre_transform_grad(z: torch.Tensor, transform: LogitTransform, grad_y: torch.Tensor) -> torch.Tensor:
    """d loss / d z from d loss / d y (fp32) through the transform, with the model's dtype and ops."""
    grad_y = grad_y.to(z.dtype)
    if transform.identity:
        return grad_y
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        (grad_z,) = torch.autograd.grad(transform(leaf), leaf, grad_y)
    return grad_z


class _ChunkedLogp(torch.autograd.Function):
    """log softmax(transform(h W^T + b))[target] per token, tile by tile over the vocabulary."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        transform: LogitTransform,
        tile: int,
        ghost: _Ghost | None,
    ) -> torch.Tensor:
        tokens, vocab = hidden.shape[0], weight.shape[0]
        running_max = torch.full((tokens,), -math.inf, dtype=torch.float32, device=hidden.device)
        running_sum = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        for start, stop in _tiles(vocab, tile):
            y = transform(_tile_logits(hidden, weight, bias, start, stop)).float()
            new_max = torch.maximum(running_max, y.max(-1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                y - new_max[:, None]
            ).sum(-1)
            running_max = new_max
            inside = (targets >= start) & (targets < stop)
            picked = y.gather(1, (targets - start).clamp(0, stop - start - 1)[:, None]).squeeze(1)
            target_logit = torch.where(inside, picked, target_logit)
        lse = running_max + torch.log(running_sum)
        ctx.save_for_backward(hidden, targets, lse)
        ctx.weight, ctx.bias, ctx.transform, ctx.tile, ctx.ghost = weight, bias, transform, tile, ghost
        return target_logit - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        hidden, targets, lse = ctx.saved_tensors
        weight, bias, transform = ctx.weight, ctx.bias, ctx.transform
        grad = grad.float()

        def tile_grad(start: int, stop: int) -> torch.Tensor:
            z = _tile_logits(hidden, weight, bias, start, stop)
            p = torch.exp(transform(z).float() - lse[:, None])
            grad_y = -grad[:, None] * p
            # + grad at each target inside this tile; rows whose target is elsewhere add 0 (no host sync, as
            # selecting the rows would be: one per tile)
            inside = (targets >= start) & (targets < stop)
            local = (targets - start).clamp(0, stop - start - 1)[:, None]
            grad_y.scatter_add_(1, local, torch.where(inside, grad, 0.0)[:, None])
            return _pre_transform_grad(z, transform, grad_y)

        grad_h, grad_w, grad_b = _weight_backward(
            ctx.ghost, weight, bias, hidden, tile_grad, weight.shape[0], ctx.tile
        )
        return grad_h.to(hidden.dtype), grad_w, grad_b, None, None, None, None


class _ChunkedKL(torch.autograd.Function):
    """KL(q || p) per token over the vocabulary, q the reference's distribution (constant), p the policy's,
    tile by tile, accumulated in fp64. With d = y_q - y_p and one running max m over both logits, P = exp(y_p - m) and
    Q = exp(y_q - m): KL = sum Q d / sum Q - log(sum Q / sum P), and sum Q / sum P = 1 + sum P expm1(d) / sum P.
    Written this way nothing of size log(vocab) cancels: close policies (KL ~ 1e-4) keep their digits, which
    the textbook sum q (log q - log p) in fp32 does not (each log-prob carries an error of eps * lse)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ref_hidden: torch.Tensor,
        ref_weight: torch.Tensor,
        ref_bias: torch.Tensor | None,
        transform: LogitTransform,
        tile: int,
        ghost: _Ghost | None,
    ) -> torch.Tensor:
        tokens, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device

        def zeros() -> torch.Tensor:
            return torch.zeros(tokens, dtype=torch.float64, device=device)

        top = torch.full((tokens,), -math.inf, dtype=torch.float64, device=device)
        sum_p, sum_q, cross, excess = zeros(), zeros(), zeros(), zeros()
        with _gathered(_foreign(ref_weight, ref_bias, weight, bias)):
            for start, stop in _tiles(vocab, tile):
                yp = transform(_tile_logits(hidden, weight, bias, start, stop)).double()
                yq = transform(_tile_logits(ref_hidden, ref_weight, ref_bias, start, stop)).double()
                new_top = torch.maximum(top, torch.maximum(yp.max(-1).values, yq.max(-1).values))
                rescale = torch.exp(top - new_top)
                top = new_top
                # in place where possible: five fp64 tiles live at most (docs/performance.md, plan)
                d = yq - yp
                pe = yp.sub_(top[:, None]).exp_()
                qe = yq.sub_(top[:, None]).exp_()
                sum_p = sum_p * rescale + pe.sum(-1)
                sum_q = sum_q * rescale + qe.sum(-1)
                cross = cross * rescale + torch.linalg.vecdot(qe, d)
                # sum (Q - P) without cancelling: P expm1(d) where d is small, the difference where it is not
                # (a select, not a masked assignment: that syncs with the host once per tile)
                large = d.abs() >= 1
                gap = torch.expm1(d).mul_(pe)
                gap = torch.where(large, torch.sub(qe, pe, out=d), gap)
                excess = excess * rescale + gap.sum(-1)
        lse_p, lse_q = top + torch.log(sum_p), top + torch.log(sum_q)  # fp64: p - q cancels in the backward
        ctx.save_for_backward(hidden, ref_hidden, lse_p, lse_q)
        ctx.params = (weight, bias, ref_weight, ref_bias)
        ctx.transform, ctx.tile, ctx.ghost = transform, tile, ghost
        return (cross / sum_q - torch.log1p(excess / sum_p)).float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        hidden, ref_hidden, lse_p, lse_q = ctx.saved_tensors
        weight, bias, ref_weight, ref_bias = ctx.params
        transform = ctx.transform
        grad = grad.float()

        def tile_grad(start: int, stop: int) -> torch.Tensor:
            z = _tile_logits(hidden, weight, bias, start, stop)
            p = torch.exp(transform(z).double() - lse_p[:, None])
            q = torch.exp(
                transform(_tile_logits(ref_hidden, ref_weight, ref_bias, start, stop)).double()
                - lse_q[:, None]
            )
            return _pre_transform_grad(z, transform, (grad[:, None] * (p - q)).float())

        with _gathered(_foreign(ref_weight, ref_bias, weight, bias)):
            grad_h, grad_w, grad_b = _weight_backward(
                ctx.ghost, weight, bias, hidden, tile_grad, weight.shape[0], ctx.tile
            )
        return grad_h.to(hidden.dtype), grad_w, grad_b, None, None, None, None, None, None


# ---- one forward of a batch through the decoder and the chunked head ----


@dataclass
class Reference:
    """The reference model's side of the KL: its final hidden states at the KL positions and its head."""

    hidden: torch.Tensor  # (T_kl, H)
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class HeadResult:
    logps: torch.Tensor  # (N,) summed response log-probs of the rows run
    kl: torch.Tensor | None  # (N,) mean token KL(ref || policy) on the KL rows, 0 on the others
    reference: Reference | None  # this model's hidden states at the KL rows' positions (as a reference)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask.reshape(-1) > 0, as_tuple=False).squeeze(-1)


def run_head(
    model: nn.Module,
    batch: Any,
    rows: torch.Tensor | None = None,
    *,
    tile: int = DEFAULT_TILE,
    kl_rows: torch.Tensor | None = None,
    reference: Reference | None = None,
    keep_reference: bool = False,
) -> HeadResult:
    """``model``'s summed response log-probs for ``rows`` of ``batch`` (all when None) through the chunked head,
    plus the KL against ``reference`` on ``kl_rows`` (indices into the rows run) when given. With
    ``keep_reference`` (a reference model's pass, under no_grad) the hidden states at ``kl_rows``' positions
    and the head are returned, to serve as the ``reference`` of the policy's pass."""
    from trace_ds.models.loading import forward_settings
    from trace_ds.scoring.ghost import active_state
    from trace_ds.scoring.ghost_ops import row_offsets

    lm = causal_lm(model)
    head = head_module(model)
    if head is None:
        raise TraceError("internal: run_head on a model whose lm_head is not a plain nn.Linear")

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if rows is None else tensor.index_select(0, rows)

    input_ids, mask, labels = pick(batch.input_ids), pick(batch.loss_mask), pick(batch.labels)
    n, length = input_ids.shape
    decoder = lm.get_decoder()
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=pick(batch.attention_mask),
        position_ids=pick(batch.position_ids),
        use_cache=False,
        **forward_settings(lm),
    ).last_hidden_state
    positions = _positions(mask)
    flat = hidden.reshape(n * length, -1)
    selected = flat.index_select(0, positions)
    targets = labels.reshape(-1).index_select(0, positions)
    row_of = positions // length
    transform = logit_transform(model)
    kl_positions = None
    if kl_rows is not None:
        kl_mask = torch.zeros(n, dtype=torch.bool, device=mask.device).index_fill_(0, kl_rows, True)
        kl_positions = _positions(mask * kl_mask[:, None])
    out: dict[str, torch.Tensor] = {}

    def forward(_: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = active_state(head)
        ghost = None
        if state is not None:
            ghost = _Ghost(state, row_offsets(row_of, n))
        out["logp"] = _ChunkedLogp.apply(selected, head.weight, head.bias, targets, transform, tile, ghost)
        if reference is not None and kl_positions is not None:
            kl_hidden = flat.index_select(0, kl_positions)
            kl_ghost = None
            if state is not None:
                kl_ghost = _Ghost(state, row_offsets(kl_positions // length, n))
            out["kl"] = _ChunkedKL.apply(
                kl_hidden, head.weight, head.bias, reference.hidden, reference.weight, reference.bias,
                transform, tile, kl_ghost,
            )  # fmt: skip
        # every output leaves the module call: DeepSpeed's hooks on them re-gather the weight for the backward
        return tuple(out.values())

    with _forward_swapped(head, forward):
        outputs = head(selected)
    out = dict(zip(list(out), outputs, strict=True))  # the tensors as they left the module call
    logps = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    logps = logps.index_add(0, row_of, out["logp"] * mask.reshape(-1).index_select(0, positions).float())
    kl = None
    if "kl" in out and kl_positions is not None:
        counts = torch.bincount(kl_positions // length, minlength=n)
        sums = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(
            0, kl_positions // length, out["kl"]
        )
        kl = sums / counts.clamp(min=1)
    kept = None
    if keep_reference and kl_positions is not None:
        kept = Reference(flat.index_select(0, kl_positions).detach(), head.weight, head.bias)
    return HeadResult(logps, kl, kept)


def response_logps(
    model: nn.Module,
    batch: PairBatch,
    rows: torch.Tensor | None = None,
    tile: int = 0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Response log-probs of ``model`` for the batch (or the given rows), summed or averaged per token
    (``reduction``): through the vocabulary-chunked head when ``tile`` > 0 and the model's head is a plain
    linear layer, else from the full logits. The one way every stage gets a pair's log-probs."""
    from trace_ds.training.losses import reduce_logps, sequence_logps

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if rows is None else tensor.index_select(0, rows)

    if tile > 0 and head_module(model) is not None:
        sums = run_head(model, batch, rows, tile=tile).logps
    else:
        sums = sequence_logps(batch.logits(model, rows), pick(batch.labels), pick(batch.loss_mask))
    return reduce_logps(sums, pick(batch.loss_mask), reduction)


def check_head(model: nn.Module, tile: int) -> None:
    """One short sequence through the model's own forward (full logits) and through the chunked head: a model
    whose forward changes ``lm_head``'s output in a way :class:`LogitTransform` does not reproduce (a new
    family's logit scale) is refused here, with the fix, instead of training on the wrong log-probs. Every
    rank runs the same calls (ZeRO-3)."""
    if tile <= 0 or head_module(model) is None:
        return
    from trace_ds.training.losses import sequence_logps

    head = head_module(model)
    assert head is not None
    vocab = int(getattr(head.weight, "ds_shape", head.weight.shape)[0])
    ids = [(7 * i + 3) % vocab for i in range(12)]
    batch = text_batch([ids], pad_id=0).to(head.weight.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = sequence_logps(batch.logits(model), batch.labels, batch.loss_mask)
            got = run_head(model, batch, tile=tile).logps
    finally:
        model.train(training)
    error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    if not error <= 1e-2:
        raise TraceError(
            f"{type(causal_lm(model)).__name__}: its forward changes lm_head's output in a way the "
            f"vocabulary-chunked head does not reproduce (summed log-probs {float(got[0]):.4f} chunked vs "
            f"{float(want[0]):.4f} from the model's own logits); run with --vocab-tile 0 (full logits, more "
            "memory at large vocabularies), or add the family's logit transform to trace_ds/training/vocab_head.py"
        )
