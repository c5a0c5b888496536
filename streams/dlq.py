"""Dead letters: entries a consumer could not use, moved to `dlq:<stream>` with the reason.

A move is the dead-letter XADD and the source entry's XACK in one MULTI/EXEC, so a
bad entry never blocks a group and is never lost.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from events.codec import DecodeError
from events.streams import STREAMS, dlq_name
from events.text import as_str
from events.types import now_iso
from streams.keys import Keys
from streams.metrics import DEAD_LETTERED
from streams.reader import Entry

log = structlog.get_logger("streams.dlq")


def dead_letter_fields(
    stream_name: str, entry: Entry, error: DecodeError, group: str, consumer: str
) -> dict[str, str]:
    return {
        "reason": error.reason,
        "detail": error.detail,
        "source_stream": stream_name,
        "source_id": entry.entry_id,
        "group": group,
        "consumer": consumer,
        "fields": json.dumps({as_str(k): as_str(v) for k, v in entry.fields.items()}),
        "at": now_iso(),
    }


def queue_dead_letter(
    pipe: Any,
    keys: Keys,
    stream_name: str,
    entry: Entry,
    error: DecodeError,
    group: str,
    consumer: str,
) -> None:
    """Buffer the move of one undecodable entry to its DLQ, with the XACK (inside MULTI)."""
    pipe.xadd(keys.dlq(stream_name), dead_letter_fields(stream_name, entry, error, group, consumer))
    pipe.xack(keys.stream(stream_name), group, entry.entry_id)
    DEAD_LETTERED.labels(stream_name, error.reason).inc()
    log.warning(
        "dead_lettered",
        stream=stream_name,
        entry_id=entry.entry_id,
        reason=error.reason,
        detail=error.detail[:200],
    )


async def dead_letter(
    r: Any,
    keys: Keys,
    stream_name: str,
    letters: list[tuple[Entry, DecodeError]],
    group: str,
    consumer: str,
) -> None:
    """Move `letters` to the DLQ of `stream_name`, all in one MULTI/EXEC."""
    if not letters:
        return
    async with r.pipeline(transaction=True) as pipe:
        for entry, error in letters:
            queue_dead_letter(pipe, keys, stream_name, entry, error, group, consumer)
        await pipe.execute()


def letter_view(dlq_stream: str, entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    """One dead letter as stored, its original fields parsed back when they are JSON."""
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    try:
        original: Any = json.loads(f.get("fields", "{}"))
    except json.JSONDecodeError:
        original = f.get("fields")
    return {
        "dlq_stream": dlq_stream,
        "entry_id": as_str(entry_id),
        "source_stream": f.get("source_stream"),
        "source_id": f.get("source_id"),
        "reason": f.get("reason"),
        "detail": f.get("detail"),
        "group": f.get("group"),
        "consumer": f.get("consumer"),
        "at": f.get("at"),
        "fields": original,
    }


async def read_dead_letters(
    r: Any, keys: Keys, *, stream: str | None = None, limit: int = 100
) -> dict[str, Any]:
    """Dead letters of every stream (or of `stream`, named without prefix), newest first, up to
    `limit` per stream, with the count per stream and per reason of those shown. Over every
    partition of a namespace-wide `keys`: each letter says its `partition`."""
    names = [stream] if stream else list(STREAMS)
    counts: dict[str, int] = {}
    letters: list[dict[str, Any]] = []
    for name in names:
        counts[name] = 0
        found: list[dict[str, Any]] = []
        for part in keys.all_partitions():
            dlq = part.dlq(name)
            n = int(await r.xlen(dlq))
            counts[name] += n
            if n:
                entries = await r.xrevrange(dlq, max="+", min="-", count=limit)
                found.extend(
                    {**letter_view(dlq_name(name), i, fields), "partition": part.partition or 0}
                    for i, fields in entries
                )
        found.sort(key=lambda d: _id_key(d["entry_id"]), reverse=True)
        letters.extend(found[:limit])
    by_reason: dict[str, int] = {}
    for letter in letters:
        by_reason[letter["reason"] or "?"] = by_reason.get(letter["reason"] or "?", 0) + 1
    return {
        "prefix": keys.prefix,
        "counts": counts,
        "total": sum(counts.values()),
        "shown_by_reason": by_reason,
        "dead_letters": letters,
    }


async def trim_dead_letters(
    r: Any, keys: Keys, *, older_than_s: float, now_ms: int | None = None
) -> dict[str, int]:
    """Dead letters' own retention: delete those older than `older_than_s` from every
    `dlq:<stream>` (no group reads a DLQ, so nothing else holds them). `now_ms` is the Redis
    server's clock (entry ids are), read here when not given. Returns deletions per stream."""
    if now_ms is None:
        seconds, micros = await r.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
    cutoff = f"{max(0, now_ms - int(older_than_s * 1000))}-0"
    out: dict[str, int] = {}
    for name in STREAMS:
        out[name] = 0
        for part in keys.all_partitions():
            out[name] += int(await r.xtrim(part.dlq(name), minid=cutoff, approximate=False))
    return out


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
