"""Shared test set-up. Triton kernels run in its interpreter here (no GPU): set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRACE_DS_GHOST_CHECKS", "1")  # the kernel's offsets checks (one host sync per layer)


from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama model with a chat-template tokenizer, built once per test session."""
    from trace_ds.models.tiny import build_tiny_pair, default_corpus

    return build_tiny_pair(tmp_path_factory.mktemp("tiny") / "model", default_corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer without a chat template (the plain-format path)."""
    from trace_ds.models.tiny import default_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("plain_tok")
    train_tokenizer(default_corpus(), out, vocab_size=512, chat_template=False)
    return out


LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_launch_env():
    """A stage run in this process forms a one-rank group and sets RANK, MASTER_PORT, ... in os.environ; a
    later test's subprocess must not inherit them (it would try to bind the port this process still holds).
    Restored after every test, whatever it did."""
    before = {key: os.environ.get(key) for key in LAUNCH_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# Tests whose passing CI's log must show by name (a quiet run prints only dots): the real pretrained model and
# the efficacy study's CI mode.
SHOWN_WHEN_PASSED = ("tests/test_real_model.py::", "tests/test_study.py::")


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    passed = [
        report
        for report in terminalreporter.stats.get("passed", [])
        if report.when == "call" and report.nodeid.startswith(SHOWN_WHEN_PASSED)
    ]
    if passed:
        terminalreporter.write_sep("-", "ran and passed")
        for report in passed:
            terminalreporter.write_line(f"PASSED {report.nodeid} ({report.duration:.1f} s)")
