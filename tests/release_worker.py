"""One process of tests/test_engine_release.py (not a test module): under ZeRO-3 (one rank), score twice and
train twice in the same process (each without and with gradient checkpointing), as `trace-ds run` runs its
stages in one launch; print how many of the DeepSpeed engines made are still alive after each, as JSON.

``python tests/release_worker.py MODEL TRIAGED SCORES_OUT WORKDIR DS_CONFIG``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trace_ds.config import ScoreConfig, TrainConfig
from trace_ds.runtime.engine import live_engines
from trace_ds.scoring.scorer import run_score
from trace_ds.training.train import run_train


def main() -> None:
    model, triaged, scores, workdir, ds_config = sys.argv[1:6]
    alive = {}
    for run, checkpointing in (("score", False), ("score_checkpointed", True)):
        config = ScoreConfig(
            model=model, triaged=triaged, out=scores, probe_size=4, micro_batch=4, deepspeed=ds_config,
            allow_empty=True, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        run_score(config)
        alive[run] = live_engines()
    for run, checkpointing in (("train", False), ("train_checkpointed", True)):
        config = TrainConfig(
            model=model, triaged=triaged, scores=scores, out=str(Path(workdir) / run), deepspeed=ds_config,
            max_steps=2, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        run_train(config)
        alive[run] = live_engines()
    print(json.dumps({"alive": alive}))
    sys.stdout.flush()
    os._exit(0)  # as run_cli: no interpreter teardown racing gloo's threads


if __name__ == "__main__":
    main()
