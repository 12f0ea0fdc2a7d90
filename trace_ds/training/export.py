"""Export the trained model as a Hugging Face folder (safetensors), consolidated from ZeRO-3, and verify it.

A known ZeRO-3 failure is an empty or partial export (partitioned parameters saved as 0-size tensors), so
the export is checked: every parameter name present with its full size, the parameter count equal to the
model's, and the exported model's logits on a fixed batch equal to the trained model's (within the export
dtype's tolerance). The check's inputs and the trained logits are saved beside it for anyone to re-run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from trace_ds.io import TraceError, write_json
from trace_ds.models.loading import DTYPES, forward_settings

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}  # max |logit diff| / max |logit|


def _consolidated_state_dict(trainer: Any) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); every rank must call this."""
    engine = trainer.engine
    if trainer.strategy.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers the partitions layer by layer
        return state if trainer.strategy.is_main else None
    return (
        {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
        if trainer.strategy.is_main
        else None
    )


def _check_batch(vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, max(vocab, 4), (2, 16), generator=generator)


def _trained_logits(trainer: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the trained model (every rank runs the forward: under ZeRO-3 it gathers parameters)."""
    module = trainer.engine.module
    module.eval()
    with torch.no_grad():
        ids = input_ids.to(trainer.strategy.device)
        logits = module(input_ids=ids, use_cache=False, **forward_settings(module)).logits.float().cpu()
    module.train()
    return logits


def export_trained(trainer: Any, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir`` (model or adapter, tokenizer, optional merged model) and verify it; returns a summary."""
    cfg, strategy = trainer.config, trainer.strategy
    export_dtype = cfg.export_dtype or cfg.dtype
    module = trainer.engine.module
    vocab = int(getattr(getattr(module, "config", None), "vocab_size", 32))
    input_ids = _check_batch(vocab)
    trained = _trained_logits(trainer, input_ids)
    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}
    state = _consolidated_state_dict(trainer)
    summary: dict[str, Any] = {}
    if strategy.is_main:
        assert state is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.lora:
            summary = _export_adapter(trainer, module, state, out_dir, export_dtype, input_ids, trained)
        else:
            summary = _export_full(module, state, expected, out_dir, export_dtype, input_ids, trained)
        if trainer.tokenizer is not None:
            trainer.tokenizer.save_pretrained(str(out_dir))
        torch.save({"input_ids": input_ids, "logits": trained}, out_dir / "export_check.pt")
        write_json(out_dir / "export.json", summary)
    strategy.barrier()
    return summary


def _cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    return {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _export_full(
    module: Any,
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    out_dir: Path,
    dtype: str,
    input_ids: torch.Tensor,
    trained: torch.Tensor,
) -> dict[str, Any]:
    missing = [
        name
        for name, shape in expected.items()
        if name not in state or state[name].numel() != math.prod(shape)
    ]
    if missing:
        raise TraceError(
            f"export incomplete: {len(missing)} parameters missing or partial, e.g. {missing[:3]}"
        )
    module.save_pretrained(str(out_dir), state_dict=_cast(state, dtype))
    state.clear()  # rank 0 holds the full model once, not twice: freed before the saved copy is reloaded
    prefix = getattr(module, "base_model_prefix", "model")
    return _verify_saved(out_dir, expected, dtype, input_ids, trained, kind="model", prefix=prefix)


def _export_adapter(
    trainer: Any,
    module: Any,
    state: dict[str, torch.Tensor],
    out_dir: Path,
    dtype: str,
    input_ids: torch.Tensor,
    trained: torch.Tensor,
) -> dict[str, Any]:
    """Save the adapter (and, with --merge-lora, a merged full model), then reload and compare logits."""
    from peft import PeftModel

    adapter_dir = out_dir / "adapter"
    module.save_pretrained(str(adapter_dir), state_dict=_cast(state, dtype))
    base = _plain_model(trainer.config.model, dtype)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir))
    summary = {
        "kind": "lora-adapter",
        "adapter": str(adapter_dir),
        **_logit_check(reloaded, input_ids, trained, dtype),
    }
    if trainer.config.merge_lora:
        merged = reloaded.merge_and_unload()
        merged.save_pretrained(str(out_dir))
        expected = {name: tuple(p.shape) for name, p in merged.named_parameters()}
        summary["merged"] = _verify_saved(
            out_dir, expected, dtype, input_ids, trained, kind="merged-model", prefix=merged.base_model_prefix
        )
    return summary


def _plain_model(path: str, dtype: str) -> Any:
    """Load a model outside DeepSpeed's zero.Init (rank 0 only, for checking and merging)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def _verify_saved(
    out_dir: Path,
    expected: dict[str, tuple[int, ...]],
    dtype: str,
    input_ids: torch.Tensor,
    trained: torch.Tensor,
    kind: str,
    prefix: str,
) -> dict[str, Any]:
    """Every parameter saved with its full size (a fused MoE expert tensor as the per-expert tensors that
    ``save_pretrained`` writes, see trace_ds.runtime.partitioned.tensor_sources), then the reloaded model's logits."""
    from safetensors import safe_open

    from trace_ds.runtime.partitioned import tensor_sources

    saved: dict[str, list[int]] = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                saved[key] = list(handle.get_slice(key).get_shape())
    missing: list[str] = []
    wrong: list[str] = []
    total_saved = 0
    for name, shape in expected.items():
        try:
            keys = tensor_sources(name, shape, saved, prefix)
        except TraceError:
            wrong.append(name)
            continue
        if keys is None:
            missing.append(name)
        else:
            total_saved += sum(math.prod(saved[key]) for key in keys)
    total_expected = sum(math.prod(shape) for shape in expected.values())
    if missing or wrong or total_saved != total_expected:
        raise TraceError(
            f"export incomplete in {out_dir}: {len(missing)} missing, {len(wrong)} with the wrong size "
            f"({total_saved} of {total_expected} parameters), e.g. {(missing + wrong)[:3]}"
        )
    model = _plain_model(str(out_dir), dtype)
    return {
        "kind": kind,
        "path": str(out_dir),
        "parameters": total_saved,
        "dtype": dtype,
        **_logit_check(model, input_ids, trained, dtype),
    }


def _logit_check(model: Any, input_ids: torch.Tensor, trained: torch.Tensor, dtype: str) -> dict[str, Any]:
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, **forward_settings(model)).logits.float()
    error = float((logits - trained).abs().max() / trained.abs().max().clamp(min=1e-12))
    if error > TOLERANCE[dtype]:
        raise TraceError(
            f"exported model does not reproduce the trained logits: relative error {error:.2e} > {TOLERANCE[dtype]}"
        )
    return {"logit_relative_error": error, "tolerance": TOLERANCE[dtype]}
