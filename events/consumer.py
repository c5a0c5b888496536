"""Consumer-group plumbing shared by the CJ and LPS consumers.

Reading starts with the consumer's own pending entries (what it held when it
died or was restarted) and then new ones. Entries that cannot be decoded are
moved to `dlq:<stream>` and acknowledged in one MULTI/EXEC, so a bad entry
never blocks a group and is never lost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import ResponseError

from events.codec import DecodeError, decode
from events.types import Event, now_iso
from streams.keys import Keys
from streams.metrics import DEAD_LETTERED

log = structlog.get_logger("events.consumer")

Fields = Mapping[bytes | str, bytes | str]


@dataclass(frozen=True)
class Entry:
    entry_id: str
    fields: Fields


def _s(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


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
            out.append(Entry(_s(entry_id), fields))
    return out


class GroupReader:
    """Reads a stream for one consumer of a group: own pending entries first, then new ones."""

    def __init__(
        self, r: Any, stream: str, group: str, consumer: str, *, count: int, block_ms: int
    ):
        self.r = r
        self.stream = stream
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
        return _entries(response)

    def rewind(self) -> None:
        """Read own pending entries again (after a reconnect, or entries handed back)."""
        self._backlog = True
        self._cursor = "0"


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
        "fields": json.dumps({_s(k): _s(v) for k, v in entry.fields.items()}),
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
