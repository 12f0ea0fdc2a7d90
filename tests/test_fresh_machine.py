"""What a fresh machine and a new user met (issue 20): nothing in the checkout shadows an installed
distribution, a missing model fails before anything launches, JSON errors name the right column, the tiny
model and the shipped DeepSpeed configs are reachable from the CLI, a stale op-build lock cannot hang a
launch, and the GPU check names a missing venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from trace_ds.cli import main
from trace_ds.io import TraceError

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


# ---- 1. the checkout shadows nothing ----


@pytest.mark.timeout(300)
def test_the_repository_root_does_not_shadow_an_installed_kernels_distribution(tmp_path: Path) -> None:
    """transformers >= 5.25 imports the `kernels` distribution; Python run from the repository root (pytest,
    python -m, python -c) has the root first on sys.path, where the project's kernels/ folder lives."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed distribution'\n")
    (site / "kernels-0.19.1.dist-info").mkdir()
    (site / "kernels-0.19.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n"
    )
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(site)!r}]   # the root first, as `python -c` from the root has it
        from kernels import CUDAProperties
        assert CUDAProperties == 'the installed distribution', CUDAProperties
        from transformers import LlamaForCausalLM, Qwen3ForCausalLM
        from trace_ds.kernels.ghost_dot import ghost_dot
        print('ok')
        """
    )
    result = _python(code, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.timeout(300)
def test_a_second_checkout_on_the_path_does_not_send_kernels_round_in_circles(tmp_path: Path) -> None:
    """A git worktree on PYTHONPATH beside the root (how a long study runs from a pinned commit while the root
    is edited): each checkout's kernels/ stepped aside to the other, without end (RecursionError, and then
    every transformers model class failed to import)."""
    other = tmp_path / "worktree"
    shutil.copytree(REPO / "kernels", other / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(other)!r}]
        import kernels
        from transformers import LlamaConfig, LlamaForCausalLM
        from trace_ds.kernels.ghost_dot import ghost_dot
        print('ok')
        """
    )
    result = _python(code, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_without_the_distribution_kernels_looks_like_an_empty_namespace_from_the_root() -> None:
    """With no `kernels` distribution installed, `import kernels` from the root gives what a bare namespace
    folder gives (no __file__, nothing to import from it): transformers' availability check reads that as "not
    installed" and every model class imports. trace_ds.kernels is unaffected."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import importlib.metadata as m\n"
        "try:\n"
        "    m.version('kernels')\n"
        "    print('installed')\n"
        "except m.PackageNotFoundError:\n"
        "    import kernels\n"
        "    assert kernels.__file__ is None and not [n for n in vars(kernels) if not n.startswith('__')], vars(kernels)\n"
        "    from transformers import LlamaForCausalLM, MixtralForCausalLM\n"
        "    from transformers.utils.import_utils import is_kernels_available\n"
        "    assert not is_kernels_available()\n"
        "    print('absent')\n"
        "from trace_ds.kernels.ghost_dot import ghost_dot\n"
    )
    result = _python(code, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() in ("absent", "installed"), result.stderr[-3000:]


# ---- 2. a missing model fails before anything launches, and no stage is marked done ----


def _run_config(tmp_path: Path, model_path: str) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"workdir: {tmp_path / 'work'}\n"
        "data: {synth: {pairs: 60}}\n"
        f"model: {{path: {model_path}}}\n"
        "launch: {ranks: 2, deepspeed: cpu}\n"
    )
    return config


def test_a_missing_model_folder_is_a_config_error_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", str(_run_config(tmp_path, "/no/such/dir"))])
    assert result.exit_code == 2, result.output
    assert "model folder not found" in result.output and "/no/such/dir" in result.output
    assert "rerun" not in result.output
    assert not (tmp_path / "work" / "stages").exists()


def test_score_names_the_missing_model_before_any_other_option(tmp_path: Path) -> None:
    triaged = tmp_path / "triaged.jsonl"
    triaged.write_text("")
    args = [
        "score",
        "--model",
        "./no/such/dir",
        "--triaged",
        str(triaged),
        "--out",
        str(tmp_path / "s.jsonl"),
    ]
    result = CliRunner().invoke(main, [*args, "--probe-size", "1"])
    assert result.exit_code == 2 and "./no/such/dir: model folder not found" in result.output, result.output


def test_a_model_folder_gone_at_run_time_marks_no_stage_done(tmp_path: Path) -> None:
    from trace_ds.pipeline.runner import Pipeline, load_config

    model = tmp_path / "model"
    model.mkdir()
    config_path = _run_config(tmp_path, str(model))
    pipeline = Pipeline(load_config(config_path), str(config_path))
    model.rmdir()  # after the config check, before the stage runs
    with pytest.raises(TraceError, match="model folder not found"):
        pipeline.run()
    old_model = next(s for s in pipeline.stages if s.name == "old_model")
    assert not old_model.done() and not old_model.directory.exists()


@pytest.mark.parametrize(("exit_code", "resumable"), [(2, False), (1, True), (-9, True)])
def test_rerun_to_resume_is_said_only_when_a_rerun_can_help(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_code: int, resumable: bool
) -> None:
    import trace_ds.pipeline.runner as pipeline_module

    model = tmp_path / "model"
    model.mkdir()
    config_path = _run_config(tmp_path, str(model))
    pipeline = pipeline_module.Pipeline(pipeline_module.load_config(config_path), str(config_path))
    code = (
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        if exit_code < 0
        else f"raise SystemExit({exit_code})"
    )
    monkeypatch.setattr(pipeline_module, "trace_ds_command", lambda *_: [sys.executable, "-c", code])
    with pytest.raises(TraceError) as caught:
        pipeline._launch(2, [s for s in pipeline.stages if s.phase == "distributed"])
    assert ("rerun the same command to resume" in str(caught.value)) == resumable, str(caught.value)


# ---- 3. JSON errors name the broken line's own column ----


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json"])
def test_a_broken_json_line_is_reported_at_its_own_column(tmp_path: Path, name: str) -> None:
    from trace_ds.data.pairs import read_pairs

    good = '{"id": "a", "prompt": "p", "chosen": "c", "rejected": "r"}'
    broken = '{"id": "b", "prompt": "p", "chosen": "c", "rejected": "r" "x": 1}'
    path = tmp_path / name
    path.write_text(f"{good}\n{broken}\n")
    try:
        json.loads(broken)
    except json.JSONDecodeError as err:
        column = err.colno
    with pytest.raises(TraceError) as caught:
        read_pairs(str(path))
    assert f"{path}:2:" in str(caught.value) and f"column {column}" in str(caught.value), str(caught.value)


def test_json_lines_in_a_json_file_read_like_a_jsonl_file(tmp_path: Path) -> None:
    from trace_ds.data.pairs import read_pairs

    lines = [json.dumps({"id": f"p{i}", "prompt": "p", "chosen": "c", "rejected": "r"}) for i in range(3)]
    (tmp_path / "a.json").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([json.loads(line) for line in lines], indent=2))
    assert [p.id for p in read_pairs(str(tmp_path / "a.json")).pairs] == ["p0", "p1", "p2"]
    assert [p.id for p in read_pairs(str(tmp_path / "b.json")).pairs] == ["p0", "p1", "p2"]


# ---- 4. the tiny model for your own data ----


def test_build_tiny_writes_a_model_folder_atomically_from_a_corpus(tmp_path: Path) -> None:
    from trace_ds.models.tiny import default_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(default_corpus()[:400]))
    out = tmp_path / "model"
    args = [
        "build-tiny",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--vocab-size",
        "400",
        "--num-layers",
        "1",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(out)) == AutoConfig.from_pretrained(out).vocab_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "model"]  # no staging folder left
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = CliRunner().invoke(main, ["build-tiny", "--corpus", str(empty), "--out", str(tmp_path / "m2")])
    assert result.exit_code == 2 and "no text" in result.output and not (tmp_path / "m2").exists()


# ---- 5. shipped DeepSpeed configs by name ----


def test_a_shipped_deepspeed_config_resolves_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trace_ds.runtime.deepspeed_configs import resolve_deepspeed_config, shipped_configs

    shipped = shipped_configs()
    assert {"cpu", "zero2", "zero3", "zero3_offload"} <= set(shipped)
    monkeypatch.chdir(tmp_path)  # outside the clone: ds_configs/cpu.json is no file here
    assert (
        Path(resolve_deepspeed_config("zero3")).read_bytes()
        == (REPO / "ds_configs" / "zero3.json").read_bytes()
    )
    assert resolve_deepspeed_config("cpu.json") == resolve_deepspeed_config("ds_configs/cpu.json")
    (tmp_path / "mine.json").write_text("{}")
    assert resolve_deepspeed_config("mine.json") == "mine.json"
    with pytest.raises(TraceError, match="zero3_offload"):
        resolve_deepspeed_config("zero4")
    listing = CliRunner().invoke(main, ["ds-configs"])
    assert listing.exit_code == 0 and all(name in listing.output for name in shipped)


# ---- 6. a stale op-build lock ----


def _hold_open(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time; fd = os.open({str(path)!r}, os.O_RDONLY); print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_only_locks_no_live_process_holds_are_removed(tmp_path: Path) -> None:
    from trace_ds.runtime.build_locks import clear_stale_build_locks

    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    held = tmp_path / "other_op" / "lock"
    for lock in (stale, held):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    holder = _hold_open(held)
    try:
        with pytest.warns(UserWarning, match=str(stale)):
            removed = clear_stale_build_locks(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [stale] and not stale.exists() and held.exists()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stale_op_build_lock_does_not_hang_a_launch(tmp_path: Path) -> None:
    """A DeepSpeed process group on the CPU loads (or JIT-builds) the shm op through torch's FileBaton, which
    waits forever on a lock left by a killed build. The built op is copied from this venv's extensions folder
    when there is one (else built here once)."""
    from trace_ds.runtime.build_locks import extensions_root

    extensions = tmp_path / "torch_extensions"
    built = extensions_root() / "deepspeed_shm_comm"
    if built.is_dir():
        shutil.copytree(built, extensions / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock"))
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    code = (
        "from trace_ds.runtime.engine import CPU_ZERO3_CONFIG, Strategy\n"
        "strategy = Strategy.create(CPU_ZERO3_CONFIG)\n"
        "print('process group up on', strategy.world_size, 'rank')\n"
    )
    started = time.monotonic()
    result = _python(code, cwd=tmp_path, timeout=360, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process group up on 1 rank" in result.stdout
    assert "stale JIT-build lock" in result.stderr and str(lock) in result.stderr
    assert time.monotonic() - started < 360


# ---- 7. the GPU check names a missing venv ----


def test_gpu_check_names_the_missing_virtual_environment(tmp_path: Path) -> None:
    missing = tmp_path / "no-venv"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke"],
        env={**os.environ, "VENV": str(missing), "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"no virtual environment at {missing}:" in result.stdout + result.stderr, result.stderr
