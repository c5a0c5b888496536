"""Reading a whole stream (or a range of it) in pages: THE one paging loop.

Pages are XRANGE ... COUNT calls; the next page is requested while the caller works on the
current one, so reading and decoding overlap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from events.text import as_str

PAGE = 5000


def next_id(entry_id: str) -> str:
    """The smallest entry id after `entry_id` (an inclusive XRANGE start that skips it)."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def raw_client(r: Any) -> Any:
    """A client on `r`'s connection pool whose XRANGE replies are left as Redis sends them
    (`[[id, [field, value, ...]], ...]`): building a dict per entry costs more than decoding it."""
    if not hasattr(r, "connection_pool"):  # a cluster client: one pool per node
        return _Flattened(r)
    client = aioredis.Redis(connection_pool=r.connection_pool)
    client.set_response_callback("XRANGE", lambda response, **_: response)
    return client


class _Flattened:
    """XRANGE of a cluster client in the raw shape (entries flattened back)."""

    def __init__(self, r: Any) -> None:
        self.r = r

    async def xrange(
        self, name: str, min: str = "-", max: str = "+", count: int | None = None
    ) -> Any:
        rows = await self.r.xrange(name, min=min, max=max, count=count)
        return [
            [entry_id, [x for pair in (fields or {}).items() for x in pair]]
            for entry_id, fields in rows
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.r, name)


async def read_pages(
    r: Any, stream: str, *, page: int = PAGE, max_id: str = "+", min_id: str = "-"
) -> AsyncIterator[list[Any]]:
    """Pages of `stream` from `min_id` up to `max_id` (XRANGE ... COUNT), the next page read
    while the caller works on the current one."""

    async def fetch(start: str) -> list[Any]:
        result: list[Any] = await r.xrange(stream, min=start, max=max_id, count=page)
        return result

    task = asyncio.ensure_future(fetch(min_id))
    try:
        while True:
            entries = await task
            if not entries:
                return
            if len(entries) == page:
                task = asyncio.ensure_future(fetch(next_id(as_str(entries[-1][0]))))
            yield entries
            if len(entries) < page:
                return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def read_stream(
    r: Any, stream: str, *, page: int = PAGE, min_id: str = "-", max_id: str = "+"
) -> AsyncIterator[tuple[str, Any]]:
    """Every entry of `stream` (from `min_id` to `max_id`) in order, as (entry id, fields)."""
    async for entries in read_pages(r, stream, page=page, min_id=min_id, max_id=max_id):
        for entry_id, fields in entries:
            yield as_str(entry_id), fields


def archived_trimmed_key(stream: str) -> str:
    """How many entries of `stream` the archiver trimmed after archiving them (a counter
    beside the stream: the same hash tag, so the trim script counts in its own slot)."""
    return f"{stream}:archived-trimmed"


async def entries_lost(r: Any, stream: str) -> dict[str, Any] | None:
    """How many entries `stream` has lost (trimmed, or deleted with XDEL) and where it now
    begins, or None when it has lost none (or the server does not say: fakeredis). Entries
    the archiver trimmed are in a verified archive: not lost. A stream the projections are
    built from must never lose entries; when it has, a replay cannot be complete."""
    # One MULTI: an archive trim between two separate reads would hide a loss.
    async with r.pipeline(transaction=True) as pipe:
        pipe.xinfo_stream(stream)
        pipe.get(archived_trimmed_key(stream))
        try:
            info, archived_raw = await pipe.execute()
        except ResponseError:  # no such stream
            return None
    added = info.get("entries-added", info.get(b"entries-added"))
    if added is None:
        return None
    archived = int(archived_raw or 0)
    lost = int(added) - int(info["length"]) - archived
    if lost <= 0:
        return None
    first = info.get("recorded-first-entry-id", info.get(b"recorded-first-entry-id"))
    return {"entries_lost": lost, "first_entry_id": as_str(first) if first else None}
