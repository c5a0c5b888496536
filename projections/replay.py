"""Rebuilding batch projections from the streams with the same `apply` the live path uses.

Order: the batch's `cj:batches` events in stream order, then its callbacks in
entry-id order (see projections/batch.py for why callbacks commute with the
batch events that follow their wave).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

from events import codec
from events.names import Keys
from events.types import BatchRegistered, ComparisonCompleted, ComparisonFailed, Event
from projections.batch import BatchState, apply_batch_event, apply_callback, register

PAGE = 5000


async def read_stream(r: Any, stream: str, *, page: int = PAGE) -> AsyncIterator[tuple[str, Any]]:
    """Every entry of `stream` in order, read in pages (XRANGE ... COUNT)."""
    start = "-"
    while True:
        entries = await r.xrange(stream, min=start, max="+", count=page)
        if not entries:
            return
        for entry_id, fields in entries:
            yield (entry_id.decode() if isinstance(entry_id, bytes) else entry_id), fields
        last = entries[-1][0]
        last = last.decode() if isinstance(last, bytes) else last
        ms, seq = last.split("-")
        start = f"{ms}-{int(seq) + 1}"
        if len(entries) < page:
            return


def fold(batch_events: Iterable[Event], callbacks: Iterable[tuple[str, Event]]) -> dict[str, BatchState]:
    """The pure fold: batch events in order, then callbacks in entry-id order."""
    states: dict[str, BatchState] = {}
    for event in batch_events:
        if isinstance(event, BatchRegistered):
            states[event.batch_id] = register(event)
        else:
            state = states.get(getattr(event, "batch_id", ""))
            if state is not None:
                apply_batch_event(state, event)  # type: ignore[arg-type]
    for entry_id, callback in callbacks:
        if isinstance(callback, ComparisonCompleted | ComparisonFailed):
            state = states.get(callback.batch_id)
            if state is not None:
                apply_callback(state, callback, entry_id)
    return states


async def replay(r: Any, keys: Keys, batch_ids: set[str] | None = None) -> tuple[dict[str, BatchState], int]:
    """Rebuild the projections of `batch_ids` (all when None); returns the states and events read."""
    batch_events: list[Event] = []
    callbacks: list[tuple[str, Event]] = []
    seen = 0
    async for _, fields in read_stream(r, keys.batches):
        seen += 1
        try:
            event = codec.decode(fields)
        except codec.DecodeError:
            continue
        if batch_ids is None or getattr(event, "batch_id", None) in batch_ids:
            batch_events.append(event)
    async for entry_id, fields in read_stream(r, keys.callbacks):
        seen += 1
        try:
            event = codec.decode(fields)
        except codec.DecodeError:
            continue
        if batch_ids is None or getattr(event, "batch_id", None) in batch_ids:
            callbacks.append((entry_id, event))
    return fold(batch_events, callbacks), seen
