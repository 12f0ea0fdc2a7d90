"""The trainer's pair stream: filter, errors, seeded shuffle, rank sharding, memory bound, resume, formats."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from trace_ds.data.stream import PairStream, TrainRecord, load_weights
from trace_ds.io import BadRecord, TraceError, write_jsonl
from trace_ds.training.train import StepData, ceil_div

CATEGORIES = ("inversion", "suppression", "retention")


def triaged(n: int) -> list[dict]:
    return [
        {
            "id": f"p{i:03d}",
            "prompt": f"Q{i}",
            "chosen": f"A{i}",
            "rejected": f"B{i}",
            "category": CATEGORIES[i % 3],
        }
        for i in range(n)
    ]


def scores(records: list[dict], zero_every: int | None = 7) -> list[dict]:
    """Score lines for the conflict pairs; every ``zero_every``-th record (None: none) gets weight 0."""
    return [
        {
            "id": r["id"],
            "category": r["category"],
            "raw_score": 1.0,
            "weight": 0.0 if zero_every and i % zero_every == 0 else 1 + i / 10,
        }
        for i, r in enumerate(records)
        if r["category"] != "retention"
    ]


def eligible_ids(records: list[dict], weights: dict[str, float]) -> set[str]:
    return {r["id"] for r in records if r["category"] == "retention" or weights[r["id"]] != 0}


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, dict[str, float], list[dict]]:
    records = triaged(50)
    source, score_file = tmp_path / "triaged.jsonl", tmp_path / "scores.jsonl"
    write_jsonl(source, records)
    write_jsonl(score_file, scores(records))
    return source, load_weights(score_file), records


def ids(records) -> list[str]:
    return [r.pair.id for r in records]


def test_load_weights_reads_scores_and_names_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "s.jsonl"
    write_jsonl(
        good, [{"id": "a", "category": "inversion", "raw_score": 2.0, "weight": 1.5}, {"id": 7, "weight": 0}]
    )
    assert load_weights(good) == {"a": 1.5, "7": 0.0}
    cases = {
        '{"id": "a", "weight": 1}\n{"id": "a", "weight": 2}\n': r"s\.jsonl:2: duplicate id 'a' \(first seen at .*s\.jsonl:1\)",
        '{"id": "a", "weight": 1}\n{"id": "b", "weight": \n': r"s\.jsonl:2: not valid JSON",
        '{"id": "a", "weight": -1}\n': r"s\.jsonl:1: .*>= 0",
        '{"id": "a"}\n': r"s\.jsonl:1: field 'weight' must be a number",
        '{"weight": 1}\n': r"s\.jsonl:1: field 'id'",
    }
    for text, message in cases.items():
        good.write_text(text, encoding="utf-8")
        with pytest.raises(BadRecord, match=message):
            load_weights(good)


def test_filter_drops_zero_weight_conflicts_and_keeps_retention(data) -> None:
    source, weights, records = data
    stream = PairStream(source, weights, buffer_size=8, seed=1)
    out: list[TrainRecord] = list(stream)
    expected = eligible_ids(records, weights)
    assert sorted(ids(out)) == sorted(expected)
    skipped = len(records) - len(expected)
    assert skipped > 0
    assert stream.counts() == {
        "epoch": 0,
        "read": 50,
        "skipped_zero_weight": skipped,
        "kept": len(expected),
        "buffered": 0,
        "emitted_global": len(expected),
        "yielded": len(expected),
    }
    for record in out:
        assert record.category == record.pair.extra["category"]
        assert record.weight == (1.0 if record.category == "retention" else weights[record.pair.id])
        assert record.weight > 0
    assert stream.count_eligible() == len(expected)


def test_missing_score_and_category_errors_name_file_and_line(tmp_path: Path) -> None:
    records = triaged(9)
    source = tmp_path / "t.jsonl"
    write_jsonl(source, records)
    weights = {r["id"]: 1.0 for r in records if r["category"] != "retention"}  # retention ids may be absent
    assert len(list(PairStream(source, weights, buffer_size=2))) == 9

    del weights["p004"]  # a suppression pair on line 5
    with pytest.raises(
        TraceError, match=r"t\.jsonl:5: no score for suppression pair 'p004'; rerun `trace-ds score`"
    ):
        list(PairStream(source, weights, buffer_size=2))
    with pytest.raises(TraceError, match=r"t\.jsonl:5: no score"):
        PairStream(source, weights).count_eligible()

    weights["p004"] = 1.0
    for bad, found in ((None, "no 'category'"), ("unjudged", "category 'unjudged'")):
        changed = [dict(r) for r in records]
        if bad is None:
            del changed[6]["category"]
        else:
            changed[6]["category"] = bad
        write_jsonl(source, changed)
        with pytest.raises(
            TraceError, match=rf"t\.jsonl:7: pair 'p006' has {found}; training reads triaged pairs"
        ):
            list(PairStream(source, weights, buffer_size=2))


def test_bad_json_mid_stream_raises_bad_record_with_line(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in triaged(10)]
    lines[6] = '{"id": "p006", "prompt": '
    source = tmp_path / "t.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stream = PairStream(source, {f"p{i:03d}": 1.0 for i in range(10)}, buffer_size=2)
    got = []
    with pytest.raises(BadRecord, match=r"t\.jsonl:7: not valid JSON"):
        for record in stream:
            got.append(record)
    assert 0 < len(got) < 6  # lazy: the items before the bad line came out first


def test_order_is_seeded_and_differs_by_epoch(data) -> None:
    source, weights, _ = data

    def epochs(seed: int) -> list[list[str]]:
        stream = PairStream(source, weights, buffer_size=6, seed=seed)
        first = ids(stream)
        stream.next_epoch()
        assert stream.epoch() == 1
        return [first, ids(stream)]

    a, b, other = epochs(3), epochs(3), epochs(4)
    assert a == b
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])
    assert a[0] != other[0]
    assert a[0] != sorted(a[0])  # actually shuffled
    whole = ids(PairStream(source, weights, buffer_size=1000, seed=3))  # all of it drains from the buffer
    assert whole not in (sorted(whole), sorted(whole, reverse=True))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_one_global_sequence_round_robin(data, world: int) -> None:
    source, weights, records = data
    for epoch in (0, 1):
        single = PairStream(source, weights, buffer_size=5, seed=9)
        shares = [
            PairStream(source, weights, rank=r, world_size=world, buffer_size=5, seed=9) for r in range(world)
        ]
        for stream in (single, *shares):
            for _ in range(epoch):
                stream.next_epoch()
        global_order = ids(single)
        per_rank = [ids(stream) for stream in shares]
        assert [global_order[r::world] for r in range(world)] == per_rank
        union = list(itertools.chain.from_iterable(per_rank))
        assert len(union) == len(set(union)) and set(union) == eligible_ids(records, weights)
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
        for r, stream in enumerate(shares):
            assert stream.counts()["yielded"] == len(per_rank[r])


@pytest.mark.parametrize("zero_every", [7, None])  # with and without zero-weight skips
@pytest.mark.parametrize("world", [1, 2])
def test_reads_stay_within_emitted_plus_buffer(tmp_path: Path, zero_every: int | None, world: int) -> None:
    records = triaged(50)
    source = tmp_path / "t.jsonl"
    write_jsonl(source, records)
    weights = {s["id"]: s["weight"] for s in scores(records, zero_every)}
    stream = PairStream(source, weights, rank=world - 1, world_size=world, buffer_size=4, seed=2)
    steps = 0
    for _ in stream:
        c = stream.counts()
        assert c["kept"] == c["emitted_global"] + c["buffered"] <= c["emitted_global"] + 4
        assert c["read"] <= c["emitted_global"] + 4 + c["skipped_zero_weight"]
        if zero_every is None:
            assert c["read"] <= c["emitted_global"] + 4
        steps += 1
    assert steps == stream.counts()["yielded"] > 0


def resumed_run(make: Callable[[], PairStream], cut: int, finish: bool, advance: bool) -> list[str]:
    """Take ``cut`` items (crossing into epoch 1 if needed), optionally finish the exhausted iterator and/or
    call next_epoch, snapshot through JSON, then finish epoch 1 on a fresh stream restored from it."""
    stream, out = make(), []
    iterator = iter(stream)
    while len(out) < cut:
        record = next(iterator, None)
        if record is None:
            stream.next_epoch()
            iterator = iter(stream)
        else:
            out.append(record.pair.id)
    if finish:
        assert next(iterator, None) is None
    if advance:
        stream.next_epoch()
    state = json.loads(json.dumps(stream.state_dict()))
    restored = make()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    while True:
        out += ids(restored)
        if restored.epoch() == 1:
            return out
        restored.next_epoch()


@pytest.mark.parametrize("world", [1, 2])
def test_resume_continues_exactly(data, world: int) -> None:
    source, weights, _ = data

    def make() -> PairStream:
        return PairStream(source, weights, rank=world - 1, world_size=world, buffer_size=4, seed=5)

    full = make()
    expected = ids(full)
    share = len(expected)
    full.next_epoch()
    expected += ids(full)
    cases = [(0, False, False), (1, False, False), (share // 2, False, False), (share - 1, False, False)]
    cases += [(share, False, False), (share, True, False), (share, True, True), (share + 3, False, False)]
    for cut, finish, advance in cases:
        assert resumed_run(make, cut, finish, advance) == expected, (cut, finish, advance)


def test_ranks_share_one_state_and_resume_under_another_world_size(data) -> None:
    source, weights, records = data
    streams = [PairStream(source, weights, rank=r, world_size=3, buffer_size=4, seed=8) for r in range(3)]
    iterators = [iter(s) for s in streams]
    consumed = []
    for _ in range(5):
        consumed += [next(it).pair.id for it in iterators]
        states = [s.state_dict() for s in streams]
        assert states[0] == states[1] == states[2]
    rest = []
    for r in range(2):  # the rank-0 state restores a world of 2
        stream = PairStream(source, weights, rank=r, world_size=2, buffer_size=4, seed=8)
        stream.load_state_dict(json.loads(json.dumps(states[0])))
        rest += ids(stream)
    everything = consumed + rest
    assert len(everything) == len(set(everything)) and set(everything) == eligible_ids(records, weights)


def test_resume_detects_a_changed_source_or_setting(data, tmp_path: Path) -> None:
    source, weights, records = data
    stream = PairStream(source, weights, buffer_size=4, seed=5)
    next(iter(stream))
    state = stream.state_dict()
    changed = tmp_path / "changed.jsonl"
    write_jsonl(changed, [r | {"id": r["id"] + "x"} for r in records])
    other = PairStream(changed, {k + "x": v for k, v in weights.items()}, buffer_size=4, seed=5)
    other.load_state_dict(state)
    with pytest.raises(TraceError, match="does not match the saved stream state"):
        list(other)
    with pytest.raises(TraceError, match="buffer_size=4"):
        PairStream(source, weights, buffer_size=5, seed=5).load_state_dict(state)


def test_a_stale_iterator_fails_loudly(data) -> None:
    source, weights, _ = data
    stream = PairStream(source, weights, buffer_size=4)
    old = iter(stream)
    next(old)
    fresh = iter(stream)
    next(fresh)
    with pytest.raises(RuntimeError, match="stale"):
        next(old)


def test_parquet_and_saved_dataset_give_the_same_stream(data, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, weights, records = data
    parquet, saved = tmp_path / "t.parquet", tmp_path / "saved"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    datasets.Dataset.from_list(records).save_to_disk(str(saved))

    def make(src: Path) -> Callable[[], PairStream]:
        return lambda: PairStream(src, weights, rank=1, world_size=2, buffer_size=4, seed=6)

    reference = make(source)()
    expected = ids(reference)
    reference.next_epoch()
    expected += ids(reference)
    for src in (parquet, saved):
        assert resumed_run(make(src), 0, False, False) == expected
        assert resumed_run(make(src), 7, False, False) == expected
    missing = dict(weights)
    del missing["p001"]
    with pytest.raises(TraceError, match=r"t\.parquet:row 1: no score"):
        list(PairStream(parquet, missing))


def test_count_eligible_leaves_the_state_alone(data) -> None:
    source, weights, records = data
    stream = PairStream(source, weights, rank=0, world_size=2, buffer_size=4, seed=1)
    iterator = iter(stream)
    next(iterator)
    before = stream.state_dict()
    total = stream.count_eligible()
    assert total == len(eligible_ids(records, weights))
    assert stream.state_dict() == before
    assert 1 + len(list(iterator)) == stream.counts()["yielded"] == (total + 1) // 2


def run_steps(
    source: Path,
    weights: dict[str, float],
    world: int,
    per_step: int,
    epochs: int | None,
    steps: int | None = None,
) -> list[dict]:
    """The trainer's data side for every rank of a world, step by step (``trace_ds.training.train.StepData``): per step
    the ids each rank took, the epoch, and each rank's ``epoch_done`` afterwards. Ends when every rank is out
    of data (``epochs``) or after ``steps`` steps."""
    ranks = [
        StepData(
            {"all": PairStream(source, weights, rank=r, world_size=world, buffer_size=4, seed=3)}, epochs
        )
        for r in range(world)
    ]
    out: list[dict] = []
    while steps is None or len(out) < steps:
        taken = [ids(data.take(per_step)) for data in ranks]
        if not any(taken):
            break
        out.append(
            {
                "ids": taken,
                "epoch": [data.epoch() for data in ranks],
                "done": [data.streams["all"].epoch_done() for data in ranks],
                "states": [json.loads(json.dumps(data.state_dict())) for data in ranks],
            }
        )
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("per_step", [3, 4, 5, 7])  # 44 eligible pairs: short last steps, 4 at world 1 exact
def test_an_epoch_trains_each_pair_exactly_once_and_steps_never_cross_epochs(
    data, world: int, per_step: int
) -> None:
    source, weights, records = data
    eligible = eligible_ids(records, weights)
    n = len(eligible)
    steps_per_epoch = ceil_div(ceil_div(n, world), per_step)  # what Trainer._total_steps counts per epoch
    for epochs in (1, 2):
        steps = run_steps(source, weights, world, per_step, epochs)
        assert len(steps) == epochs * steps_per_epoch
        for index, step in enumerate(steps):
            # every rank agrees on the epoch and on whether it is over, after every step: no communication
            assert len(set(step["epoch"])) == 1 and len(set(step["done"])) == 1
            assert step["done"][0] == ((index + 1) % steps_per_epoch == 0)
            assert all(state == step["states"][0] for state in step["states"])  # rank 0's state restores all
            assert all(len(taken) <= per_step for taken in step["ids"])
            last = (index + 1) % steps_per_epoch == 0
            assert last or all(len(taken) == per_step for taken in step["ids"])
        for epoch in range(epochs):
            trained = [
                pair
                for step in steps
                if step["epoch"][0] == epoch
                for pair in itertools.chain.from_iterable(step["ids"])
            ]
            assert sorted(trained) == sorted(eligible)  # each pair exactly once per epoch
        counts = {pair: 0 for pair in eligible}
        for step in steps:
            for pair in itertools.chain.from_iterable(step["ids"]):
                counts[pair] += 1
        assert set(counts.values()) == {epochs}
    # the epoch's last global step is short, and the next epoch starts full
    two = run_steps(source, weights, world, per_step, 2)
    assert sum(map(len, two[steps_per_epoch - 1]["ids"])) == n - (steps_per_epoch - 1) * world * per_step
    assert sum(map(len, two[steps_per_epoch]["ids"])) == min(n, world * per_step)


def test_max_steps_cycles_epochs_with_a_short_step_at_each_end(data) -> None:
    source, weights, records = data
    n = len(eligible_ids(records, weights))
    steps = run_steps(source, weights, 2, 4, None, steps=3 * ceil_div(ceil_div(n, 2), 4))
    epochs = [step["epoch"][0] for step in steps]
    assert sorted(set(epochs)) == [0, 1, 2] and epochs == sorted(epochs)
    for epoch in range(3):
        trained = [
            p for s in steps if s["epoch"][0] == epoch for p in itertools.chain.from_iterable(s["ids"])
        ]
        assert sorted(trained) == sorted(eligible_ids(records, weights))


@pytest.mark.parametrize("world", [1, 2])
def test_step_data_resumes_exactly_at_and_around_the_epoch_end(data, world: int) -> None:
    """Restoring each rank from the state saved after any step (the last step of an epoch included) gives the
    rest of the uninterrupted run."""
    source, weights, _ = data
    per_step = 5
    full = run_steps(source, weights, world, per_step, 2)
    for cut in range(1, len(full)):
        resumed = []
        for r in range(world):
            stream = PairStream(source, weights, rank=r, world_size=world, buffer_size=4, seed=3)
            step_data = StepData({"all": stream}, 2)
            step_data.load_state_dict(full[cut - 1]["states"][r])
            resumed.append(step_data)
        rest = []
        while True:
            taken = [ids(d.take(per_step)) for d in resumed]
            if not any(taken):
                break
            rest.append((taken, [d.epoch() for d in resumed]))
        assert rest == [(step["ids"], step["epoch"]) for step in full[cut:]], cut
