"""File I/O shared by every stage: atomic writes, record readers that know where each record came from.

Every output goes through :func:`atomic_write` (temp file in the same folder, fsync, rename), so a crash
or a bad record never leaves a half-written file behind. Every reader yields ``(Position, record)`` so an
error can name the file and the line (or row) it is about.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


# The exit status of a TraceError (as of click's usage errors): rerunning the same command cannot help.
USER_ERROR_EXIT = 2


class TraceError(Exception):
    """An error the user can fix; the CLI prints it without a traceback and exits with USER_ERROR_EXIT."""


@dataclass(frozen=True)
class Position:
    """Where a record came from: ``file:line`` for text files, ``file:row N`` for tables and datasets."""

    source: str
    index: int
    unit: str = "line"  # "line" (1-based text line) or "row" (0-based table row)

    def __str__(self) -> str:
        return f"{self.source}:{self.index}" if self.unit == "line" else f"{self.source}:row {self.index}"


def position_text(position: Position | None) -> str | None:
    """A position as written into JSON files: ``file:line``, or null when the record had none."""
    return None if position is None else str(position)


class BadRecord(TraceError):
    """One input record is unusable; carries its position so the message names file and line."""

    def __init__(self, position: Position | None, reason: str, raw: str | None = None):
        self.position = position
        self.reason = reason
        self.raw = raw  # the offending text when it could not be parsed at all
        super().__init__(f"{position}: {reason}" if position is not None else reason)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file next to ``path``; rename it over ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder next to ``path``; it replaces ``path`` only if the block finishes, so a crash or
    an error leaves no half-written folder (a model, a tokenizer) behind."""
    import shutil

    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def free_port() -> int:
    """A free TCP port on the loopback address (for a rendezvous; a race with another process is possible)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trace_ds_command(ranks: int, *args: str) -> list[str]:
    """``trace-ds ARGS`` on ``ranks`` local ranks: this environment's ``deepspeed`` launcher on a free
    rendezvous port when there are several, else one plain process."""
    import sys

    if ranks <= 1:
        return [sys.executable, "-m", "trace_ds.cli", *args]
    bin_dir = Path(sys.executable).parent
    launcher = [str(bin_dir / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port())]
    return [*launcher, str(bin_dir / "trace-ds"), *args]


def append_lines(sink: IO, lines: Iterable[str]) -> None:
    """Append whole lines and fsync, so a kill loses at most the line being written (resume files)."""
    text = "".join(line + "\n" for line in lines)
    if text:
        sink.write(text)
        sink.flush()
        os.fsync(sink.fileno())


def dumps(record: Any) -> str:
    """One JSONL line: compact, UTF-8 kept readable."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Atomically write records as JSONL; returns how many were written."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(dumps(record) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write one pretty-printed JSON document."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, ensure_ascii=False, indent=2)
        handle.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise BadRecord(
            Position(str(path), err.lineno), f"not valid JSON: {err.msg}: column {err.colno}"
        ) from None
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[Position, Any]]:
    """Yield ``(position, parsed line)``; blank lines are skipped, a non-JSON line raises BadRecord.

    Use :func:`iter_jsonl_lenient` where one bad line should not stop the read.
    """
    for position, value in iter_jsonl_lenient(path):
        if isinstance(value, BadRecord):
            raise value
        yield position, value


def iter_jsonl_lenient(path: str | os.PathLike) -> Iterator[tuple[Position, Any]]:
    """Like :func:`iter_jsonl`, but a line that is not JSON is yielded as a BadRecord value."""
    source = str(path)
    if not Path(path).is_file():
        raise TraceError(f"{path}: no such file")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            position = Position(source, number)
            try:
                yield position, json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    position,
                    BadRecord(
                        position, f"not valid JSON: {err.msg}: column {err.colno}", raw=line.rstrip("\n")
                    ),
                )


def _holds_json_lines(path: Path) -> bool:
    """A .json file that is not one JSON value but a value per line: its first line parses on its own and
    more follows. Its errors are then reported per line, at the broken line's own column (as a whole file it
    would fail at line 2 column 1 with "Extra data", whatever is wrong further on)."""
    with open(path, encoding="utf-8") as handle:
        lines = (line for line in handle if line.strip())
        first = next(lines, None)
        if first is None or next(lines, None) is None:
            return False
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return first.lstrip()[:1] != "["


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def iter_table_records(
    source: str, split: str | None = None, streaming: bool = False
) -> Iterator[tuple[Position, Any]]:
    """Records of any supported table source, with positions.

    ``source`` is a ``.jsonl`` file, a ``.json`` file holding an array, a ``.parquet`` file, a
    ``save_to_disk`` folder, or else a Hugging Face hub id (or loader script / data folder) given to
    ``datasets.load_dataset`` (``streaming`` passes through).
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".jsonl", ".ndjson"):
        yield from iter_jsonl_lenient(path)
    elif path.is_file() and suffix == ".json":
        if _holds_json_lines(path):  # JSON Lines named .json, as `datasets`' json loader also reads them
            yield from iter_jsonl_lenient(path)
            return
        data = read_json(path)
        if not isinstance(data, list):
            raise BadRecord(Position(source, 1), "a .json pairs file must hold one JSON array of records")
        for index, item in enumerate(data):
            yield Position(source, index, "row"), item
    elif path.is_file() and suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        index = 0
        for batch in table.iter_batches(batch_size=1024):
            for item in batch.to_pylist():
                yield Position(source, index, "row"), item
                index += 1
    elif is_saved_dataset(path):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = _pick_split(loaded, split, source)
        for index, item in enumerate(loaded):
            yield Position(source, index, "row"), item
    elif path.exists() and not path.is_dir():
        raise TraceError(f"{source}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet)")
    else:
        import datasets

        try:
            loaded = datasets.load_dataset(source, split=split, streaming=streaming)
        except Exception as err:  # the datasets library raises many types; name the source in every case
            raise TraceError(
                f"{source}: could not load as a file, saved dataset or hub dataset: {err}"
            ) from err
        if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            loaded = _pick_split(loaded, split, source)
        for index, item in enumerate(loaded):
            yield Position(f"{source}[{split or 'train'}]", index, "row"), item


def _pick_split(dataset_dict: Any, split: str | None, source: str) -> Any:
    names = list(dataset_dict.keys())
    if split is None:
        if len(names) == 1 or "train" in names:
            split = names[0] if len(names) == 1 else "train"
        else:
            raise TraceError(f"{source}: several splits {names}; choose one with --split")
    if split not in names:
        raise TraceError(f"{source}: no split {split!r} (has {names})")
    return dataset_dict[split]
