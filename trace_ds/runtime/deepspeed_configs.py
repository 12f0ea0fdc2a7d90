"""The DeepSpeed configs shipped with trace-ds, and ``--deepspeed NAME_OR_FILE`` resolution.

The repository's top-level ``ds_configs/`` folder is installed as ``trace_ds/ds_configs/`` in a wheel (see
``setup.py``), so ``--deepspeed zero3`` works wherever trace-ds is installed, not only inside a clone. A value
that is an existing file is always taken as that file; otherwise it must name a shipped config.
"""

from __future__ import annotations

import json
from pathlib import Path

from trace_ds.io import TraceError

# One line each for `trace-ds ds-configs` and the --deepspeed help; a shipped file missing here is listed
# with its ZeRO stage only.
DESCRIPTIONS = {
    "cpu": "ZeRO-3 in fp32 with torch AdamW, nothing to compile: CPU ranks (DS_ACCELERATOR=cpu), tests",
    "zero2": "ZeRO-2, bf16: GPUs, models whose parameters fit on every GPU",
    "zero3": "ZeRO-3, bf16: GPUs, parameters partitioned across ranks (7B-70B)",
    "zero3_offload": "ZeRO-3, bf16, parameters and optimizer state offloaded to host memory",
    "recipe_llama3_8b_1node": "docs/recipes.md: Llama 3.1 8B on one 8-GPU node",
    "recipe_llama3_70b_4nodes": "docs/recipes.md: Llama 3.1 70B on four 8-GPU nodes",
    "recipe_llama3_70b_4nodes_offload": "docs/recipes.md: the 70B recipe with host offload",
}


def shipped_folder() -> Path:
    """Where the shipped configs are: ``trace_ds/ds_configs`` in an install, ``ds_configs/`` in a clone."""
    package = Path(__file__).resolve().parents[1]  # trace_ds/
    for folder in (package / "ds_configs", package.parent / "ds_configs"):
        if folder.is_dir() and any(folder.glob("*.json")):
            return folder
    raise TraceError(f"no shipped DeepSpeed configs next to {package}: reinstall trace-ds")


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name (the file name without ``.json``), sorted."""
    return {path.stem: path for path in sorted(shipped_folder().glob("*.json"))}


def describe(name: str, path: Path) -> str:
    """One line about a shipped config (its ZeRO stage read from the file when it has no description)."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    stage = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0)
    return f"ZeRO-{stage}"


def resolve_deepspeed_config(value: str, option: str = "--deepspeed") -> str:
    """The file ``value`` names: an existing file as it is, else a shipped config by name (``zero3`` or
    ``zero3.json``). Anything else is an error listing the shipped names."""
    if Path(value).is_file():
        return str(value)
    shipped = shipped_configs()
    name = value[: -len(".json")] if value.endswith(".json") else value
    if "/" not in name and name in shipped:
        return str(shipped[name])
    if "/" in value and Path(value).name.removesuffix(".json") in shipped and value.startswith("ds_configs/"):
        # the README's `ds_configs/cpu.json` outside a clone: the same file ships with the package
        return str(shipped[Path(value).name.removesuffix(".json")])
    raise TraceError(
        f"{option} {value}: no such file, and no shipped config of that name; shipped: "
        f"{', '.join(shipped)} (trace-ds ds-configs lists them)"
    )
