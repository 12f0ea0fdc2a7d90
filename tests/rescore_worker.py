"""One rank of tests/test_rescore.py's launch (not a test module): the trainer set up as ``trace-ds train``
would, then one in-run re-scoring at step 0, which writes ``<out>/rescores/step_00000000.jsonl``.

``deepspeed --num_gpus 2 tests/rescore_worker.py CONFIG.json`` (CONFIG: TrainConfig's fields as JSON).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from trace_ds.config import TrainConfig
from trace_ds.data.tokenize import TokenizeConfig
from trace_ds.training.train import Trainer


def main() -> None:
    path = next(arg for arg in sys.argv[1:] if not arg.startswith("--local_rank"))
    fields = json.loads(Path(path).read_text(encoding="utf-8"))
    fields["tokenize"] = TokenizeConfig(**fields["tokenize"])
    trainer = Trainer(TrainConfig(**fields))
    trainer.setup()
    trainer.rescore()
    trainer.strategy.close()
    sys.stdout.flush()
    os._exit(0)  # as run_cli: no interpreter teardown racing gloo's threads


if __name__ == "__main__":
    main()
