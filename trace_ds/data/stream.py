"""The trainer's pair stream: lazy, seeded, resumable and sharded across ranks.

Every rank reads the whole triaged source with :func:`~trace_ds.data.pairs.iter_pairs`, filters it (conflict
pairs of weight 0 are dropped before anything else), and runs the same seeded streaming shuffle: a buffer of
``buffer_size`` records; once full, each new record replaces a random slot whose occupant is emitted; at the
end of the source the rest leaves in random order. The emitted *global* sequence is therefore identical on
every rank, and item k belongs to rank ``k % world_size``. Memory stays bounded by the buffer, never by the
dataset: records kept (read minus skipped) never exceed records emitted plus ``buffer_size``.

The stream advances one *round* (``world_size`` global items) before yielding this rank's item of it, so
when every rank has yielded the same number of items, all ranks hold the same state. The state therefore
carries nothing rank-specific: the one rank 0 saves (e.g. in DeepSpeed's ``client_state``, written by rank 0
only) restores every rank, even under another world size. It holds positions, not records: the buffer is
saved as source ordinals (plus id and weight, checked on restore), and resuming re-reads the source up to
where it stopped. That keeps checkpoints small and JSON-safe whatever the records contain.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trace_ds.data.pairs import Pair, iter_pairs
from trace_ds.io import BadRecord, Position, TraceError, iter_jsonl
from trace_ds.judge.triage import BASELINE_CATEGORIES, CONFLICT_CATEGORIES
from trace_ds.judge.triage import CATEGORIES as TRIAGE_CATEGORIES

CATEGORIES = TRIAGE_CATEGORIES + BASELINE_CATEGORIES
TRAINED_CONFLICT = CONFLICT_CATEGORIES + BASELINE_CATEGORIES

STATE_VERSION = 1


@dataclass(frozen=True)
class TrainRecord:
    """A triaged pair ready for the loss heads."""

    pair: Pair  # new orientation; pair.extra["category"] == category
    category: str
    weight: float  # impact weight of a conflict pair; 1.0 for retention (the KL head ignores it)


def load_weights(scores_path: str | Path) -> dict[str, float]:
    """Pair id -> impact weight, from a ``trace-ds score`` output (``{"id", "category", "raw_score", "weight"}``).

    A line that is not an object with an id and a finite, non-negative weight, or a repeated id, raises
    BadRecord naming the file and line: a wrong weight would silently reshape the whole update.
    """
    weights: dict[str, float] = {}
    first_seen: dict[str, Position] = {}
    for position, record in iter_jsonl(scores_path):
        if not isinstance(record, dict):
            raise BadRecord(position, f"expected a JSON object, got {type(record).__name__}")
        raw_id, weight = record.get("id"), record.get("weight")
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            raise BadRecord(position, "field 'id' must be a non-empty string or integer")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise BadRecord(position, "field 'weight' must be a number")
        if not math.isfinite(weight) or weight < 0:
            raise BadRecord(position, f"field 'weight' must be finite and >= 0, got {weight}")
        pair_id = str(raw_id)
        if pair_id in weights:
            raise BadRecord(position, f"duplicate id {pair_id!r} (first seen at {first_seen[pair_id]})")
        weights[pair_id] = float(weight)
        first_seen[pair_id] = position
    return weights


@dataclass
class _Slot:
    """One buffered record. ``record`` is None after load_state_dict until the source is re-read."""

    ordinal: int  # index among the pairs read from the source this epoch (0-based)
    id: str
    weight: float
    record: TrainRecord | None = None


class PairStream:
    """This rank's share of a seeded, shuffled pass over a triaged source, one epoch at a time.

    ``iter(stream)`` continues the current epoch from the current state and ends at the epoch's end;
    ``next_epoch()`` starts the next one (a new order). Rank r gets items r, r + W, r + 2W, ... of the global
    sequence, so shares differ by at most one item when the filtered count is not a multiple of W.
    """

    def __init__(
        self,
        source: str | Path,
        weights: Mapping[str, float],
        *,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = 1000,
        seed: int = 0,
        split: str | None = None,
        streaming: bool = False,
        columns: Mapping[str, str] | None = None,
        only_category: str | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.source = str(source)
        self.weights = weights
        self.rank = rank
        self.world_size = world_size
        self.buffer_size = buffer_size
        self.seed = seed
        self.split = split
        self.streaming = streaming
        self.columns = columns
        self.only_category = only_category  # per-category batching: one stream per category
        self._generation = 0  # bumped whenever the state is replaced, so a stale iterator fails loudly
        self._start_epoch(0)

    # ----------------------------------------------------------------------------------------------- state

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._read = 0  # pairs taken from the source this epoch (skipped ones included)
        self._skipped = 0  # conflict pairs of weight 0 (and, with only_category, pairs of other categories)
        self._emitted = 0  # global index of the next item
        self._exhausted = False  # the source has been read to its end this epoch
        self._buffer: list[_Slot] = []
        self._rng = random.Random(f"{self.seed}:{epoch}")  # str seeds hash with sha512: stable everywhere
        self._generation += 1

    def epoch(self) -> int:
        return self._epoch

    def next_epoch(self) -> None:
        """Advance to the next epoch: new shuffle order, position back to the start of the source."""
        self._start_epoch(self._epoch + 1)

    def epoch_done(self) -> bool:
        """Whether every global item of this epoch has been emitted (the source read to its end, the buffer empty).

        Emitting the epoch's last item leaves the stream in that state at once (the buffer drains only after
        the source is exhausted), so no further read is needed to know. The trainer relies on this being the
        same on every rank after each step: a rank that took a full step ends its step at the end of a round,
        and a rank that ran out has emitted everything (see ``StepData`` in ``trace_ds/training/train.py``).
        """
        return self._exhausted and not self._buffer

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot; the same on every rank once all have yielded equally many items."""
        version, internal, gauss = self._rng.getstate()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "buffer_size": self.buffer_size,
            "epoch": self._epoch,
            "read": self._read,
            "skipped_zero_weight": self._skipped,
            "emitted": self._emitted,
            "exhausted": self._exhausted,
            "buffer": [[slot.ordinal, slot.id, slot.weight] for slot in self._buffer],
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration re-reads the source up to where it stopped."""
        if state.get("version") != STATE_VERSION:
            raise TraceError(f"pair stream state version {state.get('version')!r}; expected {STATE_VERSION}")
        for name in ("seed", "buffer_size"):
            if state[name] != getattr(self, name):
                raise TraceError(
                    f"pair stream state was saved with {name}={state[name]!r} but this run uses "
                    f"{getattr(self, name)!r}; resume with the same setting"
                )
        self._start_epoch(int(state["epoch"]))
        self._read = int(state["read"])
        self._skipped = int(state["skipped_zero_weight"])
        self._emitted = int(state["emitted"])
        self._exhausted = bool(state["exhausted"])
        self._buffer = [_Slot(int(o), str(i), float(w)) for o, i, w in state["buffer"]]
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

    def counts(self) -> dict[str, int]:
        """This epoch's counters. ``kept`` (read - skipped) <= ``emitted_global`` + buffer_size always."""
        return {
            "epoch": self._epoch,
            "read": self._read,
            "skipped_zero_weight": self._skipped,
            "kept": self._read - self._skipped,
            "buffered": len(self._buffer),
            "emitted_global": self._emitted,
            "yielded": self._share(self._emitted),
        }

    def _share(self, total: int) -> int:
        """How many of global items 0 .. total-1 belong to this rank."""
        return max(0, -(-(total - self.rank) // self.world_size))

    def count_eligible(self) -> int:
        """Pairs of one epoch over all ranks (to size the LR schedule): one read of the source, state untouched.

        This rank's share is ``ceil((n - rank) / world_size)``.
        """
        return sum(1 for pair in self._pairs() if self._admit(pair) is not None)

    # ------------------------------------------------------------------------------------------- reading

    def _pairs(self) -> Iterator[Pair]:
        return iter_pairs(
            self.source, self.columns, on_bad="error", split=self.split, streaming=self.streaming
        )

    def _admit(self, pair: Pair) -> TrainRecord | None:
        """The filter: None for a conflict pair of weight 0; an error for anything the trainer can't use."""
        category = pair.extra.get("category")
        if category not in CATEGORIES:
            found = "no 'category'" if category is None else f"category {category!r}"
            raise TraceError(
                f"{pair.position}: pair {pair.id!r} has {found}; training reads triaged pairs "
                f"(`trace-ds triage` output, category one of {', '.join(CATEGORIES)})"
            )
        if self.only_category is not None and category != self.only_category:
            return None
        if category not in TRAINED_CONFLICT:
            return TrainRecord(pair, category, 1.0)
        weight = self.weights.get(pair.id)
        if weight is None:
            raise TraceError(
                f"{pair.position}: no score for {category} pair {pair.id!r}; "
                "rerun `trace-ds score` on this triaged file"
            )
        return TrainRecord(pair, category, float(weight)) if weight != 0 else None

    def _open(self) -> Iterator[Pair]:
        """The source positioned after the pairs already read, with any restored buffer slots filled in."""
        pending = {slot.ordinal: slot for slot in self._buffer if slot.record is None}
        if self._exhausted and not pending:
            return iter(())
        pairs = self._pairs()
        for ordinal in range(self._read):
            pair = next(pairs, None)
            if pair is None:
                raise TraceError(
                    f"{self.source}: has {ordinal} pairs but the saved stream state had read {self._read}; "
                    "the source changed since the state was saved"
                )
            slot = pending.pop(ordinal, None)
            if slot is None:
                continue
            record = self._admit(pair)
            if record is None or (record.pair.id, record.weight) != (slot.id, slot.weight):
                raise TraceError(
                    f"{pair.position}: pair {pair.id!r} does not match the saved stream state (expected "
                    f"{slot.id!r} with weight {slot.weight}); the source or the scores changed"
                )
            slot.record = record
        if pending:  # ordinals beyond `read`: a corrupt state
            raise TraceError(f"pair stream state buffers records it never read: {sorted(pending)[:5]}")
        return pairs

    def _next_kept(self, pairs: Iterator[Pair]) -> _Slot | None:
        for pair in pairs:
            record = self._admit(pair)
            self._read += 1
            if record is None:
                self._skipped += 1
                continue
            return _Slot(self._read - 1, pair.id, record.weight, record)
        self._exhausted = True
        return None

    def _emit(self, pairs: Iterator[Pair]) -> TrainRecord | None:
        """The next global item, or None at the end of the epoch. The state is consistent on return."""
        buffer = self._buffer
        while not self._exhausted and len(buffer) < self.buffer_size:
            slot = self._next_kept(pairs)
            if slot is not None:
                buffer.append(slot)
        incoming = None if self._exhausted else self._next_kept(pairs)
        if incoming is not None:
            index = self._rng.randrange(len(buffer))
            out, buffer[index] = buffer[index], incoming
        elif buffer:
            index = self._rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            out = buffer.pop()
        else:
            return None
        self._emitted += 1
        assert out.record is not None
        return out.record

    def __iter__(self) -> Iterator[TrainRecord]:
        """This rank's remaining items of the current epoch (starting a new iterator retires older ones)."""
        self._generation += 1
        return self._run(self._generation)

    def _run(self, generation: int) -> Iterator[TrainRecord]:
        pairs = self._open()
        while True:
            # Finish the whole round of world_size global items before yielding ours, so every rank is
            # suspended in the same state (see the module docstring).
            mine: TrainRecord | None = None
            done = False
            while True:
                index = self._emitted
                record = self._emit(pairs)
                if record is None:
                    done = True
                    break
                if index % self.world_size == self.rank:
                    mine = record
                if self._emitted % self.world_size == 0:
                    break
            if mine is not None:
                yield mine
                if generation != self._generation:
                    raise RuntimeError(
                        "this PairStream iterator is stale: the stream was re-iterated, restored or advanced"
                    )
            if done:
                return
