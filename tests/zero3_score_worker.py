"""One rank of tests/test_families_distributed.py's ZeRO-3 scoring launch (not a test module).

``deepspeed --num_gpus 2 tests/zero3_score_worker.py --deepspeed CONFIG --jobs JOBS.json``: every job (a model
folder, triaged pairs, a probe file, an output path) is scored by ``run_score`` in turn, all inside one process
group: a launch costs far more than a tiny model. A job may set:

``"experts"``
    the model's experts implementation (e.g. "eager"; absent: transformers' default);
``"fallback"``
    ``TRACE_DS_GHOST_FALLBACK`` (``trace_ds.scoring.fallback.FORCE_ENV``, e.g. "Experts,TopKRouter") for that
    job only: set before it is scored, restored (or removed) afterwards, so the next jobs run as they would
    without it;
``"one_rank_expert": [layer, expert]``
    asserts that this expert of that layer's router received tokens on rank 0 and none on rank 1, so that
    rank 1 ran every collective for an expert it never used.

While a job runs, forward hooks on the MoE routers record which experts each rank routed tokens to
(``routing_hits``). Rank 0 writes ``<out stem>.routing.json`` (per rank: router name -> experts hit) for the
test, and prints each job's wall time. A rank that has finished every job leaves with ``os._exit(0)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def routing_hits(experts: str | None = None) -> Iterator[dict[str, set[int]]]:
    """While inside, every model ``trace_ds.models.loading.load_causal_lm`` builds records, per router module (a class
    named ``*TopKRouter``), the experts its forward calls selected (backward recomputes call the forward
    directly and are not counted). ``experts`` sets the model's experts implementation (e.g. "eager")."""
    import trace_ds.models.loading as models

    hits: dict[str, set[int]] = {}
    original = models.load_causal_lm

    def load(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)
        if experts is not None:
            model.config._experts_implementation = experts
        for name, module in model.named_modules():
            if type(module).__name__.endswith("TopKRouter"):
                hits[name] = set()

                def record(module: Any, inputs: Any, output: Any, name: str = name) -> None:
                    hits[name].update(int(e) for e in output[2].unique().tolist())

                module.register_forward_hook(record)
        return model

    models.load_causal_lm = load
    try:
        yield hits
    finally:
        models.load_causal_lm = original


@contextlib.contextmanager
def forced_fallback(classes: str | None) -> Iterator[None]:
    """``TRACE_DS_GHOST_FALLBACK=classes`` while inside (nothing changes if ``classes`` is None); its previous
    value, or its absence, afterwards."""
    from trace_ds.scoring.fallback import FORCE_ENV

    if classes is None:
        yield
        return
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = classes
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--jobs", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()

    import torch.distributed as dist

    from trace_ds.config import ScoreConfig
    from trace_ds.scoring.fallback import FORCE_ENV
    from trace_ds.scoring.scorer import run_score

    outside = os.environ.get(FORCE_ENV)
    for job in json.loads(Path(args.jobs).read_text()):
        started = time.perf_counter()
        with forced_fallback(job.get("fallback")), routing_hits(job.get("experts")) as hits:
            run_score(ScoreConfig(**job["score"], deepspeed=args.deepspeed))
        assert os.environ.get(FORCE_ENV) == outside, (job["name"], os.environ.get(FORCE_ENV), outside)
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, {name: sorted(experts) for name, experts in hits.items()})
        if job.get("one_rank_expert"):
            layer, expert = job["one_rank_expert"]
            router = next(name for name in ranks[0] if name.startswith(f"model.layers.{layer}."))
            assert expert in ranks[0][router] and expert not in ranks[1][router], (job["name"], ranks)
        if dist.get_rank() == 0:
            out = Path(job["score"]["out"])
            out.with_name(f"{out.stem}.routing.json").write_text(json.dumps(ranks))
            print(f"[worker] {job['name']}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
    # every job done and written: leave without interpreter teardown, as trace_ds.cli.run_cli does (gloo's
    # threads, destroyed unjoined there, now and then abort a finished rank: SIGABRT, the launch exits 250)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
