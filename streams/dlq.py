"""Dead letters: entries a consumer could not use, moved to `dlq:<stream>` with the reason.

A move is one Lua script: the source entry's XACK and, only if that XACK acknowledged it, the
dead-letter XADD. So an entry is dead-lettered exactly once, whoever tries and however often
(a reclaimer racing the consumer that read it, a client re-sending a call after a timeout).

A letter is bounded: it holds at most `max_entry_bytes` of the original fields (as JSON,
truncated beyond that, `truncated=1`), their size in bytes (`fields_bytes`) and a SHA-256
(`fields_sha256`, over each field name and value, each preceded by its length as 8 bytes
big-endian, in entry order). The full entry stays in its source stream (XACK deletes
nothing), which is where a redrive reads it from. The dead-letter stream keeps at most
`maxlen` letters (approximately) and, when `retention_s` is set, none older (the services
leave it at 0: app/retention.py archives old letters before it trims them).

An entry that was valid but could not be handled in time (reason `max_deliveries` on
`cj:callbacks`) is also *parked* (`Keys.dlq_parked`: entry id -> letter id): acknowledged but
not applied, so that replay leaves it out as the live projection does, until `cjs dlq redrive`
applies it (app/dlq.py). Parking does not expire with the letter.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from events.clock import entry_iso
from events.codec import DecodeError, stated_type
from events.redact import scrub
from events.streams import STREAMS, dlq_name
from events.text import as_str
from streams.keys import Keys
from streams.metrics import DEAD_LETTERED
from streams.reader import Entry

log = structlog.get_logger("streams.dlq")


@dataclass(frozen=True)
class DeadLetterPolicy:
    """How much a dead letter may hold, and how long letters are kept."""

    max_entry_bytes: int = 4096
    maxlen: int = 100_000
    retention_s: float = 30 * 24 * 3600.0


DEFAULT_POLICY = DeadLetterPolicy()

# A page of letters in one call (one round trip on every engine: a cluster pipeline cannot
# load a script, and the four keys share the stream's slot).
# KEYS: 1 source stream, 2 dead-letter stream, 3 the group's handled set, 4 the parked hash
# ARGV: 1 group, 2 maxlen, 3 retention ms (0: none), then per letter: its entry id, park
#       ('1' or '0'), the number n of its field arguments, and those n (name, value, ...)
# Returns per letter its id, or '' when this call did not acknowledge the entry (someone
# else dead-lettered or applied it, or it was handled before its group was recreated).
_DEAD_LETTER_LUA = """
local out, i, wrote = {}, 4, false
while i <= #ARGV do
  local entry, park, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local first, last = i + 3, i + 2 + n
  i = last + 1
  local id = ''
  if redis.call('XACK', KEYS[1], ARGV[1], entry) == 1 then
    local ms = tonumber(string.match(entry, '^(%d+)'))
    if redis.call('ZADD', KEYS[3], 'NX', ms, entry) == 1 then
      id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, first, last))
      wrote = true
      if park == '1' then redis.call('HSET', KEYS[4], entry, id) end
    end
  end
  out[#out + 1] = id
end
if wrote and tonumber(ARGV[3]) > 0 then
  local now = redis.call('TIME')
  local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[3])
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%.0f', cutoff))
end
return out
"""

# A dead letter taken out of the dead-letter stream once: re-appended to its source stream
# (`reappend`) or parked for an apply in place (`adopt`). KEYS: 1 dead-letter stream,
# 2 source stream or parked hash; ARGV: 1 letter id, then fields (reappend) or the entry id.
_REAPPEND_LUA = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
return redis.call('XADD', KEYS[2], '*', unpack(fields))
"""
_ADOPT_LUA = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


def fields_digest(fields: Mapping[Any, Any]) -> tuple[int, str]:
    """The size in bytes and the SHA-256 of an entry's fields (see the module's docstring)."""
    digest = hashlib.sha256()
    size = 0
    for name, value in fields.items():
        for part in (name, value):
            raw = part if isinstance(part, bytes) else str(part).encode()
            digest.update(len(raw).to_bytes(8, "big"))
            digest.update(raw)
            size += len(raw)
    return size, digest.hexdigest()


def bounded_fields(fields: Mapping[Any, Any], cap: int) -> tuple[str, bool]:
    """The fields as JSON, at most `cap` characters (each value cut to `cap` bytes before it
    is encoded, so a huge entry is never copied whole), and whether anything was cut."""
    cut = False
    shown: dict[str, str] = {}
    for name, value in fields.items():
        raw = value if isinstance(value, bytes) else str(value).encode()
        if len(raw) > cap:
            raw, cut = raw[:cap], True
        shown[scrub(as_str(name)[:cap])] = scrub(as_str(raw))
    text = json.dumps(shown)
    if len(text) > cap:
        text, cut = text[:cap], True
    return text, cut


def dead_letter_fields(
    stream_name: str,
    entry: Entry,
    error: DecodeError,
    group: str,
    consumer: str,
    policy: DeadLetterPolicy = DEFAULT_POLICY,
) -> dict[str, str]:
    size, sha = fields_digest(entry.fields)
    text, cut = bounded_fields(entry.fields, policy.max_entry_bytes)
    return {
        "reason": error.reason,
        "detail": scrub(error.detail[:500]),
        "source_stream": stream_name,
        "source_id": entry.entry_id,
        "group": group,
        "consumer": consumer,
        "fields": text,
        "fields_bytes": str(size),
        "fields_sha256": sha,
        "truncated": "1" if cut else "0",
    }


async def dead_letter(
    r: Any,
    keys: Keys,
    stream_name: str,
    letters: list[tuple[Entry, DecodeError]],
    group: str,
    consumer: str,
    *,
    policy: DeadLetterPolicy = DEFAULT_POLICY,
    park: frozenset[str] = frozenset(),
) -> list[str | None]:
    """Move `letters` to the DLQ of `stream_name` (one script call, one round trip);
    entries whose id is in `park` are also parked for a redrive. Returns each letter's id,
    None for an entry this call did not dead-letter (someone else had)."""
    if not letters:
        return []
    script = r.register_script(_DEAD_LETTER_LUA)
    stream = keys.stream(stream_name)
    script_keys = [
        stream,
        keys.dlq(stream_name),
        keys.group_handled(stream_name, group),
        keys.dlq_parked(stream_name),
    ]
    args: list[Any] = [group, policy.maxlen, int(policy.retention_s * 1000)]
    for entry, error in letters:
        fields = dead_letter_fields(stream_name, entry, error, group, consumer, policy)
        args += [entry.entry_id, "1" if entry.entry_id in park else "0", 2 * len(fields)]
        for pair in fields.items():
            args += pair
    replies = await script(keys=script_keys, args=args)
    ids = [as_str(i) if i else None for i in replies]
    written = [(e, err) for (e, err), i in zip(letters, ids, strict=True) if i is not None]
    reasons = Counter(err.reason for _, err in written)
    for reason, n in reasons.items():
        DEAD_LETTERED.labels(stream_name, reason).inc(n)
    if written:
        log.warning(
            "dead_lettered",
            stream=stream_name,
            count=len(written),
            reasons=dict(reasons),
            parked=sum(1 for e, _ in written if e.entry_id in park),
            entry_ids=[e.entry_id for e, _ in written[:10]],
            detail=written[0][1].detail[:200],
        )
    return ids


def letter_view(dlq_stream: str, entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    """One dead letter as stored, its original fields parsed back when they are whole JSON."""
    f = {as_str(k): as_str(v) for k, v in fields.items()}
    try:
        original: Any = json.loads(f.get("fields", "{}"))
    except json.JSONDecodeError:
        original = f.get("fields")
    letter_id = as_str(entry_id)
    return {
        "dlq_stream": dlq_stream,
        "entry_id": letter_id,
        "source_stream": f.get("source_stream"),
        "source_id": f.get("source_id"),
        "reason": f.get("reason"),
        "detail": f.get("detail"),
        "group": f.get("group"),
        "consumer": f.get("consumer"),
        # Letters written since the hardening carry no `at`: their id is the server's time.
        "at": f.get("at") or entry_iso(letter_id),
        "fields": original,
        # What the entry says it is (`type`, or a flat entry's first field), for a listing.
        "event_type": stated_type(original) if isinstance(original, dict) else None,
        "fields_bytes": int(f["fields_bytes"]) if "fields_bytes" in f else None,
        "fields_sha256": f.get("fields_sha256"),
        "truncated": f.get("truncated") == "1",
    }


async def read_dead_letters(
    r: Any, keys: Keys, *, stream: str | None = None, limit: int = 100
) -> dict[str, Any]:
    """Dead letters of every stream (or of `stream`, named without prefix), newest first, up to
    `limit` per stream, with the count per stream and per reason of those shown, and how many
    valid entries are parked for a redrive. Over every partition of a namespace-wide `keys`:
    each letter says its `partition`."""
    names = [stream] if stream else list(STREAMS)
    counts: dict[str, int] = {}
    parked: dict[str, int] = {}
    letters: list[dict[str, Any]] = []
    for name in names:
        counts[name] = 0
        found: list[dict[str, Any]] = []
        for part in keys.all_partitions():
            dlq = part.dlq(name)
            n = int(await r.xlen(dlq))
            counts[name] += n
            held = int(await r.hlen(part.dlq_parked(name)))
            if held:
                parked[name] = parked.get(name, 0) + held
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
        "parked": parked,
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


# --- redrive (the generic part; app/dlq.py decides what each letter becomes) -----------------


async def all_letters(r: Any, keys: Keys, stream_name: str) -> list[tuple[str, dict[str, str]]]:
    """Every dead letter of `stream_name`, oldest first: (letter id, its fields)."""
    out = []
    start = "-"
    while True:
        page = await r.xrange(keys.dlq(stream_name), min=start, max="+", count=1000)
        for letter_id, fields in page:
            out.append((as_str(letter_id), {as_str(k): as_str(v) for k, v in fields.items()}))
        if len(page) < 1000:
            return out
        start = "(" + out[-1][0]


async def parked(r: Any, keys: Keys, stream_name: str) -> dict[str, str]:
    """Entry id -> letter id of the parked entries of `stream_name`."""
    raw = await r.hgetall(keys.dlq_parked(stream_name))
    return {as_str(k): as_str(v) for k, v in raw.items()}


async def source_fields(r: Any, keys: Keys, stream_name: str, entry_id: str) -> Any:
    """The fields of entry `entry_id` of `stream_name`, None when it no longer exists."""
    hit = await r.xrange(keys.stream(stream_name), min=entry_id, max=entry_id, count=1)
    return hit[0][1] if hit else None


async def reappend(
    r: Any, keys: Keys, stream_name: str, letter_id: str, fields: Mapping[Any, Any]
) -> str | None:
    """Take the letter out of the dead letters and append `fields` to the source stream as a
    new entry, once (None: another redrive took the letter first)."""
    args = [letter_id, *(x for pair in fields.items() for x in pair)]
    new_id = await r.eval(_REAPPEND_LUA, 2, keys.dlq(stream_name), keys.stream(stream_name), *args)
    return as_str(new_id) if new_id else None


async def adopt(r: Any, keys: Keys, stream_name: str, letter_id: str, entry_id: str) -> bool:
    """Park a letter written before parking existed (a valid entry dead-lettered as
    `max_deliveries`): out of the dead letters, into the parked hash, once."""
    done = await r.eval(
        _ADOPT_LUA, 2, keys.dlq(stream_name), keys.dlq_parked(stream_name), letter_id, entry_id
    )
    return int(done) == 1


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
