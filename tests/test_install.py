"""trace-ds as users install it: a built wheel holds every module and template, and the wheel installed into a
fresh virtualenv runs synth, triage, score and train (2 ranks, ZeRO-3) and eval from outside the source tree.

An editable install hides packaging mistakes: a subpackage missing from the wheel still imports from the
checkout. These tests never import the checkout in the installed runs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _source_files() -> set[str]:
    """Every file the wheel must hold, by its installed path: modules and templates of trace_ds, the kernels
    folder installed as trace_ds.kernels and the DeepSpeed configs as trace_ds/ds_configs."""
    wanted = {
        str(path.relative_to(REPO))
        for path in (REPO / "trace_ds").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".md")
    }
    wanted |= {
        f"trace_ds/kernels/{path.name}"
        for path in (REPO / "kernels").iterdir()
        if path.is_file() and path.suffix in (".py", ".md")
    }
    wanted |= {f"trace_ds/ds_configs/{path.name}" for path in (REPO / "ds_configs").glob("*.json")}
    return wanted


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built as ``pip wheel`` builds it for users."""
    import shutil

    out = tmp_path_factory.mktemp("wheel")
    # from a copy: setuptools never prunes a checkout's build/ folder, whose stale modules would reach the wheel
    source = out / "source"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, ignore=ignore)
    pip_wheel = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    subprocess.run([*pip_wheel, str(source)], check=True, timeout=300, cwd=out)
    (wheel,) = out.glob("trace_ds-*.whl")
    return wheel


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_holds_every_module_and_template(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as archive:
        (record_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        record = archive.read(record_name).decode()
    listed = {row[0] for row in csv.reader(io.StringIO(record)) if row and ".dist-info/" not in row[0]}
    wanted = _source_files()
    assert "trace_ds/scoring/scorer.py" in wanted and "trace_ds/judge/templates/judge_prompt.md" in wanted
    assert sorted(wanted - listed) == [], "in the source tree but not in the wheel"
    assert sorted(listed - wanted) == [], "in the wheel but not in the source tree"
    with zipfile.ZipFile(built_wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert "trace-ds = trace_ds.cli:run_cli" in archive.read(entry_points).decode()


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user of ``venv``: its bin first, nothing pointing at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["TORCH_EXTENSIONS_DIR"] = str(venv / "torch_extensions")  # never rebuild the test venv's ops in place
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1200)
def test_installed_wheel_runs_end_to_end_outside_the_source_tree(built_wheel: Path, tmp_path: Path) -> None:
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = _clean_env(venv)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    torch_version = _installed_version("torch")  # the same CPU build as the test venv, never a CUDA download
    _run([*pip, f"torch=={torch_version}", "setuptools", "wheel"], work, env, timeout=600)
    # DeepSpeed builds against the installed torch: no build isolation (as scripts/setup_env.sh does).
    # the versions CI tested (constraints.txt), as scripts/setup_env.sh installs them; the newest with
    # TRACE_DS_LATEST=1
    pins = [] if os.environ.get("TRACE_DS_LATEST") == "1" else ["-c", str(REPO / "constraints.txt")]
    _run([*pip, *pins, "--no-build-isolation", str(built_wheel)], work, env, timeout=900)

    python, trace_ds = str(venv / "bin" / "python"), str(venv / "bin" / "trace-ds")
    location = _run([python, "-c", "import trace_ds; print(trace_ds.__file__)"], work, env).strip()
    assert Path(location).resolve().is_relative_to(venv.resolve()), location
    assert not Path(location).resolve().is_relative_to(REPO)

    # the user's rehearsal model: `trace-ds build-tiny` from a text corpus (issue 20), scored and trained below
    _run(
        [
            python,
            "-c",
            "from trace_ds.models.tiny import default_corpus; open('corpus.txt', 'w').write('\\n\\n'.join(default_corpus()))",
        ],
        work,
        env,
    )
    _run(
        [trace_ds, "build-tiny", "--corpus", "corpus.txt", "--out", "model", "--vocab-size", "512"], work, env
    )
    _run(
        [trace_ds, "synth", "--out", "bench", "--pairs", "48", "--eval-prompts", "8", "--eval-pairs", "8"],
        work,
        env,
    )
    _run(
        [
            trace_ds,
            "triage",
            "--pairs",
            "bench/pairs.jsonl",
            "--verdicts",
            "bench/verdicts.jsonl",
            "--out",
            "triaged.jsonl",
        ],
        work,
        env,
    )
    launcher = [
        str(venv / "bin" / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        trace_ds,
    ]
    # a shipped DeepSpeed config by name: no ds_configs/ folder here, outside the clone (issue 20)
    assert not (work / "ds_configs").exists()
    common = ["--model", "model", "--triaged", "triaged.jsonl", "--deepspeed", "cpu"]
    _run(
        [
            *launcher,
            "score",
            *common,
            "--out",
            "scores.jsonl",
            "--probe-size",
            "4",
            "--micro-batch",
            "4",
            "--allow-empty",
        ],
        work,
        env,
        600,
    )
    launcher[4] = str(_free_port())
    _run(
        [
            *launcher,
            "train",
            *common,
            "--scores",
            "scores.jsonl",
            "--out",
            "train",
            "--max-steps",
            "2",
            "--micro-batch",
            "2",
        ],
        work,
        env,
        600,
    )
    _run(
        [
            trace_ds, "eval", "--model", "train/final", "--reference", "model", "--data", "bench/eval",
            "--out", "eval.json", "--max-new-tokens", "4", "--max-prompts", "4",
        ],
        work,
        env,
    )  # fmt: skip
    scores = [json.loads(line) for line in (work / "scores.jsonl").read_text().splitlines()]
    triaged = [json.loads(line) for line in (work / "triaged.jsonl").read_text().splitlines()]
    conflicts = {r["id"] for r in triaged if r["category"] in ("inversion", "suppression")}
    assert {s["id"] for s in scores} == conflicts and conflicts
    metrics = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    assert (work / "train" / "final" / "config.json").exists()
    evaluation = json.loads((work / "eval.json").read_text())
    assert evaluation["preference"] and evaluation["world_size"] == 1


def _installed_version(name: str) -> str:
    from importlib.metadata import version

    return version(name).split("+")[0]


def _free_port() -> int:
    from trace_ds.io import free_port

    return free_port()
