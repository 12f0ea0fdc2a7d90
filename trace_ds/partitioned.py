"""Partitioned loading under ZeRO-3: each rank reads only its own shard of every weight from the checkpoint.

transformers' ZeRO-3 path builds the model partitioned (``zero.Init``) but then has rank 0 read the whole
checkpoint and broadcast each layer, so rank 0's host memory peaks at the full model. Here the model is
built the same way (``from_config`` under transformers' DeepSpeed integration) and every rank copies the
slice ``[rank * shard, (rank + 1) * shard)`` of each flattened weight straight from the safetensors file
into its ``ds_tensor`` with positioned reads, through a bounded buffer: no collective, and no rank reads
more than its share of the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
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


def _checkpoint_key(name: str, keys: dict[str, Path], prefix: str) -> str | None:
    """The checkpoint's name for model tensor ``name``, allowing a checkpoint saved with or without the
    base-model prefix (``model.``)."""
    for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
        if candidate in keys:
            return candidate
    return None


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


def load_partitioned_weights(model: nn.Module, name: str, weight_map: dict[str, Path]) -> None:
    """Fill a ``zero.Init``-built model from a safetensors checkpoint, each rank its own shards."""
    prefix = getattr(model, "base_model_prefix", "model")
    missing: list[str] = []
    readers: dict[Path, SafetensorsReader] = {}
    try:
        with torch.no_grad():
            for tensor_name, tensor, partitioned in _named_tensors(model):
                key = _checkpoint_key(tensor_name, weight_map, prefix)
                if key is None:
                    missing.append(tensor_name)
                    continue
                path = weight_map[key]
                reader = readers.setdefault(path, SafetensorsReader(path))
                if not partitioned:
                    tensor.copy_(reader.tensor(key).reshape(tensor.shape))
                    continue
                local = tensor.ds_tensor  # type: ignore[attr-defined]
                numel = int(tensor.ds_numel)  # type: ignore[attr-defined]
                shard = int(local.ds_numel)
                start = shard * _partition_rank(tensor)  # type: ignore[arg-type]
                for offset, chunk in reader.read(key, start, min(start + shard, numel)):
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
