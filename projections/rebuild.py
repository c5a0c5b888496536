"""Rebuilding batch projections from the streams, and comparing them with (or writing them over)
the live ones.

The rebuild uses the same pure `apply` functions as the live consumers (projections/replay.py),
in memory, up to the instant the live projection was read (`Horizon`: callbacks still pending in
the `cj` group are not applied yet by anyone, so they are left out on both sides). Equal means
byte-for-byte equal hashes, the batch index entry included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import WatchError

from events.text import as_str
from projections import keys as pkeys
from projections.batch import BatchState
from projections.replay import (
    HORIZON_READS,
    Horizon,
    ReplayResult,
    horizon_from,
    no_gc,
    queue_horizon,
    replay_live,
    replay_ranges,
)
from projections.store import encode_state, list_batches, queue_state_write
from streams.keys import Keys

DIFF_LIMIT = 100
REBUILD_TRIES = 5
UNKNOWN_BATCH_FIELD = "orphans_unknown_batch"

Flat = dict[str, dict[str, str]]


class KeptChanging(Exception):
    """Consumers wrote to the projections during every attempt of a rebuild."""


class StreamTrimmed(Exception):
    """A stream the projections are built from lost entries: a rebuild would lose counts."""


def expected_of(state: BatchState | None, keys: Keys) -> Flat:
    """The projection keys a batch must have (its hashes and its index entry)."""
    if state is None:
        return {}
    out = encode_state(state, keys)
    out[pkeys.batch_index(keys)] = {state.batch_id: state.registered_at}
    return out


def diff(live: Flat, replayed: Flat, limit: int = DIFF_LIMIT) -> tuple[list[dict[str, Any]], int]:
    """Field-level differences, at most `limit` of them, and how many there are in all."""
    rows: list[dict[str, Any]] = []
    count = 0
    for key in sorted(set(live) | set(replayed)):
        a, b = live.get(key, {}), replayed.get(key, {})
        if key not in live or key not in replayed:
            count += 1
            if len(rows) < limit:
                rows.append(
                    {
                        "key": key,
                        "field": None,
                        "live": None if key not in live else f"{len(a)} fields",
                        "replayed": None if key not in replayed else f"{len(b)} fields",
                    }
                )
            continue
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                count += 1
                if len(rows) < limit:
                    rows.append(
                        {"key": key, "field": name, "live": a.get(name), "replayed": b.get(name)}
                    )
    return rows, count


@dataclass
class Snapshot:
    horizon: Horizon
    live: dict[str, Flat] = field(default_factory=dict)
    ranges: dict[str, dict[str, str]] = field(default_factory=dict)  # range hints per batch
    archived: frozenset[str] = frozenset()  # batches whose events are in the archive


async def read_snapshot(r: Any, keys: Keys, batch_ids: list[str]) -> Snapshot:
    """The live projections of `batch_ids`, their range hints, the archived batches and the
    horizon, read at one instant (one MULTI)."""
    async with r.pipeline(transaction=True) as pipe:
        queue_horizon(pipe, keys)
        pipe.hkeys(pkeys.archived_index(keys))
        for b in batch_ids:
            for name in pkeys.batch_keys(keys, b):
                pipe.hgetall(name)
            pipe.hget(pkeys.batch_index(keys), b)
            pipe.hgetall(pkeys.batch_range(keys, b))
        replies = await pipe.execute(raise_on_error=False)
    archived = replies[HORIZON_READS]
    archived = archived if isinstance(archived, list) else []
    snap = Snapshot(
        await horizon_from(r, keys, *replies[:HORIZON_READS]),
        archived=frozenset(map(as_str, archived)),
    )
    per = len(pkeys.batch_keys(keys, "x")) + 2
    for i, b in enumerate(batch_ids):
        start = HORIZON_READS + 1 + i * per
        chunk = replies[start : start + per]
        flat: Flat = {}
        for name, value in zip(pkeys.batch_keys(keys, b), chunk[:-2], strict=True):
            if isinstance(value, dict) and value:
                flat[name] = {as_str(k): as_str(v) for k, v in value.items()}
        if chunk[-2] is not None and not isinstance(chunk[-2], Exception):
            flat[pkeys.batch_index(keys)] = {b: as_str(chunk[-2])}
        snap.live[b] = flat
        if isinstance(chunk[-1], dict):
            snap.ranges[b] = {as_str(k): as_str(v) for k, v in chunk[-1].items()}
    return snap


def compare(
    snap: Snapshot, result: ReplayResult, keys: Keys, batch_ids: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for b in batch_ids:
        rows_b, count = diff(snap.live.get(b, {}), expected_of(result.states.get(b), keys))
        rows.append(
            {
                "batch_id": b,
                "matches_live": count == 0,
                "diff_count": count,
                "diff": rows_b,
                "in_streams": b in result.states,
                "in_projection": bool(snap.live.get(b)),
            }
        )
    return rows


async def check(
    r: Any, keys: Keys, batch_ids: list[str] | None
) -> tuple[ReplayResult, list[dict[str, Any]]]:
    """Replay `batch_ids` (every batch of the index and the streams when None) and compare."""
    with no_gc():
        return await _check(r, keys, batch_ids)


async def _check(
    r: Any, keys: Keys, batch_ids: list[str] | None
) -> tuple[ReplayResult, list[dict[str, Any]]]:
    ids = batch_ids if batch_ids is not None else await list_batches(r, keys)
    snap = await read_snapshot(r, keys, ids)
    ranges = None
    if batch_ids is not None:  # a few batches: read only the part of the log they lie in
        ranges = replay_ranges(
            {b: snap.ranges.get(b, {}) for b in batch_ids},
            {b: snap.live.get(b, {}).get(pkeys.batch(keys, b), {}) for b in batch_ids},
        )
    result = await replay_live(
        r,
        keys,
        set(batch_ids) if batch_ids is not None else None,
        horizon=snap.horizon,
        ranges=ranges,
        exclude=snap.archived,
    )
    if batch_ids is None:
        extra = sorted(
            set(result.states) - set(ids), key=lambda b: (result.states[b].registered_at, b)
        )
        if extra:  # registered in the streams, missing from the index: their keys were lost
            more = await read_snapshot(r, keys, extra)
            snap.live.update(more.live)
            ids = ids + extra
    return result, compare(snap, result, keys, ids)


async def rebuild(r: Any, keys: Keys, batch_ids: list[str] | None) -> dict[str, Any]:
    """Write the replayed projections over the live ones, atomically.

    Optimistic: the batch hashes, the index and the stats hash are WATCHed before the horizon is
    read; a consumer applying a callback or advancing a batch meanwhile touches one of them, the
    EXEC fails and the rebuild starts over.
    """
    for attempt in range(1, REBUILD_TRIES + 1):
        ids = batch_ids if batch_ids is not None else await list_batches(r, keys)
        async with r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(
                    pkeys.batch_index(keys), pkeys.stats(keys), *(pkeys.batch(keys, b) for b in ids)
                )
                started = time.perf_counter()
                result, rows = await check(r, keys, batch_ids)
                checked = time.perf_counter()
                if result.trimmed:
                    await pipe.unwatch()
                    raise StreamTrimmed(
                        "refusing to rebuild: entries were deleted from "
                        + ", ".join(
                            f"{k} ({v['entries_lost']} entries, it now begins at "
                            f"{v['first_entry_id']})"
                            for k, v in result.trimmed.items()
                        )
                        + "; the replay is incomplete and would lose counts"
                    )
                if batch_ids is None:
                    known = set(ids)
                    new = [b for b in result.states if b not in known]
                    if new:  # batches missing from the index: watch them too, then go on
                        await pipe.watch(*(pkeys.batch(keys, b) for b in new))
                stale = [row["batch_id"] for row in rows if not row["in_streams"]]
                pipe.multi()
                with no_gc():
                    for state in result.states.values():
                        queue_state_write(pipe, keys, state, full=True)
                for b in stale:  # in the index but registered nowhere in the streams
                    for name in pkeys.batch_keys(keys, b):
                        pipe.delete(name)
                    pipe.hdel(pkeys.batch_index(keys), b)
                if batch_ids is None:
                    if result.unknown_batch_callbacks:
                        pipe.hset(
                            pkeys.stats(keys), UNKNOWN_BATCH_FIELD, result.unknown_batch_callbacks
                        )
                    else:
                        pipe.hdel(pkeys.stats(keys), UNKNOWN_BATCH_FIELD)
                await pipe.execute()
            except WatchError:
                continue
        return {
            "result": result,
            "before": rows,
            "stale_removed": stale,
            "attempts": attempt,
            "seconds_replay_and_compare": round(checked - started, 3),
            "seconds_write": round(time.perf_counter() - checked, 3),
        }
    raise KeptChanging(
        f"the projections kept changing during {REBUILD_TRIES} rebuild attempts: consumers are "
        "applying callbacks; stop the cj workers and run it again"
    )


def summary(result: ReplayResult) -> dict[str, Any]:
    """A replay's size and speed, JSON-ready."""
    return {
        "events": result.events,
        "seconds": round(result.seconds, 4),
        "events_per_s": round(result.events / result.seconds) if result.seconds > 0 else None,
        "callbacks_applied": result.callbacks_applied,
        "callbacks_unapplied": result.callbacks_unapplied,
        "undecodable": result.undecodable,
        "trimmed": result.trimmed,
    }
