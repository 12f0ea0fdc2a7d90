"""``trace-ds bench train``: training tokens/s of trace-ds against TRL's ``DPOTrainer`` on the same work.

Both arms train the same randomly initialised tiny Llama (fp32) on the same pre-tokenized pairs, in the same
order, with the same DPO loss (sigmoid, same beta), optimizer (torch AdamW, no weight decay), learning-rate
schedule (cosine, no warm-up), gradient clipping, micro-batch, number of optimizer steps, process count and
DeepSpeed config, with a live reference model:

* ``trace-ds``: :class:`trace_ds.training.train.Trainer`, every pair an ``inversion`` of weight 1 routed to the
  relational head with ``--relational dpo`` (so the retention and suppression heads are idle);
* ``trl``: ``trl.DPOTrainer`` with ``loss_type="sigmoid"``, ``ref_model`` given, no precomputed
  reference log-probs, no evaluation, no checkpoints, no logging.

Pre-tokenized random pairs (rather than text) make the two arms see byte-identical token sequences: the
trainers tokenise text differently (chat template, BOS handling), and tokenisation is outside the timed
loop anyway. Every run is a fresh ``deepspeed --num_gpus R --module trace_ds.bench.train ARM SETTINGS``
launch (so its peak RSS is its own); each rank writes its own figures: the wall time of optimizer steps
2..N (step 1 is warm-up), the non-padding tokens of the chosen and rejected rows of those steps, its peak
RSS at the end of training (and on a GPU its peak CUDA memory), and the per-step losses (compared between
arms, so a fast wrong arm cannot win). A memory matrix then trains the trace-ds arm under ZeRO-2 and ZeRO-3
with 1 and 2 ranks.

The runs use DeepSpeed's CUDA accelerator when torch sees a GPU (one GPU per rank) and its CPU one otherwise;
``DS_ACCELERATOR`` set in the environment decides instead. Both arms train in fp32 with torch's AdamW on either.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trace_ds.io import free_port
from trace_ds.runtime.engine import cpu_ds_config
from trace_ds.runtime.memory import lifetime_peak_rss_mib

ARMS = ("trace-ds", "trl")

DEFAULT_SETTINGS: dict[str, Any] = {
    "layers": 4,
    "hidden": 256,
    "vocab": 8192,
    "pairs": 64,
    "tokens": 256,  # per sequence, prompt + response (about half each)
    "micro_batch": 8,
    "steps": 8,
    "lr": 1e-4,
    "beta": 0.1,
    "threads": 2,  # torch threads per run, split between its ranks
    "seed": 0,
    "zero": 0,  # ZeRO stage of the speed comparison (0: trace-ds's default one-process engine)
    "ranks": 1,  # processes of the speed comparison
    "repeats": 1,  # speed runs per arm, interleaved; the report gives each and their median
    "arms": list(ARMS),
    "memory": True,
    "memory_zero": [2, 3],
    "memory_ranks": [1, 2],
    "workdir": "runs/bench_train",
}

# ds_configs/cpu.json (ZeRO-3, fp32) is the reference; stage 0 is trace-ds's built-in default and stage 2 is
# the same CPU config at stage 2 (engine.cpu_ds_config). The "auto" batch fields are filled in the same way
# by both trainers.
DS_STAGES = (0, 2, 3)


# ---------------------------------------------------------------------------------------------- the work


def prepare_work(settings: dict[str, Any]) -> dict[str, str]:
    """Build the model folder, the triaged pairs, the scores and the DeepSpeed configs in the workdir."""
    from trace_ds.io import write_json, write_jsonl
    from trace_ds.models.tiny import build_tiny_llama, default_corpus, train_tokenizer

    work = Path(settings["workdir"])
    model_dir = work / "model"
    hidden = settings["hidden"]
    heads = max(hidden // 64, 1)
    build_tiny_llama(
        model_dir, settings["vocab"], hidden_size=hidden, num_layers=settings["layers"], num_heads=heads,
        num_kv_heads=heads, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        max_position_embeddings=max(1024, 2 * settings["tokens"]), seed=settings["seed"],
    )  # fmt: skip
    # TRL needs a tokenizer for its pad token; the pairs are pre-tokenized, so any one with <pad>=3 will do.
    train_tokenizer(default_corpus(), model_dir, vocab_size=512, seed=settings["seed"])
    pairs = make_pairs(settings["pairs"], settings["tokens"], settings["vocab"], settings["seed"])
    write_jsonl(work / "triaged.jsonl", pairs)
    write_jsonl(
        work / "scores.jsonl",
        [{"id": p["id"], "category": "inversion", "raw_score": 1.0, "weight": 1.0} for p in pairs],
    )
    paths = {
        "model": str(model_dir),
        "triaged": str(work / "triaged.jsonl"),
        "scores": str(work / "scores.jsonl"),
    }
    for stage in DS_STAGES:
        path = work / f"ds_zero{stage}.json"
        write_json(path, cpu_ds_config(stage))
        paths[f"ds_zero{stage}"] = str(path)
    return paths


def make_pairs(
    n: int, tokens: int, vocab: int, seed: int, jitter: int = 8, categories: tuple[str, ...] = ("inversion",)
) -> list[dict[str, Any]]:
    """``n`` pre-tokenized pairs: a prompt of ``tokens // 2`` tokens and responses of the rest, each length
    +-``jitter`` independently (0: exactly ``tokens`` per sequence); BOS first, responses ending with EOS,
    ids drawn uniformly above the special ids; categories in turn from ``categories``."""
    rng = random.Random(seed)
    half = tokens // 2

    def ids(k: int) -> list[int]:
        return [rng.randrange(4, vocab) for _ in range(k)]

    def length(base: int) -> int:
        return max(base - 1 + (rng.randint(-jitter, jitter) if jitter else 0), 1)

    return [
        {
            "id": f"p{i}",
            "prompt_input_ids": [1, *ids(length(half))],
            "chosen_input_ids": [*ids(length(tokens - half)), 2],
            "rejected_input_ids": [*ids(length(tokens - half)), 2],
            "category": categories[i % len(categories)],
        }
        for i in range(n)
    ]


def _length_caps(settings: dict[str, Any]) -> tuple[int, int]:
    """(max_length, max_prompt_length): above every generated pair, so neither trainer truncates anything."""
    half = settings["tokens"] // 2
    return 2 * (half + 8) + 8, half + 8 + 4


# ---------------------------------------------------------------------------------------------- one rank


def _zero_stage(engine: Any) -> int | None:
    stage = getattr(engine, "zero_optimization_stage", None)
    return int(stage()) if callable(stage) else None


def _on_cuda() -> bool:
    """Whether this rank trains on a GPU (launch sets DS_ACCELERATOR for every run)."""
    import torch

    return accelerator() == "cuda" and torch.cuda.is_available()


def _peak_cuda_mib() -> float | None:
    """This process's peak CUDA memory (allocated tensors), None on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if _on_cuda() else None


class _StepClock:
    """Per-step end timestamps, local token counts and losses; the peak RSS (and on a GPU the peak CUDA memory)
    when the last step ends. On a GPU each timestamp waits for the device, so a step's time is its kernels'."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.peak_rss_mb = 0.0
        self.rss_before_steps_mb = 0.0
        self.peak_cuda_mb: float | None = None
        self.cuda_before_steps_mb: float | None = None
        self.started = 0.0
        self.engine = ""

    def steps_begin(self) -> None:
        """Called once, just before the first step: the peak RSS of start-up (imports, models, engines)."""
        if not self.stamps and not self.rss_before_steps_mb:
            self._sync()
            self.rss_before_steps_mb = lifetime_peak_rss_mib()
            self.cuda_before_steps_mb = _peak_cuda_mib()
            self.started = time.perf_counter()

    @staticmethod
    def _sync() -> None:
        if _on_cuda():
            import torch

            torch.cuda.synchronize()

    def step_done(self, tokens: int, loss: float) -> None:
        self._sync()
        self.stamps.append(time.perf_counter())
        self.tokens.append(int(tokens))
        self.losses.append(float(loss))
        self.peak_rss_mb = lifetime_peak_rss_mib()
        self.peak_cuda_mb = _peak_cuda_mib()

    def result(self) -> dict[str, Any]:
        timed = len(self.stamps) - 1
        seconds = self.stamps[-1] - self.stamps[0] if timed > 0 else 0.0
        return {
            "steps": len(self.stamps),
            "timed_steps": timed,
            "seconds": seconds,
            "tokens": sum(self.tokens[1:]),
            "tokens_all_steps": sum(self.tokens),
            "step_tokens": self.tokens[1:],
            "first_step_seconds": self.stamps[0] - self.started if self.stamps else 0.0,
            "step_seconds": [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)],
            "losses": self.losses,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_rss_mb_before_steps": self.rss_before_steps_mb,
            "peak_cuda_mb": self.peak_cuda_mb,
            "peak_cuda_mb_before_steps": self.cuda_before_steps_mb,
            "engine": self.engine,
        }


def _run_trace_ds(settings: dict[str, Any], clock: _StepClock) -> None:
    from trace_ds.config import TrainConfig
    from trace_ds.data.tokenize import TokenizeConfig
    from trace_ds.training.train import STAT_KEYS, Trainer

    class TimedTrainer(Trainer):
        def _train_step(self, records: Any, dummy: Any, pairs_in_step: int) -> Any:
            clock.steps_begin()
            stats = super()._train_step(records, dummy, pairs_in_step)
            tokens = sum(
                2 * len(r.pair.prompt) + len(r.pair.chosen) + len(r.pair.rejected)
                for r in records
                if r.weight > 0
            )
            clock.step_done(tokens, float(stats[STAT_KEYS.index("step_loss")]))
            return stats

        def export(self, summary: dict[str, Any]) -> None:
            """No final export (the TRL arm saves nothing either)."""

    max_length, max_prompt = _length_caps(settings)
    config = TrainConfig(
        model=settings["model"], triaged=settings["triaged"], scores=settings["scores"],
        out=str(Path(settings["run_dir"]) / "trace"), deepspeed=settings["ds_config"], relational="dpo",
        beta=settings["beta"], lr=settings["lr"], warmup_ratio=0.0, max_steps=settings["steps"],
        micro_batch=settings["micro_batch"], buffer_size=1, seed=settings["seed"],
        tokenize=TokenizeConfig(max_length=max_length, max_prompt_length=max_prompt),
    )  # fmt: skip
    trainer = TimedTrainer(config)
    trainer.run()
    engine = trainer.engine
    clock.engine = (
        f"{type(engine).__name__}, ZeRO-{_zero_stage(engine)}, {trainer.strategy.world_size} rank(s)"
    )


def _run_trl(settings: dict[str, Any], clock: _StepClock) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trace_ds.io import iter_jsonl

    pending: dict[str, float] = {}

    class TimedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # already tokenized: prompt_ids / chosen_ids / rejected_ids, used as given

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            pending["tokens"] = float(inputs["attention_mask"].sum())
            loss = super().training_step(model, inputs, *args, **kwargs)
            pending["loss"] = float(loss)
            return loss

    class StepEnd(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.steps_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_done(int(pending.pop("tokens")), pending.pop("loss"))

    rows = [record for _, record in iter_jsonl(settings["triaged"])]
    dataset = Dataset.from_dict(
        {
            "prompt_ids": [r["prompt_input_ids"] for r in rows],
            "chosen_ids": [r["chosen_input_ids"] for r in rows],
            "rejected_ids": [r["rejected_input_ids"] for r in rows],
        }
    )
    max_length, _ = _length_caps(settings)
    extra: dict[str, Any] = {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        extra["accelerator_config"] = {"use_configured_state": True}
        _cpu_deepspeed_state()
    args = DPOConfig(
        **extra,
        output_dir=str(Path(settings["run_dir"]) / "trl"),
        deepspeed=settings["ds_config"],
        per_device_train_batch_size=settings["micro_batch"],
        gradient_accumulation_steps=1,
        max_steps=settings["steps"],
        learning_rate=settings["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",  # torch.optim.AdamW, as trace-ds (the default on torch >= 2.8 is the fused one)
        max_grad_norm=1.0,
        beta=settings["beta"],
        loss_type=["sigmoid"],
        max_length=max_length,
        precompute_ref_log_probs=False,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # DPOConfig turns it on by default; trace-ds trains without it
        train_sampling_strategy="sequential",  # the file's order, as trace-ds with --buffer-size 1
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=settings["seed"],
    )
    # Loaded after DPOConfig, whose DeepSpeed config (under ZeRO-3) partitions the weights as they load.
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    trainer = TimedDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[StepEnd()],
    )  # fmt: skip
    trainer.train()
    engine = trainer.model_wrapped
    clock.engine = (
        f"{type(engine).__name__}, ZeRO-{_zero_stage(engine)}, {trainer.accelerator.num_processes} rank(s)"
    )


def _cpu_deepspeed_state() -> None:
    """accelerate's state for DeepSpeed on CPU ranks. Left to itself (TrainingArguments with ``deepspeed``
    and no GPU) it finds no backend and sets ``num_processes = 1`` although DeepSpeed has formed a larger
    world, so the data is not sharded and its metric gathers fail. Naming the backend DeepSpeed's CPU
    accelerator uses (gloo, or ccl) makes it read the real world size; TrainingArguments then reuses it."""
    from accelerate import PartialState
    from deepspeed.accelerator import get_accelerator

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend=get_accelerator().communication_backend_name())
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def run_arm(arm: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One rank of one run, in this process; writes ``rank{R}.json`` into ``settings["run_dir"]``."""
    import torch

    from trace_ds.io import write_json

    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, settings["threads"] // settings["run_ranks"]))
    clock = _StepClock()
    started = time.perf_counter()
    if arm == "trace-ds":
        _run_trace_ds(settings, clock)
    elif arm == "trl":
        _run_trl(settings, clock)
    else:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    result = {
        "arm": arm,
        "rank": rank,
        **clock.result(),
        "process_seconds": time.perf_counter() - started,
        "peak_rss_mb_at_exit": lifetime_peak_rss_mib(),
    }
    write_json(Path(settings["run_dir"]) / f"rank{rank}.json", result)
    return result


# ---------------------------------------------------------------------------------------------- the driver


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(
    arm: str, settings: dict[str, Any], paths: dict[str, str], zero: int, ranks: int, tag: str = ""
) -> dict[str, Any]:
    """One run in fresh processes (``deepspeed --num_gpus ranks``); its per-rank figures combined."""
    import shutil
    import statistics

    run_dir = Path(settings["workdir"]) / f"{arm}_zero{zero}_ranks{ranks}{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    run_settings = {
        **{
            k: settings[k]
            for k in ("layers", "hidden", "vocab", "tokens", "micro_batch", "steps", "lr", "beta")
        },
        **{k: settings[k] for k in ("threads", "seed")},
        **{k: paths[k] for k in ("model", "triaged", "scores")},
        "ds_config": paths[f"ds_zero{zero}"],
        "run_dir": str(run_dir),
        "run_ranks": ranks,
    }
    command = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
        str(free_port()), "--no_local_rank", "--module", "trace_ds.bench.train", arm, json.dumps(run_settings),
    ]  # fmt: skip
    threads = str(max(1, settings["threads"] // ranks))  # else accelerate picks its own for the TRL arm
    env = {
        **os.environ, "DS_ACCELERATOR": accelerator(), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
    }  # fmt: skip
    env.setdefault("TRACE_DS_DIST_TIMEOUT_S", "600")
    busy, children = _machine_busy_s(), _children_cpu_s()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    busy_after = _machine_busy_s()
    other_cpu_s = (
        None if busy is None or busy_after is None else busy_after - busy - (_children_cpu_s() - children)
    )
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    found = sorted(run_dir.glob("rank*.json"))
    if proc.returncode != 0 or len(found) != ranks:
        raise RuntimeError(
            f"{arm} (ZeRO-{zero}, {ranks} ranks) failed (exit {proc.returncode}); log: {run_dir / 'log.txt'}\n"
            + (proc.stdout + proc.stderr)[-4000:]
        )
    per_rank = sorted((json.loads(p.read_text()) for p in found), key=lambda r: r["rank"])
    if arm == "trl":  # each rank's loss is its own batch's mean; equal batches: their mean is the global one
        losses = [sum(step) / len(step) for step in zip(*(r["losses"] for r in per_rank), strict=True)]
    else:  # trace-ds logs the global step loss on every rank
        losses = per_rank[0]["losses"]
    seconds = max(r["seconds"] for r in per_rank)
    tokens = sum(r["tokens"] for r in per_rank)
    # Per timed step: every rank's tokens over the slowest rank's time; the median resists a short disturbance.
    step_seconds = [max(step) for step in zip(*(r["step_seconds"] for r in per_rank), strict=True)]
    step_tokens = [sum(step) for step in zip(*(r["step_tokens"] for r in per_rank), strict=True)]
    step_rates = [t / s for t, s in zip(step_tokens, step_seconds, strict=True) if s > 0]
    return {
        "arm": arm,
        "zero": zero,
        "ranks": ranks,
        "device": env["DS_ACCELERATOR"],
        "steps": per_rank[0]["steps"],
        "timed_steps": per_rank[0]["timed_steps"],
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "median_step_tokens_per_s": statistics.median(step_rates) if step_rates else None,
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in per_rank],
        "peak_rss_mb_before_steps_per_rank": [r["peak_rss_mb_before_steps"] for r in per_rank],
        "peak_cuda_mb_per_rank": [r["peak_cuda_mb"] for r in per_rank],
        "peak_cuda_mb_before_steps_per_rank": [r["peak_cuda_mb_before_steps"] for r in per_rank],
        "first_step_seconds": max(r["first_step_seconds"] for r in per_rank),
        "step_seconds": step_seconds,
        "losses": losses,
        "engine": per_rank[0]["engine"],
        "process_seconds": max(r["process_seconds"] for r in per_rank),
        "other_cpu_s": other_cpu_s,
    }


def accelerator() -> str:
    """DeepSpeed's accelerator for the runs: ``DS_ACCELERATOR`` if set, else cuda where torch sees a GPU."""
    import torch

    return os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")


def versions() -> dict[str, str | None]:
    """Versions of the libraries the arms depend on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "deepspeed", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_train_benchmark(settings: dict[str, Any], out: str | None = None) -> dict[str, Any]:
    """Run the speed comparison (every arm in ``settings["arms"]``) and, with ``settings["memory"]``, the
    trace-ds memory matrix; one run at a time, nothing else should run meanwhile. Returns the report (also
    written to ``out`` as JSON)."""
    import statistics

    from trace_ds.console import console

    settings = {**DEFAULT_SETTINGS, **settings}
    arms = tuple(settings["arms"])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if "trl" in arms:
        try:
            import trl  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "the trl arm needs TRL: pip install 'trl>=0.12' (or drop it from the arms)"
            ) from err
    if settings["steps"] < 2:
        raise ValueError("steps must be at least 2 (the first step is warm-up and is not timed)")
    if settings["repeats"] < 1:
        raise ValueError("repeats must be at least 1")
    paths = prepare_work(settings)
    speed = []
    for repeat in range(settings["repeats"]):  # arms interleaved, so a slow spell of the machine hits both
        for arm in arms:
            console.print(
                f"bench train: {arm}, ZeRO-{settings['zero']}, {settings['ranks']} rank(s), "
                f"run {repeat + 1}/{settings['repeats']}"
            )
            row = launch(arm, settings, paths, settings["zero"], settings["ranks"], f"_run{repeat + 1}")
            speed.append({**row, "repeat": repeat + 1})
    summary = {
        arm: {
            key: statistics.median(row[key] for row in speed if row["arm"] == arm)
            for key in ("tokens_per_s", "median_step_tokens_per_s")
        }
        for arm in arms
    }
    comparison: dict[str, Any] = {}
    if "trace-ds" in summary and "trl" in summary:
        ours, theirs = summary["trace-ds"], summary["trl"]
        comparison["tokens_per_s_ratio_trace_ds_over_trl"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        comparison["median_step_ratio_trace_ds_over_trl"] = (
            ours["median_step_tokens_per_s"] / theirs["median_step_tokens_per_s"]
        )
        ours_runs = [row for row in speed if row["arm"] == "trace-ds"]
        theirs_runs = [row for row in speed if row["arm"] == "trl"]
        comparison["per_run_ratios"] = [
            a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours_runs, theirs_runs, strict=True)
        ]
        # Same pairs per step (in any split over ranks), same loss, optimizer and schedule: same step losses.
        diffs = [
            abs(x - y)
            for a, b in zip(ours_runs, theirs_runs, strict=True)
            for x, y in zip(a["losses"], b["losses"], strict=True)
        ]
        comparison["max_abs_loss_difference"] = max(diffs) if diffs else None
    memory = []
    if settings["memory"]:
        for zero in settings["memory_zero"]:
            for ranks in settings["memory_ranks"]:
                console.print(f"bench train: memory, trace-ds, ZeRO-{zero}, {ranks} rank(s)")
                memory.append(launch("trace-ds", settings, paths, zero, ranks))
    report = {
        "settings": settings,
        "versions": versions(),
        "speed": speed,
        "speed_median": summary,
        "comparison": comparison,
        "memory": memory,
    }
    if out:
        from trace_ds.io import write_json

        write_json(out, report)
    return report


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_tables(report: dict[str, Any]) -> str:
    """The speed table (each run, the medians, the ratio, the loss agreement) and the memory table, if run.
    Runs on a GPU add their peak CUDA memory per rank (allocated tensors, the whole run / before step 1)."""
    rows = [*report["speed"], *(report.get("memory") or [])]
    cuda = any(v is not None for row in rows for v in row.get("peak_cuda_mb_per_rank") or [])
    cuda_head, cuda_rule = (
        (" peak CUDA MB per rank | peak CUDA MB before step 1 |", "---|---|") if cuda else ("", "")
    )

    def cuda_cells(row: dict[str, Any]) -> str:
        if not cuda:
            return ""
        return (
            f" {_per_rank(row.get('peak_cuda_mb_per_rank') or [])} |"
            f" {_per_rank(row.get('peak_cuda_mb_before_steps_per_rank') or [])} |"
        )

    lines = [
        "| arm | run | ZeRO | ranks | timed steps | tokens | seconds | tokens/s | median-step tokens/s "
        f"| peak RSS MB per rank | peak RSS MB before step 1 | other CPU s |{cuda_head}",
        f"|---|---|---|---|---|---|---|---|---|---|---|---|{cuda_rule}",
    ]
    for row in report["speed"]:
        lines.append(
            f"| {row['arm']} | {row.get('repeat', 1)} | {row['zero']} | {row['ranks']} | {row['timed_steps']} | "
            f"{row['tokens']} | {row['seconds']:.2f} | {_fmt(row['tokens_per_s'])} | "
            f"{_fmt(row['median_step_tokens_per_s'])} | {_per_rank(row['peak_rss_mb_per_rank'])} | "
            f"{_per_rank(row['peak_rss_mb_before_steps_per_rank'])} | {_fmt(row['other_cpu_s'], 1)} |"
            + cuda_cells(row)
        )
    for arm, median in (report.get("speed_median") or {}).items():
        lines.append(
            f"| {arm} | median | | | | | | {_fmt(median['tokens_per_s'])} | "
            f"{_fmt(median['median_step_tokens_per_s'])} | | | |" + (" | |" if cuda else "")
        )
    comparison = report.get("comparison") or {}
    if "tokens_per_s_ratio_trace_ds_over_trl" in comparison:
        per_run = ", ".join(f"{r:.2f}" for r in comparison["per_run_ratios"])
        lines += [
            "",
            f"trace-ds / TRL tokens/s (medians): {comparison['tokens_per_s_ratio_trace_ds_over_trl']:.2f}x "
            f"(per run: {per_run}); median-step figures: {comparison['median_step_ratio_trace_ds_over_trl']:.2f}x",
        ]
    if comparison.get("max_abs_loss_difference") is not None:
        lines.append(
            f"max |step loss difference|, trace-ds vs TRL: {comparison['max_abs_loss_difference']:.2e}"
        )
    if report.get("memory"):
        lines += [
            "",
            "| trace-ds train | ZeRO | ranks | peak RSS MB per rank | peak RSS MB before step 1 | tokens/s "
            f"| other CPU s |{cuda_head}",
            f"|---|---|---|---|---|---|---|{cuda_rule}",
        ]
        for row in report["memory"]:
            lines.append(
                f"| | {row['zero']} | {row['ranks']} | {_per_rank(row['peak_rss_mb_per_rank'])} | "
                f"{_per_rank(row['peak_rss_mb_before_steps_per_rank'])} | {_fmt(row['tokens_per_s'])} | "
                f"{_fmt(row['other_cpu_s'], 1)} |" + cuda_cells(row)
            )
    devices = sorted({str(row.get("device", "cpu")) for row in rows})
    lines += ["", f"DeepSpeed accelerator of the runs: {', '.join(devices)}."]
    return "\n".join(lines)


def _per_rank(values: list[float | None]) -> str:
    return " / ".join("n/a" if v is None else f"{v:.0f}" for v in values)


if __name__ == "__main__":
    run_arm(sys.argv[1], json.loads(sys.argv[2]))
