"""Pair reading: every input format and record shape, column remapping, ids, and every bad-input path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_ds.data.pairs import content_id, parse_column_map, read_pairs, rejects_path
from trace_ds.io import BadRecord, TraceError, atomic_write, write_jsonl

TEXT = [
    {"id": "a", "prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "topic": "greeting"},
    {"id": "b", "prompt": "2+2?", "chosen": "4", "rejected": "5", "topic": "math"},
]
CONVERSATIONAL = [
    {
        "id": "c1",
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
]
TOKENIZED = [
    {"id": 7, "prompt_input_ids": [1, 5, 6], "chosen_input_ids": [9, 2], "rejected_input_ids": [8, 2]}
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "records", [TEXT, CONVERSATIONAL, TOKENIZED], ids=["text", "conversational", "tokenized"]
)
def test_every_file_format_reads_the_same_pairs(tmp_path: Path, records: list[dict]) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "p.jsonl"
    write_jsonl(jsonl, records)
    array = tmp_path / "p.json"
    array.write_text(json.dumps(records), encoding="utf-8")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(saved_dict))

    expected = [r | {"id": str(r["id"])} for r in records]
    for source in (jsonl, array, parquet, saved, saved_dict):
        result = read_pairs(source)
        assert [p.to_record() for p in result.pairs] == expected, source
        assert result.rejects == []


def test_load_dataset_path_for_hub_ids_and_streaming(tmp_path: Path) -> None:
    """A name that is not a file or saved dataset goes through datasets.load_dataset (hub id, data folder)."""
    folder = tmp_path / "hub_like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", TEXT)
    for streaming in (False, True):
        pairs = read_pairs(str(folder), streaming=streaming, split="train").pairs
        assert [p.id for p in pairs] == ["a", "b"]
    with pytest.raises(TraceError, match="could not load"):
        read_pairs(str(tmp_path / "no-such-dataset"))


def test_record_shapes(tmp_path: Path) -> None:
    pairs = read_pairs(write_jsonl_path(tmp_path, TEXT + CONVERSATIONAL + TOKENIZED)).pairs
    assert [p.shape for p in pairs] == ["text", "text", "conversational", "tokenized"]
    assert pairs[0].extra == {"topic": "greeting"}
    assert pairs[3].id == "7" and pairs[3].chosen == [9, 2]
    swapped = pairs[0].swapped()
    assert (swapped.chosen, swapped.rejected) == ("Go away.", "Hello.")
    assert pairs[0].chosen == "Hello."


def write_jsonl_path(tmp_path: Path, records: list[dict], name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    write_jsonl(path, records)
    return path


def test_column_remapping(tmp_path: Path) -> None:
    source = write_jsonl_path(tmp_path, [{"uid": "x", "question": "Q", "good": "A", "bad": "B"}])
    columns = parse_column_map(["id=uid", "prompt=question", "chosen=good", "rejected=bad"])
    pair = read_pairs(source, columns).pairs[0]
    assert (pair.id, pair.prompt, pair.chosen, pair.rejected) == ("x", "Q", "A", "B")
    with pytest.raises(BadRecord, match=r"missing field 'rejected' \(mapped from 'worse'\)"):
        read_pairs(source, parse_column_map(["prompt=question", "chosen=good", "rejected=worse"]))
    for bad in ("prompt", "=x", "answer=good"):
        with pytest.raises(TraceError):
            parse_column_map([bad])


def test_content_ids_are_stable_and_documented(tmp_path: Path) -> None:
    record = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    pair = read_pairs(write_jsonl_path(tmp_path, [record])).pairs[0]
    assert pair.id == content_id("text", "Q", "A", "B")
    # sha256 of the canonical JSON ["text","Q","A","B"]: the same on every machine and run
    assert pair.id == "pair-" + __import__("hashlib").sha256(b'["text","Q","A","B"]').hexdigest()[:16]
    assert content_id("text", "Q", "B", "A") != pair.id


BAD_CASES = {
    "not json": ("{not json", "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing field": ('{"id": "m", "prompt": "Q", "chosen": "A"}', "missing field 'rejected'"),
    "wrong type": ('{"id": "t", "prompt": "Q", "chosen": 3, "rejected": "B"}', "must be a string"),
    "empty response": ('{"id": "e", "prompt": "Q", "chosen": "  ", "rejected": "B"}', "empty response"),
    "duplicate id": ('{"id": "a", "prompt": "Q2", "chosen": "A", "rejected": "B"}', "duplicate id 'a'"),
    "bad id type": ('{"id": [1], "prompt": "Q", "chosen": "A", "rejected": "B"}', "'id' must be"),
    "bad token ids": (
        '{"prompt_input_ids": [1], "chosen_input_ids": ["x"], "rejected_input_ids": [2]}',
        "list of integers",
    ),
    "empty token response": (
        '{"prompt_input_ids": [1], "chosen_input_ids": [], "rejected_input_ids": [2]}',
        "empty response",
    ),
    "negative token": (
        '{"prompt_input_ids": [1], "chosen_input_ids": [-1], "rejected_input_ids": [2]}',
        "negative",
    ),
    "bad message": (
        '{"prompt": [{"role": "user"}], "chosen": [], "rejected": []}',
        "prompt\\[0\\] needs string",
    ),
    "user as response": (
        '{"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "user", "content": "A"}], '
        '"rejected": [{"role": "assistant", "content": "B"}]}',
        "must be assistant messages",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_names_file_and_line_and_skip_mode_keeps_it(tmp_path: Path, case: str) -> None:
    bad_line, reason = BAD_CASES[case]
    good = json.dumps(TEXT[0])
    source = write_lines(tmp_path / "pairs.jsonl", [good, "", bad_line, json.dumps(TEXT[1])])
    with pytest.raises(BadRecord, match=reason) as caught:
        read_pairs(source)
    assert str(caught.value).startswith(f"{source}:3: ")  # blank line 2 still counts as a line

    result = read_pairs(source, on_bad="skip")
    assert [p.id for p in result.pairs] == ["a", "b"]
    assert len(result.rejects) == 1
    reject = result.rejects[0].to_record()
    assert reject["position"] == f"{source}:3" and reason.replace("\\", "") in reject["reason"]
    assert reject["record"] is not None  # the offending record (raw text when it was not JSON) is kept


def test_rows_are_named_for_tables(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([TEXT[0], {**TEXT[1], "chosen": ""}]), path)
    with pytest.raises(BadRecord, match=rf"^{path}:row 1: field 'chosen' is an empty response"):
        read_pairs(path)
    array = tmp_path / "p.json"
    array.write_text(json.dumps({"not": "an array"}))
    with pytest.raises(BadRecord, match="one JSON array"):
        read_pairs(array)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(TraceError, match="unsupported file type"):
        read_pairs(tmp_path / "p.csv")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind
    assert rejects_path(tmp_path / "triaged.jsonl") == tmp_path / "triaged.rejects.jsonl"
