"""Pending-entry maintenance: reclaiming stuck entries, keeping slow ones alive, pruning consumers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from events.consumer import Entry, _s


@dataclass(frozen=True)
class Claimed:
    entry: Entry
    deliveries: int
    idle_ms: int
    previous_consumer: str


async def claim_idle(
    r: Any, stream: str, group: str, consumer: str, min_idle_ms: int, *, page: int = 100
) -> tuple[list[Claimed], list[str]]:
    """XAUTOCLAIM every entry idle for `min_idle_ms` or more to `consumer`.

    Returns the claimed entries with their delivery counts (after this claim) and
    the ids of pending entries whose data no longer exists. Claiming bumps the
    delivery count and resets idle time, so two racing claimers never both win.
    """
    before = await pending_details(r, stream, group, min_idle_ms=min_idle_ms)
    owners = {p["entry_id"]: (p["consumer"], p["idle_ms"]) for p in before}
    claimed: list[tuple[str, Any]] = []
    deleted: list[str] = []
    cursor = "0-0"
    while True:
        reply = await r.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=page)
        cursor = _s(reply[0])
        for entry_id, fields in reply[1]:
            if fields is not None:
                claimed.append((_s(entry_id), fields))
        if len(reply) > 2:
            deleted.extend(_s(i) for i in reply[2])
        if cursor == "0-0":
            break
    if not claimed:
        return [], deleted
    counts = {
        p["entry_id"]: p["deliveries"]
        for p in await pending_details(r, stream, group, consumer=consumer)
    }
    out = []
    for entry_id, fields in claimed:
        prev, idle = owners.get(entry_id, ("?", min_idle_ms))
        out.append(Claimed(Entry(entry_id, fields), counts.get(entry_id, 1), idle, prev))
    return out, deleted


async def pending_details(
    r: Any,
    stream: str,
    group: str,
    *,
    min_idle_ms: int | None = None,
    consumer: str | None = None,
    count: int = 10_000,
) -> list[dict[str, Any]]:
    kwargs: dict[str, Any] = {}
    if min_idle_ms is not None:
        kwargs["idle"] = min_idle_ms
    if consumer is not None:
        kwargs["consumername"] = consumer
    rows = await r.xpending_range(stream, group, min="-", max="+", count=count, **kwargs)
    return [
        {
            "entry_id": _s(row["message_id"]),
            "consumer": _s(row["consumer"]),
            "idle_ms": int(row["time_since_delivered"]),
            "deliveries": int(row["times_delivered"]),
        }
        for row in rows
    ]


async def keep_alive(r: Any, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
    """Reset the idle time of entries still being worked on, without bumping delivery counts."""
    if entry_ids:
        await r.xclaim(stream, group, consumer, 0, entry_ids, justid=True)
