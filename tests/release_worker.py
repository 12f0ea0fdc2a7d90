"""One process of tests/test_engine_release.py (not a test module): under ZeRO-3 (one rank), score once and
train twice in the same process, as `trace-ds run` runs its stages in one launch, then print how many of the
DeepSpeed engines made are still alive, as JSON.

``python tests/release_worker.py MODEL TRIAGED SCORES_OUT WORKDIR DS_CONFIG``
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trace_ds.config import ScoreConfig, TrainConfig
from trace_ds.engine import live_engines
from trace_ds.scoring.scorer import run_score
from trace_ds.train import run_train


def main() -> None:
    model, triaged, scores, workdir, ds_config = sys.argv[1:6]
    alive = {}
    run_score(
        ScoreConfig(
            model=model,
            triaged=triaged,
            out=scores,
            probe_size=4,
            micro_batch=4,
            deepspeed=ds_config,
            allow_empty=True,
        )
    )
    alive["score"] = live_engines()
    for run in ("train_1", "train_2"):
        out = str(Path(workdir) / run)
        run_train(
            TrainConfig(
                model=model, triaged=triaged, scores=scores, out=out, deepspeed=ds_config, max_steps=2
            )
        )
        alive[run] = live_engines()
    print(json.dumps({"alive": alive}))
    sys.stdout.flush()
    os._exit(0)  # as run_cli: no interpreter teardown racing gloo's threads


if __name__ == "__main__":
    main()
