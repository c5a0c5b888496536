"""The export file: a batch's events as JSON lines (`cjs export`), and loading one into a
namespace (`cjs import`, `cjs validate --runs`).

A line is `{"type", "stream", "entry_id", "data"}`; `stream` is the stream's name without the key
prefix, `data` the event exactly as stored (the entry's JSON, spliced in byte for byte; of a
flat entry, the JSON its fields make, events/codec.py, as every reader decodes it). Lines are
in entry-id order across the four streams. Import appends the events with their original entry
ids where the target streams allow it (each stream must end before the file's first id), so the
order replay depends on is the recorded one; otherwise Redis assigns new ids in the same order.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import heapq
import json
import os
import re
import sys
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import msgspec
from redis.exceptions import ResponseError, WatchError

from app.errors import BadFile, ConfigError, Conflict, NotFound
from app.rebuild import rebuild
from app.settings import Settings
from events import codec
from events.ids import event_id_problem
from events.streams import BATCHES, CALLBACKS, CJ_GROUP, LPS_GROUP, REQUESTS, STREAMS
from events.text import as_str
from events.types import EVENT_TYPES, BatchRegistered, BundleDispatched, Event
from projections import keys as pkeys
from projections.batch import BatchState, entry_id_key
from projections.replay import decode_flat, fold, mentions
from streams.keys import Keys
from streams.paging import raw_client, read_pages

IMPORT_TRIES = 5
GROUPS = {REQUESTS: LPS_GROUP, CALLBACKS: CJ_GROUP}
_ENTRY_ID = re.compile(r"^\d+-\d+$")

# Told after each page read: entries read, from which stream, the batch's events found so far.
Progress = Callable[[int, str, int], None]
# A file's events per stream: (entry id, type name, data as stored, event).
PerStream = dict[str, list[tuple[str, str, bytes, Event]]]


def by_partition(keys: Keys, batch_ids: Iterable[str]) -> dict[Keys, list[str]]:
    """`batch_ids` grouped by the partition holding them, in their order."""
    out: dict[Keys, list[str]] = {}
    for b in batch_ids:
        out.setdefault(keys.for_batch(b), []).append(b)
    return out


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
    return (await collect_many(r, keys, [batch_id], progress=progress))[batch_id]


async def collect_many(
    r: Any,
    keys: Keys,
    batch_ids: list[str],
    *,
    min_ids: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> dict[str, list[Record]]:
    """Every decodable event of each of `batch_ids` in the four streams, in entry-id order, read
    in one pass over each stream from `min_ids[stream]` (its start when not given): the
    streams of the batches' partition (one pass per partition they are in)."""
    groups = by_partition(keys, batch_ids)
    if len(groups) > 1:
        out: dict[str, list[Record]] = {}
        for part, ids in groups.items():
            out.update(await collect_many(r, part, ids, min_ids=min_ids, progress=progress))
        return out
    if groups:
        keys = next(iter(groups))
    # The id raw (a flat entry's `batch_id`) and as it appears inside the stored JSON (escaped
    # where JSON escapes), so that the byte filter never skips an entry of the batch.
    needles = [(b, [b.encode()], [msgspec.json.encode(b)[1:-1]]) for b in batch_ids]
    raw = raw_client(r)
    per_batch: dict[str, list[list[Record]]] = {b: [] for b in batch_ids}
    found = 0
    for rank, name in enumerate(STREAMS):
        records: dict[str, list[Record]] = {b: [] for b in batch_ids}
        start = (min_ids or {}).get(name, "-")
        async for entries in read_pages(raw, keys.stream(name), min_id=start):
            for raw_id, flat in entries:
                wanted = [b for b, plain, n in needles if mentions(flat, plain, n)]
                if not wanted:
                    continue
                event, data = decode_flat(flat)
                if event is None:
                    continue
                owners = [b for b in wanted if belongs(event, b)]
                if not owners:
                    continue
                entry_id = as_str(raw_id)
                ms, seq = entry_id_key(entry_id)
                data_bytes = data if isinstance(data, bytes) else str(data).encode()
                record = Record((ms, seq, rank), name, entry_id, type(event).__name__, data_bytes)
                for b in owners:
                    records[b].append(record)
                    found += 1
            if progress is not None:
                progress(len(entries), name, found)
        for b in batch_ids:
            per_batch[b].append(records[b])
    return {b: list(heapq.merge(*streams)) for b, streams in per_batch.items()}


async def batch_records(
    r: Any,
    keys: Keys,
    batch_id: str,
    progress: Progress | None = None,
    archive_options: Mapping[str, Any] | None = None,
) -> list[Record]:
    """`collect`, for a batch the streams must register (NotFound otherwise); an archived
    batch's events come from its archive."""
    manifest = await archived_manifest(r, keys, batch_id)
    if manifest is not None:
        return records_of(await read_archived(manifest, archive_options))
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
    try:
        lines = list(_lines(path))
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        if isinstance(exc, EOFError | zlib.error):
            why = f"corrupt or truncated gzip data ({exc})"
        raise BadFile(f"cannot read {path}: {why}") from exc
    return parse_export(lines, str(path))


def parse_export(lines: Iterable[bytes], path: str) -> PerStream:
    """Export lines per stream, validated: (entry id, type, data, event). `path` names the
    source in error messages."""
    per: PerStream = {name: [] for name in STREAMS}
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
            event = codec.decode({"type": line.type.encode(), "data": data}, line.entry_id)
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
    keys = keys.for_batch(batch_id)
    if (
        await r.exists(pkeys.batch(keys, batch_id))
        or await r.hexists(pkeys.batch_index(keys), batch_id)
        or await r.hexists(pkeys.archived_index(keys), batch_id)
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
    target streams past them, in one MULTI/EXEC per partition the file's batches go to (each
    batch's events to its own partition's streams); then rebuild the imported batches."""
    batch_ids = [e.batch_id for _, _, _, e in per[STREAMS[0]] if isinstance(e, BatchRegistered)]
    if not batch_ids:
        raise BadFile("the file holds no BatchRegistered event: nothing to import")
    for b in batch_ids:
        if await _holds_batch(r, keys, b):
            raise Conflict(
                f"prefix {keys.prefix!r} already holds batch {b!r}; refusing to import it twice "
                "(import into another --prefix, or delete that namespace first)"
            )
    parts = split_by_partition(keys, per, batch_ids)
    for part, part_per in parts.items():  # refuse before writing to any partition
        await _targets(r, part, part_per)
    preserved = {name: True for name in STREAMS}
    attempts = 0
    for part, part_per in parts.items():
        kept, tries = await _append(r, part, part_per)
        preserved = {name: preserved[name] and kept[name] for name in STREAMS}
        attempts = max(attempts, tries)
    done = await rebuild(r, keys, batch_ids)
    return {
        "batches": batch_ids,
        "ids_preserved": preserved,
        "attempts": attempts,
        "events_replayed": done["result"].events,
    }


def split_by_partition(keys: Keys, per: PerStream, batch_ids: list[str]) -> dict[Keys, PerStream]:
    """A file's events per partition of the target: each with the first of its batches that
    the file registers (a bundle names several), else its first batch."""
    registered = set(batch_ids)
    out: dict[Keys, PerStream] = {}
    for name in STREAMS:
        for row in per[name]:
            event = row[3]
            owners = (
                list(event.batch_ids)
                if isinstance(event, BundleDispatched)
                else [getattr(event, "batch_id", "") or batch_ids[0]]
            )
            owner = next((b for b in owners if b in registered), owners[0] if owners else "")
            part = keys.for_batch(owner or batch_ids[0])
            out.setdefault(part, {n: [] for n in STREAMS})[name].append(row)
    return out


async def _append(r: Any, keys: Keys, per: PerStream) -> tuple[dict[str, bool], int]:
    """One partition's share of an import, in one MULTI/EXEC under WATCH of its streams:
    which streams kept the file's ids, and the attempts it took."""
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
        return preserved, attempt
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


# --- the archive of finished batches ------------------------------------------------------------
#
# An archived batch is one export file (the format above, gzip-compressed) in an archive store:
# a directory, or any fsspec URL (s3://bucket/prefix, gs://..., memory://...). Redis keeps its
# manifest (`proj:archived`, projections/keys.py): where the file is, how many events, their
# sha256, per stream the count and last entry id, and the sha256 of the projection the archive
# replays to. Reads of an archived batch go to the file named there and check it against it.


def encode_records(records: Iterable[Record]) -> bytes:
    """The export lines of `records`, uncompressed."""
    return b"".join(rec.line() for rec in records)


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a fixed header time: the same lines always compress to the same bytes."""
    return gzip.compress(data, compresslevel=6, mtime=0)


def _quote(part: str) -> str:
    return quote(part, safe="-_.")


class ArchiveStore:
    """An archive root: a directory path or an fsspec URL, with its storage options."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        import fsspec  # only archiving and archived reads need it

        self.url = url
        self.options = dict(options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.options)
        self.root = str(root).rstrip("/")
        self.local = "file" in _protocols(self.fs)

    def path(self, keys: Keys, *parts: str) -> str:
        """A path under the root, in the namespace's own folder (`ns-<quoted prefix>`)."""
        return "/".join([self.root, "ns-" + _quote(keys.prefix), *parts])

    def batch_path(self, keys: Keys, batch_id: str) -> str:
        return self.path(keys, "batches", f"{_quote(batch_id)}.jsonl.gz")

    def segment_path(self, keys: Keys, kind: str, stream: str, first: str, last: str) -> str:
        return self.path(keys, kind, _quote(stream), f"{first}_{last}.jsonl.gz")

    def url_of(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def write(self, path: str, data: bytes) -> None:
        """Write `data` at `path` whole: a local file appears by rename, an object store's
        PUT is atomic by itself."""
        if self.local:
            parent = path.rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def read(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))


def store_for(settings: Settings) -> ArchiveStore:
    """The archive store the settings name (CJS_ARCHIVE_URL, CJS_ARCHIVE_OPTIONS)."""
    try:
        return ArchiveStore(settings.archive_url, settings.archive_options)
    except (ImportError, ValueError, TypeError) as exc:
        raise ConfigError(f"CJS_ARCHIVE_URL {settings.archive_url!r}: {exc}") from exc


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def read_url(url: str, options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of an archive object named by its full URL."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **dict(options or {}))
    return bytes(fs.cat_file(path))


class StreamPart(msgspec.Struct, frozen=True):
    count: int
    first: str
    last: str


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """What Redis keeps of an archived batch (`proj:archived`), and how its file is checked."""

    batch_id: str
    url: str
    events: int
    sha256: str  # of the uncompressed lines
    stored_bytes: int  # compressed, as stored
    streams: dict[str, StreamPart]
    projection_sha256: str  # of the projection the archive replays to
    status: str
    registered_at: str
    completed_at: str
    archived_at: str


_manifest = msgspec.json.Decoder(Manifest)
_manifest_encoder = msgspec.json.Encoder()


def encode_manifest(manifest: Manifest) -> bytes:
    return _manifest_encoder.encode(manifest)


def decode_manifest(raw: bytes | str) -> Manifest:
    return _manifest.decode(raw)


def canonical_sha256(flat: Mapping[str, Mapping[str, str]]) -> str:
    """sha256 of a projection's canonical JSON (keys sorted): what `projection_sha256` is."""
    blob = json.dumps(flat, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def stream_parts(per: PerStream) -> dict[str, StreamPart]:
    return {
        name: StreamPart(len(rows), rows[0][0], rows[-1][0]) for name, rows in per.items() if rows
    }


async def archived_manifest(r: Any, keys: Keys, batch_id: str) -> Manifest | None:
    raw = await r.hget(pkeys.archived_index(keys.for_batch(batch_id)), batch_id)
    return None if raw is None else decode_manifest(raw)


async def archived_manifests(r: Any, keys: Keys) -> dict[str, Manifest]:
    """The manifests of `keys`' partition, or of every partition of a namespace-wide `keys`."""
    out: dict[str, Manifest] = {}
    for part in keys.all_partitions():
        rows = await r.hgetall(pkeys.archived_index(part))
        out.update({as_str(k): decode_manifest(v) for k, v in rows.items()})
    return out


def check_archive(blob: bytes, manifest: Manifest) -> PerStream:
    """The archive's events, after checking them against the manifest (BadFile otherwise):
    readable, the same sha256, the same count and entry ids per stream."""
    try:
        data = gzip.decompress(blob)
    except (OSError, EOFError) as exc:
        raise BadFile(f"archive {manifest.url}: not gzip: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise BadFile(
            f"archive {manifest.url}: sha256 {digest[:12]}… is not the recorded "
            f"{manifest.sha256[:12]}…"
        )
    per = parse_export(data.splitlines(keepends=True), manifest.url)
    if sum(len(v) for v in per.values()) != manifest.events or stream_parts(per) != dict(
        manifest.streams
    ):
        raise BadFile(f"archive {manifest.url}: events differ from the manifest")
    return per


def records_of(per: PerStream) -> list[Record]:
    """The events of a file as records, in entry-id order across the streams."""
    rows = [
        Record((*entry_id_key(entry_id), rank), name, entry_id, type_name, data)
        for rank, name in enumerate(STREAMS)
        for entry_id, type_name, data, _ in per[name]
    ]
    rows.sort()
    return rows


def fold_file(per: PerStream) -> dict[str, BatchState]:
    """The batch states the file's events replay to (the same fold as `cjs replay`)."""
    return fold(
        [e for _, _, _, e in per[BATCHES]], [(entry_id, e) for entry_id, _, _, e in per[CALLBACKS]]
    )


async def read_archived(manifest: Manifest, options: Mapping[str, Any] | None = None) -> PerStream:
    """An archived batch's events, read from its store and checked against its manifest."""
    try:
        blob = await asyncio.to_thread(read_url, manifest.url, options)
    except (OSError, ValueError) as exc:  # missing object, unreachable store
        raise NotFound(f"archive of batch {manifest.batch_id!r} unreadable: {exc}") from exc
    return check_archive(blob, manifest)


async def archived_state(
    manifest: Manifest, options: Mapping[str, Any] | None = None
) -> tuple[BatchState, PerStream]:
    """An archived batch's state replayed from its archive, and its events."""
    per = await read_archived(manifest, options)
    state = fold_file(per).get(manifest.batch_id)
    if state is None:
        raise BadFile(f"archive {manifest.url} does not register batch {manifest.batch_id!r}")
    return state, per
