"""Trimming a stream, never below what its consumer groups still need.

`XTRIM MINID` alone drops pending and undelivered entries too. Here the floor asked for is
lowered, in the same atomic step as the trim (a Lua script), to every group's oldest pending
entry and to its last-delivered id: whatever the consumers do meanwhile, an entry a group still
has pending, or has not been delivered yet, is never trimmed. What else must be kept (entries
not archived yet) is the caller's floor.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from events.text import as_str
from streams.lua import ENTRY_ID_ORDER
from streams.paging import archived_trimmed_key, next_id

# KEYS: 1 stream, 2 its count of archived entries trimmed; ARGV: 1 the floor asked for.
# Returns {entries trimmed, the floor used}.
_TRIM_LUA = (
    ENTRY_ID_ORDER
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ARGV[1]} end
local floor = ARGV[1]
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local f = {}
  for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
  local last = f['last-delivered-id']
  if before(last, floor) then floor = last end
  local p = redis.call('XPENDING', KEYS[1], f['name'])
  if tonumber(p[1]) > 0 and before(p[2], floor) then floor = p[2] end
end
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', floor)
if trimmed > 0 then redis.call('INCRBY', KEYS[2], trimmed) end
return {trimmed, floor}
"""
)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def lower(a: str | None, b: str | None) -> str | None:
    """The smaller of two entry ids (None: no bound)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if _key(a) <= _key(b) else b


async def group_floor(r: Any, stream: str) -> str | None:
    """The lowest id any consumer group of `stream` still needs: its oldest pending entry or
    its last-delivered id, whichever is lower, over all groups (None: no group). Entries
    below it have been delivered to and acknowledged by every group."""
    try:
        groups = await r.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return None
    floor: str | None = None
    for group in groups:
        floor = lower(floor, as_str(group["last-delivered-id"]))
        if int(group.get("pending", 0)):
            summary = await r.xpending(stream, as_str(group["name"]))
            if summary and summary.get("pending") and summary.get("min") is not None:
                floor = lower(floor, as_str(summary["min"]))
    return floor


async def trim_below(r: Any, stream: str, floor: str) -> tuple[int, str]:
    """Delete the entries of `stream` below `floor`, or below a lower floor that a consumer
    group needs (checked in the same atomic step). Returns (entries deleted, floor used).
    They are counted, in the same step, as trimmed on purpose (`archived_trimmed_key`): the
    caller has them in a verified archive, so they are not lost (`entries_lost`)."""
    deleted, used = await r.eval(_TRIM_LUA, 2, stream, archived_trimmed_key(stream), floor)
    return int(deleted), as_str(used)


def after(entry_id: str) -> str:
    """The floor that trims `entry_id` and everything before it."""
    return next_id(entry_id)
