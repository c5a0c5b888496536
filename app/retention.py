"""Bounded memory: archive finished batches, then trim the streams below what is still needed.

One pass (`run_pass`), run by the reaper role every CJS_ARCHIVE_INTERVAL_S and by `cjs archive`:

1. **Archive.** A batch finished (finalized or failed) at least `older_than_s` ago and quiet
   (none of its entries pending in, or not yet delivered to, the `lps` and `cj` groups) is
   written with all its events from the four streams to the archive store (app/archive.py),
   then verified: read back, its events counted and hashed, and replayed to exactly the
   projection Redis has for it, byte for byte. Only then, in one MULTI/EXEC under WATCH of the
   batch, its projection shrinks to its manifest (`proj:archived`), and LPS's per-request keys
   of the batch (done markers, Message Batch index) go: none of its requests can come back.
2. **Trim.** Each stream is read from its start, up to the first entry still needed: one of a
   batch not archived, or one the groups still need. An entry of an archived batch is covered
   by its archive (entry ids only grow, so the archive holds every entry of the batch up to
   the last one it records per stream). Entries of no batch (undecodable, or naming a batch
   that was never registered) and entries that came for a batch after its archive are first
   written to a segment file of the archive, and verified. Then `XTRIM MINID`, lowered in the
   same atomic step to every group's oldest pending entry and last-delivered id
   (streams/trim.py).
3. **Dead letters** older than CJS_DLQ_RETENTION_S are written to the archive, then trimmed.

A crash at any point leaves one of: nothing changed (the next pass does it again); a file
without its manifest (written again next time); a manifest whose entries are still in the
streams (trimmed next pass); a segment whose entries are still in the streams (written again,
then trimmed). Nothing is deleted that is not in a verified archive file.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from redis.exceptions import ResponseError, WatchError

from app.archive import (
    ArchiveStore,
    Manifest,
    Record,
    archived_manifests,
    canonical_sha256,
    check_archive,
    collect_many,
    encode_manifest,
    encode_records,
    fold_file,
    gzip_bytes,
    parse_export,
    stream_parts,
)
from app.errors import BadFile
from app.partitions import label
from events.ids import is_numbered
from events.streams import CALLBACKS, CONSUMED, STREAMS
from events.text import as_str
from events.types import BatchRegistered, BundleDispatched, now_iso
from lps import keys as lkeys
from projections import keys as pkeys
from projections.batch import TERMINAL, entry_id_key
from projections.rebuild import diff, expected_of, read_snapshot
from projections.replay import decode_flat, range_start
from projections.store import batch_fields
from streams.dlq import trim_dead_letters
from streams.errors import kind_of, policy_of
from streams.keys import Keys
from streams.paging import next_id, raw_client, read_pages
from streams.resilience import REDIS_ERRORS, sleep_unless
from streams.trim import group_floor, lower, trim_below

log = structlog.get_logger("app.retention")

CHUNK = 16  # batches collected together in one read of each stream
MAX_BATCHES_PER_PASS = 256
DELETE_CHUNK = 1000

Step = Callable[[str], None]
"""Told each step a pass has completed (`batch_written`, `stream_trimmed`, ...): the hook the
crash tests kill the process from."""


def _no_step(_: str) -> None:
    return None


@dataclass
class PassReport:
    """What one pass did (or, with `dry_run`, would do)."""

    dry_run: bool
    archive_url: str
    older_than_s: float
    archived: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    trimmed: dict[str, int] = field(default_factory=dict)
    floors: dict[str, str | None] = field(default_factory=dict)
    blocked: dict[str, dict[str, Any]] = field(default_factory=dict)
    segments: list[dict[str, Any]] = field(default_factory=list)
    dead_letters_trimmed: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "archive_url": self.archive_url,
            "older_than_s": self.older_than_s,
            "archived": self.archived,
            "skipped": self.skipped,
            "trimmed": self.trimmed,
            "floors": self.floors,
            "blocked": self.blocked,
            "segments": self.segments,
            "dead_letters_trimmed": self.dead_letters_trimmed,
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
        }


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def server_ms(r: Any) -> int:
    """The Redis server's clock in milliseconds: the clock entry ids are made of."""
    seconds, micros = await r.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def finished_batches(
    r: Any, keys: Keys, older_than_s: float, *, now: datetime | None = None
) -> list[str]:
    """Batches of the index finished at least `older_than_s` ago, oldest registration first."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=older_than_s)
    out = []
    for b, (status, completed_at) in await batch_fields(r, keys, "status", "completed_at"):
        if status is None or as_str(status) not in TERMINAL:
            continue
        done = _parse_time(as_str(completed_at or b""))
        if done is not None and done <= cutoff:
            out.append(b)
    return out


# --- archiving ----------------------------------------------------------------------------------


async def _still_needed(r: Any, keys: Keys, records: list[Record]) -> str | None:
    """Why the batch whose events are `records` is not quiet yet (None when it is): an entry of
    it pending in, or not yet delivered to, the group consuming its stream."""
    for name, group in CONSUMED:
        ids = [rec.entry_id for rec in records if rec.stream == name]
        if not ids:
            continue
        stream = keys.stream(name)
        try:
            infos = await r.xinfo_groups(stream)
        except ResponseError:
            continue
        info = next((g for g in infos if as_str(g["name"]) == group), None)
        if info is None:
            continue  # no consumer of the stream: nothing of it can still be handled
        delivered = as_str(info["last-delivered-id"])
        if entry_id_key(delivered) < entry_id_key(ids[-1]):
            return f"{name}: entries not yet delivered to group {group}"
        mine = set(ids)
        start = ids[0]
        while True:
            rows = await r.xpending_range(stream, group, min=start, max=ids[-1], count=1000)
            if any(as_str(row["message_id"]) in mine for row in rows):
                return f"{name}: entries pending in group {group}"
            if len(rows) < 1000:
                break
            start = next_id(as_str(rows[-1]["message_id"]))
    # A parked callback waits for `cjs dlq redrive`, which reads it from the stream: archiving
    # the batch first would trim it, and the archive would replay it as applied.
    parked = {as_str(p) for p in await r.hkeys(keys.dlq_parked(CALLBACKS))}
    if parked & {rec.entry_id for rec in records if rec.stream == CALLBACKS}:
        return f"{CALLBACKS}: parked dead letters wait for `cjs dlq redrive`"
    return None


def _request_keys(keys: Keys, batch_id: str, correlation_ids: list[str]) -> list[str]:
    out = [lkeys.answered(keys, batch_id)]
    for cid in correlation_ids:  # Message Batches, and markers of before the answered hash
        out.append(lkeys.message_batch(keys, batch_id, cid))
        if not is_numbered(cid):  # (only random ids of then had one)
            out.append(lkeys.done(keys, cid))
    return out


async def _archive_batch(
    r: Any,
    keys: Keys,
    store: ArchiveStore,
    batch_id: str,
    records: list[Record],
    report: PassReport,
    step: Step,
) -> None:
    if not any(rec.type == "BatchRegistered" for rec in records):
        report.skipped.append({"batch_id": batch_id, "reason": "not registered in the streams"})
        return
    async with r.pipeline(transaction=True) as pipe:
        await pipe.watch(pkeys.batch(keys, batch_id))
        busy = await _still_needed(r, keys, records)
        if busy is not None:
            report.skipped.append({"batch_id": batch_id, "reason": busy})
            return
        snap = await read_snapshot(r, keys, [batch_id])
        live = snap.live.get(batch_id, {})
        data = encode_records(records)
        per = parse_export(data.splitlines(keepends=True), f"batch {batch_id}")
        state = fold_file(per).get(batch_id)
        replayed = expected_of(state, keys)
        _, differences = diff(live, replayed)
        if differences:
            report.skipped.append(
                {
                    "batch_id": batch_id,
                    "reason": f"replay differs from the live projection ({differences} fields);"
                    " see cjs replay",
                }
            )
            return
        assert state is not None
        blob = gzip_bytes(data)
        path = store.batch_path(keys, batch_id)
        manifest = Manifest(
            batch_id=batch_id,
            url=store.url_of(path),
            events=len(records),
            sha256=hashlib.sha256(data).hexdigest(),
            stored_bytes=len(blob),
            streams=stream_parts(per),
            projection_sha256=canonical_sha256(expected_of(state, Keys())),
            status=state.status,
            registered_at=state.registered_at,
            completed_at=state.completed_at,
            archived_at=now_iso(),
        )
        row = {
            "batch_id": batch_id,
            "events": manifest.events,
            "stored_bytes": manifest.stored_bytes,
            "url": manifest.url,
        }
        if report.dry_run:
            report.archived.append(row)
            return
        try:
            await asyncio.to_thread(store.write, path, blob)
            step("batch_written")
            back = await asyncio.to_thread(store.read, path)
            per_back = check_archive(back, manifest)
        except OSError as exc:  # the store: full, forbidden, unreachable
            report.problems.append(f"batch {batch_id}: archive store failed: {exc}")
            return
        except BadFile as exc:
            report.problems.append(f"batch {batch_id}: archive check failed: {exc.message}")
            return
        state_back = fold_file(per_back).get(batch_id)
        if diff(live, expected_of(state_back, keys))[1]:
            report.problems.append(f"batch {batch_id}: the archive read back replays differently")
            return
        step("batch_verified")
        pipe.multi()
        for name in (*pkeys.batch_keys(keys, batch_id), pkeys.batch_range(keys, batch_id)):
            pipe.delete(name)
        pipe.hdel(pkeys.batch_index(keys), batch_id)
        pipe.hset(pkeys.archived_index(keys), batch_id, encode_manifest(manifest))
        request_keys = _request_keys(keys, batch_id, sorted(state.pairs))
        for i in range(0, len(request_keys), DELETE_CHUNK):
            pipe.unlink(*request_keys[i : i + DELETE_CHUNK])
        try:
            await pipe.execute()
        except WatchError:
            report.skipped.append({"batch_id": batch_id, "reason": "changed while archiving"})
            return
    step("batch_committed")
    report.archived.append(row)
    log.info("batch_archived", batch_id=batch_id, events=manifest.events, url=manifest.url)


async def archive_batches(
    r: Any, keys: Keys, store: ArchiveStore, batch_ids: list[str], report: PassReport, step: Step
) -> None:
    """Archive `batch_ids` (finished batches), CHUNK at a time."""
    for i in range(0, len(batch_ids), CHUNK):
        chunk = batch_ids[i : i + CHUNK]
        async with r.pipeline(transaction=False) as pipe:
            for b in chunk:
                pipe.hgetall(pkeys.batch_range(keys, b))
            hints = [{as_str(k): as_str(v) for k, v in h.items()} for h in await pipe.execute()]
        starts: dict[str, str] = {}
        for name in STREAMS:
            first = [range_start(h, name) for h in hints]
            starts[name] = "-" if "-" in first else min(first, key=entry_id_key)
        collected = await collect_many(r, keys, chunk, min_ids=starts)
        step("batches_collected")
        for b in chunk:
            await _archive_batch(r, keys, store, b, collected[b], report, step)


# --- trimming -----------------------------------------------------------------------------------


def _batches_of(event: Any) -> list[str]:
    if isinstance(event, BundleDispatched):
        return list(event.batch_ids)
    batch_id = getattr(event, "batch_id", None)
    return [batch_id] if isinstance(batch_id, str) else []


def _field_value(value: Any) -> Any:
    raw = value if isinstance(value, bytes) else str(value).encode()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


def segment_line(stream_name: str, entry_id: str, flat: list[Any]) -> bytes:
    """An entry kept verbatim: its stream, id and fields (a value that is not UTF-8 as base64)."""
    fields = {as_str(k): _field_value(v) for k, v in zip(flat[::2], flat[1::2], strict=False)}
    line = {"stream": stream_name, "entry_id": entry_id, "fields": fields}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


class _Scan:
    """What the start of one stream holds: how far it is covered by archives, and the entries
    (kept verbatim) that must go to a segment before it is trimmed."""

    def __init__(self) -> None:
        self.floor: str | None = None  # trim below this
        self.first: str | None = None
        self.lines: list[bytes] = []
        self.seg_first = ""
        self.seg_last = ""
        self.blocked: dict[str, Any] | None = None
        self.abort: str | None = None
        self.below = 0  # entries below the floor


async def _scan(
    r: Any,
    keys: Keys,
    name: str,
    *,
    until: str,
    known: set[str],
    manifests: dict[str, Manifest],
) -> _Scan:
    """Read stream `name` from its start up to (not including) `until`, stopping at the first
    entry still needed."""
    out = _Scan()
    raw = raw_client(r)
    exists: dict[str, bool] = {}
    until_key = entry_id_key(until)
    last_seen: str | None = None

    async def is_known(b: str) -> bool:
        if b in known:
            return True
        if b not in exists:
            exists[b] = bool(await r.exists(pkeys.batch(keys, b)))
        return exists[b]

    async for entries in read_pages(raw, keys.stream(name)):
        for raw_id, flat in entries:
            entry_id = as_str(raw_id)
            if out.first is None:
                out.first = entry_id
            if entry_id_key(entry_id) >= until_key:
                out.floor = entry_id
                out.blocked = {
                    "entry_id": entry_id,
                    "reason": "needed by a consumer group, or appended after the pass began",
                }
                return out
            event, _ = decode_flat(flat)
            owners = _batches_of(event) if event is not None else []
            # Covered: every batch the entry names has it in its archive (entry ids only grow,
            # so an archive holds every entry of its batch up to the last it records).
            covered = bool(owners)
            for b in owners:
                manifest = manifests.get(b)
                if manifest is not None:
                    part = manifest.streams.get(name)
                    if part is None or entry_id_key(entry_id) > entry_id_key(part.last):
                        covered = False  # came after the archive: kept in a segment
                    continue
                if await is_known(b):
                    out.floor = entry_id
                    out.blocked = {
                        "entry_id": entry_id,
                        "batch_id": b,
                        "reason": "batch not archived yet",
                    }
                    return out
                if isinstance(event, BatchRegistered):
                    # Every registered batch has a projection or a manifest: this one has
                    # neither, so the projections were lost. Trim nothing before a rebuild.
                    out.abort = (
                        f"{name} registers batch {b!r} at {entry_id}, which has neither a "
                        "projection nor an archive: the projections look lost; run "
                        "`cjs replay --all --rebuild` before archiving"
                    )
                    return out
                covered = False  # a batch never registered: kept in a segment
            if not covered:
                if not out.lines:
                    out.seg_first = entry_id
                out.seg_last = entry_id
                out.lines.append(segment_line(name, entry_id, flat))
            last_seen = entry_id
            out.below += 1
    if last_seen is not None:
        out.floor = next_id(last_seen)
    return out


async def _write_segment(
    store: ArchiveStore,
    keys: Keys,
    kind: str,
    stream_name: str,
    first: str,
    last: str,
    lines: list[bytes],
    report: PassReport,
) -> bool:
    """Write entries kept verbatim to a segment file and verify it; False when it failed."""
    data = b"".join(lines)
    path = store.segment_path(keys, kind, stream_name, first, last)
    try:
        await asyncio.to_thread(store.write, path, gzip_bytes(data))
        back = await asyncio.to_thread(store.read, path)
    except OSError as exc:  # the store: full, forbidden, unreachable
        report.problems.append(f"segment {store.url_of(path)}: archive store failed: {exc}")
        return False
    try:
        ok = gzip.decompress(back) == data and len(data.splitlines()) == len(lines)
    except (OSError, EOFError):
        ok = False
    if not ok:
        report.problems.append(f"segment {store.url_of(path)} did not read back as written")
        return False
    report.segments.append(
        {"kind": kind, "stream": stream_name, "entries": len(lines), "url": store.url_of(path)}
    )
    return True


async def trim_streams(
    r: Any, keys: Keys, store: ArchiveStore, report: PassReport, step: Step
) -> None:
    """Trim each stream below the oldest entry still needed (see the module docstring)."""
    async with r.pipeline(transaction=True) as pipe:
        pipe.hkeys(pkeys.batch_index(keys))
        for name in STREAMS:
            pipe.xrevrange(keys.stream(name), max="+", min="-", count=1)
        replies = await pipe.execute()
    # Entries appended after this instant are left for the next pass: a batch registered
    # meanwhile is not in `known`, but every entry of it comes after its registration.
    known = {as_str(b) for b in replies[0]}
    manifests = await archived_manifests(r, keys)
    scans: dict[str, _Scan] = {}
    for name, last in zip(STREAMS, replies[1:], strict=True):
        if not last:
            report.floors[label(keys, name)] = None
            continue
        stream = keys.stream(name)
        until = next_id(as_str(last[0][0]))
        until = lower(until, await group_floor(r, stream)) or until
        scan = await _scan(r, keys, name, until=until, known=known, manifests=manifests)
        if scan.abort is not None:
            report.problems.append(scan.abort)
            log.error("trim_aborted", reason=scan.abort)
            return
        scans[name] = scan
    for name, scan in scans.items():
        # A partition's floors are its own; the trimmed counts add up per stream.
        where = label(keys, name)
        report.floors[where] = scan.floor
        report.trimmed.setdefault(name, 0)
        if scan.blocked is not None:
            report.blocked[where] = scan.blocked
        if scan.floor is None or scan.floor == scan.first:
            continue
        if report.dry_run:
            report.trimmed[name] += scan.below  # would be trimmed (less any a group holds)
            continue
        if scan.lines:
            ok = await _write_segment(
                store, keys, "segments", where, scan.seg_first, scan.seg_last, scan.lines, report
            )
            if not ok:
                continue
            step("segment_written")
        deleted, used = await trim_below(r, keys.stream(name), scan.floor)
        report.trimmed[name] += deleted
        report.floors[where] = used
        step("stream_trimmed")
        if deleted:
            log.info("stream_trimmed", stream=name, deleted=deleted, floor=used)


async def expire_dead_letters(
    r: Any,
    keys: Keys,
    store: ArchiveStore,
    retention_s: float,
    report: PassReport,
    step: Step,
) -> None:
    """Dead letters older than `retention_s`: written to the archive, then deleted."""
    now_ms = await server_ms(r)
    cutoff_ms = max(0, now_ms - int(retention_s * 1000))
    below = f"{cutoff_ms - 1}-18446744073709551615" if cutoff_ms else None
    raw = raw_client(r)
    for name in STREAMS:
        if below is None:
            break
        lines: list[bytes] = []
        first = last = ""
        async for entries in read_pages(raw, keys.dlq(name), max_id=below):
            for raw_id, flat in entries:
                entry_id = as_str(raw_id)
                first = first or entry_id
                last = entry_id
                lines.append(segment_line(f"dlq:{name}", entry_id, flat))
        if not lines:
            continue
        if report.dry_run:
            shown = report.dead_letters_trimmed
            shown[name] = shown.get(name, 0) + len(lines)
            continue
        ok = await _write_segment(
            store, keys, "dead-letters", label(keys, f"dlq:{name}"), first, last, lines, report
        )
        if not ok:
            return
        step("dead_letters_written")
    if report.dry_run:
        return
    trimmed = await trim_dead_letters(r, keys, older_than_s=retention_s, now_ms=now_ms)
    for name, n in trimmed.items():
        if n:
            report.dead_letters_trimmed[name] = report.dead_letters_trimmed.get(name, 0) + n
    step("dead_letters_trimmed")


async def run_pass(
    r: Any,
    keys: Keys,
    store: ArchiveStore,
    *,
    older_than_s: float,
    dlq_retention_s: float,
    dry_run: bool = False,
    step: Step = _no_step,
    max_batches: int = MAX_BATCHES_PER_PASS,
) -> PassReport:
    """One pass: archive what is due, trim the streams, expire old dead letters; in each
    partition of the namespace in turn (each partition's streams, index and archived
    batches are its own; at most `max_batches` archived in all)."""
    started = time.perf_counter()
    report = PassReport(dry_run=dry_run, archive_url=store.url, older_than_s=older_than_s)
    for part in keys.all_partitions():
        room = max_batches - len(report.archived)
        due = (await finished_batches(r, part, older_than_s))[:room] if room > 0 else []
        await archive_batches(r, part, store, due, report, step)
        await trim_streams(r, part, store, report, step)
        await expire_dead_letters(r, part, store, dlq_retention_s, report, step)
    report.seconds = time.perf_counter() - started
    if report.archived or any(report.trimmed.values()) or report.problems:
        log.info(
            "archive_pass",
            dry_run=dry_run,
            archived=len(report.archived),
            skipped=len(report.skipped),
            trimmed=report.trimmed,
            problems=report.problems,
            seconds=round(report.seconds, 3),
        )
    return report


async def run_archiver(
    r: Any,
    keys: Keys,
    store: ArchiveStore,
    stop: asyncio.Event,
    *,
    older_than_s: float,
    dlq_retention_s: float,
    every_s: float,
) -> None:
    """The archiving part of the `reaper` worker role: a pass every `every_s` until `stop`.
    Safe beside another archiver: a batch is committed under WATCH, trimming is idempotent."""
    while not stop.is_set():
        backlog = False
        try:
            report = await run_pass(
                r, keys, store, older_than_s=older_than_s, dlq_retention_s=dlq_retention_s
            )
            # A pass archives at most MAX_BATCHES_PER_PASS: a backlog goes on at once.
            backlog = len(report.archived) >= MAX_BATCHES_PER_PASS
        except REDIS_ERRORS as exc:
            if policy_of(exc) is None:
                log.exception("archiver_error")
            else:
                log.warning(
                    "archiver_redis_unavailable", error_kind=kind_of(exc), error=str(exc)[:200]
                )
        except Exception:  # a bug, or the store unreachable: try again at the next pass
            log.exception("archiver_error")
        if not backlog:
            await sleep_unless(stop, every_s)
