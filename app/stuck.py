"""What `cjs stuck` shows and does: the pending entries of every consumer group, the entries
stuck longer than a threshold, stalled batches and dead letters (`collect`, read-only), and one
cleanup pass now (`reclaim`)."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from app.settings import Settings, consumer_name
from app.wiring import cj_consumer, lps_worker
from cj.continuation import Decision
from cj.stalls import finalize_stalled, find_stalled, stalled_view
from events import codec
from events.streams import CONSUMED, STREAMS
from events.text import as_str
from events.types import (
    BatchScored,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    Event,
)
from lps.providers.registry import make_provider
from streams.clock import server_time
from streams.keys import Keys
from streams.pending import StuckAction, pending_details, prune_consumer


def _unknown(**why: Any) -> dict[str, Any]:
    """What a pending entry is about when that cannot be told (undecodable or deleted)."""
    return {"correlation_id": None, "batch_id": None, "essay_ids": [], "event_type": None, **why}


def describe(fields: Any) -> dict[str, Any]:
    """What a pending entry is about: correlation id, batch and essays (None when undecodable)."""
    try:
        event: Event = codec.decode(fields)
    except codec.DecodeError as exc:
        return _unknown(undecodable=exc.reason)
    essays: list[str] = []
    if isinstance(event, ComparisonRequested):
        essays = [event.essay_a.essay_id, event.essay_b.essay_id]
    elif isinstance(event, ComparisonCompleted | ComparisonFailed):
        essays = [event.essay_a_id, event.essay_b_id]
    return {
        "correlation_id": getattr(event, "correlation_id", None),
        "batch_id": getattr(event, "batch_id", None),
        "essay_ids": essays,
        "event_type": type(event).__name__,
    }


# --- the snapshot -------------------------------------------------------------------------------


async def collect(
    r: Any, keys: Keys, *, idle_s: float, batch_idle_s: float, limit: int = 1000
) -> dict[str, Any]:
    """The dashboard as one JSON-ready object (read-only: creates nothing)."""
    groups: list[dict[str, Any]] = []
    stuck: list[dict[str, Any]] = []
    truncated = False
    for stream_name, group in CONSUMED:
        view, rows = await _group_view(r, keys, stream_name, group, limit)
        groups.append(view)
        truncated = truncated or len(rows) < view["pending"]
        stuck += await _stuck_entries(r, keys, stream_name, group, rows, idle_s)
    now = await server_time(r)
    stalled = [
        stalled_view(state, now) for state in await find_stalled(r, keys, batch_idle_s, now=now)
    ]
    return {
        "prefix": keys.prefix,
        "at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "idle_threshold_s": idle_s,
        "batch_idle_timeout_s": batch_idle_s,
        "groups": groups,
        "stuck": stuck,
        "stuck_truncated": truncated,
        "stalled_batches": stalled,
        "dead_letters": await _dead_letter_counts(r, keys),
    }


async def _group_info(r: Any, stream: str, group: str) -> dict[str, Any] | None:
    try:
        groups = await r.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return None
    for info in groups:
        if as_str(info["name"]) == group:
            return dict(info)
    return None


async def _group_view(
    r: Any, keys: Keys, stream_name: str, group: str, limit: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One group's summary, and the details of up to `limit` of its pending entries."""
    stream = keys.stream(stream_name)
    info = await _group_info(r, stream, group)
    if info is None:
        absent = {"exists": False, "pending": 0, "lag": None, "oldest_idle_s": None}
        return {"stream": stream_name, "group": group, **absent, "consumers": []}, []
    summary = await r.xpending(stream, group)
    pending = int(summary["pending"]) if summary else 0
    rows = await pending_details(r, stream, group, count=limit) if pending else []
    oldest: dict[str, float] = {}
    for row in rows:
        oldest[row["consumer"]] = max(oldest.get(row["consumer"], 0.0), row["idle_ms"] / 1000)
    consumers = await _consumers(r, stream, group, oldest)
    lag = info.get("lag")
    view = {
        "stream": stream_name,
        "group": group,
        "exists": True,
        "pending": pending,
        "lag": None if lag is None else int(lag),
        "oldest_idle_s": round(max(oldest.values()), 3) if oldest else None,
        "consumers": consumers,
    }
    return view, rows


async def _consumers(
    r: Any, stream: str, group: str, oldest: dict[str, float]
) -> list[dict[str, Any]]:
    out = []
    for c in await r.xinfo_consumers(stream, group):
        name = as_str(c["name"])
        out.append(
            {
                "consumer": name,
                "pending": int(c["pending"]),
                "idle_s": round(int(c["idle"]) / 1000, 3),
                "oldest_pending_idle_s": round(oldest[name], 3) if name in oldest else None,
            }
        )
    return out


async def _stuck_entries(
    r: Any, keys: Keys, stream_name: str, group: str, rows: list[dict[str, Any]], idle_s: float
) -> list[dict[str, Any]]:
    """The pending entries idle `idle_s` or longer, each with what it is about."""
    over = [row for row in rows if row["idle_ms"] >= idle_s * 1000]
    if not over:
        return []
    stream = keys.stream(stream_name)
    async with r.pipeline(transaction=False) as pipe:
        for row in over:
            pipe.xrange(stream, min=row["entry_id"], max=row["entry_id"], count=1)
        found = await pipe.execute()
    return [
        {
            "stream": stream_name,
            "group": group,
            "entry_id": row["entry_id"],
            "consumer": row["consumer"],
            "idle_s": round(row["idle_ms"] / 1000, 3),
            "deliveries": row["deliveries"],
            **(describe(hit[0][1]) if hit else _unknown(deleted=True)),
        }
        for row, hit in zip(over, found, strict=True)
    ]


async def _dead_letter_counts(r: Any, keys: Keys) -> dict[str, int]:
    counts = {}
    for stream_name in STREAMS:
        n = int(await r.xlen(keys.dlq(stream_name)))
        if n:
            counts[stream_name] = n
    return counts


# --- the cleanup --------------------------------------------------------------------------------


async def reclaim(r: Any, keys: Keys, s: Settings, *, batch_idle_s: float) -> dict[str, Any]:
    """One cleanup pass now, as a worker's reaper does it, plus the stalled batches:
    requests idle past CJS_PROCESSING_TIMEOUT_S are judged again here (or expired after
    CJS_MAX_DELIVERIES), callback entries are applied again (or dead-lettered), and stalled
    batches are finalized or failed. The command's own consumers are removed afterwards."""
    consumer = consumer_name("cjs-stuck")
    lps_actions = await _reclaim_requests(r, keys, s, consumer)
    cj = cj_consumer(r, keys, s, consumer)
    await cj.start()
    cj_actions = await cj.reclaim()
    # A batch whose entries were just reclaimed is not stalled: their callbacks are on the
    # way (applied by the CJ workers), so it is left for a later pass.
    active = {a.batch_id for a in [*lps_actions, *cj_actions] if a.batch_id}
    batches, skipped = await _end_stalled(r, keys, batch_idle_s, active)
    for stream_name, group in CONSUMED:
        await prune_consumer(r, keys.stream(stream_name), group, consumer, min_idle_ms=0)
    return {
        "requests": [a.as_dict() for a in lps_actions],
        "callbacks": [a.as_dict() for a in cj_actions],
        "batches": batches,
        "skipped_batches": skipped,
    }


async def _reclaim_requests(r: Any, keys: Keys, s: Settings, consumer: str) -> list[StuckAction]:
    lps = lps_worker(r, keys, s, consumer, make_provider)
    await lps.start()
    try:
        return await lps.reclaim()
    finally:
        await lps.close()


async def _end_stalled(
    r: Any, keys: Keys, batch_idle_s: float, active: set[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """End the stalled batches but those in `active`; what ended, and what was left."""
    ended = []
    skipped = []
    for state in await find_stalled(r, keys, batch_idle_s):
        if state.batch_id in active:
            skipped.append(state.batch_id)
            continue
        decision = await finalize_stalled(r, keys, state.batch_id, batch_idle_s)
        if decision is not None and decision.terminal is not None:
            ended.append(_ended(state.batch_id, decision))
    return ended, skipped


def _ended(batch_id: str, decision: Decision) -> dict[str, Any]:
    terminal = decision.terminal
    assert terminal is not None
    return {
        "batch_id": batch_id,
        "event": type(terminal).__name__,
        "reason": terminal.reason,
        "message": getattr(terminal, "message", None),
        "scored": any(isinstance(e, BatchScored) for e in decision.events),
        "abandoned": list(terminal.abandoned),
    }
