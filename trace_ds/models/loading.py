"""Loading models and tokenizers (a local folder or a hub id), and attaching LoRA adapters."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from trace_ds.config import LoraConfig
from trace_ds.io import TraceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name: str, required: bool) -> Any | None:
    """The model's tokenizer; None when the model has none and none is required (pre-tokenized pairs)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # transformers raises OSError, ValueError, ... for a missing tokenizer
        if required:
            raise TraceError(f"{name}: could not load a tokenizer ({err}); text pairs need one") from err
        return None


def load_causal_lm(name: str, dtype: str = "float32") -> nn.Module:
    """A transformers causal LM in eval mode (no dropout) with every parameter trainable. Under ZeRO-3 it is
    built partitioned and each rank reads only its shards of a safetensors checkpoint (trace_ds.runtime.partitioned)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    from trace_ds.runtime.partitioned import load_partitioned_causal_lm

    zero3 = is_deepspeed_zero3_enabled()
    try:
        model = load_partitioned_causal_lm(name, DTYPES[dtype]) if zero3 else None
        if model is None:
            if zero3:
                warnings.warn(
                    f"{name} is not a safetensors checkpoint: transformers' ZeRO-3 loader reads it whole on rank 0",
                    stacklevel=2,
                )
            model = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype])
    except OSError as err:
        raise TraceError(f"{name}: could not load a causal LM ({err})") from err
    model.eval()
    model.config.use_cache = False
    return model


def forward_settings(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for every forward and ``generate`` call trace-ds makes: MoE models (Mixtral,
    Qwen3-MoE, ...) run with ``output_router_logits=False`` whatever their config says. Scores and training
    losses are the heads' losses of the logits alone, never with the router's load-balancing auxiliary loss
    (docs/compatibility.md), so it is not computed; and transformers' ``generate`` fails on a padded batch
    when it is (the auxiliary loss's mask covers the whole sequence, the router logits the new token only)."""
    moe = hasattr(getattr(model, "config", None), "output_router_logits")
    return {"output_router_logits": False} if moe else {}


def attach_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters (seeded); only the adapters stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in lora.target_modules if target not in names]
    if missing:
        raise TraceError(f"--lora-targets {','.join(missing)}: no such module in the model")
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        # peft's init: A random (seeded here), B zero, so the adapted model equals the reference at the start
        # and the scores (through grad_B, which depends on A) are reproducible from the saved initial adapter.
        torch.manual_seed(lora.seed)
        peft_model = get_peft_model(model, config)
    peft_model.eval()
    return peft_model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing. transformers only checkpoints in train mode, so the model is
    put in train mode, which is exact only when no dropout is active: that is checked, not assumed."""
    config = getattr(model, "config", None)
    rates = {
        name: getattr(config, name, 0.0) or 0.0
        for name in ("attention_dropout", "hidden_dropout", "resid_pdrop")
    }
    rates.update({name: module.p for name, module in model.named_modules() if isinstance(module, nn.Dropout)})
    active = {name: rate for name, rate in rates.items() if rate > 0}
    if active:
        raise TraceError(
            f"gradient checkpointing needs train mode, where dropout would change the result; dropout is active in "
            f"{sorted(active)[:5]}: set those rates to 0 or run without --gradient-checkpointing"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.train()


def pad_token_id(tokenizer: Any | None, model: nn.Module) -> int:
    """Any valid id works for padding (padded positions are excluded by selection); prefer the tokenizer's."""
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(model.config, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    return 0
