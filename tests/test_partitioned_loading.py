"""Partitioned loading under ZeRO-3: exact weights, and per-rank peak memory that grows like half the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trace_ds.bench.memory import run_load_benchmark
from trace_ds.models.tiny import build_tiny_llama
from trace_ds.runtime import partitioned
from trace_ds.runtime.partitioned import SafetensorsReader, safetensors_weight_map

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_reader_ranges_equal_the_tensor_across_chunk_edges(
    tmp_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(partitioned, "CHUNK_BYTES", 40)  # many chunks, edges inside rows
    tensors = {
        "a": (torch.arange(7 * 13) * 3 - 50).reshape(7, 13).to(dtype),
        "b": torch.arange(5).to(dtype),
        "c": torch.tensor(2.5).to(dtype),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert set(safetensors_weight_map(str(tmp_path)) or {}) == {"a", "b", "c"}
    reader = SafetensorsReader(tmp_path / "model.safetensors")
    try:
        for key, value in tensors.items():
            assert torch.equal(reader.tensor(key), value)
            flat = value.reshape(-1)
            for start, end in [
                (0, flat.numel()),
                (3, flat.numel() - 2),
                (11, 12),
                (flat.numel(), flat.numel()),
            ]:
                start, end = min(start, flat.numel()), min(end, flat.numel())
                pieces = [(offset, chunk) for offset, chunk in reader.read(key, start, end)]
                got = torch.cat([chunk for _, chunk in pieces]) if pieces else flat[:0]
                assert [offset for offset, _ in pieces] == sorted(offset for offset, _ in pieces)
                assert torch.equal(got, flat[start:end])
    finally:
        reader.close()


def test_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1000)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    reader = SafetensorsReader(path)
    try:
        with pytest.raises(partitioned.TraceError, match=r"model\.safetensors: w is truncated"):
            reader.tensor("w")
    finally:
        reader.close()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_rank_peak_during_load_grows_like_half_the_model(tmp_path: Path) -> None:
    """Two checkpoints that differ only in depth (so the largest single tensor is the same): going from the
    small to the large one, each of 2 ranks' peak growth must rise by about half the added size. Rank 0 of
    transformers' own ZeRO-3 loader rises by the whole added size and more (docs/performance.md)."""
    sizes = {}
    for layers in (4, 16):
        folder = tmp_path / f"layers{layers}"
        build_tiny_llama(
            folder, 8000, hidden_size=512, num_layers=layers, num_heads=8, num_kv_heads=8,
            intermediate_size=1536, seed=0,
        )  # fmt: skip
        sizes[layers] = run_load_benchmark(
            str(folder), tmp_path / f"work{layers}", 2, str(REPO / "ds_configs" / "cpu.json"),
            verify=layers == 4, loaders=("trace-ds",),
        )  # fmt: skip
    small, large = sizes[4], sizes[16]
    assert 200 < large["checkpoint_mib"] < 260  # a model of a few hundred MB
    added = large["checkpoint_mib"] - small["checkpoint_mib"]
    for rank in range(2):
        peak_small, peak_large = small["loaders"]["trace-ds"][rank], large["loaders"]["trace-ds"][rank]
        slope = (peak_large - peak_small) / added
        assert 0.35 < slope < 0.75, f"rank {rank}: peak grows by {slope:.2f} x the added model size"
        assert peak_large < 0.75 * large["checkpoint_mib"], f"rank {rank}: peak {peak_large:.0f} MiB"


def test_plain_model_loads_through_the_reader_with_either_key_prefix(tmp_path: Path) -> None:
    """Without ZeRO-3 every tensor is whole, so the same loader fills them whole: a checkpoint saved with or
    without the base-model prefix ("model.") loads; a missing tensor is named."""
    from transformers import AutoModelForCausalLM

    from trace_ds.runtime.partitioned import load_partitioned_weights

    source = build_tiny_llama(tmp_path / "saved", 300, hidden_size=64, num_layers=2, seed=3)
    weight_map = safetensors_weight_map(str(tmp_path / "saved")) or {}
    fresh = AutoModelForCausalLM.from_config(source.config)
    load_partitioned_weights(fresh, "saved", weight_map)
    for (name, expected), (_, got) in zip(
        source.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(expected, got), name

    stripped = {k.removeprefix("model."): v.contiguous() for k, v in source.state_dict().items()}
    save_file(stripped, str(tmp_path / "stripped.safetensors"))
    other = AutoModelForCausalLM.from_config(source.config)
    load_partitioned_weights(other, "stripped", dict.fromkeys(stripped, tmp_path / "stripped.safetensors"))
    assert torch.equal(other.model.embed_tokens.weight, source.model.embed_tokens.weight)

    partial = {k: v for k, v in weight_map.items() if "layers.1." not in k}
    with pytest.raises(partitioned.TraceError, match=r"no tensor for \['model\.layers\.1\."):
        load_partitioned_weights(AutoModelForCausalLM.from_config(source.config), "partial", partial)


def test_non_safetensors_checkpoints_fall_back(tmp_path: Path) -> None:
    """A folder with only pytorch_model.bin has no safetensors weight map: load_causal_lm then warns and uses
    transformers' loader."""
    model = build_tiny_llama(tmp_path, 300, hidden_size=64, num_layers=1)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    assert safetensors_weight_map(str(tmp_path)) is None
    assert set(safetensors_weight_map(str(REPO / "tests")) or {}) == set()  # no checkpoint at all: None too
