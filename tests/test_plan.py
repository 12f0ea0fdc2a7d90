"""`trace-ds plan`: exact parameter counts from the config alone, the ZeRO arithmetic, its errors, and (slow)
its totals within 25% of the measured per-rank peaks of real score and train runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.config import LoraConfig
from trace_ds.models.tiny import build_tiny_llama
from trace_ds.runtime.plan import PlanSettings, model_shape, plan

REPO = Path(__file__).resolve().parents[1]
LORA_TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.mark.parametrize("tied", [False, True])
def test_counts_equal_the_built_model_and_peft(tmp_path: Path, tied: bool) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = build_tiny_llama(tmp_path, 300, hidden_size=64, num_layers=3, tie_word_embeddings=tied)
    shape = model_shape(str(tmp_path / "config.json"))  # a config file alone is enough
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.largest_param == 300 * 64 and shape.layers == 3 and shape.vocab == 300
    # the largest tensor whose G ZeRO-3 reads whole: not the embedding or the head (read by rows)
    assert shape.largest_piece == max(p.numel() for p in model.parameters() if p.shape[0] != 300)
    lora = LoraConfig(r=4, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=list(LORA_TARGETS)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert model_shape(str(tmp_path), lora).lora_params == trainable


def test_zero_arithmetic(tmp_path: Path) -> None:
    build_tiny_llama(tmp_path, 1000, hidden_size=128, num_layers=4)
    shape = model_shape(str(tmp_path))

    def training(**kwargs: object) -> dict[str, int]:
        settings = PlanSettings(**{"micro_batch": 2, "seq_len": 64, "dtype": "bfloat16", **kwargs})  # type: ignore[arg-type]
        return plan(shape, settings)["checkpointing"]["training"]

    two, four = training(ranks_per_node=2), training(ranks_per_node=2, nodes=2)
    for key in ("parameters", "optimizer"):  # ZeRO-3 splits these over every rank of every node
        assert four[key] == pytest.approx(two[key] / 2, abs=4)
    assert two["optimizer"] == shape.params * 12 // 2
    assert training(ranks_per_node=2, offload=True)["optimizer"] == 0
    assert training(ranks_per_node=2, zero=2)["parameters"] == shape.params * 2  # ZeRO-2: whole weights
    offloaded = training(ranks_per_node=2, offload_reference=True)["reference"]
    # the training engine, whose optimizer steps complete DeepSpeed's trace, keeps the whole (small) model
    # gathered; the reference, forwards only, one module at a time; scoring, which never steps, two at once
    assert two["gathered_parameters"] == shape.params * 2
    assert offloaded < two["reference"] and offloaded == shape.largest_param * 2
    scoring = plan(shape, PlanSettings(ranks_per_node=2, micro_batch=2, seq_len=64))["checkpointing"][
        "scoring"
    ]
    assert scoring["gathered_parameters"] == 2 * shape.largest_param * 2 < two["gathered_parameters"]
    assert training(ranks_per_node=2, zero=2)["gathered_parameters"] == 0
    full = plan(shape, PlanSettings(micro_batch=2, seq_len=64))
    assert (
        full["checkpointing"]["training"]["activations"] < full["no_checkpointing"]["training"]["activations"]
    )

    # the G read whole at once while scoring: under ZeRO-3 with the chunked head a tile or a layer's matrix,
    # not the (V, d) embedding; with full logits, or replicated G (ZeRO-2), the whole embedding
    def transient(**kwargs: object) -> int:
        settings = PlanSettings(**{"micro_batch": 2, "seq_len": 64, "dtype": "bfloat16", **kwargs})  # type: ignore[arg-type]
        return plan(shape, settings)["checkpointing"]["scoring"]["probe_transient"]

    assert transient(vocab_tile=0) == transient(zero=2) == shape.largest_param * 8
    assert (
        transient(vocab_tile=256)
        == max(shape.largest_piece, 256 * shape.hidden) * 8
        < shape.largest_param * 8
    )
    lora = model_shape(str(tmp_path), LoraConfig(r=8))
    with_lora = plan(lora, PlanSettings(micro_batch=2, seq_len=64))["checkpointing"]["training"]
    assert with_lora["reference"] == 0 and with_lora["optimizer"] == lora.lora_params * 12 // 1


def test_cli_prints_the_table_and_says_what_fits(tmp_path: Path) -> None:
    build_tiny_llama(tmp_path, 1000, hidden_size=128, num_layers=4)
    out = tmp_path / "plan.json"
    args = ["plan", "--model", str(tmp_path), "--ranks", "2", "--seq-len", "64", "--json-out", str(out)]
    result = CliRunner().invoke(
        main, [*args, "--device-gib", "0.001", "--reserve-gib", "0"], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "optimizer states (Adam, fp32)" in result.output and "DOES NOT FIT" in result.output
    saved = json.loads(out.read_text())
    assert saved["world_size"] == 2 and saved["fits"]["training/checkpointing"] is False
    result = CliRunner().invoke(main, [*args, "--device-gib", "80"], terminal_width=200)
    assert "DOES NOT FIT" not in result.output


def test_errors_with_brackets_print_verbatim() -> None:
    """An error message is data (paths, log tails like gloo's "[/path/pair.cc:553]"), not rich markup."""
    result = CliRunner().invoke(main, ["plan", "--model", "/no/such[/x]/model"], terminal_width=200)
    assert result.exit_code == 2 and "/no/such[/x]/model: no model config found" in result.output, (
        result.output
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--zero", "2", "--offload-reference"], "--offload-reference needs --zero 3"),
        (["--zero", "2", "--deepspeed", "ds_configs/cpu.json"], "is ZeRO-3 but --zero is 2"),
        (["--lora", "--lora-targets", "nope"], "--lora-targets nope: no such linear module"),
    ],
)
def test_bad_options_are_named(
    tmp_path: Path, extra: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    build_tiny_llama(tmp_path, 1000, hidden_size=128, num_layers=2)
    result = CliRunner().invoke(main, ["plan", "--model", str(tmp_path), *extra], terminal_width=200)
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero", [2, 3])
def test_plan_is_within_25_percent_of_measured_peaks(tmp_path: Path, zero: int) -> None:
    """A 83 MB model on 2 ranks: `trace-ds score` and `trace-ds train` each report every rank's peak memory
    (TRACE_DS_MEMORY_REPORT); the plan for the same launch is within 25% of the larger rank's."""
    from trace_ds.bench.memory import compare_plan

    model = tmp_path / "model"
    build_tiny_llama(
        model, 8000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=1536
    )
    rows = compare_plan(str(model), tmp_path / "work", zero, ranks=2, micro_batch=4, seq_len=128)
    assert [row["stage"] for row in rows] == ["scoring", "training"]
    for row in rows:
        assert abs(row["error"]) <= 0.25, row
