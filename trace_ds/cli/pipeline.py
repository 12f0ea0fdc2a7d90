"""Whole runs from one command: ``run`` (a YAML config as cached stages), ``demo`` and ``study``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from trace_ds.console import console
from trace_ds.io import TraceError


@click.command("run")
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--phase",
    type=click.Choice(["all", "distributed"]),
    default="all",
    hidden=True,
    help="Set by the pipeline's own launch.",
)
def run_command(config_path: str, phase: str) -> None:
    """Every stage from one YAML config; finished stages are cached by a hash of their inputs and settings."""
    pipeline = load_pipeline(config_path)
    if phase == "distributed":
        pipeline.run_distributed_phase()
        return
    summary = pipeline.run()
    _print_pipeline_summary(pipeline, summary)


def load_pipeline(config_path: str | Path) -> Any:
    """The pipeline of a config, with its CPU numerics pinned first (launch.threads/cpu_isa: before torch
    is imported here, and inherited by every launch)."""
    from trace_ds.pipeline.config import read_config, validate_config
    from trace_ds.pipeline.runner import Pipeline
    from trace_ds.runtime.determinism import pin_cpu_numerics

    config = read_config(config_path)
    pin_cpu_numerics(config["launch"].get("threads"), config["launch"].get("cpu_isa"))
    validate_config(config, str(config_path))
    return Pipeline(config, str(config_path))


def _print_pipeline_summary(pipeline: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"trace-ds run: {summary['seconds']} s", header_style="bold")
    for column in ("stage", "key", "seconds"):
        table.add_column(column)
    for stage in pipeline.stages:
        done = stage.directory / "done.json"
        seconds = json.loads(done.read_text()).get("seconds") if done.exists() else None
        table.add_row(stage.name, stage.key, "-" if seconds is None else str(seconds))
    console.print(table)
    report = next((s.directory / "report.md" for s in pipeline.stages if s.name == "report"), None)
    if report is not None and report.exists():
        console.print(report.read_text(encoding="utf-8"), highlight=False, soft_wrap=True, markup=False)
        console.print(f"report: {report}")


@click.command()
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Default: runs/demo (runs/real with --real).",
)
@click.option(
    "--pairs", "n_pairs", default=None, type=int, help="Training pairs. Default: 2000 (100 with --real)."
)
@click.option("--seed", default=0, show_default=True)
@click.option("--ranks", default=2, show_default=True, help="Ranks of the ZeRO-3 training launch.")
@click.option(
    "--all-baselines", is_flag=True, help="Also run TRACE w/o impact weighting, w/o KL and w/o triage."
)
@click.option(
    "--methods",
    "methods_option",
    default=None,
    help="Comma-separated methods (trace-ds run's names). Default: trace,naive_dpo (trace with --real: "
    "naive DPO doubles the training time; add it with --methods trace,naive_dpo).",
)
@click.option(
    "--real",
    is_flag=True,
    help="A real chat model (SmolLM2-135M-Instruct, prepared offline) on a natural-language policy shift.",
)
@click.option(
    "--lora", is_flag=True, help="With --real: score and train LoRA adapters instead of every weight."
)
def demo(
    out: str | None,
    n_pairs: int | None,
    seed: int,
    ranks: int,
    all_baselines: bool,
    methods_option: str | None,
    real: bool,
    lora: bool,
) -> None:
    """The built-in job: synthetic policy shift, tiny old-policy model, TRACE vs naive DPO, report.

    With --real: SmolLM2-135M-Instruct and a natural-language policy shift judged by a rule judge, on the
    CPU (TRACE alone 12 minutes on 2 idle cores, with naive DPO 23; docs/results.md)."""
    from trace_ds.pipeline.runner import DEMO_CPU_NUMERICS, write_demo_config
    from trace_ds.runtime.determinism import pin_cpu_numerics

    default = "trace" if real else "trace,naive_dpo"
    methods = [m.strip() for m in (methods_option or default).split(",") if m.strip()]
    if all_baselines:
        methods += [m for m in ("naive_dpo", "no_impact", "no_kl", "no_triage") if m not in methods]
    if lora and not real:
        raise TraceError("--lora applies to --real (the synthetic demo trains its tiny model in full)")
    if real:
        from trace_ds.pipeline.real_demo import SCENARIO, run_real_demo

        out = out or "runs/real"
        pipeline, summary = run_real_demo(
            out, seed, n_pairs or SCENARIO["n_pairs"], methods, ranks, lora, load_pipeline
        )
        _print_pipeline_summary(pipeline, {"seconds": summary["pipeline_seconds"]})
        console.print(
            f"summary (stage seconds, peak memory, TPA, perplexity): {out}/summary{'_lora' if lora else ''}.json"
        )
        return
    out = out or "runs/demo"
    pin_cpu_numerics(**DEMO_CPU_NUMERICS)  # before write_demo_config imports torch
    config_path = write_demo_config(out, seed, n_pairs or 2000, methods, ranks)
    console.print(f"demo config: {config_path} (edit it and run `trace-ds run {config_path}`)")
    pipeline = load_pipeline(config_path)
    _print_pipeline_summary(pipeline, pipeline.run())


@click.command()
@click.option("--out", default="runs/study", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--quick", is_flag=True, help="CI size: 2 seeds, noise 0 and 0.2, a tiny model, one rank (minutes)."
)
@click.option("--seeds", default=None, help="Comma-separated seeds (default 0,1,2; --quick 0,1).")
@click.option("--noise", default=None, help="Comma-separated label-noise levels (default 0,0.1,0.2,0.3).")
@click.option(
    "--ranks",
    type=int,
    default=None,
    help="Ranks of each training launch (default 2; 1 with --quick, --screen or --confirm: the same updates, "
    "without the launcher).",
)
@click.option(
    "--screen",
    is_flag=True,
    help="The weighting screen: every weight map x metric x probe x head at every --lrs on the first seed, "
    "ranked at matched utility (issue 21; hours at full size).",
)
@click.option(
    "--confirm",
    default=None,
    metavar="COMBO,...",
    help="Confirm these weighting combinations (and uniform) on every seed (default 0-4) at noise 0, 0.2, 0.3.",
)
@click.option(
    "--lrs", default=None, help="Learning rates each combination is trained at (default 1.25e-4,2.5e-4,5e-4)."
)
@click.option("--combos", default=None, help="--screen: only these combinations (default: all).")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="--screen/--confirm: run the points in this many processes at once, one thread each.",
)
@click.option(
    "--real",
    default=None,
    metavar="COMBO",
    help="Confirm this weighting combination on the real chat model against uniform weights and naive DPO, "
    "3 seeds (default 0,1,2; hours on 2 CPU cores; needs the [real] extra).",
)
@click.option(
    "--worker", default=None, hidden=True, help="K/N: run worker K's share of the points (from --jobs)."
)
def study(
    out: str,
    quick: bool,
    seeds: str | None,
    noise: str | None,
    ranks: int | None,
    screen: bool,
    confirm: str | None,
    lrs: str | None,
    combos: str | None,
    jobs: int,
    real: str | None,
    worker: str | None,
) -> None:
    """The efficacy study: every arm over seeds, TRACE and naive DPO under label noise, one report. With
    --screen or --confirm, the weighting study at matched utility (docs/results.md)."""
    from dataclasses import replace

    from trace_ds.pipeline.runner import DEMO_CPU_NUMERICS
    from trace_ds.runtime.determinism import pin_cpu_numerics

    levels = _noise_levels(noise, confirm) if noise else ()
    # before anything imports torch; --quick runs on one thread (CI runs another test beside it), and so does
    # each of several workers
    worker_of = _worker_share(worker) if worker else None
    threads = max(1, (os.cpu_count() or 2) // worker_of[1]) if worker_of else (1 if quick else None)
    pin_cpu_numerics(**{**DEMO_CPU_NUMERICS, **({"threads": threads} if threads else {})})
    from trace_ds.pipeline.study import StudyConfig, run_study

    config = StudyConfig.quick_mode(out) if quick else StudyConfig(out=out)
    if seeds:
        config = replace(config, seeds=tuple(int(s) for s in seeds.split(",")))
    if noise:
        config = replace(config, noise=levels)
    if real:
        from trace_ds.pipeline.real_study import REAL_SEEDS, run_real
        from trace_ds.pipeline.weighting_study import combos_named

        if screen or confirm or quick or noise:
            raise TraceError("--real runs alone: not with --screen, --confirm, --quick or --noise")
        chosen = combos_named([real])[0]
        report = run_real(out, chosen, config.seeds if seeds else REAL_SEEDS, ranks or 2)
        console.print(f"real: {Path(out) / 'real' / 'real.md'} ({report['seconds'] / 60:.1f} min)")
        return
    if ranks or screen or confirm:
        # the global batch is fixed (study.micro_batch): one rank trains the same updates as two, faster here
        config = replace(config, ranks=ranks or 1)
    if screen or confirm:
        if jobs > 1 and screen and confirm:
            raise TraceError("--jobs: run --screen and --confirm as two commands")
        config = replace(config, jobs=jobs, worker=worker_of, threads=threads, worker_args=_study_args())
        _weighting_study(config, quick, screen, confirm, lrs, combos, seeds, noise)
        return
    run_study(config)


def _noise_levels(text: str, confirm: str | None) -> tuple[float, ...]:
    try:
        levels = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise TraceError(f"--noise {text!r}: comma-separated fractions, e.g. 0,0.2") from None
    if any(not 0.0 <= x <= 1.0 for x in levels):
        raise TraceError(f"--noise {text}: fractions in [0, 1]")
    if 0.0 not in levels and not confirm:  # a confirmation may run any levels, e.g. to split its work
        raise TraceError(f"--noise {text}: include 0 (the study's arms run there)")
    return levels


def _worker_share(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise TraceError(f"--worker {text!r}: K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise TraceError(f"--worker {text!r}: K from 0 to N-1")
    return k, n


def _study_args() -> tuple[str, ...]:
    """This study command's own arguments, less --jobs and --worker: what each worker process reruns."""
    context = click.get_current_context()
    args: list[str] = [context.info_name or "study"]
    for name, value in context.params.items():
        if name in ("jobs", "worker") or value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return tuple(args)


def _weighting_study(
    config: Any,
    quick: bool,
    screen: bool,
    confirm: str | None,
    lrs: str | None,
    combos: str | None,
    seeds: str | None,
    noise: str | None,
) -> None:
    from dataclasses import replace

    from trace_ds.pipeline.weighting_study import (
        CONFIRM_NOISE,
        LRS,
        QUICK_COMBOS,
        all_combos,
        combos_named,
        run_confirm,
        run_screen,
    )

    rates = tuple(float(x) for x in lrs.split(",")) if lrs else ((5e-4, 2e-3) if quick else LRS)
    if screen:
        chosen = (
            combos_named(combos.split(","))
            if combos
            else (combos_named(list(QUICK_COMBOS)) if quick else all_combos())
        )
        report = run_screen(config, rates, chosen)
        if config.worker:
            return
        console.print(
            f"screen: {Path(config.out) / 'screen' / 'screen.md'} ({report['seconds'] / 60:.1f} min)"
        )
    if confirm:
        if not seeds:
            config = replace(config, seeds=(0, 1) if quick else (0, 1, 2, 3, 4))
        levels = config.noise if noise else ((0.0, 0.2) if quick else CONFIRM_NOISE)
        report = run_confirm(config, rates, combos_named(confirm.split(",")), levels)
        if config.worker:
            return
        console.print(
            f"confirm: {Path(config.out) / 'confirm' / 'confirm.md'} ({report['seconds'] / 60:.1f} min)"
        )


COMMANDS = [run_command, demo, study]
