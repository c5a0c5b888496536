"""Rebuilding batch projections from the streams with the same `apply` the live path uses.

Order: the batch's `cj:batches` events in stream order, then its callbacks in
entry-id order (see projections/batch.py for why callbacks commute with the
batch events that follow their wave).
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events import codec
from events.clock import time_problem
from events.ids import event_id_problem
from events.streams import BATCHES, CALLBACKS, CJ_GROUP
from events.text import as_str
from events.types import EVENT_TYPES, BatchRegistered, ComparisonCompleted, ComparisonFailed, Event
from projections.batch import (
    TERMINAL,
    BatchState,
    apply_batch_event,
    apply_callback,
    entry_id_key,
    register,
)
from streams.keys import Keys
from streams.paging import PAGE, entries_lost, next_id, raw_client, read_pages, read_stream


def usable_callback(event: Event | None, entry_id: str) -> bool:
    """Whether the `cj` group applies this entry of `cj:callbacks` (`event` decoded with its
    entry id) rather than dead-lettering it: a callback with valid ids and a credible time,
    by the rules of streams/consumer.py."""
    return (
        isinstance(event, ComparisonCompleted | ComparisonFailed)
        and event_id_problem(event) is None
        and time_problem(event.occurred_at, entry_id) is None
    )


def fold(
    batch_events: Iterable[Event], callbacks: Iterable[tuple[str, Event]]
) -> dict[str, BatchState]:
    """The pure fold: batch events in order, then callbacks in entry-id order."""
    states: dict[str, BatchState] = {}
    for event in batch_events:
        if event_id_problem(event) is not None:
            continue
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


async def replay(
    r: Any, keys: Keys, batch_ids: set[str] | None = None
) -> tuple[dict[str, BatchState], int]:
    """Rebuild the projections of `batch_ids` (all when None): the states and the events read.
    Callbacks the `cj` group dead-lettered (invalid, or parked for a redrive) are left out."""
    batch_events: list[Event] = []
    callbacks: list[tuple[str, Event]] = []
    parked = {as_str(i) for i in await r.hkeys(keys.dlq_parked(CALLBACKS))}
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
            event = codec.decode(fields, entry_id)
        except codec.DecodeError:
            continue
        if entry_id in parked or not usable_callback(event, entry_id):
            continue
        if batch_ids is None or getattr(event, "batch_id", None) in batch_ids:
            callbacks.append((entry_id, event))
    return fold(batch_events, callbacks), seen


# --- replay against a live namespace ------------------------------------------------------------
#
# A callback reaches the live projection only through the `cj` group (callback.lua applies it and
# acknowledges it in one step). So at any instant the live projection is the fold of the
# `cj:batches` events appended so far and of the callbacks the group has acknowledged: entries up
# to its last-delivered id that are not pending. Entries not yet delivered, or delivered and still
# pending, will be applied later by a consumer; folding them now would make the live projection
# count them twice (as duplicates) once it does. `Horizon` is that instant, read in one MULTI.

PEL_PAGE = 10_000


@dataclass(frozen=True)
class Horizon:
    """What the live projection had applied when it was read."""

    batches_last: str | None  # last entry of cj:batches (None: empty)
    callbacks_delivered: str | None  # the cj group's last-delivered id (None: no group yet)
    pending: frozenset[str] = frozenset()
    # Acknowledged but not applied: dead-lettered while valid, waiting for a redrive.
    parked: frozenset[str] = frozenset()

    def batch_event_in(self, entry_id: str) -> bool:
        last = self.batches_last
        return last is not None and entry_id_key(entry_id) <= entry_id_key(last)

    def callback_applied(self, entry_id: str) -> bool:
        if self.callbacks_delivered is None:
            return False
        return (
            entry_id_key(entry_id) <= entry_id_key(self.callbacks_delivered)
            and entry_id not in self.pending
            and entry_id not in self.parked
        )


HORIZON_READS = 4


def queue_horizon(pipe: Any, keys: Keys) -> None:
    """Queue the `HORIZON_READS` reads of a horizon (inside MULTI, with other reads, for one
    instant)."""
    pipe.xrevrange(keys.batches, max="+", min="-", count=1)
    pipe.xinfo_groups(keys.callbacks)
    pipe.xpending_range(keys.callbacks, CJ_GROUP, min="-", max="+", count=PEL_PAGE)
    pipe.hkeys(keys.dlq_parked(CALLBACKS))


async def horizon_from(
    r: Any, keys: Keys, last: Any, groups: Any, pel: Any, parked: Any = None
) -> Horizon:
    """The horizon from the replies of `queue_horizon` (errors mean: no stream or no group)."""
    batches_last = as_str(last[0][0]) if isinstance(last, list) and last else None
    delivered: str | None = None
    if isinstance(groups, list):
        for group in groups:
            if as_str(group["name"]) == CJ_GROUP:
                delivered = as_str(group["last-delivered-id"])
    pending: set[str] = set()
    if delivered is not None and isinstance(pel, list):
        pending.update(as_str(p["message_id"]) for p in pel)
        while len(pel) == PEL_PAGE:  # a huge backlog: page on (outside the instant; see README)
            start = next_id(as_str(pel[-1]["message_id"]))
            pel = await r.xpending_range(
                keys.callbacks, CJ_GROUP, min=start, max="+", count=PEL_PAGE
            )
            pending.update(as_str(p["message_id"]) for p in pel)
    held = frozenset(as_str(i) for i in parked) if isinstance(parked, list) else frozenset()
    return Horizon(batches_last, delivered, frozenset(pending), held)


async def read_horizon(r: Any, keys: Keys) -> Horizon:
    async with r.pipeline(transaction=True) as pipe:
        queue_horizon(pipe, keys)
        replies = await pipe.execute(raise_on_error=False)
    return await horizon_from(r, keys, *replies)


_DECODERS = {name.encode(): msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def decode_flat(flat: list[Any]) -> tuple[Event | None, Any]:
    """Decode a raw entry's field list; returns (event or None when undecodable, the event's
    JSON: its `data`, or made from a flat entry's fields, see events/codec.py)."""
    if len(flat) == 4 and flat[0] == b"type" and flat[2] == b"data":  # the {type, data} layout
        decoder = _DECODERS.get(flat[1])
        if decoder is not None:
            try:
                return decoder.decode(flat[3]), flat[3]
            except msgspec.DecodeError:
                return None, flat[3]
    try:
        found = codec.entry_data(dict(zip(flat[::2], flat[1::2], strict=False)))
    except UnicodeDecodeError:
        return None, None
    if found is None:
        return None, None
    type_name, data = found
    decoder = _DECODERS.get(type_name)
    if decoder is None:
        return None, data
    try:
        return decoder.decode(data), data
    except msgspec.DecodeError:
        return None, data


def mentions(flat: list[Any], needles: list[bytes], escaped: list[bytes] | None = None) -> bool:
    """Whether a raw entry may concern one of the ids `needles` (a cheap byte filter before any
    decoding): its `data` holds one (as JSON writes it: `escaped`, the same for ids of the
    grammar), or a flat entry's value is one (its `batch_id`, exactly: a list scan in C)."""
    if len(flat) == 4 and flat[2] == b"data":
        data = flat[3]
    elif b"data" not in flat:  # (a value `data` takes the way below: the same answer)
        return any(n in flat for n in needles)
    else:
        data = dict(zip(flat[::2], flat[1::2], strict=False))[b"data"]
    raw = data if isinstance(data, bytes) else str(data).encode()
    return any(n in raw for n in (escaped or needles))


@contextmanager
def no_gc() -> Iterator[None]:
    """Replay allocates millions of short-lived objects and few cycles: the cyclic collector would
    walk the growing states again and again (a quarter of the time on a million events)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


# --- reading one batch's range ------------------------------------------------------------------
#
# A batch's entries lie in a range of each stream: from its registration (the range hints
# written with BatchRegistered, projections/keys.py `batch_range`) to its last applied callback
# (recorded by callback.lua). Replaying a few batches reads only those ranges, not the log.

Range = tuple[str, str] | None  # (min id, max id) to read; None: nothing to read
ALL: Range = ("-", "+")


def range_start(hints: Mapping[str, str], name: str) -> str:
    """Where the batch with range `hints` starts in stream `name` (`-`: not known)."""
    if f"first:{name}" in hints:
        return hints[f"first:{name}"]
    if f"after:{name}" in hints:
        return next_id(hints[f"after:{name}"])
    return "-"


def _key(entry_id: str) -> tuple[float, float]:
    if entry_id == "-":
        return (float("-inf"), 0)
    if entry_id == "+":
        return (float("inf"), 0)
    return entry_id_key(entry_id)


def replay_ranges(
    hints: Mapping[str, Mapping[str, str]], scalars: Mapping[str, Mapping[str, str]]
) -> dict[str, Range]:
    """Per stream replay reads (`cj:batches`, `cj:callbacks`), the range holding the events of
    the batches whose range hints are `hints` (batch id -> hints): from the earliest start to
    the end of the stream, or, when every batch is finished, to the latest end (its last
    `cj:batches` event, its last applied callback). `scalars`: the batches' live projection
    hashes (status, callbacks_received); a finished batch without an end hint (a projection
    written before hints) is read to the end of the stream."""
    out: dict[str, Range] = {}
    for name in (BATCHES, CALLBACKS):
        lows: list[str] = []
        highs: list[str] = []
        for batch_id, h in hints.items():
            lows.append(range_start(h, name))
            live = scalars.get(batch_id, {})
            if live.get("status") not in TERMINAL:
                highs.append("+")  # a running batch's range ends now
            elif f"last:{name}" in h:
                highs.append(h[f"last:{name}"])
            elif name == BATCHES:
                highs.append("+")  # finished before its end was recorded
            elif f"first:{BATCHES}" in h and live.get("callbacks_received", "0") == "0":
                continue  # registered with hints and nothing applied: no callback to read
            else:
                highs.append("+")
        if not highs:
            out[name] = None
            continue
        out[name] = (
            min(lows, key=_key),
            max(highs, key=_key),
        )
    return out


def _cap(max_id: str, cap: str | None) -> str:
    """The smaller of two max ids (`+` is the largest)."""
    if cap is None or cap == "+":
        return max_id
    if max_id == "+":
        return cap
    return max_id if entry_id_key(max_id) <= entry_id_key(cap) else cap


async def _range_pages(
    r: Any, stream: str, page: int, rng: Range, cap: str | None = None
) -> AsyncIterator[list[Any]]:
    if rng is None:
        return
    async for entries in read_pages(r, stream, page=page, min_id=rng[0], max_id=_cap(rng[1], cap)):
        yield entries


@dataclass
class ReplayResult:
    states: dict[str, BatchState]
    horizon: Horizon
    events: int = 0  # entries read from cj:batches and cj:callbacks
    batch_events: int = 0  # of those, the events of the batches replayed that were applied
    callbacks_applied: int = 0
    callbacks_unapplied: int = 0  # in the stream, not yet applied by the cj group
    unknown_batch_callbacks: int = 0  # applied callbacks naming no registered batch
    undecodable: int = 0
    seconds: float = 0.0
    # Streams that lost entries (trimmed or XDEL): stream name -> {entries_lost,
    # first_entry_id}. Their replay cannot be complete: it is reported, never written over.
    trimmed: dict[str, dict[str, Any]] = field(default_factory=dict)


def _wanted(flat: list[Any], needles: list[bytes] | None) -> bool:
    """Cheap pre-filter on the raw entry: a batch's events contain its id verbatim (JSON encoders
    escape no plain ASCII), so entries without any wanted id need no decoding."""
    return needles is None or mentions(flat, needles)


async def replay_live(
    r: Any,
    keys: Keys,
    batch_ids: set[str] | None = None,
    *,
    horizon: Horizon | None = None,
    page: int = PAGE,
    ranges: Mapping[str, Range] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> ReplayResult:
    """Rebuild batch states as the live projection has them at `horizon` (read now when None):
    the same `apply` functions, the same order as `replay`, only applied callbacks. `ranges`
    (from `replay_ranges`) limits the reads to the part of each stream the batches lie in;
    the events of `exclude` (archived batches, whose entries may still be in the streams until
    they are trimmed) are passed over."""
    with no_gc():
        return await _replay_live(r, keys, batch_ids, horizon, page, ranges or {}, exclude)


async def _replay_live(
    r: Any,
    keys: Keys,
    batch_ids: set[str] | None,
    horizon: Horizon | None,
    page: int,
    ranges: Mapping[str, Range],
    exclude: frozenset[str],
) -> ReplayResult:
    started = time.perf_counter()
    hz = horizon if horizon is not None else await read_horizon(r, keys)
    out = ReplayResult(states={}, horizon=hz)
    for name in (BATCHES, CALLBACKS):
        lost = await entries_lost(r, keys.stream(name))
        if lost is not None:
            out.trimmed[name] = lost
    needles = None
    if batch_ids is not None and len(batch_ids) <= 16:
        needles = [b.encode() for b in sorted(batch_ids)]
    states = out.states
    raw = raw_client(r)
    if hz.batches_last is not None:
        batches_range = ranges.get(BATCHES, ALL)
        async for entries in _range_pages(raw, keys.batches, page, batches_range, hz.batches_last):
            out.events += len(entries)
            for _, flat in entries:
                if needles is not None and not _wanted(flat, needles):
                    continue
                event, _ = decode_flat(flat)
                if event is None or event_id_problem(event) is not None:
                    out.undecodable += 1
                    continue
                b = getattr(event, "batch_id", None)
                if (batch_ids is not None and b not in batch_ids) or b in exclude:
                    continue
                if isinstance(event, BatchRegistered):
                    states[event.batch_id] = register(event)
                    out.batch_events += 1
                elif b in states:
                    apply_batch_event(states[b], event)  # type: ignore[arg-type]
                    out.batch_events += 1
    delivered = None if hz.callbacks_delivered is None else entry_id_key(hz.callbacks_delivered)
    held = hz.pending | hz.parked
    async for entries in _range_pages(raw, keys.callbacks, page, ranges.get(CALLBACKS, ALL)):
        out.events += len(entries)
        # Whole pages up to the group's last-delivered id, with nothing pending or parked,
        # need no check per entry.
        whole = (
            delivered is not None and not held and entry_id_key(as_str(entries[-1][0])) <= delivered
        )
        for raw_id, flat in entries:
            entry_id = as_str(raw_id)
            if not whole and (
                delivered is None or entry_id_key(entry_id) > delivered or entry_id in held
            ):
                out.callbacks_unapplied += 1
                continue
            if needles is not None and not _wanted(flat, needles):
                continue
            callback, data = decode_flat(flat)
            if callback is None:
                out.undecodable += 1
                continue
            if isinstance(data, bytes):
                callback = codec.with_entry_time(callback, data, entry_id)
            if not usable_callback(callback, entry_id):
                out.undecodable += 1
                continue
            assert isinstance(callback, ComparisonCompleted | ComparisonFailed)
            if batch_ids is not None and callback.batch_id not in batch_ids:
                continue
            if callback.batch_id in exclude:
                continue
            out.callbacks_applied += 1
            state = states.get(callback.batch_id)
            if state is None:
                out.unknown_batch_callbacks += 1
            else:
                apply_callback(state, callback, entry_id)
                out.batch_events += 1
    out.seconds = time.perf_counter() - started
    return out
