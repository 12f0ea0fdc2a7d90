"""One typed configuration per stage, validated up front: a bad combination fails before any model loads,
with a message that says how to fix it."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from trace_ds.data.tokenize import TokenizeConfig
from trace_ds.io import TraceError

# where the probe's suppression third comes from (trace_ds/scoring/probe.py, docs/method.md)
SUPPRESSION_SOURCES = ("pool", "same-prompt", "drop")
DEFAULT_PROBE_SUPPRESSION = "same-prompt"  # a built probe's, when --probe-suppression is not given
# the paper's impact weighting: raw dot scores, clamped at 0 and normalised, against Algorithm 2's probe. Kept
# apart from ScoreConfig's defaults so that a changed default does not change what these names mean: partial
# score files resume by them, and in-run re-scoring supports only them
PAPER_WEIGHTING = {
    "score_metric": "dot",
    "weighting": "paper",
    "probe_normalize": "none",
    "probe_suppression": "pool",
}


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the named modules; with LoRA only the adapters are trainable (and scored)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise TraceError(f"--lora-r {self.r}: must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise TraceError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise TraceError("--lora-targets is empty: name at least one module, e.g. q_proj,v_proj")


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def check_model_source(name: str, option: str = "--model") -> None:
    """Refuse, before anything loads or launches, a model that is meant as a local folder and is not there.

    A value that cannot be a hub id (absolute, ``./``, ``~``, more than one ``/``) or whose first component is
    an existing local folder (``models/missing``) is a path; anything else may be a hub id and is left to
    ``from_pretrained``."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TraceError(
                f"{option} {name}: not a folder (a model folder holds config.json and the weights)"
            )
        return
    first = Path(name).parts[0] if Path(name).parts else name
    path_like = (
        name.startswith(("/", "./", "../", "~", "."))
        or not HUB_ID.fullmatch(name)
        or ("/" in name and Path(first).is_dir())
    )
    if path_like:
        raise TraceError(f"{option} {name}: model folder not found")


def resolve_deepspeed_option(config: Any) -> None:
    """A stage config's ``deepspeed`` (a file, or a shipped config's name) replaced by the file it names."""
    from trace_ds.runtime.deepspeed_configs import resolve_deepspeed_config

    if config.deepspeed is not None:
        object.__setattr__(config, "deepspeed", resolve_deepspeed_config(config.deepspeed))


DEFAULT_VOCAB_TILE = 8192  # vocabulary rows per tile of the chunked head (trace_ds/training/vocab_head.py)


def check_vocab_tile(tile: int) -> None:
    if tile < 0:
        raise TraceError(
            f"--vocab-tile {tile}: use a positive tile (vocabulary rows per chunk of the head; default "
            f"{DEFAULT_VOCAB_TILE}) or 0 for the full-logits path"
        )


def check_logp_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise TraceError(
            f"--logp-reduction {reduction!r}: use sum (log-probs summed over response tokens, the paper's) or "
            "mean (per token, the scale IPO's target 1/(2 beta) assumes)"
        )


def default_weighting() -> dict[str, Any]:
    """Today's defaults of the options :data:`PAPER_WEIGHTING` names (ScoreConfig's, which the CLI shares)."""
    defaults = {key: getattr(ScoreConfig, key) for key in PAPER_WEIGHTING}
    return {**defaults, "probe_suppression": DEFAULT_PROBE_SUPPRESSION}


@dataclass(frozen=True)
class ScoreConfig:
    """``trace-ds score``: impact scores of conflict pairs against a policy probe."""

    model: str
    triaged: str
    out: str
    probe: str | None = None
    probe_size: int = 64
    seed: int = 0
    probe_holdout: bool = False
    relational: Literal["ipo", "dpo"] = "ipo"
    beta: float = 0.1
    normalize: Literal["per-category", "joint"] = "per-category"
    kernel: Literal["auto", "triton", "torch"] = "auto"
    micro_batch: int = 8
    dtype: Literal["float32", "bfloat16"] = "float32"
    allow_empty: bool = False
    deepspeed: str | None = None
    lora: LoraConfig | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    save_every: int = 4
    gradient_checkpointing: bool = False
    on_bad_record: Literal["error", "skip"] = "error"
    vocab_tile: int = DEFAULT_VOCAB_TILE
    g_dtype: Literal["float32", "model"] = "float32"
    logp_reduction: Literal["sum", "mean"] = "sum"
    # how scores become weights (trace_ds/scoring/weights.py) and how the probe is built (scoring/probe.py). The
    # defaults are the weighting study's pick (docs/results.md, issue 21); PAPER_WEIGHTING is the paper's
    score_metric: Literal["dot", "cosine"] = "cosine"
    weighting: str = "prune:0.25"  # paper | standardized | prune:Q | uniform
    weight_alpha: float = 0.5
    weight_min: float = 0.1
    probe_normalize: Literal["none", "unit"] = "unit"
    # None: DEFAULT_PROBE_SUPPRESSION for a built probe (a --probe file is used as it is)
    probe_suppression: Literal["pool", "same-prompt", "drop"] | None = None

    def __post_init__(self) -> None:
        check_model_source(self.model)
        resolve_deepspeed_option(self)
        self.weighting_choice()  # every weighting option checked here, before anything loads
        if self.probe_normalize not in ("none", "unit"):
            raise TraceError(f"--probe-normalize {self.probe_normalize!r}: use none or unit")
        if self.probe_suppression is not None and self.probe_suppression not in SUPPRESSION_SOURCES:
            raise TraceError(
                f"--probe-suppression {self.probe_suppression!r}: use {', '.join(SUPPRESSION_SOURCES)}"
            )
        if self.probe is not None and self.probe_suppression is not None:
            raise TraceError(
                "--probe-suppression chooses how a built probe gets its suppression pairs; a --probe file is used as "
                "it is: drop one of the two"
            )
        check_vocab_tile(self.vocab_tile)
        check_logp_reduction(self.logp_reduction)
        if self.g_dtype not in ("float32", "model"):
            raise TraceError(f"--g-dtype {self.g_dtype!r}: use float32 or model")
        if self.beta <= 0:
            raise TraceError(f"--beta {self.beta}: must be positive (IPO's target is 1/(2 beta))")
        if self.relational not in ("ipo", "dpo"):
            raise TraceError(f"--relational {self.relational!r}: use ipo or dpo")
        if self.normalize not in ("per-category", "joint"):
            raise TraceError(f"--normalize {self.normalize!r}: use per-category or joint")
        if self.kernel not in ("auto", "triton", "torch"):
            raise TraceError(f"--kernel {self.kernel!r}: use auto, triton or torch")
        if self.micro_batch < 1 or self.save_every < 1:
            raise TraceError("--micro-batch and --save-every must be at least 1")
        if self.probe is not None and self.probe_holdout:
            raise TraceError(
                "--probe-holdout removes the members of a probe built here from the scored set; a --probe file is "
                "already your own held-out set: drop --probe-holdout, or drop --probe and use --probe-size"
            )
        if self.probe is None and self.probe_size < 3:
            raise TraceError(f"--probe-size {self.probe_size}: must be at least 3 (one pair per category)")

    @property
    def suppression_source(self) -> str:
        """Where a built probe's suppression third comes from (the option, or its default)."""
        return self.probe_suppression or DEFAULT_PROBE_SUPPRESSION

    def weighting_choice(self) -> Any:
        """The :class:`trace_ds.scoring.weights.Weighting` these options ask for (validated)."""
        from trace_ds.scoring.weights import Weighting

        return Weighting(
            self.score_metric, self.weighting, self.weight_alpha, self.weight_min, self.normalize
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a partial result depends on (resume refuses to mix different ones). The weighting
        options are not among them: weights are made from the raw scores and norms at the end."""
        keys = (
            "model",
            "triaged",
            "probe",
            "probe_size",
            "seed",
            "probe_holdout",
            "relational",
            "beta",
            "dtype",
            "g_dtype",
            "logp_reduction",
        )
        data = {key: getattr(self, key) for key in keys}
        probe_options = {"probe_normalize": self.probe_normalize}
        if self.probe is None:  # a given probe file is used as it is
            probe_options["probe_suppression"] = self.suppression_source
        for key, value in probe_options.items():  # only off the paper's: older partial files resume
            if value != PAPER_WEIGHTING[key]:
                data[key] = value
        data["lora"] = asdict(self.lora) if self.lora else None
        data["tokenize"] = asdict(self.tokenize)
        return data


BEST_METRICS = {"eval_loss": "min", "eval_inversion_accuracy": "max", "eval_inversion_margin": "max"}


@dataclass(frozen=True)
class TrainConfig:
    """``trace-ds train``: the hybrid update (relational / NPO / KL heads) under a DeepSpeed engine."""

    model: str
    triaged: str
    scores: str
    out: str
    deepspeed: str | None = None
    relational: Literal["ipo", "dpo"] = "ipo"
    beta: float = 0.1
    alpha_kl: float = 1.0
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int | None = None
    max_steps: int | None = None
    micro_batch: int = 4
    grad_accum: int = 1
    seed: int = 0
    buffer_size: int = 1000
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: bool = False
    gradient_checkpointing: bool = False
    eval_pairs: str | None = None
    eval_every: int | None = None
    best_metric: str = "eval_loss"
    save_every: int | None = None
    keep_last: int = 2
    resume: bool = False
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    merge_lora: bool = False
    tensorboard: bool = False
    precompute_ref_logps: bool = False
    offload_reference: bool = False
    category_proportions: tuple[tuple[str, float], ...] | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    vocab_tile: int = DEFAULT_VOCAB_TILE
    logp_reduction: Literal["sum", "mean"] = "sum"
    rescore_every: int | None = (
        None  # re-score every conflict pair every K steps (trace_ds/training/rescore.py)
    )

    def __post_init__(self) -> None:
        check_model_source(self.model)
        resolve_deepspeed_option(self)
        check_vocab_tile(self.vocab_tile)
        check_logp_reduction(self.logp_reduction)
        if self.rescore_every is not None and self.rescore_every < 1:
            raise TraceError(
                f"--rescore-every {self.rescore_every}: must be at least 1 (steps between re-scorings)"
            )
        if self.epochs is not None and self.max_steps is not None:
            raise TraceError("give --epochs or --max-steps, not both (--max-steps cycles epochs as needed)")
        if (self.epochs is not None and self.epochs < 1) or (
            self.max_steps is not None and self.max_steps < 1
        ):
            raise TraceError("--epochs and --max-steps must be at least 1")
        if self.beta <= 0 or self.lr <= 0 or self.alpha_kl < 0:
            raise TraceError("--beta and --lr must be positive and --alpha-kl non-negative")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise TraceError(f"--warmup-ratio {self.warmup_ratio}: must be in [0, 1)")
        if self.micro_batch < 1 or self.grad_accum < 1 or self.buffer_size < 1 or self.keep_last < 1:
            raise TraceError("--micro-batch, --grad-accum, --buffer-size and --keep-last must be at least 1")
        if (self.eval_pairs is None) != (self.eval_every is None):
            raise TraceError("--eval-pairs and --eval-every go together: give both or neither")
        if (self.eval_every is not None and self.eval_every < 1) or (
            self.save_every is not None and self.save_every < 1
        ):
            raise TraceError("--eval-every and --save-every must be at least 1")
        if self.best_metric not in BEST_METRICS:
            raise TraceError(f"--best-metric {self.best_metric!r}: choose from {', '.join(BEST_METRICS)}")
        if self.category_proportions is not None:
            names = [name for name, _ in self.category_proportions]
            shares = [share for _, share in self.category_proportions]
            if set(names) - {"inversion", "suppression", "retention"} or len(set(names)) != len(names):
                raise TraceError(
                    f"--category-proportions {dict(self.category_proportions)}: use each of inversion, suppression, retention at most once"
                )
            if any(share < 0 for share in shares) or abs(sum(shares) - 1.0) > 1e-6:
                raise TraceError(
                    f"--category-proportions {dict(self.category_proportions)}: shares must be >= 0 and add up to 1"
                )
            if self.max_steps is None:
                raise TraceError(
                    "--category-proportions draws each category from its own stream, which never ends: give --max-steps"
                )
        if self.merge_lora and not self.lora:
            raise TraceError("--merge-lora needs --lora (there is no adapter to merge)")
        if self.offload_reference:
            self._check_offload_reference()
        for name in ("triaged", "scores"):
            if not Path(getattr(self, name)).exists():
                raise TraceError(f"--{name} {getattr(self, name)}: no such file")
        checkpoints = Path(self.out) / "checkpoints" / "latest"
        if self.resume and not checkpoints.exists():
            raise TraceError(
                f"--resume: no checkpoint in {checkpoints.parent}; run without --resume to start"
            )
        if not self.resume and checkpoints.exists():
            raise TraceError(
                f"{self.out} already holds checkpoints: pass --resume to continue, or choose a new --out"
            )

    def _check_offload_reference(self) -> None:
        if self.lora:
            raise TraceError(
                "--offload-reference: with --lora the reference is the base model (adapters off), not a copy"
            )
        stage = None
        if self.deepspeed is not None:
            try:
                stage = (
                    json.loads(Path(self.deepspeed).read_text(encoding="utf-8"))
                    .get("zero_optimization", {})
                    .get("stage")
                )
            except (OSError, json.JSONDecodeError) as err:
                raise TraceError(f"--deepspeed {self.deepspeed}: {err}") from err
        if stage != 3:
            raise TraceError(
                "--offload-reference needs a ZeRO-3 --deepspeed config (ds_configs/zero3.json): only "
                "ZeRO-3 partitions the reference and can keep its partitions in host memory"
            )
