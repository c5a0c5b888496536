"""Reading a stream as one consumer of a group, and keeping the group where it belongs.

Reading starts with the consumer's own pending entries (what it held when it
died or was restarted, or when Redis went away) and then new ones. Re-reading its
own entries is not a delivery: it is done by a script that reads them and resets
their idle time without touching their delivery count (XREADGROUP with an id would
count one more delivery each time, and a healthy worker's entries would look like
poison after a few outages). Entries that cannot be decoded are moved to
`dlq:<stream>` (streams/dlq.py), so a bad entry never blocks a group and is never lost.

A group destroyed by an operator is recreated where it had got to (`ensure_group`):
the position its consumers record beside it (`record_position`), not `0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import ResponseError

from events.codec import DecodeError, EntryFields, decode
from events.text import as_str
from events.types import Event
from streams.metrics import observe_queue_wait

log = structlog.get_logger("streams.reader")

Fields = EntryFields


@dataclass(frozen=True)
class Entry:
    entry_id: str
    fields: Fields


async def ensure_group(r: Any, stream: str, group: str, record: str | None = None) -> bool:
    """Create `group` on `stream` unless it exists: at the position recorded in the hash
    `record` (see `record_position`) when there is one, else at `0`. True when created."""
    position = "0"
    if record is not None:
        recorded = await r.hget(record, "position")
        if recorded:
            position = as_str(recorded)
    try:
        await r.xgroup_create(stream, group, id=position, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    if position != "0":
        log.warning("consumer_group_recreated", stream=stream, group=group, position=position)
    return True


# Record where a group has got to: the id up to which every entry has been handled
# (acknowledged): just before its oldest pending entry, else its last-delivered id. Entries
# handled after that id are in the `handled` set, which is trimmed up to it here.
# KEYS: 1 stream, 2 the group's record (hash), 3 its handled set (zset); ARGV: 1 group.
# Returns the position, or false when there is no such stream or group.
_RECORD_POSITION_LUA = """
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(groups) ~= 'table' or groups.err then return false end
local delivered
for _, g in ipairs(groups) do
  for i = 1, #g, 2 do
    if g[i] == 'name' and g[i + 1] == ARGV[1] then
      for j = 1, #g, 2 do
        if g[j] == 'last-delivered-id' then delivered = g[j + 1] end
      end
    end
  end
end
if not delivered then return false end
local position = delivered
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
if summary[1] > 0 then
  local ms, seq = string.match(summary[2], '^(%d+)-(%d+)$')
  if tonumber(seq) > 0 then
    position = ms .. '-' .. string.format('%.0f', tonumber(seq) - 1)
  else
    position = string.format('%.0f', tonumber(ms) - 1) .. '-18446744073709551615'
  end
end
redis.call('HSET', KEYS[2], 'position', position)
local ms = tonumber(string.match(position, '^(%d+)'))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%.0f', ms))
return position
"""


async def record_position(r: Any, stream: str, group: str, record: str, handled: str) -> str | None:
    """Record where `group` has got to (see `ensure_group`); returns the position."""
    position = await r.eval(_RECORD_POSITION_LUA, 3, stream, record, handled, group)
    return as_str(position) if position else None


# The consumer's own pending entries after a cursor, with their fields, each refreshed (idle
# time reset, the consumer seen) without a delivery counted.
# KEYS: 1 stream; ARGV: 1 group, 2 consumer, 3 start ('-' or '(<id>'), 4 count.
# Returns {{id, fields or false}, ...}: false when the entry was deleted from the stream.
_OWN_PENDING_LUA = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', tonumber(ARGV[4]), ARGV[2])
local out = {}
for _, row in ipairs(rows) do
  local id = row[1]
  local hit = redis.call('XRANGE', KEYS[1], id, id)
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  if #hit == 1 then out[#out + 1] = hit[1] else out[#out + 1] = {id, false} end
end
return out
"""


def _flat_fields(flat: Any) -> dict[Any, Any] | None:
    if not flat:
        return None
    return dict(zip(flat[::2], flat[1::2], strict=False))


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
        self._cursor = "-"
        self._own_pending = r.register_script(_OWN_PENDING_LUA)

    async def read(self) -> list[Entry]:
        if self._backlog:
            rows = await self._own_pending(
                keys=[self.stream], args=[self.group, self.consumer, self._cursor, self.count]
            )
            if rows:
                self._cursor = "(" + as_str(rows[-1][0])
                entries = [
                    Entry(as_str(entry_id), fields)
                    for entry_id, flat in rows
                    if (fields := _flat_fields(flat)) is not None
                ]
                if entries:
                    return entries
                return await self.read()
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
        self._cursor = "-"


def split_decoded(
    entries: list[Entry],
) -> tuple[list[tuple[Entry, Event]], list[tuple[Entry, DecodeError]]]:
    good: list[tuple[Entry, Event]] = []
    bad: list[tuple[Entry, DecodeError]] = []
    for entry in entries:
        try:
            good.append((entry, decode(entry.fields, entry.entry_id)))
        except DecodeError as exc:
            bad.append((entry, exc))
    return good, bad
