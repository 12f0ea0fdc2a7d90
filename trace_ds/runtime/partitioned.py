"""Partitioned loading under ZeRO-3: each rank reads only its own shard of every weight from the checkpoint.

transformers' ZeRO-3 path builds the model partitioned (``zero.Init``) but then has rank 0 read the whole
checkpoint and broadcast each layer, so rank 0's host memory peaks at the full model. Here the model is
built the same way (``from_config`` under transformers' DeepSpeed integration) and every rank copies the
slice ``[rank * shard, (rank + 1) * shard)`` of each flattened weight straight from the safetensors file
into its ``ds_tensor`` with positioned reads, through a bounded buffer: no collective, and no rank reads
more than its share of the checkpoint. A fused MoE expert tensor is the concatenation of the per-expert
tensors that ``save_pretrained`` writes (:func:`tensor_sources`), so it is read the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from trace_ds.io import TraceError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _resolve(name: str, filename: str) -> Path | None:
    """A checkpoint file from a local folder or the hub cache (None when the repository has no such file)."""
    local = Path(name)
    if local.is_dir():
        path = local / filename
        return path if path.exists() else None
    from transformers.utils import cached_file

    found = cached_file(name, filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def safetensors_weight_map(name: str) -> dict[str, Path] | None:
    """Every tensor name of the checkpoint and the file that holds it; None when it is not in safetensors."""
    index = _resolve(name, INDEX_FILE)
    if index is not None:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = {file: _resolve(name, file) for file in set(weight_map.values())}
        missing = sorted(file for file, path in files.items() if path is None)
        if missing:
            raise TraceError(f"{index}: lists {missing[:3]} but they are missing")
        return {key: files[file] for key, file in weight_map.items()}  # type: ignore[misc]
    single = _resolve(name, SINGLE_FILE)
    if single is None:
        return None
    with open(single, "rb") as handle:
        return dict.fromkeys(read_header(handle)[0], single)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
CHUNK_BYTES = 16 * 1024 * 1024


def read_header(handle: IO[bytes]) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensor table (name -> dtype, shape, data offsets) and where its data starts."""
    header_size = int.from_bytes(handle.read(8), "little")
    header = json.loads(handle.read(header_size))
    header.pop("__metadata__", None)
    return header, 8 + header_size


class SafetensorsReader:
    """Reads element ranges of tensors in a safetensors file with plain positioned reads.

    Not ``safe_open``: that memory-maps the file, and every page a rank reads then counts in its resident
    memory until the file is closed, so a rank's peak would hold its shard twice. Reads here go through the
    page cache into one bounded buffer (``CHUNK_BYTES``)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "rb")  # noqa: SIM115 (closed by close())
        self.header, self.data_start = read_header(self.handle)

    def close(self) -> None:
        self.handle.close()

    def shape(self, key: str) -> list[int]:
        return list(self.header[key]["shape"])

    def read(self, key: str, start: int, end: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Elements ``[start, end)`` of ``key`` flattened, as (offset from ``start``, chunk) pairs."""
        entry = self.header[key]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        per_chunk = max(CHUNK_BYTES // size, 1)
        for first in range(start, end, per_chunk):
            count = min(per_chunk, end - first)
            data = os.pread(
                self.handle.fileno(), count * size, self.data_start + entry["data_offsets"][0] + first * size
            )
            if len(data) != count * size:
                raise TraceError(
                    f"{self.path}: {key} is truncated (the file is shorter than its header says)"
                )
            yield first - start, torch.frombuffer(bytearray(data), dtype=dtype)

    def tensor(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=SAFETENSORS_DTYPES[self.header[key]["dtype"]])
        for offset, chunk in self.read(key, 0, numel):
            out[offset : offset + chunk.numel()] = chunk
        return out.view(shape)


def _checkpoint_key(name: str, keys: Mapping[str, Any], prefix: str) -> str | None:
    """The checkpoint's name for model tensor ``name``, allowing a checkpoint saved with or without the
    base-model prefix (``model.``)."""
    for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
        if candidate in keys:
            return candidate
    return None


# Fused MoE expert tensors (transformers 5: ``...experts.gate_up_proj`` of shape (E, 2I, H) and
# ``...experts.down_proj`` of shape (E, H, I)) and the per-expert tensors of the layout ``save_pretrained``
# writes and hub checkpoints hold: Qwen-MoE style ``mlp.experts.N.{gate,up,down}_proj.weight`` and Mixtral
# style ``block_sparse_moe.experts.N.{w1,w3,w2}.weight``. transformers' own conversion (conversion_mapping.py,
# "qwen2_moe" and "mixtral") stacks the experts (dim 0) and concatenates gate then up (dim 1), so the fused
# tensor flattened is, expert by expert, gate flattened then up flattened: a plain concatenation of
# checkpoint tensors, which each rank can read its slice of.
EXPERT_LAYOUTS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
MOE_MODULE_ALIASES = {".mlp.": ".block_sparse_moe."}  # Mixtral checkpoints: mlp was block_sparse_moe


def _aliases(name: str) -> list[str]:
    names = [name]
    for new, old in MOE_MODULE_ALIASES.items():
        if new in name:
            names.append(name.replace(new, old))
    return names


def tensor_sources(
    name: str, shape: Sequence[int], shapes: Mapping[str, Sequence[int]], prefix: str
) -> list[str] | None:
    """The checkpoint tensors that make model tensor ``name`` (of ``shape``), in order: their flattened
    concatenation is the tensor flattened. One key when the checkpoint has the model's own name (with or
    without ``prefix``, the base-model prefix); one per expert and projection for a fused MoE expert tensor
    stored per expert. None when the checkpoint has nothing for it. ``shapes``: every checkpoint tensor's shape.
    A size that does not fit, or two layouts present at once, is an error naming the tensor."""
    shape = tuple(int(n) for n in shape)
    for alias in _aliases(name):
        key = _checkpoint_key(alias, shapes, prefix)
        if key is not None:
            if math.prod(shapes[key]) != math.prod(shape):
                raise TraceError(
                    f"checkpoint tensor {key} has shape {list(shapes[key])} but the model's {name} has "
                    f"{list(shape)}: the checkpoint does not belong to this config"
                )
            return [key]
    module, _, projection = name.rpartition(".experts.")
    if not module or projection not in EXPERT_LAYOUTS or len(shape) != 3:
        return None
    found: list[list[str]] = []
    for parts in EXPERT_LAYOUTS[projection]:
        for alias in _aliases(f"{module}.experts"):
            candidates = [
                _checkpoint_key(f"{alias}.{expert}.{part}.weight", shapes, prefix)
                for expert in range(shape[0])
                for part in parts
            ]
            keys = [key for key in candidates if key is not None]
            if len(keys) == len(candidates):
                found.append(keys)
    if not found:
        return None
    keys = found[0]
    per_expert = [list(shapes[key]) for key in keys]
    fits = (
        all(len(s) == 2 and s[1] == shape[2] for s in per_expert)
        and sum(s[0] for s in per_expert[: len(keys) // shape[0]]) == shape[1]
        and sum(math.prod(s) for s in per_expert) == math.prod(shape)
    )
    if len(found) > 1 or not fits:
        problem = (
            f"holds {len(found)} per-expert layouts for it"
            if len(found) > 1
            else f"has per-expert tensors of shape {per_expert[0]} that do not stack to {list(shape)}"
        )
        raise TraceError(
            f"the checkpoint {problem} (model tensor {name}): partitioned loading cannot tell how they map; "
            "load the model without ZeRO-3 and save its state_dict() with safetensors.torch.save_file, so the "
            "checkpoint has the model's own tensor names"
        )
    return keys


def _partition_rank(param: nn.Parameter) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=param.ds_process_group)  # type: ignore[attr-defined]


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_partitioned) for every parameter (tied ones once) and every persistent buffer."""
    for name, param in model.named_parameters():
        yield name, param, hasattr(param, "ds_tensor")
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, buffer, False


def _read_sources(
    readers: list[tuple[SafetensorsReader, str]], start: int, end: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Elements ``[start, end)`` of the flattened concatenation of checkpoint tensors, as (offset from
    ``start``, chunk) pairs: only the tensors (and the parts of them) that overlap the range are read."""
    first = 0
    for reader, key in readers:
        numel = math.prod(reader.shape(key))
        lo, hi = max(start, first), min(end, first + numel)
        if lo < hi:
            for offset, chunk in reader.read(key, lo - first, hi - first):
                yield lo - start + offset, chunk
        first += numel


def load_partitioned_weights(model: nn.Module, name: str, weight_map: dict[str, Path]) -> None:
    """Fill a ``zero.Init``-built model from a safetensors checkpoint, each rank its own shards. Fused MoE
    expert tensors are read from a checkpoint that stores them per expert (:func:`tensor_sources`)."""
    prefix = getattr(model, "base_model_prefix", "model")
    missing: list[str] = []
    readers: dict[Path, SafetensorsReader] = {}
    try:
        for path in dict.fromkeys(weight_map.values()):
            readers[path] = SafetensorsReader(path)
        shapes = {key: readers[path].shape(key) for key, path in weight_map.items()}
        with torch.no_grad():
            for tensor_name, tensor, partitioned in _named_tensors(model):
                shape = tensor.ds_shape if partitioned else tensor.shape  # type: ignore[attr-defined]
                keys = tensor_sources(tensor_name, shape, shapes, prefix)
                if keys is None:
                    missing.append(tensor_name)
                    continue
                sources = [(readers[weight_map[key]], key) for key in keys]
                if not partitioned:
                    whole = torch.cat([reader.tensor(key).reshape(-1) for reader, key in sources])
                    tensor.copy_(whole.reshape(tensor.shape))
                    continue
                local = tensor.ds_tensor  # type: ignore[attr-defined]
                numel = int(tensor.ds_numel)  # type: ignore[attr-defined]
                shard = int(local.ds_numel)
                start = shard * _partition_rank(tensor)  # type: ignore[arg-type]
                for offset, chunk in _read_sources(sources, start, min(start + shard, numel)):
                    local.narrow(0, offset, chunk.numel()).copy_(chunk)
    finally:
        for reader in readers.values():
            reader.close()
    if missing:
        raise TraceError(
            f"{name}: the checkpoint has no tensor for {missing[:5]} ({len(missing)} in all); re-save it with "
            "save_pretrained from this transformers version"
        )


def load_partitioned_causal_lm(name: str, dtype: torch.dtype) -> nn.Module | None:
    """The model built partitioned and loaded shard by shard; None when the checkpoint is not safetensors
    (the caller then falls back to transformers' loader)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    weight_map = safetensors_weight_map(name)
    if weight_map is None:
        return None
    config = AutoConfig.from_pretrained(name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    load_partitioned_weights(model, name, weight_map)
    with contextlib.suppress(OSError):  # no generation_config.json: keep the one derived from the config
        model.generation_config = GenerationConfig.from_pretrained(name)
    return model
