"""`trace-ds plan`: memory per rank for scoring and training, from the model config alone (no weights).

Parameter counts come from the model built on the meta device (exact for any architecture transformers
knows); activations from a per-token count of what a Llama-style decoder layer keeps for backward. The
ZeRO terms follow DeepSpeed's partitioning: at stage 3 parameters, gradients and optimizer states are
split over all ranks; at stages 1-2 parameters stay whole on every rank. Every figure is in bytes; the
printed tables use GiB. Accuracy against measured peaks is in docs/performance.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.config import DEFAULT_VOCAB_TILE, LoraConfig
from trace_ds.io import TraceError

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# DeepSpeed defaults (elements) for the ZeRO-3 knobs that size gathered parameters and gradient buckets.
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter counts and the decoder's widths."""

    name: str
    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    largest_param: int  # elements of the biggest single tensor (embedding or LM head, usually)
    largest_piece: int  # ... of the biggest G read whole under ZeRO-3: not a vocabulary tensor; one expert
    layer_params: int  # elements of one decoder layer
    lora_params: int = 0  # trainable elements with LoRA adapters (0: full fine-tuning)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def _load_config(model: str) -> Any:
    from transformers import AutoConfig

    path = Path(model)
    try:
        if path.is_file():  # a config.json itself
            return AutoConfig.for_model(**json.loads(path.read_text(encoding="utf-8")))
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise TraceError(f"--model {model}: no model config found ({err})") from err


def model_shape(model: str, lora: LoraConfig | None = None) -> ModelShape:
    """Count parameters by building the model on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _load_config(model)
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    params = list(built.named_parameters())  # tied weights once
    layer_modules = [m for name, m in built.named_modules() if name.endswith("layers.0")]
    layer_params = sum(p.numel() for p in layer_modules[0].parameters()) if layer_modules else 0
    lora_params = 0
    if lora is not None:
        targets = set(lora.target_modules)
        found = set()
        for name, module in built.named_modules():
            if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                lora_params += lora.r * (module.in_features + module.out_features)
                found.add(name.rsplit(".", 1)[-1])
        missing = sorted(targets - found)
        if missing:  # as score/train refuse them (models.attach_lora): the plan must not count fewer adapters
            raise TraceError(
                f"--lora-targets {','.join(missing)}: no such linear module in {model} (Phi-3 fuses qkv_proj and "
                "gate_up_proj; MoE experts are not linear modules: name the model's own modules)"
            )
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    return ModelShape(
        name=model,
        params=sum(p.numel() for _, p in params),
        layers=int(config.num_hidden_layers),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", 4 * hidden)),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        vocab=int(config.vocab_size),
        largest_param=max(p.numel() for _, p in params),
        largest_piece=max(
            (p.numel() // p.shape[0] if p.dim() == 3 else p.numel())
            for _, p in params
            if p.shape[0] != int(config.vocab_size)
        ),
        layer_params=layer_params,
        lora_params=lora_params,
    )


@dataclass(frozen=True)
class PlanSettings:
    ranks_per_node: int = 1
    nodes: int = 1
    zero: int = 3
    offload: bool = False  # optimizer states and (ZeRO-3) parameters in host memory (--offload)
    offload_reference: bool = False  # train --offload-reference: the reference's partitions on the host
    micro_batch: int = 4  # pairs per micro-batch: 2 x micro_batch sequences per forward
    seq_len: int = 1024
    dtype: str = "bfloat16"
    device_gib: float | None = None
    reserve_gib: float = 0.0  # runtime memory outside tensors (CUDA context, NCCL buffers), for the fit check
    ds_config: dict[str, Any] = field(default_factory=dict)
    vocab_tile: int = DEFAULT_VOCAB_TILE  # the chunked head's tile (0: full logits)

    @property
    def world(self) -> int:
        return self.ranks_per_node * self.nodes

    def offloads(self, section: str) -> bool:
        """``offload_optimizer`` / ``offload_param`` to host memory: from --offload or the DeepSpeed config."""
        device = self.ds_config.get("zero_optimization", {}).get(section, {}).get("device", "none")
        return self.offload or device in ("cpu", "nvme")

    def zero_knob(self, name: str) -> float:
        return float(self.ds_config.get("zero_optimization", {}).get(name, DS_DEFAULTS[name]))


def _activations(shape: ModelShape, settings: PlanSettings, checkpointing: bool) -> dict[str, int]:
    """Bytes kept for backward by one micro-batch (2 x micro_batch sequences of seq_len tokens).

    A Llama-style layer keeps, per token: the two RMSNorms' inputs and normalised outputs (4h), the
    attention projections' input (h), q and k after RoPE and v (h + 2 kv), the attention output and its
    log-sum-exp (h), the MLP input (h), gate, up, SiLU(gate) and their product (4i). With checkpointing a
    layer keeps only its input (h) and one layer at a time is recomputed. The vocabulary-chunked head
    (``vocab_tile`` > 0) keeps the final hidden states of the positions that predict a response token (taken
    as half the tokens: prompt and response of equal length) and, one tile at a time, holds that tile's logits
    in the model dtype and fp32 (forward and backward alike), plus the input gradient in fp32 in the backward.
    The full-logits path keeps the logits and their fp32 log-softmax (the sequence log-probs), and the
    backward briefly holds their gradients too.
    """
    b = DTYPE_BYTES[settings.dtype]
    tokens = 2 * settings.micro_batch * settings.seq_len
    per_layer = tokens * b * (8 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate)
    layers = (
        shape.layers * per_layer
        if not checkpointing
        else shape.layers * tokens * b * shape.hidden + per_layer
    )
    if settings.vocab_tile > 0:
        response = tokens // 2
        tile = response * min(settings.vocab_tile, shape.vocab) * (b + 8)
        kept = response * shape.hidden * b
        return {"layers": layers, "head": kept, "head_backward": tile + response * shape.hidden * 4}
    logits = tokens * shape.vocab * b
    log_softmax = tokens * shape.vocab * 4
    return {"layers": layers, "head": logits + log_softmax, "head_backward": log_softmax + logits}


def _reference_head(shape: ModelShape, settings: PlanSettings) -> int:
    """What training holds for the KL head beyond the policy's activations. Chunked head: the reference's hidden
    states at the KL positions (the chosen rows' response positions: a quarter of the tokens, as if every pair
    were a retention pair, an upper bound) and the KL's tile, in place of the log-prob tile: two logit tiles
    in the model dtype and at most five fp64 tiles (trace_ds/training/vocab_head.py). Full logits: the reference's
    logits and their fp32 copy."""
    b = DTYPE_BYTES[settings.dtype]
    tokens = 2 * settings.micro_batch * settings.seq_len
    if settings.vocab_tile > 0:
        response, kl = tokens // 2, tokens // 4
        tile = min(settings.vocab_tile, shape.vocab)
        logp_tile = response * tile * (b + 8)
        return kl * shape.hidden * b + max(0, kl * tile * (2 * b + 5 * 8) - logp_tile)
    return tokens * shape.vocab * (b + 4)


def _gathered(shape: ModelShape, settings: PlanSettings) -> int:
    """Elements of parameters gathered at once by the training engine under ZeRO-3. Its optimizer steps end
    DeepSpeed's trace of the module calls; once a trace is complete DeepSpeed keeps a parameter gathered until
    no reuse is due within max_reuse_distance (default 1e9 elements): up to max_live_parameters (+ the
    prefetch bucket), never less than the biggest layer or tensor. Measured on the CPU: the whole 63M model."""
    live = settings.zero_knob("stage3_max_live_parameters") + settings.zero_knob(
        "stage3_prefetch_bucket_size"
    )
    floor = max(shape.layer_params, shape.largest_param)
    return int(min(shape.params, max(live, floor)))


def _gathered_untraced(shape: ModelShape, together: int) -> int:
    """Elements gathered at once by an engine that never steps an optimizer (scoring, the training's
    reference): DeepSpeed's trace never completes there, so it releases each module's parameters right after
    the module's forward or backward, and the working set is a module or two, not the model. Measured on the
    CPU (2 ranks, 16-layer 63M model, ZeRO-3): scoring held the embedding and the lm_head at once (``together``
    = 2), the reference one tensor (``together`` = 1), whether or not checkpointing recomputes the layers."""
    return int(min(shape.params, together * shape.largest_param))


def plan(shape: ModelShape, settings: PlanSettings) -> dict[str, Any]:
    """Per-rank bytes of every term, for scoring and training, with and without gradient checkpointing."""
    b = DTYPE_BYTES[settings.dtype]
    world = settings.world
    zero3 = settings.zero == 3
    trainable = shape.lora_params or shape.params
    split = world if settings.zero >= 1 else 1
    param_split = world if zero3 else 1
    params = shape.params * b // param_split
    gathered = _gathered(shape, settings) * b if zero3 else 0
    scoring_gathered = _gathered_untraced(shape, 2) * b if zero3 else 0
    params_device = 0 if (zero3 and settings.offloads("offload_param")) else params
    grads = trainable * b // (world if settings.zero >= 2 else 1)
    bucket = int(min(settings.zero_knob("reduce_bucket_size"), trainable)) * b if settings.zero >= 2 else 0
    # Adam's two moments and DeepSpeed's fp32 partition of the trainable weights (a copy even in fp32)
    optimizer = trainable * 12 // split
    optimizer_device = 0 if settings.offloads("offload_optimizer") else optimizer
    # G in fp32: the probe pass accumulates it in fp32 whatever --g-dtype, so that is the peak; --g-dtype model
    # (and the Triton kernel) then casts it, tensor by tensor, to the model dtype for the scoring passes
    probe = trainable * 4 // (world if zero3 else 1)
    # one tensor's G gathered (or reduced) at a time: the embedding's whole (lm_head's goes one vocabulary
    # tile at a time with the chunked head, but the embedding path still reads all of its G)
    probe_transient = shape.largest_param * 4 * 2
    if zero3 and settings.vocab_tile > 0:
        # ZeRO-3 reads lm_head's G one vocabulary tile at a time, the embedding's only for the rows of the
        # batch's tokens, a fused MoE tensor's one expert at a time: the largest whole piece is then a layer's
        tokens = 2 * settings.micro_batch * settings.seq_len
        vocab_rows = max(min(settings.vocab_tile, shape.vocab), min(tokens, shape.vocab)) * shape.hidden
        probe_transient = max(shape.largest_piece, vocab_rows) * 4 * 2
    # LoRA: the base model with adapters off is the reference, no copy. Under ZeRO-3 the reference engine
    # has its own parameter coordinator, which only runs forwards: it gathers one module at a time.
    has_reference = not shape.lora_params
    reference_partitions = 0 if (zero3 and settings.offload_reference) else params_device
    reference_gathered = _gathered_untraced(shape, 1) * b if zero3 else 0
    reference = (reference_partitions + reference_gathered) if has_reference else 0

    result: dict[str, Any] = {
        "model": shape.name,
        "world_size": world,
        "zero": settings.zero,
        "dtype": settings.dtype,
        "offload": settings.offloads("offload_optimizer") or settings.offloads("offload_param"),
        "lora_params": shape.lora_params,
        "params": shape.params,
        "micro_batch": settings.micro_batch,
        "seq_len": settings.seq_len,
    }
    for checkpointing in (False, True):
        acts = _activations(shape, settings, checkpointing)
        activations = acts["layers"] + acts["head"] + acts["head_backward"]
        # training also holds the reference's side of the KL head (and, with full logits, of the rewards)
        train_acts = activations + _reference_head(shape, settings)
        tag = "checkpointing" if checkpointing else "no_checkpointing"
        scoring = {
            "parameters": params_device,
            "gathered_parameters": scoring_gathered,
            "probe_gradient": probe,
            "probe_transient": probe_transient,
            "activations": activations,
        }
        # The peak of a step has two candidates: the backward's activations, or its end, when the activations
        # are freed and the full reduce bucket is flushed, holding its flattened copy and the gradient
        # partition it is reduced into besides (measured on the CPU, 2 ranks: the peak came at the end of the
        # backward, level with and without checkpointing, and shrinking the bucket from 239 to 19 MiB lowered
        # it by 372 MiB). ZeRO-2 empties its bucket before the next forward; ZeRO-3's stays allocated.
        flush = bucket + grads if settings.zero >= 2 else 0
        in_flight = (bucket if zero3 else 0) + max(0, flush - train_acts)
        training = {
            "parameters": params_device,
            "gathered_parameters": gathered,
            "gradients": grads + in_flight,
            "optimizer": optimizer_device,
            "reference": reference,
            "activations": train_acts,
        }
        result[tag] = {
            "scoring": {**scoring, "total": sum(scoring.values())},
            "training": {**training, "total": sum(training.values())},
        }
    host = {
        "optimizer_offloaded": optimizer - optimizer_device,
        "parameters_offloaded": params - params_device,
        "reference_offloaded": params if (zero3 and settings.offload_reference and has_reference) else 0,
        # the consolidated state dict, freed before the saved model is reloaded to check it
        "export_rank0": shape.params * b,
    }
    result["host"] = host
    if settings.device_gib is not None:
        budget = (settings.device_gib - settings.reserve_gib) * GIB
        result["fits"] = {
            f"{stage}/{tag}": result[tag][stage]["total"] <= budget
            for tag in ("no_checkpointing", "checkpointing")
            for stage in ("scoring", "training")
        }
    return result


ROWS = (
    ("parameters", "parameters (this rank's)"),
    ("gathered_parameters", "parameters gathered (ZeRO-3)"),
    ("gradients", "gradients (+ reduce bucket)"),
    ("optimizer", "optimizer states (Adam, fp32)"),
    ("probe_gradient", "probe gradient G (fp32)"),
    ("probe_transient", "G of one tensor, gathered"),
    ("reference", "reference engine (+ gathered)"),
    ("activations", "activations + LM head"),
    ("total", "total"),
)


def render(result: dict[str, Any], settings: PlanSettings) -> str:
    """The plan as a fixed-width table (GiB per rank), ready to paste into docs."""
    columns = [
        (stage, tag) for tag in ("no_checkpointing", "checkpointing") for stage in ("scoring", "training")
    ]
    head = ["GiB per rank"] + [
        f"{stage} {'+ckpt' if tag == 'checkpointing' else ''}".strip() for stage, tag in columns
    ]
    lines = [
        f"model {result['model']}: {result['params'] / 1e9:.3g} B parameters"
        + (f", LoRA {result['lora_params'] / 1e6:.3g} M trainable" if result["lora_params"] else ""),
        f"{settings.nodes} node(s) x {settings.ranks_per_node} rank(s) = {result['world_size']}; ZeRO-{result['zero']}"
        f"{' + offload' if result['offload'] else ''}"
        f"{' + reference offload' if settings.offload_reference else ''}; {result['dtype']}; micro-batch {result['micro_batch']} pairs"
        f" x {result['seq_len']} tokens",
        "",
        f"{head[0]:<32}" + "".join(f"{h:>16}" for h in head[1:]),
    ]
    for key, label in ROWS:
        values = [result[tag][stage].get(key) for stage, tag in columns]
        if all(v is None or v == 0 for v in values) and key != "total":
            continue
        cells = "".join(f"{'-' if v is None else f'{v / GIB:.2f}':>16}" for v in values)
        lines.append(f"{label:<32}{cells}")
    host = result["host"]
    lines.append("")
    lines.append(
        "host memory per rank: "
        + ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f} GiB" for k, v in host.items() if v)
        + " (export: rank 0 only)"
    )
    if "fits" in result:
        budget = (
            f"{settings.device_gib:g} GiB device memory (minus {settings.reserve_gib:g} GiB runtime reserve)"
        )
        verdicts = ", ".join(
            f"{k.replace('/no_checkpointing', '').replace('/checkpointing', ' +ckpt')}: "
            f"{'fits' if v else 'DOES NOT FIT'}"
            for k, v in result["fits"].items()
        )
        lines.append(f"{budget}: {verdicts}")
    return "\n".join(lines)
