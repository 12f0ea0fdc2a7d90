"""docs/recipes.md stays true: its `trace-ds plan` outputs are what the planner prints today, and its
DeepSpeed configs load for bf16."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.runtime.engine import load_ds_config

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```text\n\$ trace-ds (plan [^\n]+)\n(.*?)```", re.DOTALL)


def plan_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((REPO / "docs" / "recipes.md").read_text(encoding="utf-8"))


def test_recipes_page_has_the_three_plans() -> None:
    commands = [command for command, _ in plan_blocks()]
    assert len(commands) == 3
    assert all("--device-gib" in command for command in commands)


@pytest.mark.parametrize("index", range(3))
def test_recipe_plan_output_matches_the_page(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    command, expected = plan_blocks()[index]
    result = CliRunner().invoke(main, command.split(), terminal_width=200)
    assert result.exit_code == 0, result.output
    printed = "\n".join(line for line in result.output.splitlines() if "[WARNING]" not in line).strip()
    assert printed == expected.strip(), (
        f"docs/recipes.md is stale; `trace-ds {command}` now prints:\n{printed}"
    )
    assert "training +ckpt: fits" in printed  # every recipe trains with checkpointing within its device


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("recipe_*.json")), ids=lambda p: p.name)
def test_recipe_configs_load_for_bf16(path: Path) -> None:
    config = load_ds_config(str(path), micro_batch=1, grad_accum=8, dtype="bfloat16")
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"] == {"enabled": True}
