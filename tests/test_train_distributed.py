"""2-rank ZeRO-3 training with uneven shards, a category missing on one rank and the reference offloaded to
host memory, untied and tied embeddings: no hang, the same losses as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trace_ds.io import write_jsonl

from .helpers import deepspeed_command, read_lines

REPO = Path(__file__).resolve().parents[1]
CATEGORY_BY_POSITION = [
    "inversion",
    "retention",
    "suppression",
    "retention",
    "inversion",
    "retention",
    "suppression",
    "retention",
    "inversion",
]


def records() -> list[dict]:
    """9 pairs in a fixed order (buffer 1 keeps it): rank 0 gets the 5 conflict pairs, rank 1 the 4 retention
    pairs, so rank 1 has no conflict category at all and one step fewer of data."""
    out = []
    for i, category in enumerate(CATEGORY_BY_POSITION):
        out.append(
            {
                "id": f"p{i}",
                "prompt": f"Question number {i}?",
                "chosen": f"Answer {i} is fine.",
                "rejected": f"Answer {i} is not fine.",
                "category": category,
            }
        )
    return out


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with lm_head tied to the embedding (one ZeRO-3 parameter read by both ends)."""
    from trace_ds.models.tiny import build_tiny_pair, default_corpus

    out = tmp_path_factory.mktemp("tied") / "model"
    return build_tiny_pair(out, default_corpus(), vocab_size=512, tie_word_embeddings=True)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zero3_uneven_shards_do_not_hang_and_match_one_process(
    tiny_model_dir: Path, tied_model_dir: Path, tmp_path: Path, tied: bool
) -> None:
    model = tied_model_dir if tied else tiny_model_dir
    triaged, scores = tmp_path / "triaged.jsonl", tmp_path / "scores.jsonl"
    write_jsonl(triaged, records())
    write_jsonl(
        scores,
        [
            {"id": r["id"], "category": r["category"], "raw_score": 1.0, "weight": 1.0 + 0.1 * i}
            for i, r in enumerate(records())
            if r["category"] != "retention"
        ],
    )
    common = [
        "--model",
        str(model),
        "--triaged",
        str(triaged),
        "--scores",
        str(scores),
        "--buffer-size",
        "1",
        "--lr",
        "1e-3",
        "--max-length",
        "64",
        "--max-prompt-length",
        "32",
        "--alpha-kl",
        "5",
        "--epochs",
        "2",  # the epoch boundary after a short step: rank 1 runs a dummy, then both start epoch 1 together
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TRACE_DS_DIST_TIMEOUT_S": "90"}

    two = tmp_path / "two"
    command = deepspeed_command(
        2,
        "train",
        *common,
        "--out",
        str(two),
        "--micro-batch",
        "2",
        "--deepspeed",
        str(REPO / "ds_configs" / "cpu.json"),
        "--offload-reference",  # the reference's partitions in host memory: the same losses
        "--vocab-tile",  # tiles of 100 (6, the last short) against one process's single tile: the head, the KL
        "100",  # and the reference's weight gathered tile by tile under ZeRO-3 give the same losses
    )
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=540, start_new_session=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    one = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, "-m", "trace_ds.cli", "train", *common, "--out", str(one), "--micro-batch", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = read_lines(one / "metrics.jsonl"), read_lines(two / "metrics.jsonl")
    # each epoch's last step: one pair on rank 0, a dummy on rank 1; epoch 1 never fills epoch 0's last step
    assert [m["pairs"] for m in b] == [4, 4, 1] * 2
    assert [m["epoch"] for m in b] == [m["epoch"] for m in a] == [0, 0, 0, 1, 1, 1]
    for key in ("loss", "loss_inversion", "loss_suppression", "kl_retention"):
        for x, y in zip(a, b, strict=True):
            assert (x[key] is None) == (y[key] is None)
            if x[key] is not None:
                # abs: near its minimum an IPO loss (delta - 1/(2 beta))^2 is a squared small difference, so the
                # fp32 summation-order noise of delta (~1e-6 relative after a few Adam steps) shows up ~100x there
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (key, x["step"])
    import json

    export = json.loads((two / "final" / "export.json").read_text())  # consolidated from ZeRO-3 and verified
    assert export["parameters"] == json.loads((one / "final" / "export.json").read_text())["parameters"]
