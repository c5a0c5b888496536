"""What `cjs stuck` shows and does: the streams and their consumer groups, the entries stuck
longer than a threshold, stalled batches and dead letters (`collect`, read-only; `summary` is all
of it but the entries), one cleanup pass now (`reclaim`), and one entry's action
(`act_on_entry`: reclaim now, expire, dead-letter), which the dashboard calls too."""

from __future__ import annotations

import time
from typing import Any

from redis.exceptions import ResponseError

from app.dlq import acceptable
from app.errors import Conflict, InputError, NotFound
from app.partitions import max_id, min_id, number, one_partition, total
from app.settings import Settings, consumer_name, dead_letter_policy
from app.wiring import cj_consumer, lps_worker
from cj.continuation import Decision
from cj.stalls import finalize_stalled, find_stalled, stalled_view
from events import codec
from events.streams import CALLBACKS, CONSUMED, REQUESTS, STREAMS, dlq_name
from events.text import as_str
from events.types import (
    BatchScored,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    Event,
)
from lps.breaker import open_breakers
from lps.providers.registry import make_provider
from streams.clock import server_time
from streams.dlq import dead_letter
from streams.keys import Keys
from streams.pending import (
    HANDOFF_CONSUMER,
    Claimed,
    StuckAction,
    claim_ids,
    hand_over,
    pending_details,
    prune_consumer,
)


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


async def summary(
    r: Any,
    keys: Keys,
    *,
    batch_idle_s: float,
    dead_after_s: float,
    limit: int = 1000,
) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """Everything `collect` shows but the stuck entries (what the dashboard's overview shows),
    and the pending rows (up to `limit` per group) each group's figures were computed from."""
    groups: list[dict[str, Any]] = []
    rows_per_group: list[list[dict[str, Any]]] = []
    for stream_name, group in CONSUMED:
        views = []
        rows = []
        for part in keys.all_partitions():
            view, part_rows = await _group_view(r, part, stream_name, group, limit, dead_after_s)
            views.append(view)
            rows += part_rows
        groups.append(_group_total(views))
        rows_per_group.append(rows)
    now = await server_time(r)
    stalled = [
        stalled_view(state, now) for state in await find_stalled(r, keys, batch_idle_s, now=now)
    ]
    # Breakers keep the workers' wall-clock times (lps/breaker.py), as `cjs status` reads them.
    breakers = [b.view(time.time()) for b in await open_breakers(r, keys)]
    view = {
        "prefix": keys.prefix,
        "partitions": keys.partitions,
        "at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "batch_idle_timeout_s": batch_idle_s,
        "dead_consumer_after_s": dead_after_s,
        "streams": await stream_views(r, keys),
        "groups": groups,
        "stalled_batches": stalled,
        "breakers": breakers,
        "dead_letters": await _dead_letter_counts(r, keys),
    }
    return view, rows_per_group


async def collect(
    r: Any,
    keys: Keys,
    *,
    idle_s: float,
    batch_idle_s: float,
    limit: int = 1000,
    dead_after_s: float | None = None,
) -> dict[str, Any]:
    """The `cjs stuck` view as one JSON-ready object (read-only: creates nothing). A consumer
    idle `dead_after_s` (default `idle_s`) is judged dead."""
    view, rows_per_group = await summary(
        r,
        keys,
        batch_idle_s=batch_idle_s,
        dead_after_s=idle_s if dead_after_s is None else dead_after_s,
        limit=limit,
    )
    stuck: list[dict[str, Any]] = []
    truncated = False
    for g, rows in zip(view["groups"], rows_per_group, strict=True):
        truncated = truncated or len(rows) < g["pending"]
        for part in keys.all_partitions():
            mine = [row for row in rows if row["partition"] == number(part)]
            stuck += await _stuck_entries(r, part, g["stream"], g["group"], mine, idle_s)
    return {
        **view,
        "idle_threshold_s": idle_s,
        "stuck": stuck,
        "stuck_truncated": truncated,
    }


async def stream_views(r: Any, keys: Keys) -> list[dict[str, Any]]:
    """Per stream (and its dead letters): length, entries ever added, first and last entry id;
    over every partition of the namespace (lengths added, the first and last ids of any)."""
    names = [name for stream in STREAMS for name in (stream, dlq_name(stream))]
    out = []
    for name in names:
        rows = [await _stream_view(r, part, name) for part in keys.all_partitions()]
        found = [row for row in rows if row["exists"]]
        if not found:
            out.append({"stream": name, "exists": False, "length": 0, "entries_added": 0})
            continue
        added = [row["entries_added"] for row in found]
        out.append(
            {
                "stream": name,
                "exists": True,
                "length": sum(row["length"] for row in found),
                "entries_added": None if None in added else sum(added),
                "first_entry_id": min_id(row["first_entry_id"] for row in found),
                "last_entry_id": max_id(row["last_entry_id"] for row in found),
                "groups": max(row["groups"] for row in found),
            }
        )
    return out


async def _stream_view(r: Any, part: Keys, name: str) -> dict[str, Any]:
    try:
        info = await r.xinfo_stream(part.stream(name))
    except ResponseError:  # no such stream
        return {"stream": name, "exists": False, "length": 0, "entries_added": 0}
    added = info.get("entries-added")
    return {
        "stream": name,
        "exists": True,
        "length": int(info["length"]),
        # Redis < 7 does not count them.
        "entries_added": None if added is None else int(added),
        "first_entry_id": _entry_id(info.get("first-entry")),
        "last_entry_id": as_str(info["last-generated-id"]),
        "groups": int(info.get("groups", 0)),
    }


def _entry_id(entry: Any) -> str | None:
    return as_str(entry[0]) if entry else None


def verdict(consumer: str, pending: int, idle_s: float, dead_after_s: float) -> str:
    """live (reading, nothing pending), busy (reading or working, holds entries), dead (no
    read or claim for `dead_after_s`, the processing timeout), or handoff (the `released`
    consumer: entries handed back for the next worker to take)."""
    if consumer == HANDOFF_CONSUMER:
        return "handoff"
    if idle_s >= dead_after_s:
        return "dead"
    return "busy" if pending else "live"


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
    r: Any, keys: Keys, stream_name: str, group: str, limit: int, dead_after_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One group's summary, and the details of up to `limit` of its pending entries."""
    stream = keys.stream(stream_name)
    info = await _group_info(r, stream, group)
    if info is None:
        absent = {
            "exists": False,
            "pending": 0,
            "lag": None,
            "entries_read": None,
            "last_delivered_id": None,
            "oldest_idle_s": None,
        }
        return {"stream": stream_name, "group": group, **absent, "consumers": []}, []
    summary = await r.xpending(stream, group)
    pending = int(summary["pending"]) if summary else 0
    rows = await pending_details(r, stream, group, count=limit) if pending else []
    oldest: dict[str, float] = {}
    for row in rows:
        row["partition"] = number(keys)
        oldest[row["consumer"]] = max(oldest.get(row["consumer"], 0.0), row["idle_ms"] / 1000)
    consumers = await _consumers(r, stream, group, oldest, dead_after_s)
    for c in consumers:
        c["partition"] = number(keys)
    lag = info.get("lag")
    read = info.get("entries-read")
    view = {
        "stream": stream_name,
        "group": group,
        "exists": True,
        "pending": pending,
        "lag": None if lag is None else int(lag),
        "entries_read": None if read is None else int(read),
        "last_delivered_id": as_str(info["last-delivered-id"]),
        "oldest_idle_s": round(max(oldest.values()), 3) if oldest else None,
        "consumers": consumers,
    }
    return view, rows


def _group_total(views: list[dict[str, Any]]) -> dict[str, Any]:
    """One group over the partitions: its figures added (the oldest idle and last delivered
    id the largest of any), its consumers those of every partition (each says which)."""
    if len(views) == 1:
        return views[0]
    found = [v for v in views if v["exists"]]
    if not found:
        return views[0]
    idle = [v["oldest_idle_s"] for v in found if v["oldest_idle_s"] is not None]
    return {
        "stream": found[0]["stream"],
        "group": found[0]["group"],
        "exists": True,
        "pending": sum(v["pending"] for v in found),
        "lag": total(v["lag"] for v in found),
        "entries_read": total(v["entries_read"] for v in found),
        "last_delivered_id": max_id(v["last_delivered_id"] for v in found),
        "oldest_idle_s": max(idle) if idle else None,
        "consumers": [c for v in found for c in v["consumers"]],
    }


async def _consumers(
    r: Any, stream: str, group: str, oldest: dict[str, float], dead_after_s: float
) -> list[dict[str, Any]]:
    out = []
    for c in await r.xinfo_consumers(stream, group):
        name = as_str(c["name"])
        pending = int(c["pending"])
        idle_s = round(int(c["idle"]) / 1000, 3)
        out.append(
            {
                "consumer": name,
                "pending": pending,
                "idle_s": idle_s,
                "oldest_pending_idle_s": round(oldest[name], 3) if name in oldest else None,
                "verdict": verdict(name, pending, idle_s, dead_after_s),
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
        _entry_view(stream_name, group, row, hit[0][1] if hit else None)
        for row, hit in zip(over, found, strict=True)
    ]


def _entry_view(stream_name: str, group: str, row: dict[str, Any], fields: Any) -> dict[str, Any]:
    """One pending row with what its entry is about (`fields` None: the entry was deleted)."""
    return {
        "stream": stream_name,
        "group": group,
        "partition": row.get("partition", 0),
        "entry_id": row["entry_id"],
        "consumer": row["consumer"],
        "idle_s": round(row["idle_ms"] / 1000, 3),
        "deliveries": row["deliveries"],
        **(describe(fields) if fields is not None else _unknown(deleted=True)),
    }


async def _dead_letter_counts(r: Any, keys: Keys) -> dict[str, int]:
    counts = {}
    for stream_name in STREAMS:
        n = 0
        for part in keys.all_partitions():
            n += int(await r.xlen(part.dlq(stream_name)))
        if n:
            counts[stream_name] = n
    return counts


# --- one page of pending entries (the dashboard's stuck page) ---------------------------------

PAGE_SIZE = 50
# With a batch filter, a page looks at most this many pending rows before it returns what it has
# (and where to go on from): a page costs a bounded number of XPENDING/XRANGE replies.
SCAN_LIMIT = 2000


# The fields of the given entries in one call (one XRANGE each, inside Redis), keeping only
# those whose field values contain ARGV[1] (when it is not empty): a batch filter then costs one
# round trip and a reply of the matches, not one XRANGE reply per pending row. An entry deleted
# meanwhile is returned as [id, false], unless filtering. KEYS: 1 stream; ARGV: 1 needle, ids.
_ENTRIES_LUA = """
local out = {}
for i = 2, #ARGV do
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #e == 0 then
    if ARGV[1] == '' then table.insert(out, {ARGV[i], false}) end
  else
    local f = e[1][2]
    local keep = ARGV[1] == ''
    if not keep then
      for j = 2, #f, 2 do
        if string.find(f[j], ARGV[1], 1, true) then keep = true break end
      end
    end
    if keep then table.insert(out, {ARGV[i], f}) end
  end
end
return out
"""


async def _entries_of(
    r: Any, stream: str, rows: list[dict[str, Any]], needle: str | None
) -> dict[str, dict[bytes, bytes] | None]:
    """Entry id -> fields (None: deleted) of the rows' entries, those mentioning `needle` only."""
    if not rows:
        return {}
    reply = await r.eval(_ENTRIES_LUA, 1, stream, needle or "", *[row["entry_id"] for row in rows])
    out: dict[str, dict[bytes, bytes] | None] = {}
    for item in reply:
        flat = item[1] if len(item) > 1 else None
        out[as_str(item[0])] = dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None
    return out


async def stuck_page(
    r: Any,
    keys: Keys,
    *,
    stream_name: str,
    min_idle_s: float = 0.0,
    consumer: str | None = None,
    batch_id: str | None = None,
    after: str | None = None,
    size: int = PAGE_SIZE,
    partition: int | str | None = None,
) -> dict[str, Any]:
    """One page of the pending entries of `stream_name`'s group idle `min_idle_s` or more,
    oldest entry first from after the entry id `after`, optionally of one consumer (XPENDING's
    own filters) and of one batch (read from each entry). Never lists the whole group: the
    rows come by XPENDING ranges of at most `size` (`SCAN_LIMIT` with a batch filter), and
    `next_after` says where the next page starts (None at the end).

    With several partitions a page is of one: `partition`, else the batch's, else the first;
    `partitions_pending` gives every partition's pending count, to choose from."""
    group = _GROUP_OF.get(stream_name)
    if group is None:
        raise InputError(
            f"no consumer group reads {stream_name!r}: choose one of {list(_GROUP_OF)}"
        )
    if partition in (None, "") and keys.partition is None:
        partition = keys.partition_of(batch_id) if batch_id else 0
    part = one_partition(keys, partition)
    stream = part.stream(stream_name)
    head: dict[str, Any] = {
        "stream": stream_name,
        "group": group,
        "partition": number(part),
        "partitions": keys.partitions,
        "partitions_pending": await _pending_per_partition(r, keys, stream_name, group),
        "min_idle_s": min_idle_s,
        "consumer": consumer,
        "batch_id": batch_id,
        "after": after,
        "size": size,
    }
    if await _group_info(r, stream, group) is None:
        return {
            **head,
            "exists": False,
            "pending": 0,
            "consumers": {},
            "entries": [],
            "next_after": None,
            "scanned": 0,
        }
    summary_reply = await r.xpending(stream, group)
    per_consumer = {
        as_str(c["name"]): int(c["pending"]) for c in (summary_reply or {}).get("consumers") or []
    }
    entries, next_after, scanned = await _page(
        r, part, stream_name, group, min_idle_s, consumer, batch_id, after, size
    )
    return {
        **head,
        "exists": True,
        "pending": int(summary_reply["pending"]) if summary_reply else 0,
        "consumers": per_consumer,
        "entries": entries,
        "next_after": next_after,
        "scanned": scanned,
    }


async def _page(
    r: Any,
    part: Keys,
    stream_name: str,
    group: str,
    min_idle_s: float,
    consumer: str | None,
    batch_id: str | None,
    after: str | None,
    size: int,
) -> tuple[list[dict[str, Any]], str | None, int]:
    """The entries of one page of `stream_name`'s pending entries in partition `part` (see
    `stuck_page`), where the next page starts (None at the end), and the rows scanned."""
    stream = part.stream(stream_name)
    kwargs: dict[str, Any] = {"idle": int(min_idle_s * 1000)}
    if consumer:
        kwargs["consumername"] = consumer
    entries: list[dict[str, Any]] = []
    start = f"({after}" if after else "-"
    scanned = 0
    next_after: str | None = None
    while len(entries) < size and scanned < SCAN_LIMIT:
        want = min(SCAN_LIMIT - scanned, 500) if batch_id else size - len(entries)
        try:
            reply = await r.xpending_range(stream, group, min=start, max="+", count=want, **kwargs)
        except ResponseError as exc:  # a malformed `after`
            raise InputError(f"bad page position {after!r}: {exc}") from exc
        rows: list[dict[str, Any]] = [
            {
                "entry_id": as_str(row["message_id"]),
                "consumer": as_str(row["consumer"]),
                "idle_ms": int(row["time_since_delivered"]),
                "deliveries": int(row["times_delivered"]),
            }
            for row in reply
        ]
        scanned += len(rows)
        found = await _entries_of(r, stream, rows, batch_id)
        for row in rows:
            if row["entry_id"] not in found:
                continue
            row["partition"] = number(part)
            e = _entry_view(stream_name, group, row, found[row["entry_id"]])
            if batch_id and e["batch_id"] != batch_id:
                continue
            entries.append(e)
            if len(entries) == size:
                break
        if len(rows) < want:
            next_after = None
            if len(entries) == size and entries[-1]["entry_id"] != rows[-1]["entry_id"]:
                next_after = entries[-1]["entry_id"]
            break
        next_after = entries[-1]["entry_id"] if len(entries) == size else rows[-1]["entry_id"]
        start = f"({next_after}"
    return entries, next_after, scanned


async def _pending_per_partition(r: Any, keys: Keys, stream_name: str, group: str) -> list[int]:
    out = []
    for part in keys.whole.all_partitions():
        try:
            reply = await r.xpending(part.stream(stream_name), group)
        except ResponseError:  # no stream or no group yet
            reply = None
        out.append(int(reply["pending"]) if reply else 0)
    return out


# --- the cleanup --------------------------------------------------------------------------------


async def reclaim(r: Any, keys: Keys, s: Settings, *, batch_idle_s: float) -> dict[str, Any]:
    """One cleanup pass now, as a worker's reaper does it, plus the stalled batches:
    requests idle past CJS_PROCESSING_TIMEOUT_S are judged again here (or expired after
    CJS_MAX_DELIVERIES), callback entries are applied again (or dead-lettered), and stalled
    batches are finalized or failed. The command's own consumers are removed afterwards."""
    consumer = consumer_name("cjs-stuck")
    lps_actions: list[StuckAction] = []
    cj_actions: list[StuckAction] = []
    views: dict[str, list[dict[str, Any]]] = {"requests": [], "callbacks": []}
    for part in keys.all_partitions():
        lps_done = await _reclaim_requests(r, part, s, consumer)
        cj = cj_consumer(r, part, s, consumer)
        await cj.start()
        cj_done = await cj.reclaim()
        for kind, done in (("requests", lps_done), ("callbacks", cj_done)):
            views[kind] += [{**a.as_dict(), "partition": number(part)} for a in done]
        lps_actions += lps_done
        cj_actions += cj_done
    # A batch whose entries were just reclaimed is not stalled: their callbacks are on the
    # way (applied by the CJ workers), so it is left for a later pass.
    active = {a.batch_id for a in [*lps_actions, *cj_actions] if a.batch_id}
    batches, skipped = await _end_stalled(r, keys, batch_idle_s, active)
    for part in keys.all_partitions():
        for stream_name, group in CONSUMED:
            await prune_consumer(r, part.stream(stream_name), group, consumer, min_idle_ms=0)
    return {
        "requests": views["requests"],
        "callbacks": views["callbacks"],
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


# --- one entry's action (the dashboard's buttons) -------------------------------------------------

# What can be done to one pending entry, per stream: a request can also be expired (it ends as
# RequestExpired + ComparisonFailed(expired), as after CJS_MAX_DELIVERIES); a callback cannot.
ENTRY_ACTIONS: dict[str, tuple[str, ...]] = {
    REQUESTS: ("reclaim", "expire", "dead_letter"),
    CALLBACKS: ("reclaim", "dead_letter"),
}
_GROUP_OF = dict(CONSUMED)


async def pending_row(
    r: Any, keys: Keys, stream_name: str, entry_id: str, partition: int | str | None = None
) -> dict[str, Any]:
    """The pending row (consumer, idle_ms, deliveries) of one entry (of `partition`, see
    `app.partitions.one_partition`); NotFound when not pending."""
    group = _GROUP_OF.get(stream_name)
    if group is None:
        raise InputError(
            f"no consumer group reads {stream_name!r}: choose one of {list(_GROUP_OF)}"
        )
    part = one_partition(keys, partition)
    try:
        rows = await r.xpending_range(
            part.stream(stream_name), group, min=entry_id, max=entry_id, count=1
        )
    except ResponseError as exc:  # a malformed id, or no group yet
        raise InputError(f"{stream_name} {entry_id!r}: {exc}") from exc
    if not rows:
        raise NotFound(f"{stream_name} {entry_id} is not pending (done, or handled meanwhile)")
    row = rows[0]
    return {
        "entry_id": as_str(row["message_id"]),
        "consumer": as_str(row["consumer"]),
        "idle_ms": int(row["time_since_delivered"]),
        "deliveries": int(row["times_delivered"]),
    }


async def act_on_entry(
    r: Any,
    keys: Keys,
    s: Settings,
    *,
    stream_name: str,
    entry_id: str,
    action: str,
    min_idle_s: float = 0.0,
    partition: int | str | None = None,
) -> dict[str, Any]:
    """Do `action` to one pending entry of `partition` (needed with several, see
    `app.partitions.one_partition`) now, if it is still idle `min_idle_s` (what the user saw:
    an entry its consumer took up meanwhile is left alone, Conflict):

    - `reclaim`: hand it to the live workers at once. It moves to the `released` consumer
      marked idle for CJS_PROCESSING_TIMEOUT_S (its delivery count unchanged), so the next
      reaper pass of any live worker of the group claims it and handles it as after a crash:
      no provider call is made from here.
    - `expire` (requests only): end it here as the workers do after CJS_MAX_DELIVERIES:
      RequestExpired + ComparisonFailed(expired) appended with its XACK, so its batch goes on.
    - `dead_letter`: move it to `dlq:<stream>` (reason `manual`) with its XACK, once (one
      script, streams/dlq.py); a valid callback is also parked, for a redrive to apply.

    Returns what was done (the entry, its batch and correlation id, never essay text)."""
    allowed = ENTRY_ACTIONS.get(stream_name)
    if allowed is None:
        raise InputError(
            f"no consumer group reads {stream_name!r}: choose one of {list(_GROUP_OF)}"
        )
    if action not in allowed:
        raise InputError(f"{action!r} is not an action on {stream_name}: one of {list(allowed)}")
    keys = one_partition(keys, partition)
    row = await pending_row(r, keys, stream_name, entry_id)
    group = _GROUP_OF[stream_name]
    stream = keys.stream(stream_name)
    min_idle_ms = int(min_idle_s * 1000)
    fields = await r.xrange(stream, min=entry_id, max=entry_id, count=1)
    about = describe(fields[0][1]) if fields else _unknown(deleted=True)
    done = {
        "stream": stream_name,
        "group": group,
        "partition": number(keys),
        "entry_id": entry_id,
        "action": action,
        "consumer": row["consumer"],
        "idle_s": round(row["idle_ms"] / 1000, 3),
        "deliveries": row["deliveries"],
        "batch_id": about["batch_id"],
        "correlation_id": about["correlation_id"],
    }
    if action == "reclaim":
        handed = await hand_over(
            r,
            stream,
            group,
            [entry_id],
            min_idle_ms=min_idle_ms,
            idle_ms=int(s.processing_timeout_s * 1000),
        )
        if not handed:
            raise Conflict(f"{stream_name} {entry_id} is no longer idle {min_idle_s:g}s")
        return {**done, "handed_to": HANDOFF_CONSUMER}
    if action == "expire" and about["event_type"] != ComparisonRequested.__name__:
        raise InputError(f"{stream_name} {entry_id} holds no request: dead-letter it instead")
    consumer = consumer_name("dashboard")
    try:
        claimed = await claim_ids(r, stream, group, consumer, min_idle_ms, [row])
        if not claimed:
            raise Conflict(f"{stream_name} {entry_id} is no longer idle {min_idle_s:g}s")
        if action == "expire":
            await _expire_request(r, keys, s, consumer, claimed[0])
        else:
            detail = f"dead-lettered by hand after {row['deliveries']} deliveries"
            entry = claimed[0].entry
            # A valid callback is parked, as the CJ consumers park one after
            # CJS_MAX_DELIVERIES: replay leaves it out as the live projection does, and
            # `cjs dlq redrive` (or the dashboard's) applies it in place, once.
            valid = stream_name == CALLBACKS and (
                acceptable(CALLBACKS, entry.fields, entry.entry_id)[0] is not None
            )
            await dead_letter(
                r,
                keys,
                stream_name,
                [(entry, codec.DecodeError("manual", detail))],
                group,
                consumer,
                policy=dead_letter_policy(s),
                park=frozenset({entry.entry_id}) if valid else frozenset(),
            )
    finally:
        await prune_consumer(r, stream, group, consumer, min_idle_ms=0)
    return done


async def _expire_request(r: Any, keys: Keys, s: Settings, consumer: str, claimed: Claimed) -> None:
    event = codec.decode(claimed.entry.fields)
    assert isinstance(event, ComparisonRequested)  # checked before the claim
    lps = lps_worker(r, keys, s, consumer, make_provider)
    await lps.start()
    try:
        await lps.expire([(claimed, event)])
    finally:
        await lps.close()
