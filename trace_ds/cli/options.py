"""Option decorators that several commands share (defined once), and what they parse into."""

from __future__ import annotations

import os
from typing import Any

import click

from trace_ds.config import DEFAULT_VOCAB_TILE
from trace_ds.io import TraceError


def pair_source_options(func: Any) -> Any:
    """Options every command that reads pairs shares: column remapping, bad-record policy, dataset split."""
    func = click.option(
        "--column",
        "columns",
        multiple=True,
        metavar="CANONICAL=SOURCE",
        help="Read a canonical field from another column, e.g. --column prompt=question (repeatable).",
    )(func)
    func = click.option(
        "--on-bad-record",
        type=click.Choice(["error", "skip"]),
        default="error",
        show_default=True,
        help="error: stop naming file and line, write nothing. skip: go on, write bad records to <out>.rejects.jsonl.",
    )(func)
    func = click.option("--split", default=None, help="Dataset split for a saved dataset or hub id.")(func)
    return func


def column_map(columns: tuple[str, ...]) -> dict[str, str]:
    from trace_ds.data.pairs import parse_column_map

    return parse_column_map(columns)


class DeepSpeedConfigType(click.ParamType):
    """A DeepSpeed JSON file, or the name of a config shipped with trace-ds (``zero3``, ``cpu``, ...)."""

    name = "FILE|NAME"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from trace_ds.runtime.deepspeed_configs import resolve_deepspeed_config

        try:
            return resolve_deepspeed_config(str(value))
        except TraceError as err:
            self.fail(str(err).removeprefix("--deepspeed ").removeprefix(f"{value}: "), param, ctx)


def deepspeed_option(help_text: str, name: str = "deepspeed_config") -> Any:
    """``--deepspeed``: a config file, or a shipped config by name (``trace-ds ds-configs`` lists them)."""
    return click.option(
        "--deepspeed",
        name,
        type=DeepSpeedConfigType(),
        help=f"{help_text} A file, or a shipped config by name: cpu, zero2, zero3, zero3_offload, ... "
        "(trace-ds ds-configs).",
    )


def tokenize_options(func: Any) -> Any:
    """Length caps of the shared tokenisation path (docs/formats.md)."""
    func = click.option(
        "--prompt-truncation", type=click.Choice(["left", "right"]), default="left", show_default=True
    )(func)
    func = click.option("--max-prompt-length", default=512, show_default=True, help="Prompt token cap.")(func)
    func = click.option("--max-length", default=1024, show_default=True, help="Prompt + response token cap.")(
        func
    )
    return func


def vocab_tile_option(func: Any) -> Any:
    return click.option(
        "--vocab-tile",
        default=DEFAULT_VOCAB_TILE,
        show_default=True,
        help="Vocabulary rows per tile of the chunked LM head (log-probs, KL and lm_head's score without "
        "[tokens, vocabulary] logits); 0: the full-logits path.",
    )(func)


def logp_reduction_option(func: Any) -> Any:
    return click.option(
        "--logp-reduction",
        type=click.Choice(["sum", "mean"]),
        default="sum",
        show_default=True,
        help="Response log-probs summed over tokens (the paper's) or averaged per token (the scale IPO's "
        "target 1/(2 beta) assumes; TRL's IPO). Score and train with the same one.",
    )(func)


def lora_options(func: Any) -> Any:
    func = click.option(
        "--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", show_default=True
    )(func)
    func = click.option(
        "--lora-seed", default=0, show_default=True, help="Seed of the adapters' initial values."
    )(func)
    func = click.option("--lora-dropout", default=0.0, show_default=True)(func)
    func = click.option("--lora-alpha", default=16.0, show_default=True)(func)
    func = click.option("--lora-r", default=8, show_default=True)(func)
    func = click.option("--lora", is_flag=True, help="Train and score LoRA adapters only.")(func)
    return func


def lora_config_from(options: dict[str, Any]) -> Any:
    from trace_ds.config import LoraConfig

    values = {
        key: options.pop(key)
        for key in ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_seed", "lora_targets")
    }
    if not values["lora"]:
        return None
    targets = tuple(t.strip() for t in values["lora_targets"].split(",") if t.strip())
    return LoraConfig(
        values["lora_r"], values["lora_alpha"], values["lora_dropout"], targets, values["lora_seed"]
    )


def is_rank_zero() -> bool:

    return os.environ.get("RANK", "0") == "0"


def parse_proportions(text: str | None) -> tuple[tuple[str, float], ...] | None:
    if not text:
        return None
    out = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            raise TraceError(
                f"--category-proportions {text!r}: expected NAME=SHARE,..., e.g. inversion=0.4,suppression=0.3,retention=0.3"
            ) from None
        if not sep:
            raise TraceError(f"--category-proportions {text!r}: expected NAME=SHARE items")
    return tuple(out)


def tokenize_config_from(options: dict[str, Any]) -> Any:
    from trace_ds.data.tokenize import TokenizeConfig

    return TokenizeConfig(
        options.pop("max_length"), options.pop("max_prompt_length"), options.pop("prompt_truncation")
    )


def path_option(name: str, help_text: str, *, folder: bool = False, exists: bool = False) -> Any:
    """A required file (or, with ``folder``, folder) option; ``exists``: it must be there already."""
    kind = {"file_okay": False} if folder else {"dir_okay": False}
    return click.option(name, required=True, type=click.Path(exists=exists, **kind), help=help_text)


report_json_option = click.option(
    "--out", type=click.Path(dir_okay=False), help="Also write the report as JSON."
)
