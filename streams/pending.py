"""Pending-entry maintenance: reclaiming stuck entries, keeping slow ones alive, releasing
entries at shutdown, pruning dead consumers, and the pending-entries gauge."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from events.text import as_str
from streams.keys import Keys
from streams.metrics import set_pending
from streams.reader import Entry

log = structlog.get_logger("streams.pending")

# Entries a worker hands back at shutdown wait here, already idle past the processing
# timeout, so the next reaper pass of any live worker claims them.
HANDOFF_CONSUMER = "released"


@dataclass(frozen=True)
class Claimed:
    entry: Entry
    deliveries: int
    idle_ms: int
    previous_consumer: str


@dataclass(frozen=True)
class StuckAction:
    """What a reaper did with one stuck pending entry (logged, counted, and reported by
    `cjs stuck --reclaim`). `action`: reclaimed, expired or dead_lettered."""

    stream: str
    group: str
    entry_id: str
    action: str
    consumer: str  # the consumer that held it
    claimed_by: str
    idle_s: float
    deliveries: int  # after the claim
    batch_id: str | None = None
    correlation_id: str | None = None

    @classmethod
    def of(
        cls, claimed: Claimed, stream: str, group: str, action: str, claimed_by: str, event: Any
    ) -> StuckAction:
        """The record of what happened to `claimed` (whose decoded event, if any, is `event`)."""
        return cls(
            stream=stream,
            group=group,
            entry_id=claimed.entry.entry_id,
            action=action,
            consumer=claimed.previous_consumer,
            claimed_by=claimed_by,
            idle_s=round(claimed.idle_ms / 1000, 3),
            deliveries=claimed.deliveries,
            batch_id=getattr(event, "batch_id", None),
            correlation_id=getattr(event, "correlation_id", None),
        )

    def log_fields(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "group": self.group,
            "entry_id": self.entry_id,
            "batch_id": self.batch_id,
            "correlation_id": self.correlation_id,
            "consumer": self.consumer,
            "claimed_by": self.claimed_by,
            "idle_s": self.idle_s,
            "deliveries": self.deliveries,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.log_fields(), "action": self.action}


async def claim_idle(
    r: Any,
    stream: str,
    group: str,
    consumer: str,
    min_idle_ms: int,
    *,
    page: int = 100,
    spare: Iterable[str] = (),
) -> tuple[list[Claimed], list[str]]:
    """XCLAIM every entry idle for `min_idle_ms` or more to `consumer`, page by page through
    the whole pending list (one XPENDING and one XCLAIM per page), but those held by
    `consumer` itself or by a consumer in `spare`.

    Returns the claimed entries with their delivery counts (after this claim) and the ids
    of pending entries whose data no longer exists. Claiming bumps the delivery count and
    resets idle time, and XCLAIM re-checks the idle time, so two racing claimers never both
    win.
    """
    spared = {consumer, *spare}
    claimed: list[Claimed] = []
    deleted: list[str] = []
    start = "-"
    while True:
        rows = await pending_details(
            r, stream, group, min_idle_ms=min_idle_ms, count=page, page=page, start=start
        )
        if not rows:
            break
        start = "(" + rows[-1]["entry_id"]
        wanted = [row for row in rows if row["consumer"] not in spared]
        won = await claim_ids(r, stream, group, consumer, min_idle_ms, wanted)
        claimed.extend(won)
        got = {c.entry.entry_id for c in won}
        lost = [row["entry_id"] for row in wanted if row["entry_id"] not in got]
        if lost:
            async with r.pipeline(transaction=False) as pipe:
                for entry_id in lost:
                    pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
                found = await pipe.execute()
            deleted.extend(i for i, hit in zip(lost, found, strict=True) if not hit)
        if len(rows) < page:
            break
    return claimed, deleted


async def pending_details(
    r: Any,
    stream: str,
    group: str,
    *,
    min_idle_ms: int | None = None,
    consumer: str | None = None,
    count: int | None = None,
    page: int = 1000,
    start: str = "-",
) -> list[dict[str, Any]]:
    """XPENDING (extended form) in pages, oldest entry first, from `start` (an id, `(id` for
    after it): up to `count` rows (every row when None) of
    `{entry_id, consumer, idle_ms, deliveries}`."""
    kwargs: dict[str, Any] = {}
    if min_idle_ms is not None:
        kwargs["idle"] = min_idle_ms
    if consumer is not None:
        kwargs["consumername"] = consumer
    out: list[dict[str, Any]] = []
    while count is None or len(out) < count:
        want = page if count is None else min(page, count - len(out))
        rows = await r.xpending_range(stream, group, min=start, max="+", count=want, **kwargs)
        out.extend(
            {
                "entry_id": as_str(row["message_id"]),
                "consumer": as_str(row["consumer"]),
                "idle_ms": int(row["time_since_delivered"]),
                "deliveries": int(row["times_delivered"]),
            }
            for row in rows
        )
        if len(rows) < want:
            break
        start = "(" + out[-1]["entry_id"]
    return out


async def claim_ids(
    r: Any, stream: str, group: str, consumer: str, min_idle_ms: int, rows: list[dict[str, Any]]
) -> list[Claimed]:
    """XCLAIM the given pending rows (from `pending_details`) if they are still idle for
    `min_idle_ms`: of racing claimers exactly one wins each entry. Returns what this
    consumer won, with delivery counts after the claim; entries deleted from the stream
    meanwhile are dropped from the group by Redis and not returned."""
    if not rows:
        return []
    reply = await r.xclaim(stream, group, consumer, min_idle_ms, [row["entry_id"] for row in rows])
    won = {as_str(entry_id): fields for entry_id, fields in reply or [] if fields is not None}
    out = []
    for row in rows:
        fields = won.get(row["entry_id"])
        if fields is not None:
            # XCLAIM adds one delivery; the count before it is in `row`.
            out.append(
                Claimed(
                    Entry(row["entry_id"], fields),
                    row["deliveries"] + 1,
                    row["idle_ms"],
                    row["consumer"],
                )
            )
    return out


async def hand_over(
    r: Any,
    stream: str,
    group: str,
    entry_ids: list[str],
    *,
    min_idle_ms: int,
    idle_ms: int,
) -> list[str]:
    """Move pending entries idle `min_idle_ms` or more to `HANDOFF_CONSUMER`, marked idle for
    `idle_ms` (the processing timeout: due for the next reclaim of any live worker), delivery
    counts unchanged. Returns the ids moved; an entry taken up meanwhile is not."""
    if not entry_ids:
        return []
    reply = await r.xclaim(
        stream, group, HANDOFF_CONSUMER, min_idle_ms, entry_ids, idle=idle_ms, justid=True
    )
    return [as_str(i) for i in reply or []]


async def pending_count(r: Any, stream: str, group: str) -> int:
    summary = await r.xpending(stream, group)
    return int(summary["pending"]) if summary else 0


async def update_pending_gauge(r: Any, stream: str, stream_name: str, group: str) -> int:
    """Set the pending-entries gauges (`stream_pending_entries{stream, group}` and the
    deprecated `lps_pending_entries`, stream named without the key prefix)."""
    n = await pending_count(r, stream, group)
    set_pending(stream_name, group, n, key=stream)
    return n


async def release_entries(
    r: Any, stream: str, group: str, consumer: str, entry_ids: Iterable[str], *, idle_ms: int
) -> int:
    """Hand entries this consumer will not finish to `HANDOFF_CONSUMER`, marked idle for
    `idle_ms` (the processing timeout) so the next reclaim takes them at once, with the
    delivery count of each put back by one: an entry given back untouched is not a failed
    delivery. Returns how many were released."""
    wanted = set(entry_ids)
    if not wanted:
        return 0
    rows = [
        p
        for p in await pending_details(r, stream, group, consumer=consumer)
        if p["entry_id"] in wanted
    ]
    by_count: dict[int, list[str]] = {}
    for row in rows:
        by_count.setdefault(max(0, row["deliveries"] - 1), []).append(row["entry_id"])
    async with r.pipeline(transaction=True) as pipe:
        for retries, ids in sorted(by_count.items()):
            pipe.xclaim(
                stream,
                group,
                HANDOFF_CONSUMER,
                0,
                ids,
                idle=idle_ms,
                retrycount=retries,
                justid=True,
            )
        await pipe.execute()
    return len(rows)


# Delete a consumer only if it has nothing pending and has been idle long enough, checked in
# the same atomic step as the delete (XGROUP DELCONSUMER silently drops pending entries).
# KEYS: 1 stream; ARGV: 1 group, 2 consumer, 3 min idle ms. Returns 1 deleted, 0 kept, -1 gone.
_PRUNE_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] == ARGV[2] then
    if tonumber(f['idle']) < tonumber(ARGV[3]) then return 0 end
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    return 1
  end
end
return -1
"""


async def prune_consumer(
    r: Any, stream: str, group: str, consumer: str, *, min_idle_ms: int
) -> bool:
    """Remove one consumer if (atomically) it has nothing pending and is idle for `min_idle_ms`."""
    return int(await r.eval(_PRUNE_LUA, 1, stream, group, consumer, min_idle_ms)) == 1


async def prune_dead_consumers(
    r: Any, stream: str, group: str, *, dead_after_ms: int, keep: Iterable[str] = ()
) -> list[str]:
    """Remove the consumers of `group` idle for `dead_after_ms` with nothing pending."""
    spared = set(keep)
    removed = []
    for info in await r.xinfo_consumers(stream, group):
        name = as_str(info["name"])
        if name in spared or int(info["pending"]) > 0 or int(info["idle"]) < dead_after_ms:
            continue
        if await prune_consumer(r, stream, group, name, min_idle_ms=dead_after_ms):
            removed.append(name)
            log.info(
                "dead_consumer_removed",
                stream=stream,
                group=group,
                consumer=name,
                idle_s=round(int(info["idle"]) / 1000, 1),
            )
    return removed


# Reset the idle time of the entries `consumer` still holds (XCLAIM ... JUSTID: no delivery
# counted); an entry another consumer has claimed meanwhile is left to it (an unchecked
# XCLAIM would take it back). KEYS: 1 stream; ARGV: 1 group, 2 consumer, 3.. entry ids.
# Returns the ids no longer held.
_KEEP_ALIVE_LUA = """
local taken, gone = {}, {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 0 then
    gone[#gone + 1] = ARGV[i]
  elseif p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    taken[#taken + 1] = ARGV[i]
  end
end
return {taken, gone}
"""


@dataclass(frozen=True)
class NotHeld:
    """What `keep_alive` found a consumer no longer holds: entries another consumer holds now
    (`taken`: claimed after this one looked dead) and entries no longer pending at all
    (`gone`: acknowledged, most often by this very consumer's commit a moment before; or
    deleted)."""

    taken: list[str]
    gone: list[str]

    @property
    def all(self) -> list[str]:
        return self.taken + self.gone


async def keep_alive(
    r: Any, stream: str, group: str, consumer: str, entry_ids: list[str]
) -> NotHeld:
    """Reset the idle time of entries still being worked on, without bumping delivery counts,
    if this consumer still holds them; returns those it no longer holds, told apart: only one
    another consumer took is a lost claim (a worker's commits acknowledge its entries before
    it forgets them, so entries merely answered are not)."""
    if not entry_ids:
        return NotHeld([], [])
    taken, gone = await r.eval(_KEEP_ALIVE_LUA, 1, stream, group, consumer, *entry_ids)
    return NotHeld([as_str(i) for i in taken or []], [as_str(i) for i in gone or []])


async def group_upkeep(
    r: Any, keys: Keys, stream_name: str, group: str, consumer: str, *, dead_after_s: float
) -> None:
    """The part of a reaper pass every group shares: the pending gauge, and removing
    consumers dead with nothing pending (never `consumer` itself)."""
    stream = keys.stream(stream_name)
    await update_pending_gauge(r, stream, stream_name, group)
    await prune_dead_consumers(
        r, stream, group, dead_after_ms=int(dead_after_s * 1000), keep=[consumer]
    )
