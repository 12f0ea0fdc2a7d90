"""The stages of ``trace-ds run`` and what each reads and writes (see trace_ds.pipeline.runner for caching)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trace_ds.config import default_weighting
from trace_ds.io import TraceError, read_json, write_json, write_jsonl
from trace_ds.pipeline.config import (
    DEFAULT_RESCORE_EVERY,
    SFT_DEFAULTS,
    SYNTH_PARAMETERS,
    USER_DATA,
    lora_config,
)


def _paths(directory: Path) -> dict[str, str]:
    return read_json(directory / "paths.json")


def _tokenize(config: dict[str, Any]) -> Any:
    from trace_ds.data.tokenize import TokenizeConfig

    return TokenizeConfig(**config["tokenize"])


def _file_identity(path: str) -> dict[str, Any]:
    """Part of a stage key for user inputs: a changed file (anywhere in a folder) reruns what depends on it.
    A name that is not a local path (a hub id) stands for itself."""
    target = Path(path)
    if not target.exists():
        return {"id": path}
    if target.is_dir():
        return {p.name: _file_identity(str(p)) for p in sorted(target.iterdir())}
    stat = target.stat()
    return {"path": str(target.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class Stage:
    name: str
    phase: str  # "prepare", "distributed" or "finish"
    settings: dict[str, Any]
    inputs: list[str]
    run: Callable[[Path, dict[str, Path]], dict[str, Any]]
    key: str = ""
    directory: Path = field(default_factory=Path)

    def done(self) -> bool:
        return (self.directory / "done.json").exists()


def plan_stages(config: dict[str, Any]) -> list[Any]:
    stages: list[Stage] = []
    data, model = config["data"], config["model"]
    ranks = int(config["launch"]["ranks"])
    deepspeed_config = config["launch"].get("deepspeed") if ranks > 1 else None

    # ---- prepare ----
    if "synth" in data:
        stages.append(Stage("data", "prepare", {"synth": data["synth"]}, [], _synth_stage(data["synth"])))
    else:
        files = {k: data[k] for k in (*USER_DATA, "corpus") if k in data}
        stages.append(
            Stage(
                "data",
                "prepare",
                {"files": {k: _file_identity(v) for k, v in files.items()}},
                [],
                _given_data(files),
            )
        )
    if "path" in model:
        identity = {"path": model["path"], "files": _file_identity(model["path"])}
        stages.append(Stage("old_model", "prepare", identity, [], _given_model(model["path"])))
    else:
        stages.append(
            Stage(
                "base_model",
                "prepare",
                {"build_tiny": model["build_tiny"], "seed": config["seed"]},
                ["data"],
                _build_tiny(model["build_tiny"], config["seed"]),
            )
        )
        sft = {**SFT_DEFAULTS, **(model.get("sft") or {})}
        stages.append(
            Stage(
                "old_model",
                "prepare",
                {"sft": sft, "tokenize": config["tokenize"], "seed": config["seed"]},
                ["data", "base_model"],
                _sft(sft, config),
            )
        )
    # only what differs from the defaults enters the key (a config without a triage section keeps its cache)
    triage_settings = {k: v for k, v in config["triage"].items() if v}
    if triage_settings.get("noise"):
        triage_settings["seed"] = config["seed"]
    stages.append(Stage("triage", "prepare", triage_settings, ["data"], _triage(triage_settings)))
    methods = list(config["methods"])
    for method in methods:
        if method in DERIVED:
            stages.append(
                Stage(f"derive_{method}", "prepare", {"method": method}, ["triage"], _derive(method))
            )

    # ---- distributed ----
    score_settings = {
        **config["score"],
        "tokenize": config["tokenize"],
        "seed": config["seed"],
        "deepspeed": deepspeed_config,
        # in the key only: a changed default must not reuse scores weighted by the old one
        "weighting_defaults": default_weighting(),
    }
    stages.append(
        Stage("score", "distributed", score_settings, ["old_model", "triage"], _score(score_settings, config))
    )
    if "no_triage" in methods:  # its own impact scores, against the same probe
        no_triage_inputs = ["old_model", "derive_no_triage", "score"]
        score_no_triage = _score(score_settings, config, "derive_no_triage")
        stages.append(
            Stage("score_no_triage", "distributed", score_settings, no_triage_inputs, score_no_triage)
        )
    for method in methods:
        settings = {
            **config["train"],
            "method": method,
            "tokenize": config["tokenize"],
            "seed": config["seed"],
            "deepspeed": deepspeed_config,
        }
        inputs = ["old_model", "triage", SCORES_FROM.get(method, "score")]
        inputs += [f"derive_{method}"] if method in DERIVED and f"derive_{method}" not in inputs else []
        stages.append(
            Stage(f"train_{method}", "distributed", settings, inputs, _train(method, settings, config))
        )

    # ---- finish ----
    eval_settings = {**config["eval"], "tokenize": config["tokenize"], "seed": config["seed"]}
    stages.append(
        Stage(
            "eval_old", "finish", eval_settings, ["data", "old_model"], _evaluate(None, eval_settings, config)
        )
    )
    for method in methods:
        stages.append(
            Stage(
                f"eval_{method}",
                "finish",
                eval_settings,
                ["data", "old_model", f"train_{method}"],
                _evaluate(method, eval_settings, config),
            )
        )
    report_inputs = ["eval_old", *(f"eval_{m}" for m in methods), "score", *(f"train_{m}" for m in methods)]
    # the report records the whole config: any change to it rewrites the report (cheap), nothing else
    report_settings = {"methods": methods, "config": config}
    stages.append(Stage("report", "finish", report_settings, report_inputs, _report(methods, config)))
    return stages


# ---- stage bodies: each returns a small summary that goes into done.json ----


DERIVED = ("naive_dpo", "no_impact", "no_triage")  # baselines that change the training data
SCORES_FROM = {
    "naive_dpo": "derive_naive_dpo",
    "no_impact": "derive_no_impact",
    "no_triage": "score_no_triage",
}


def _synth_stage(settings: dict[str, Any]) -> Any:
    def run(directory: Path, _: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.synth.generator import build_benchmark

        bench = directory / "bench"
        manifest = build_benchmark(bench, **{"n_pairs": 2000, **_rename(settings)})
        write_json(
            directory / "paths.json",
            {
                "pairs": str(bench / "pairs.jsonl"),
                "verdicts": str(bench / "verdicts.jsonl"),
                "eval": str(bench / "eval"),
                "corpus": str(bench / "corpus.txt"),
            },
        )
        return {"counts": manifest.get("counts")}

    return run


def _rename(settings: dict[str, Any]) -> dict[str, Any]:
    return {SYNTH_PARAMETERS.get(k, k): v for k, v in settings.items()}


def _given_data(files: dict[str, str]) -> Any:
    def run(directory: Path, _: dict[str, Path]) -> dict[str, Any]:
        write_json(directory / "paths.json", files)
        return {}

    return run


def _given_model(path: str) -> Any:
    def run(directory: Path, _: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.config import check_model_source

        check_model_source(path, "model.path")  # checked again here: never mark a missing folder done
        write_json(directory / "paths.json", {"model": path})
        return {}

    return run


def _build_tiny(settings: dict[str, Any], seed: int) -> Any:
    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.models.tiny import build_tiny_from_corpus

        out = directory / "model"
        vocab = build_tiny_from_corpus(_paths(inputs["data"])["corpus"], out, seed=seed, **settings)
        write_json(directory / "paths.json", {"model": str(out)})
        return {"vocab": vocab}

    return run


def _sft(settings: dict[str, Any], config: dict[str, Any]) -> Any:
    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.training.sft import SFTConfig, run_sft

        out = directory / "model"
        summary = run_sft(
            SFTConfig(
                model=_paths(inputs["base_model"])["model"],
                pairs=_paths(inputs["data"])["pairs"],
                out=str(out),
                seed=config["seed"],
                tokenize=_tokenize(config),
                **settings,
            )
        )
        write_json(directory / "paths.json", {"model": str(out)})
        return summary

    return run


def _triage(settings: dict[str, Any]) -> Any:
    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.judge.triage import run_triage

        paths = _paths(inputs["data"])
        report = run_triage(paths["pairs"], paths["verdicts"], str(directory / "triaged.jsonl"), **settings)
        write_json(directory / "paths.json", {"triaged": str(directory / "triaged.jsonl")})
        flipped = (report.get("noise") or {}).get("flipped")
        return {"categories": report["categories"], "unjudged": report["unjudged"], "noise_flipped": flipped}

    return run


def _derive(method: str) -> Any:
    """Inputs of the baselines that change the data: naive oracle DPO routes every judged pair to the DPO
    head in its new orientation (suppression pairs keep their old order); both use uniform weights."""

    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        triaged = Path(_paths(inputs["triage"])["triaged"])
        records = [
            json.loads(line) for line in triaged.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
        if method == "naive_dpo":
            records = [{**r, "category": "inversion", "original_category": r["category"]} for r in records]
        if method == "no_triage":  # every pair back in its old orientation, NPO on its old chosen response
            records = [_old_orientation(r) for r in records]
        scores = [
            {"id": r["id"], "category": r["category"], "raw_score": 1.0, "weight": 1.0}
            for r in records
            if r["category"] != "retention"
        ]
        write_jsonl(directory / "triaged.jsonl", records)
        write_jsonl(directory / "scores.jsonl", scores)
        write_json(
            directory / "paths.json",
            {"triaged": str(directory / "triaged.jsonl"), "scores": str(directory / "scores.jsonl")},
        )
        return {"pairs": len(records)}

    return run


def _old_orientation(record: dict[str, Any]) -> dict[str, Any]:
    swapped = record.get("swapped")
    chosen, rejected = (
        (record["rejected"], record["chosen"]) if swapped else (record["chosen"], record["rejected"])
    )
    return {
        **record,
        "chosen": chosen,
        "rejected": rejected,
        "swapped": False,
        "category": "unlearning",
        "original_category": record["category"],
    }


def _score(settings: dict[str, Any], config: dict[str, Any], data_stage: str = "triage") -> Any:
    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.config import ScoreConfig
        from trace_ds.scoring.scorer import run_score

        options = {
            k: v for k, v in settings.items() if k not in ("tokenize", "deepspeed", "weighting_defaults")
        }
        if options.get("lora") is not None:  # the config's mapping, checked by pipeline.config._check_lora
            options["lora"] = lora_config(options["lora"])
        if "score" in inputs:  # reuse the main probe (a baseline's data has no categories to build one from)
            options["probe"] = _paths(inputs["score"])["probe"][0]
            options.pop("probe_size", None)
            options.pop("probe_suppression", None)  # how a built probe is made: this one is given
        meta = run_score(
            ScoreConfig(
                model=_paths(inputs["old_model"])["model"],
                triaged=_paths(inputs[data_stage])["triaged"],
                out=str(directory / "scores.jsonl"),
                deepspeed=settings["deepspeed"],
                tokenize=_tokenize(config),
                **options,
            )
        )
        probe = directory / "scores.probe.jsonl"
        write_json(
            directory / "paths.json",
            {"scores": str(directory / "scores.jsonl"), "probe": [str(probe)] if probe.exists() else []},
        )
        return {"timings": meta.get("timings")} if meta else {}

    return run


def _train(method: str, settings: dict[str, Any], config: dict[str, Any]) -> Any:
    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.config import TrainConfig
        from trace_ds.training.train import run_train

        options = {k: v for k, v in settings.items() if k not in ("tokenize", "deepspeed", "method")}
        triaged = _paths(inputs[f"derive_{method}"] if method in DERIVED else inputs["triage"])["triaged"]
        scores = _paths(inputs[SCORES_FROM.get(method, "score")])["scores"]
        if method == "naive_dpo":
            options.update(relational="dpo", alpha_kl=0.0)
        if method in ("no_kl", "no_triage"):
            options["alpha_kl"] = 0.0
        if options.get("lora"):
            options["merge_lora"] = True  # the eval stage loads run/final as a full model
        if method == "trace_rescore":
            options["rescore_every"] = options.get("rescore_every") or DEFAULT_RESCORE_EVERY
        else:
            options.pop("rescore_every", None)
        out = directory / "run"
        resume = (out / "checkpoints" / "latest").exists()
        summary = run_train(
            TrainConfig(
                model=_paths(inputs["old_model"])["model"],
                triaged=triaged,
                scores=scores,
                out=str(out),
                deepspeed=settings["deepspeed"],
                resume=resume,
                tokenize=_tokenize(config),
                **options,
            )
        )
        if "stopped_at" in summary:  # SIGTERM: a checkpoint, no model; the stage must not be marked done
            raise TraceError(
                f"{directory.name}: training stopped by SIGTERM at step {summary['stopped_at']} with a checkpoint; "
                "rerun the same command to resume from it"
            )
        write_json(
            directory / "paths.json", {"model": str(out / "final"), "metrics": str(out / "metrics.jsonl")}
        )
        return {}

    return run


def _evaluate(method: str | None, settings: dict[str, Any], config: dict[str, Any]) -> Any:
    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.evaluate.run import EvalConfig, run_eval, tpa_summary

        old = _paths(inputs["old_model"])["model"]
        model = old if method is None else _paths(inputs[f"train_{method}"])["model"]
        options = {k: v for k, v in settings.items() if k not in ("tokenize",)}
        metrics = run_eval(
            EvalConfig(
                model=model,
                reference=old,
                data=_paths(inputs["data"])["eval"],
                out=str(directory / "metrics.json"),
                tokenize=_tokenize(config),
                **options,
            )
        )
        write_json(directory / "paths.json", {"metrics": str(directory / "metrics.json")})
        return {"tpa": tpa_summary(metrics)}

    return run


def _report(methods: list[str], config: dict[str, Any]) -> Any:
    def run(directory: Path, inputs: dict[str, Path]) -> dict[str, Any]:
        from trace_ds.evaluate.report import write_report

        evaluations = {"old": read_json(inputs["eval_old"] / "metrics.json")}
        evaluations.update({m: read_json(inputs[f"eval_{m}"] / "metrics.json") for m in methods})
        training = {m: _paths(inputs[f"train_{m}"])["metrics"] for m in methods}
        return write_report(directory, evaluations, _paths(inputs["score"])["scores"], training, config)

    return run
