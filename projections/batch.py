"""The batch-state projection as a pure fold over events.

`apply(state, event, entry_id)` is the only definition of what an event does to
a batch. The live projector runs it for the events CJ writes itself and runs
`callback.lua` (its transcription, checked against it by tests) for callbacks.

Callbacks commute with each other and with every batch event after the wave
that requested them, so replay can fold the `cj:batches` events in order and
then the callbacks in entry-id order and reach the same state as the live
consumers did in whatever order they ran:
- duplicates of one correlation id: the lowest entry id is the accepted one;
- a forced finalization names the requests still in flight (`abandoned`); a
  callback for those is late, whenever it is applied;
- an orphan names an id never requested, or essays other than the pair its wave recorded
  for it (a pair, once recorded, never changes); an id an orphan named before its wave is
  never requested afterwards (cj/continuation.py `numbered_ids`), so it stays one;
- `in_flight` and the counters move by increments, `last_event_at` is a max;
- the cost (`cost_nusd`, integer nano-dollars) is a sum over every callback of the batch
  that is not an orphan (duplicates and late ones were paid for too).

Time is the Redis server's: a callback counts as activity at its entry id's time (its
producer's `occurred_at` may be wrong, or absent); the events CJ writes itself carry the
server's time in `occurred_at` (cj/continuation.py stamps them with Redis TIME).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.clock import entry_iso
from events.types import (
    BatchConfig,
    BatchEvent,
    BatchFailed,
    BatchFinalized,
    BatchRegistered,
    BatchScored,
    Callback,
    ComparisonCompleted,
    Essay,
    Event,
    WaveSubmitted,
    failure_kind,
    nano_usd,
)

PENDING = "pending"
ABANDONED = "abandoned"
# The statuses a batch never leaves.
TERMINAL = frozenset({"finalized", "failed"})

# Scalar fields of the batch hash, in a fixed order so encodings are byte-stable.
COUNTERS = (
    "submitted",
    "completed",
    "failed",
    "callbacks_received",
    "duplicates",
    "orphans",
    "late_callbacks",
    "waves",
    "in_flight",
    "scored_wave",
    "cost_nusd",
)


@dataclass
class BatchState:
    batch_id: str
    essays: list[Essay]
    config: BatchConfig
    denominator: int
    registered_at: str
    status: str = "registered"
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    callbacks_received: int = 0
    duplicates: int = 0
    orphans: int = 0
    late_callbacks: int = 0
    waves: int = 0
    in_flight: int = 0
    scored_wave: int = 0
    cost_nusd: int = 0
    """What the batch's provider calls cost so far, in nano-dollars (see `cost_of`)."""
    finalize_reason: str = ""
    failure_message: str = ""
    completed_at: str = ""
    last_event_at: str = ""
    # correlation_id -> PENDING | ABANDONED | "c <entry_id> <winner>" | "f <entry_id> <kind>"
    # (kind: the error type, or spend_limit; see events.types.failure_kind)
    corr: dict[str, str] = field(default_factory=dict)
    # correlation_id -> (wave, essay_a, essay_b)
    pairs: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # correlation ids named by callbacks but never requested -> times seen
    orphan_ids: dict[str, int] = field(default_factory=dict)
    scores: BatchScored | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def accepted(self) -> int:
        return self.completed + self.failed

    @property
    def cost_usd(self) -> float:
        return self.cost_nusd / 1e9


class CallbackOutcome:
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    ORPHAN = "orphan"
    LATE = "late"


def entry_id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def cost_of(callback: Callback) -> int:
    """The callback's cost in nano-dollars (all attempts of the judging it ends)."""
    return nano_usd(callback.cost_usd)


def corr_value(callback: Callback, entry_id: str) -> str:
    if isinstance(callback, ComparisonCompleted):
        return f"c {entry_id} {callback.winner}"
    return f"f {entry_id} {failure_kind(callback.error)}"


def register(event: BatchRegistered) -> BatchState:
    return BatchState(
        batch_id=event.batch_id,
        essays=list(event.essays),
        config=event.config,
        denominator=event.denominator,
        registered_at=event.occurred_at,
        last_event_at=event.occurred_at,
    )


def _touch(state: BatchState, event: Event) -> None:
    state.last_event_at = max(state.last_event_at, event.occurred_at)


def _touch_at(state: BatchState, moment: str) -> None:
    state.last_event_at = max(state.last_event_at, moment)


def _close(state: BatchState, status: str, reason: str, abandoned: list[str], event: Event) -> None:
    state.status = status
    state.finalize_reason = reason
    state.completed_at = event.occurred_at
    for cid in abandoned:
        if state.corr.get(cid) == PENDING:
            state.corr[cid] = ABANDONED
            state.in_flight -= 1


def failed_reason(event: BatchFailed) -> str:
    """The finalize reason of a failed batch: `stalled` when the stalled-batch reaper ended it,
    else `failed` (the event's own reason, e.g. too_many_failures, is in failure_message)."""
    return "stalled" if event.reason == "stalled" else "failed"


def apply_batch_event(state: BatchState, event: BatchEvent) -> BatchState:
    """Apply an event of `cj:batches` (other than BatchRegistered) to its batch."""
    _touch(state, event)
    if isinstance(event, WaveSubmitted):
        if state.status == "registered":
            state.status = "running"
        state.waves = max(state.waves, event.wave)
        # Every pair has a correlation id of its own (numbered in the batch, a wave written
        # only on the count it was numbered from: cj/continuation.py `numbered_ids`): one
        # already known is the same wave appended again (a commit whose reply a failover lost,
        # re-sent by the client), which the live projection, written with it, counted once.
        new = [pair for pair in event.pairs if pair.correlation_id not in state.pairs]
        for pair in new:
            state.pairs[pair.correlation_id] = (event.wave, pair.essay_a, pair.essay_b)
            state.corr[pair.correlation_id] = PENDING
        state.submitted += len(new)
        state.in_flight += len(new)
    elif isinstance(event, BatchScored):
        state.scored_wave = max(state.scored_wave, event.wave)
        state.scores = event
    elif isinstance(event, BatchFinalized):
        _close(state, "finalized", event.reason, event.abandoned, event)
    elif isinstance(event, BatchFailed):
        _close(state, "failed", failed_reason(event), event.abandoned, event)
        state.failure_message = (
            f"{event.reason}: {event.message}" if event.message else event.reason
        )
    return state


def answers_pair(state: BatchState, callback: Callback) -> bool:
    """Whether the callback names the essays its correlation id was asked for, in their
    order (the winner, "essay_a" or "essay_b", is read against the recorded pair): one that
    names others, or the same swapped, answers no request of ours and is an orphan. A pair
    not recorded (a state stored in part) leaves the id alone to decide."""
    pair = state.pairs.get(callback.correlation_id)
    return pair is None or (pair[1], pair[2]) == (callback.essay_a_id, callback.essay_b_id)


def apply_callback(state: BatchState, callback: Callback, entry_id: str) -> tuple[BatchState, str]:
    """Apply one callback; returns the state and how the callback was counted."""
    state.callbacks_received += 1
    # Every callback counts as activity, at its entry's time, so the max commutes.
    _touch_at(state, entry_iso(entry_id))
    cid = callback.correlation_id
    current = state.corr.get(cid)
    if current is None or not answers_pair(state, callback):
        state.orphans += 1
        state.orphan_ids[cid] = state.orphan_ids.get(cid, 0) + 1
        return state, CallbackOutcome.ORPHAN
    state.cost_nusd += cost_of(callback)
    if current == ABANDONED:
        state.late_callbacks += 1
        return state, CallbackOutcome.LATE
    new_value = corr_value(callback, entry_id)
    if current == PENDING:
        state.corr[cid] = new_value
        if new_value[0] == "c":
            state.completed += 1
        else:
            state.failed += 1
        state.in_flight -= 1
        return state, CallbackOutcome.ACCEPTED
    # Already accepted: the earliest entry of the stream wins, whatever order we see them in.
    old_kind, old_entry, _ = current.split(" ", 2)
    if entry_id_key(entry_id) < entry_id_key(old_entry):
        state.corr[cid] = new_value
        if old_kind != new_value[0]:
            delta = 1 if new_value[0] == "c" else -1
            state.completed += delta
            state.failed -= delta
    state.duplicates += 1
    return state, CallbackOutcome.DUPLICATE


def completion_pct(state: BatchState) -> float:
    if state.denominator <= 0:
        return 0.0
    return round(100.0 * state.accepted / state.denominator, 2)
