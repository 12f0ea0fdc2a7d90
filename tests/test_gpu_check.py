"""``scripts/gpu_check.sh --cpu-smoke``: the GPU check script end to end on tiny shapes on the CPU, so that the
one command meant for a lent GPU machine cannot rot between GPU sessions. Checks that every section runs and is
written, that a failed (timed-out) section is recorded and the next one still runs, and that a run interrupted
after its first section keeps that section in the results file."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HEADINGS = {
    "a": "## a. Kernel sweep",
    "b": "## b. Exactness",
    "c": "## c. trace-ds bench scoring",
    "d": "## d. trace-ds bench train",
    "e": "## e. Memory",
}
HAVE_TRL = importlib.util.find_spec("trl") is not None
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

pytestmark = pytest.mark.slow


def _env(tag: str) -> dict[str, str]:
    """This venv for the script, no launch variables of this process, and a tag to find its processes by."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "VENV": sys.prefix, "GPU_CHECK_TEST_TAG": tag}


def _sections(text: str) -> dict[str, str]:
    """The results file's section blocks by letter (heading included)."""
    parts = re.split(r"^(?=## [a-e]\. )", text, flags=re.MULTILINE)
    return {part[3]: part for part in parts if part.startswith("## ")}


def _tagged_processes(tag: str) -> list[int]:
    """Processes still running with the test's tag in their environment (a section left behind)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"GPU_CHECK_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _assert_no_leftovers(tag: str, out: Path) -> None:
    deadline = time.time() + 15
    while _tagged_processes(tag) and time.time() < deadline:
        time.sleep(0.2)
    left = _tagged_processes(tag)
    for pid in left:  # never leave them running, whatever the assertion says
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the script left running: {left}"
    assert not list(out.parent.glob(f"{out.name}.tmp*")), "a temporary results file was left behind"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, str, float]:
    """One whole ``--cpu-smoke`` run: its process result, the results file and its wall time."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_results.md"
    tag = uuid.uuid4().hex
    t0 = time.perf_counter()
    run = subprocess.run(
        [str(SCRIPT), "--cpu-smoke", "--out", str(out)],
        env=_env(tag), capture_output=True, text=True, timeout=840, start_new_session=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    _assert_no_leftovers(tag, out)
    return run, out.read_text(), seconds


@pytest.mark.timeout(900)
def test_cpu_smoke_runs_every_section(smoke: tuple[subprocess.CompletedProcess, str, float]) -> None:
    run, text, seconds = smoke
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    blocks = _sections(text)
    assert sorted(blocks) == sorted(HEADINGS), list(blocks)
    for letter, heading in HEADINGS.items():
        block = blocks[letter]
        assert block.startswith(heading), block[:200]
        assert "\n- status: ok\n" in block, block[:600]
        assert "failed" not in block.lower(), block
        for line in ("\n- wall time: ", "\n- machine: GPU: none (CPU smoke run); CPU: ", "\n- command: `"):
            assert line in block, (letter, line)
        assert "torch " in block and "triton " in block and "deepspeed " in block
    assert "- state: finished: all 5 section(s) ok" in text
    assert "**CPU smoke run**" in text
    # the figures each section exists for (tiny, but measured)
    assert "| float32 | 64 | 2004 | 256 |" in blocks["a"]  # the lm_head shape at --tiny width
    assert "--family llama" in blocks["c"] and "--family mixtral" in blocks["c"]
    assert blocks["c"].count("| ghost |") == 2 and blocks["c"].count("| floor |") == 2
    assert "| trace-ds | 1 |" in blocks["d"]
    assert "| scoring |" in blocks["e"] and "| training |" in blocks["e"]
    assert "TRACE_DS_MEMORY_REPORT=" in blocks["e"] and "trace-ds plan --model" in blocks["e"]
    # exactness: fp32 ghost scores (the Triton kernel, interpreted) equal the fp64 reference
    fp32 = re.search(r"^\| fp32 \| triton \| ([0-9.e+-]+) \|", blocks["b"], re.MULTILINE)
    assert fp32 is not None and float(fp32.group(1)) <= 1e-5, blocks["b"]
    assert re.search(r"^\| bf16 \| triton \| ", blocks["b"], re.MULTILINE)
    assert "bf16 vs fp32 scores: Spearman rank correlation" in blocks["b"]
    print(f"gpu_check.sh --cpu-smoke: {seconds:.0f} s")


@pytest.mark.timeout(900)
def test_trl_arm_is_skipped_and_said_so_without_trl(
    smoke: tuple[subprocess.CompletedProcess, str, float],
) -> None:
    block = _sections(smoke[1])["d"]
    if HAVE_TRL:
        assert "| trl | 1 |" in block and "TRL arm skipped" not in block
    else:
        assert "**TRL arm skipped**" in block and "No module named 'trl'" in block
        assert "--arms trace-ds " in block and "| trl |" not in block


@pytest.mark.timeout(300)
def test_timed_out_sections_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "gpu_results.md"
    tag = uuid.uuid4().hex
    run = subprocess.run(
        [str(SCRIPT), "--cpu-smoke", "--out", str(out), "--only", "b,e", "--section-timeout", "1"],
        env=_env(tag), capture_output=True, text=True, timeout=240, start_new_session=True,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    blocks = _sections(out.read_text())
    assert sorted(blocks) == ["b", "e"]
    for block in blocks.values():
        assert "\n- status: failed: timed out after 1 s" in block, block
        assert "\n- command: `" in block
    assert "- state: finished in " in out.read_text() and "failed: b e" in out.read_text()
    _assert_no_leftovers(tag, out)


@pytest.mark.timeout(300)
def test_an_interrupted_run_keeps_its_finished_sections(tmp_path: Path) -> None:
    out = tmp_path / "gpu_results.md"
    tag = uuid.uuid4().hex
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            [str(SCRIPT), "--cpu-smoke", "--out", str(out), "--only", "a,b,c"],
            env=_env(tag), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.time() + 200
            while not (out.exists() and HEADINGS["a"] in out.read_text()):
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()
                assert time.time() < deadline, "section a did not finish in time"
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGTERM)  # what `timeout` sends a run that outlasts it
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    text = out.read_text()
    blocks = _sections(text)
    assert sorted(blocks) == ["a"], text
    assert "\n- status: ok\n" in blocks["a"] and "| float32 | 64 | 2004 | 256 |" in blocks["a"]
    assert "- state: interrupted by SIGTERM" in text  # while section b ran, or just before it started
    _assert_no_leftovers(tag, out)


def test_the_device_wrapper_builds_its_venv_and_runs_the_check(tmp_path: Path) -> None:
    """scripts/device_wheels.sh, then scripts/device_gpu_check.sh as a lent GPU machine runs it: a fresh venv over
    the base Python's packages, the carried wheels and trace-ds installed into it, the check's results written
    to $OUT. This venv's Python stands in for the GPU image's (wheels for its version; the CPU smoke mode,
    section b only)."""
    env = _env(uuid.uuid4().hex)
    wheels, out = tmp_path / "whl", tmp_path / "out"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    fetch = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_wheels.sh"), "--python-version", version, "--dest", str(wheels)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fetch.returncode == 0, fetch.stdout[-2000:] + fetch.stderr[-2000:]
    names = {path.name.split("-")[0] for path in wheels.glob("*.whl")}
    assert {"deepspeed", "transformers", "datasets", "trl", "pydantic_core"} <= names, names
    device_env = {
        **env, "DEVICE_BASE_PYTHON": sys.executable, "DEVICE_VENV": str(tmp_path / "venv"),
        "DEVICE_WHEELS": str(wheels), "OUT": str(out),
    }  # fmt: skip
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_gpu_check.sh"), "--cpu-smoke", "--only", "exactness"],
        env=device_env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "venv ready: deepspeed" in (out / "setup.log").read_text()
    sections = _sections((out / "gpu_results.md").read_text())
    assert list(sections) == ["b"] and "- status: ok" in sections["b"]
    assert (tmp_path / "venv" / "bin" / "trace-ds").exists()  # trace-ds itself installed into the new venv
