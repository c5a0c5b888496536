"""Reading a stream as one consumer of a group.

Reading starts with the consumer's own pending entries (what it held when it
died or was restarted) and then new ones. Entries that cannot be decoded are
moved to `dlq:<stream>` (streams/dlq.py), so a bad entry never blocks a group
and is never lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from events.codec import DecodeError, decode
from events.text import as_str
from events.types import Event
from streams.metrics import observe_queue_wait

Fields = Mapping[bytes | str, bytes | str]


@dataclass(frozen=True)
class Entry:
    entry_id: str
    fields: Fields


async def ensure_group(r: Any, stream: str, group: str) -> None:
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _entries(response: Any) -> list[Entry]:
    out: list[Entry] = []
    for _stream, items in response or []:
        for entry_id, fields in items:
            if fields is None:  # deleted while pending
                continue
            out.append(Entry(as_str(entry_id), fields))
    return out


class GroupReader:
    """Reads a stream for one consumer of a group: own pending entries first, then new ones."""

    def __init__(
        self,
        r: Any,
        stream: str,
        group: str,
        consumer: str,
        *,
        count: int,
        block_ms: int,
        name: str | None = None,
    ):
        self.r = r
        self.stream = stream
        # The stream's name without the key prefix, as metrics label it.
        self.name = name or stream
        self.group = group
        self.consumer = consumer
        self.count = count
        self.block_ms = block_ms
        self._backlog = True
        self._cursor = "0"

    async def read(self) -> list[Entry]:
        if self._backlog:
            response = await self.r.xreadgroup(
                self.group, self.consumer, {self.stream: self._cursor}, count=self.count
            )
            entries = _entries(response)
            if entries:
                self._cursor = entries[-1].entry_id
                return entries
            self._backlog = False
        response = await self.r.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.count, block=self.block_ms
        )
        entries = _entries(response)
        observe_queue_wait(self.name, self.group, (e.entry_id for e in entries))
        return entries

    def rewind(self) -> None:
        """Read own pending entries again (after a reconnect, or entries handed back)."""
        self._backlog = True
        self._cursor = "0"


def split_decoded(
    entries: list[Entry],
) -> tuple[list[tuple[Entry, Event]], list[tuple[Entry, DecodeError]]]:
    good: list[tuple[Entry, Event]] = []
    bad: list[tuple[Entry, DecodeError]] = []
    for entry in entries:
        try:
            good.append((entry, decode(entry.fields)))
        except DecodeError as exc:
            bad.append((entry, exc))
    return good, bad
