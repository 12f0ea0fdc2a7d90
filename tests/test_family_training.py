"""Training, export, partitioned ZeRO-3 loading and evaluation on every model family of trace_ds.models.tiny.FAMILIES
(Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo2, Mixtral, Qwen3-MoE), each a tiny random model built with
transformers' own classes and saved as save_pretrained writes it (per-expert tensors for the MoE models)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from trace_ds.io import TraceError, free_port, write_jsonl
from trace_ds.judge.triage import run_triage
from trace_ds.models.tiny import FAMILIES, MOE_FAMILIES, build_tiny_family, default_corpus, train_tokenizer
from trace_ds.synth.generator import build_benchmark

from .helpers import read_lines

REPO = Path(__file__).resolve().parents[1]
BETA = 0.1
# Conflict weights of the scores file (retention pairs have none): not all 1, so a lost weight shows.
WEIGHTS = {"inversion": (0.5, 1.5), "suppression": (2.0, 0.25)}
# The router's load-balancing loss is switched on in the MoE checkpoints' configs (as some hub configs do),
# with a large coefficient: trace-ds must still train on the heads' losses alone (docs/compatibility.md).
MOE_AUX = {"output_router_logits": True, "router_aux_loss_coef": 0.5}


def build_families(root: Path) -> dict[str, Path]:
    """A saved tiny random model of every family of trace_ds.models.tiny.FAMILIES (MoE ones with MOE_AUX)."""
    tokenizer = train_tokenizer(default_corpus(), root / "tokenizer", vocab_size=512)
    out = {}
    for index, family in enumerate(FAMILIES):
        overrides = MOE_AUX if family in MOE_FAMILIES else {}
        build_tiny_family(root / family, family, tokenizer, seed=index, **overrides)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_families(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two pairs of each category (one optimizer step holds all six) and their conflict weights."""
    root = tmp_path_factory.mktemp("family_pairs")
    build_benchmark(root / "bench", n_pairs=24, seed=7, n_eval_prompts=3, n_eval_pairs=6)
    run_triage(
        str(root / "bench" / "pairs.jsonl"), str(root / "bench" / "verdicts.jsonl"), str(root / "all.jsonl")
    )
    rows = read_lines(root / "all.jsonl")
    categories = ("inversion", "suppression", "retention")
    picked = [r for category in categories for r in [r for r in rows if r["category"] == category][:2]]
    write_jsonl(root / "triaged.jsonl", picked)
    scores = [
        {"id": r["id"], "category": r["category"], "raw_score": w, "weight": w}
        for category, weights in WEIGHTS.items()
        for r, w in zip([r for r in picked if r["category"] == category], weights, strict=True)
    ]
    write_jsonl(root / "scores.jsonl", scores)
    return {
        "triaged": root / "triaged.jsonl",
        "scores": root / "scores.jsonl",
        "eval": root / "bench" / "eval",
    }


def heads_only_first_step_loss() -> float:
    """At step 1 the policy is the reference, so every reward is 0: IPO gives (0 - 1/(2 beta))^2 per inversion
    pair, NPO -(2/beta) log sigmoid(0) per suppressed response (two per pair), the KL 0; weighted, over 6 pairs."""
    ipo = (1 / (2 * BETA)) ** 2
    npo_pair = 2 * (2 / BETA) * math.log(2)
    return (sum(WEIGHTS["inversion"]) * ipo + sum(WEIGHTS["suppression"]) * npo_pair) / 6


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_export_reloads_in_transformers_with_the_trained_logits(
    family: str, families: dict[str, Path], pairs: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from trace_ds.config import TrainConfig
    from trace_ds.data.pairs import read_pairs
    from trace_ds.data.stream import TrainRecord
    from trace_ds.training.train import Trainer

    out = tmp_path / "run"
    config = TrainConfig(
        model=str(families[family]), triaged=str(pairs["triaged"]), scores=str(pairs["scores"]), out=str(out),
        max_steps=2, micro_batch=6, lr=1e-3, warmup_ratio=0.0, beta=BETA,
    )  # fmt: skip
    trainer = Trainer(config)
    trainer.run()
    metrics = read_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["pairs"] == 6
    # the loss trained on is the heads' loss; for the MoE models without the router's auxiliary loss (MOE_AUX)
    assert metrics[0]["loss"] == pytest.approx(heads_only_first_step_loss(), rel=1e-6)
    assert math.isfinite(metrics[1]["loss"]) and metrics[1]["loss"] != metrics[0]["loss"]

    # the export reloads with plain transformers and gives the trained model's logits, on the training batch
    # (padding, attention mask, position ids: the trainer's own forward)
    exported = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    initial = AutoModelForCausalLM.from_pretrained(families[family]).eval()
    assert type(exported).__name__ == type(initial).__name__
    records = [TrainRecord(p, str(p.extra["category"]), 1.0) for p in read_pairs(str(pairs["triaged"])).pairs]
    batch, _, _ = trainer._batch(records)
    trained_module = trainer.engine.module.eval()
    with torch.no_grad():
        trained = batch.logits(trained_module)
        reloaded = batch.logits(exported)
        before = batch.logits(initial)
    mask = batch.attention_mask.bool()
    scale = trained[mask].abs().max()
    assert (reloaded - trained)[mask].abs().max() <= 1e-5 * scale, family
    assert (before - trained)[mask].abs().max() > 1e-3 * scale, f"{family}: training did not move the model"
    for name, param in exported.named_parameters():
        assert torch.equal(param, dict(trained_module.named_parameters())[name].detach()), name
    if family in MOE_FAMILIES:  # the user's config is exported as it was
        assert exported.config.output_router_logits is True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_moe_batch_logits_leave_the_router_loss_out(
    families: dict[str, Path], pairs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one model call of scoring and training passes output_router_logits=False: with the checkpoint's
    config asking for the auxiliary loss, it is never computed, and the step loss is exactly the heads'."""
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trace_ds.config import TrainConfig
    from trace_ds.data.batching import collate_pairs
    from trace_ds.data.pairs import read_pairs
    from trace_ds.data.tokenize import tokenize_pair
    from trace_ds.training.losses import reduce_step_loss, sequence_logps
    from trace_ds.training.train import compute_losses

    for family, module_name in (("mixtral", "mixtral"), ("qwen3_moe", "qwen3_moe")):
        modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        policy = AutoModelForCausalLM.from_pretrained(families[family]).eval()
        reference = AutoModelForCausalLM.from_pretrained(families[family]).eval()
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in reference.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        assert policy.config.output_router_logits is True and policy.config.router_aux_loss_coef == 0.5
        tokenizer = AutoTokenizer.from_pretrained(families[family])
        read = read_pairs(str(pairs["triaged"])).pairs
        config = TrainConfig(
            model=str(families[family]), triaged=str(pairs["triaged"]), scores=str(pairs["scores"]),
            out=str(families[family].parent / f"unused_{family}"), beta=BETA,
        )  # fmt: skip
        batch = collate_pairs([tokenize_pair(p, tokenizer, config.tokenize) for p in read], 3)
        categories = [str(p.extra["category"]) for p in read]
        weights = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0, 1.0])

        # what the model itself would add with labels: its auxiliary loss, not 0
        with torch.no_grad():
            full = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        assert full.aux_loss is not None and float(full.aux_loss) > 0.1

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("the router's load-balancing loss was computed")

        with monkeypatch.context() as patch:
            patch.setattr(modeling, "load_balancing_loss_func", refuse)
            conflict, conflict_w, kl, _ = compute_losses(
                policy, lambda fn, ref=reference: fn(ref), batch, categories, weights, config
            )
        loss = reduce_step_loss(conflict, conflict_w, kl, config.alpha_kl, 6)

        # the heads by hand, from the plain logits
        with torch.no_grad():
            pol = policy(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
            ref = reference(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
        rewards = sequence_logps(pol, batch.labels, batch.loss_mask) - sequence_logps(
            ref, batch.labels, batch.loss_mask
        )
        chosen, rejected = rewards[:6], rewards[6:]
        total = torch.zeros(())
        for i, category in enumerate(categories):
            if category == "inversion":
                total = total + weights[i] * (chosen[i] - rejected[i] - 1 / (2 * BETA)) ** 2
            elif category == "suppression":
                npo = -(2 / BETA) * (
                    torch.nn.functional.logsigmoid(-BETA * chosen[i])
                    + torch.nn.functional.logsigmoid(-BETA * rejected[i])
                )
                total = total + weights[i] * npo
            else:  # retention: the KL(ref || policy) per response token of the chosen response, averaged
                # (in fp64, as trace-ds computes it: in fp32 each log-prob carries an error of eps * lse, and
                # the KL of two close models is small next to that; docs/method.md)
                log_p, log_q = pol[i].double().log_softmax(-1), ref[i].double().log_softmax(-1)
                per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
                mask = batch.loss_mask[i]
                total = total + config.alpha_kl * (per_token * mask).sum() / mask.sum()
        loss = float(loss.detach())
        # rel 2e-4, not 1e-5: the random model's summed log-probs are 200-900 nats, and the chunked head sums
        # them in another order than these full logits (5e-4 nats apart in fp32); the rewards, differences of
        # two such sums, carry that into IPO and NPO (measured: 4e-5 relative). The auxiliary loss would add
        # more than 1e-3 relative (checked below).
        assert loss == pytest.approx(float(total) / 6, rel=2e-4), family
        assert loss != pytest.approx(float(total) / 6 + 0.5 * float(full.aux_loss), rel=1e-3)


# ---------------------------------------------------------------------------------------- partitioned loading

HANDWRITTEN_EXPERT_NAMES = {  # the per-expert layout of hub checkpoints, written here by hand from fused tensors
    "mixtral": (".block_sparse_moe.", ("w1", "w3"), "w2"),
    "qwen3_moe": (".mlp.", ("gate_proj", "up_proj"), "down_proj"),
}


def per_expert_state(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each fused expert tensor split into per-expert tensors (gate rows, then up rows) under
    the family's hub names; Mixtral's router moves to block_sparse_moe.gate too."""
    module_name, (gate, up), down = HANDWRITTEN_EXPERT_NAMES[family]
    out = {}
    for name, tensor in state.items():
        module, _, projection = name.rpartition(".experts.")
        if projection == "gate_up_proj":
            base = module.replace(".mlp", module_name.rstrip("."))
            rows = tensor.shape[1] // 2
            for expert in range(tensor.shape[0]):
                out[f"{base}.experts.{expert}.{gate}.weight"] = tensor[expert, :rows].contiguous()
                out[f"{base}.experts.{expert}.{up}.weight"] = tensor[expert, rows:].contiguous()
        elif projection == "down_proj":
            base = module.replace(".mlp", module_name.rstrip("."))
            for expert in range(tensor.shape[0]):
                out[f"{base}.experts.{expert}.{down}.weight"] = tensor[expert].contiguous()
        else:
            out[name.replace(".mlp.", module_name)] = tensor.contiguous()
    return out


def checkpoint_layouts(families: dict[str, Path], root: Path) -> dict[str, Path]:
    """Folders of the MoE families' weights in the other layouts (the families' own folders are as
    save_pretrained writes them: per expert): per expert written by hand from the fused tensors, fused (the
    model's own tensor names), and for Qwen3-MoE save_pretrained's layout sharded over several files."""
    import shutil

    from transformers import AutoModelForCausalLM

    folders = {}
    for family in MOE_FAMILIES:
        model = AutoModelForCausalLM.from_pretrained(families[family])
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        for layout, tensors in (("handwritten", per_expert_state(family, state)), ("fused", state)):
            folder = root / f"{family}-{layout}"
            shutil.copytree(families[family], folder)
            save_file(tensors, str(folder / "model.safetensors"))
            folders[folder.name] = folder
        if family == "qwen3_moe":
            folder = root / f"{family}-sharded"
            model.save_pretrained(folder, max_shard_size="40KB")
            assert (
                len(list(folder.glob("*.safetensors"))) > 2
                and (folder / "model.safetensors.index.json").exists()
            )
            folders[folder.name] = folder
    return folders


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_moe_layouts_load_exactly_in_one_process(families: dict[str, Path], tmp_path: Path) -> None:
    """Without ZeRO-3 the partitioned loader fills whole tensors: every layout gives what transformers loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trace_ds.runtime.partitioned import load_partitioned_weights, safetensors_weight_map

    layouts = {family: families[family] for family in MOE_FAMILIES}
    for name, folder in {**layouts, **checkpoint_layouts(families, tmp_path)}.items():
        expected = AutoModelForCausalLM.from_pretrained(families[name.split("-")[0]]).state_dict()
        assert all(
            torch.equal(expected[k], v)
            for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()
        ), f"{name}: transformers reads this layout differently"
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        load_partitioned_weights(fresh, name, safetensors_weight_map(str(folder)) or {})
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, expected[key]), (name, key)


def test_expert_layouts_that_do_not_fit_are_refused() -> None:
    from trace_ds.runtime.partitioned import tensor_sources

    shape = (2, 8, 4)  # 2 experts, intermediate 4 (gate + up rows), hidden 4
    qwen = {f"model.l.mlp.experts.{e}.{p}.weight": [4, 4] for e in range(2) for p in ("gate_proj", "up_proj")}
    mixtral = {
        f"model.l.block_sparse_moe.experts.{e}.{p}.weight": [4, 4] for e in range(2) for p in ("w1", "w3")
    }
    assert tensor_sources("model.l.mlp.experts.gate_up_proj", shape, qwen, "model") == [
        "model.l.mlp.experts.0.gate_proj.weight", "model.l.mlp.experts.0.up_proj.weight",
        "model.l.mlp.experts.1.gate_proj.weight", "model.l.mlp.experts.1.up_proj.weight",
    ]  # fmt: skip
    assert tensor_sources("model.l.mlp.experts.gate_up_proj", shape, mixtral, "model") is not None
    with pytest.raises(TraceError, match=r"holds 2 per-expert layouts.*save_file"):
        tensor_sources("model.l.mlp.experts.gate_up_proj", shape, {**qwen, **mixtral}, "model")
    transposed = {key: [4, 8] for key in qwen}  # e.g. (hidden, intermediate): not what the model stacks
    with pytest.raises(TraceError, match="do not stack to"):
        tensor_sources("model.l.mlp.experts.gate_up_proj", shape, transposed, "model")
    with pytest.raises(TraceError, match=r"has shape \[3, 4\] but the model's .* has \[2, 8, 4\]"):
        tensor_sources(
            "model.l.mlp.experts.gate_up_proj", shape, {"model.l.mlp.experts.gate_up_proj": [3, 4]}, "model"
        )
    assert tensor_sources("model.l.mlp.experts.gate_up_proj", shape, {}, "model") is None


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_zero3_partitioned_loading_on_every_layout(families: dict[str, Path], tmp_path: Path) -> None:
    """One 2-rank ZeRO-3 launch loads each checkpoint through load_causal_lm (each rank reading its own
    slices); the gathered weights and the partitioned model's logits must equal plain transformers'."""
    from transformers import AutoModelForCausalLM

    folders = dict(families)
    folders.update(checkpoint_layouts(families, tmp_path / "layouts"))
    out = tmp_path / "out"
    out.mkdir()
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        str(REPO / "tests" / "zero3_load_worker.py"), "--deepspeed", str(REPO / "ds_configs" / "cpu.json"),
        "--out", str(out), *(str(folder) for folder in folders.values()),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRACE_DS_DIST_TIMEOUT_S": "120"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks
        output, _ = process.communicate()
        pytest.fail(f"the 2-rank loading launch timed out:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    for name, folder in folders.items():
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        gathered = load_file(str(out / f"{folder.name}.safetensors"))
        assert set(gathered) == {n for n, _ in plain.named_parameters()}, name
        for param_name, param in plain.named_parameters():
            assert torch.equal(gathered[param_name], param.detach()), (name, param_name)
        check = torch.load(out / f"{folder.name}.logits.pt")
        with torch.no_grad():
            logits = plain(input_ids=check["input_ids"], use_cache=False).logits
        assert torch.allclose(check["logits"], logits, rtol=1e-5, atol=1e-5), name
        assert json.loads((out / f"{folder.name}.json").read_text())["verified_tensors"] == len(gathered)


# ------------------------------------------------------------------------------------------------- evaluation


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_runs(family: str, families: dict[str, Path], pairs: dict[str, Path], tmp_path: Path) -> None:
    from trace_ds.cli import main

    out = tmp_path / "metrics.json"
    model = str(families[family])
    args = ["eval", "--model", model, "--reference", model, "--data", str(pairs["eval"]), "--out", str(out)]
    args += ["--max-new-tokens", "4", "--max-length", "96", "--max-prompt-length", "48"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["preference"]["inversion_margin"] == 0.0  # the model is its own reference
    assert metrics["perplexity"]["model"] == metrics["perplexity"]["reference"] > 1.0
    generations = read_lines(Path(metrics["generations"]))
    assert len(generations) == metrics["tpa"]["all"]["prompts"] == 3
