"""The export file: a batch's events as JSON lines (`cjs export`), and loading one into a
namespace (`cjs import`, `cjs validate --runs`).

A line is `{"type", "stream", "entry_id", "data"}`; `stream` is the stream's name without the key
prefix, `data` the event exactly as stored (the entry's JSON, spliced in byte for byte). Lines are
in entry-id order across the four streams. Import appends the events with their original entry
ids where the target streams allow it (each stream must end before the file's first id), so the
order replay depends on is the recorded one; otherwise Redis assigns new ids in the same order.
"""

from __future__ import annotations

import gzip
import heapq
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
from redis.exceptions import ResponseError, WatchError

from app.errors import BadFile, Conflict, NotFound
from app.replay import rebuild
from events import codec
from events.ids import event_id_problem
from events.streams import CALLBACKS, CJ_GROUP, LPS_GROUP, REQUESTS, STREAMS
from events.text import as_str
from events.types import EVENT_TYPES, BatchRegistered, BundleDispatched, Event
from projections import keys as pkeys
from projections.batch import entry_id_key
from projections.replay import decode_flat
from streams.keys import Keys
from streams.paging import raw_client, read_pages

IMPORT_TRIES = 5
GROUPS = {REQUESTS: LPS_GROUP, CALLBACKS: CJ_GROUP}
_ENTRY_ID = re.compile(r"^\d+-\d+$")

# Told after each page read: entries read, from which stream, the batch's events found so far.
Progress = Callable[[int, str, int], None]
# A file's events per stream: (entry id, type name, data as stored, event).
PerStream = dict[str, list[tuple[str, str, bytes, Event]]]


def belongs(event: Event, batch_id: str) -> bool:
    if isinstance(event, BundleDispatched):
        return batch_id in event.batch_ids
    return getattr(event, "batch_id", None) == batch_id


@dataclass(order=True)
class Record:
    key: tuple[int, int, int]
    stream: str = field(compare=False)
    entry_id: str = field(compare=False)
    type: str = field(compare=False)
    data: bytes = field(compare=False)

    def line(self) -> bytes:
        head = json.dumps({"type": self.type, "stream": self.stream, "entry_id": self.entry_id})
        return head[:-1].encode() + b', "data": ' + self.data + b"}\n"


async def collect(
    r: Any, keys: Keys, batch_id: str, progress: Progress | None = None
) -> list[Record]:
    """Every decodable event of `batch_id` in the four streams, in entry-id order."""
    needle = batch_id.encode()
    raw = raw_client(r)
    per_stream: list[list[Record]] = []
    found = 0
    for rank, name in enumerate(STREAMS):
        records: list[Record] = []
        async for entries in read_pages(raw, keys.stream(name)):
            for raw_id, flat in entries:
                data = flat[3] if len(flat) == 4 and flat[2] == b"data" else None
                if data is not None and needle not in data:
                    continue
                event, data = decode_flat(flat)
                if event is None or not belongs(event, batch_id):
                    continue
                entry_id = as_str(raw_id)
                ms, seq = entry_id_key(entry_id)
                data_bytes = data if isinstance(data, bytes) else str(data).encode()
                records.append(
                    Record((ms, seq, rank), name, entry_id, type(event).__name__, data_bytes)
                )
            if progress is not None:
                progress(len(entries), name, found + len(records))
        found += len(records)
        per_stream.append(records)
    return list(heapq.merge(*per_stream))


async def batch_records(
    r: Any, keys: Keys, batch_id: str, progress: Progress | None = None
) -> list[Record]:
    """`collect`, for a batch the streams must register (NotFound otherwise)."""
    records = await collect(r, keys, batch_id, progress)
    if not any(rec.type == "BatchRegistered" for rec in records):
        raise NotFound(f"no batch {batch_id!r} in the streams under prefix {keys.prefix!r}")
    return records


def check_output(path: str) -> None:
    """BadFile at once, before any work, when `path` cannot be written (- is stdout)."""
    if path == "-":
        return
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise BadFile(f"cannot write {path}: it is a directory")
    if not parent.is_dir():
        raise BadFile(f"cannot write {path}: there is no directory {parent}")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise BadFile(f"cannot write {path}: permission denied")


def write(records: list[Record], path: str) -> None:
    """The export file at `path` (gzip-compressed when it ends in .gz; - is stdout)."""
    try:
        out = _open_out(path)
        try:
            for rec in records:
                out.write(rec.line())
        finally:
            if out is not sys.stdout.buffer:
                out.close()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise BadFile(f"cannot write {path}: {exc.strerror or exc}") from exc


def _open_out(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdout.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "wb")  # type: ignore[return-value]
    return open(path, "wb")


class Line(msgspec.Struct):
    type: str
    stream: str
    entry_id: str
    data: msgspec.Raw


_line = msgspec.json.Decoder(Line)


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as probe:
        gz = probe.read(2) == b"\x1f\x8b"
    opener: Any = gzip.open if gz else open
    with opener(path, "rb") as fh:
        yield from fh


def read_export(path: Path) -> PerStream:
    """The file's events per stream, validated: (entry id, type, data, event)."""
    per: PerStream = {name: [] for name in STREAMS}
    try:
        lines = list(_lines(path))
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        if isinstance(exc, EOFError | zlib.error):
            why = f"corrupt or truncated gzip data ({exc})"
        raise BadFile(f"cannot read {path}: {why}") from exc
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = _line.decode(text)
        except msgspec.DecodeError as exc:
            raise BadFile(f"{path}:{number}: not an export line: {exc}") from exc
        if line.stream not in per:
            raise BadFile(f"{path}:{number}: unknown stream {line.stream!r}")
        if not _ENTRY_ID.match(line.entry_id):
            raise BadFile(f"{path}:{number}: bad entry id {line.entry_id!r}")
        if line.type not in EVENT_TYPES:
            raise BadFile(f"{path}:{number}: unknown event type {line.type!r}")
        data = bytes(line.data)
        try:
            event = codec.decode({"type": line.type.encode(), "data": data})
        except codec.DecodeError as exc:
            raise BadFile(f"{path}:{number}: {exc}") from exc
        problem = event_id_problem(event)
        if problem:  # ids become keys: never import one outside the grammar (events/ids.py)
            raise BadFile(f"{path}:{number}: {problem}")
        rows = per[line.stream]
        if rows and entry_id_key(line.entry_id) <= entry_id_key(rows[-1][0]):
            raise BadFile(f"{path}:{number}: entry ids of {line.stream} are not increasing")
        rows.append((line.entry_id, line.type, data, event))
    return per


async def _holds_batch(r: Any, keys: Keys, batch_id: str) -> bool:
    if await r.exists(pkeys.batch(keys, batch_id)) or await r.hexists(
        pkeys.batch_index(keys), batch_id
    ):
        return True
    needle = batch_id.encode()
    async for entries in read_pages(raw_client(r), keys.batches):
        for _, flat in entries:
            data = flat[3] if len(flat) == 4 else b""
            if needle in data:
                event, _ = decode_flat(flat)
                if isinstance(event, BatchRegistered) and event.batch_id == batch_id:
                    return True
    return False


async def load(r: Any, keys: Keys, per: PerStream) -> dict[str, Any]:
    """Append the events (original ids where possible) and move every consumer group of the
    target streams past them, in one MULTI/EXEC; then rebuild the imported batches."""
    batch_ids = [e.batch_id for _, _, _, e in per[STREAMS[0]] if isinstance(e, BatchRegistered)]
    if not batch_ids:
        raise BadFile("the file holds no BatchRegistered event: nothing to import")
    for b in batch_ids:
        if await _holds_batch(r, keys, b):
            raise Conflict(
                f"prefix {keys.prefix!r} already holds batch {b!r}; refusing to import it twice "
                "(import into another --prefix, or delete that namespace first)"
            )
    for attempt in range(1, IMPORT_TRIES + 1):
        async with r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*(keys.stream(name) for name in STREAMS))
                preserved, groups = await _targets(pipe, keys, per)
                pipe.multi()
                _queue_append(pipe, keys, per, preserved, groups)
                await pipe.execute()
            except WatchError:
                continue
        done = await rebuild(r, keys, batch_ids)
        return {
            "batches": batch_ids,
            "ids_preserved": preserved,
            "attempts": attempt,
            "events_replayed": done["result"].events,
        }
    raise Conflict(f"the target streams kept changing during {IMPORT_TRIES} attempts")


async def _targets(
    pipe: Any, keys: Keys, per: PerStream
) -> tuple[dict[str, bool], dict[str, list[str]]]:
    """Per target stream (read under WATCH): whether the file's entry ids can be kept (the
    stream ends before them), and its consumer groups, each of which must have read it all."""
    preserved: dict[str, bool] = {}
    groups: dict[str, list[str]] = {}
    for name in STREAMS:
        stream = keys.stream(name)
        last = await pipe.xrevrange(stream, max="+", min="-", count=1)
        last_id = as_str(last[0][0]) if last else None
        rows = per[name]
        preserved[name] = (
            not rows or last_id is None or entry_id_key(last_id) < entry_id_key(rows[0][0])
        )
        try:
            infos = await pipe.xinfo_groups(stream)
        except ResponseError:
            infos = []
        groups[name] = []
        for info in infos:
            group = as_str(info["name"])
            delivered = as_str(info["last-delivered-id"])
            if last_id is not None and entry_id_key(delivered) < entry_id_key(last_id):
                raise Conflict(
                    f"group {group!r} of {stream} has not read every entry yet; importing now "
                    "would hand it the imported events too. Let the consumers catch up, or "
                    "import into a fresh --prefix"
                )
            groups[name].append(group)
    return preserved, groups


def _queue_append(
    pipe: Any,
    keys: Keys,
    per: PerStream,
    preserved: dict[str, bool],
    groups: dict[str, list[str]],
) -> None:
    """The file's events appended, and every group of the target moved past them (created
    for the streams the services consume)."""
    for name in STREAMS:
        stream = keys.stream(name)
        for entry_id, type_name, data, _ in per[name]:
            pipe.xadd(
                stream, {"type": type_name, "data": data}, id=entry_id if preserved[name] else "*"
            )
        for group in groups[name]:
            pipe.xgroup_setid(stream, group, id="$")
        if name in GROUPS and GROUPS[name] not in groups[name]:
            pipe.xgroup_create(stream, GROUPS[name], id="$", mkstream=True)
