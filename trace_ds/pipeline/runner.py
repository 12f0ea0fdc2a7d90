"""``trace-ds run CONFIG.yaml``: every stage from one config, cached by a hash of its inputs and settings.

Each stage writes into ``<workdir>/stages/<name>-<key>/`` and marks it done with ``done.json``. The key
hashes the stage's settings, the keys of the stages it reads and the trace-ds version, so a rerun skips
finished stages and a changed setting reruns exactly the stages that depend on it.

Stages run in three phases: local preparation (data, models, triage, derived inputs for baselines), the
distributed training stages (scoring and every method's training, in ONE ``deepspeed`` launch when
``launch.ranks`` > 1), and local evaluation and the report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from trace_ds import __version__
from trace_ds.console import console
from trace_ds.io import USER_ERROR_EXIT, TraceError, read_json, trace_ds_command, write_json
from trace_ds.pipeline.config import load_config
from trace_ds.pipeline.stages import Stage, plan_stages

__all__ = ["Pipeline", "Stage", "load_config", "write_demo_config"]


class Pipeline:
    def __init__(self, config: dict[str, Any], config_path: str):
        self.config = config
        self.config_path = config_path
        self.workdir = Path(config["workdir"])
        self.stages = self._plan()
        self._assign_keys()

    # ---- the plan ----
    def _plan(self) -> list[Stage]:
        return plan_stages(self.config)

    def _assign_keys(self) -> None:
        from trace_ds.evaluate.run import judge_versions

        by_name = {stage.name: stage for stage in self.stages}
        # an evaluation's verdicts depend on the rule judges' code, not only on its inputs
        judges = judge_versions()
        for stage in self.stages:
            payload = {
                "name": stage.name,
                "settings": stage.settings,
                "inputs": {name: by_name[name].key for name in stage.inputs},
                "version": __version__,
            }
            if stage.name.startswith("eval"):
                payload["judges"] = judges
            stage.key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
                :12
            ]
            stage.directory = self.workdir / "stages" / f"{stage.name}-{stage.key}"

    def dirs(self, stage: Stage) -> dict[str, Path]:
        by_name = {s.name: s for s in self.stages}
        return {name: by_name[name].directory for name in stage.inputs}

    # ---- running ----
    def run(self) -> dict[str, Any]:
        """The whole pipeline from the top-level process."""
        started = time.perf_counter()
        self._run_phase("prepare")
        pending = [s for s in self.stages if s.phase == "distributed" and not s.done()]
        if pending:  # in their own processes: a training stage's process group must not outlive it here
            self._launch(int(self.config["launch"]["ranks"]), pending)
        self._run_phase("finish")
        summary = self.summary(time.perf_counter() - started)
        write_json(self.workdir / "pipeline.json", summary)
        return summary

    def _run_phase(self, phase: str, is_main: bool = True) -> None:
        for stage in self.stages:
            if stage.phase != phase:
                continue
            if stage.done():
                if is_main:
                    console.print(f"[dim]cached[/]  {stage.name} ({stage.directory})")
                continue
            if is_main:
                console.rule(f"{stage.name}")
            started = time.perf_counter()
            created = not stage.directory.exists()
            stage.directory.mkdir(parents=True, exist_ok=True)
            try:
                result = stage.run(stage.directory, self.dirs(stage)) or {}
            except BaseException:
                if created and is_main:  # a stage that failed before writing anything leaves no folder
                    with contextlib.suppress(OSError):
                        stage.directory.rmdir()
                raise
            if phase == "distributed":
                _release_after(stage.name)
            if is_main:
                write_json(
                    stage.directory / "done.json",
                    {
                        "stage": stage.name,
                        "key": stage.key,
                        "seconds": round(time.perf_counter() - started, 2),
                        **result,
                    },
                )

    def run_distributed_phase(self) -> None:
        """Inside the one ``deepspeed`` launch: every rank runs the same stages; rank 0 marks them done."""
        rank = int(os.environ.get("RANK", "0"))
        self._run_phase("distributed", is_main=rank == 0)

    def _launch(self, ranks: int, pending: list[Stage]) -> None:
        command = trace_ds_command(ranks, "run", self.config_path, "--phase", "distributed")
        console.print(f"launching {len(pending)} distributed stage(s) on {ranks} ranks: {' '.join(command)}")
        env = dict(os.environ)
        env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
        result = subprocess.run(command, env=env, check=False)
        if result.returncode == USER_ERROR_EXIT:
            raise TraceError(
                f"the distributed stages stopped on the error printed above (exit {result.returncode}): fix it "
                "and rerun; finished stages stay cached"
            )
        if result.returncode != 0:
            raise TraceError(
                f"the distributed stages failed (exit {result.returncode}); rerun the same command to resume"
            )
        missing = [s.name for s in pending if not s.done()]
        if missing:
            raise TraceError(f"the distributed launch finished without completing {missing}")

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "config": self.config_path,
            "seconds": round(seconds, 1),
            "stages": {
                s.name: {"key": s.key, "dir": str(s.directory), "done": s.done()} for s in self.stages
            },
        }


def _release_after(stage: str) -> None:
    """Between the stages of one launch: give back what the finished stage freed, and log the resident set
    and how many of its DeepSpeed engines are still alive (0 unless something keeps them: see
    Strategy._release_engines)."""
    from trace_ds.runtime.engine import live_engines
    from trace_ds.runtime.memory import MIB, release_host_memory

    before, after = release_host_memory()
    console.print(
        f"rank {os.environ.get('RANK', '0')}: resident {before / MIB:,.0f} MiB after {stage}, "
        f"{after / MIB:,.0f} MiB once released, {live_engines()} DeepSpeed engines alive",
        soft_wrap=True,
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_done(directory: Path) -> dict[str, Any]:
    return read_json(directory / "done.json")


DEMO_CONFIG = """\
# The built-in demo: a synthetic policy shift, a tiny Llama model aligned to the OLD policy by SFT, then TRACE
# (and baselines) realigning it with 2-rank ZeRO-3 on the CPU. Edit and rerun: finished stages are cached.
workdir: {workdir}
seed: {seed}
data:
  synth: {{pairs: {pairs}, seed: {seed}, eval_prompts: 300, eval_pairs: 300}}
model:
  build_tiny: {{vocab_size: 1024, hidden_size: 128, num_layers: 4, num_heads: 4, num_kv_heads: 2, intermediate_size: 344, max_position_embeddings: 256, tie_word_embeddings: true}}
  sft: {{epochs: 3, lr: 0.003, batch_size: 32}}
tokenize: {{max_length: 160, max_prompt_length: 64}}
score: {{probe_size: 60, beta: 0.1, micro_batch: 16}}
train: {{epochs: 1, micro_batch: 8, lr: 0.0005, beta: 0.1, alpha_kl: 20.0}}
eval: {{max_new_tokens: 48, batch_size: 32}}
methods: {methods}
launch: {{ranks: {ranks}, deepspeed: {deepspeed}, threads: {threads}, cpu_isa: {cpu_isa}}}
"""
# The demo's digits must reproduce on another machine: two threads per process, AVX2 kernels everywhere.
DEMO_CPU_NUMERICS: dict[str, Any] = {"threads": 2, "cpu_isa": "avx2"}


def write_demo_config(workdir: str, seed: int, pairs: int, methods: list[str], ranks: int) -> Path:
    """The demo's config file (and the CPU ZeRO-3 DeepSpeed config it launches with) under ``workdir``."""
    from trace_ds.runtime.engine import CPU_ZERO3_CONFIG

    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    ds_path = folder / "ds_cpu_zero3.json"
    write_json(ds_path, CPU_ZERO3_CONFIG)
    text = DEMO_CONFIG.format(
        workdir=workdir,
        seed=seed,
        pairs=pairs,
        methods=json.dumps(methods),
        ranks=ranks,
        deepspeed=json.dumps(str(ds_path)),
        **DEMO_CPU_NUMERICS,
    )
    path = folder / "demo.yaml"
    from trace_ds.io import write_text

    write_text(path, text)
    return path
