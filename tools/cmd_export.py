"""`cjs export` and `cjs import`: a batch's events as JSON lines, and back into a namespace.

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
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import msgspec
from redis.exceptions import ResponseError, WatchError

from app import errors, settings
from app.connection import open_redis
from app.replay import rebuild
from events import codec
from events.names import CALLBACKS, CJ_GROUP, LPS_GROUP, REQUESTS, STREAMS, Keys
from events.types import EVENT_TYPES, BatchRegistered, BundleDispatched, Event
from projections.batch import entry_id_key
from projections.replay import decode_flat, raw_client, read_pages
from tools import common

PROGRESS_EVERY = 200_000
IMPORT_TRIES = 5
GROUPS = {REQUESTS: LPS_GROUP, CALLBACKS: CJ_GROUP}
_ENTRY_ID = re.compile(r"^\d+-\d+$")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.scanned = 0
        self._next = PROGRESS_EVERY

    def add(self, n: int, stream: str, found: int) -> None:
        self.scanned += n
        if self.enabled and self.scanned >= self._next:
            click.echo(
                f"export: {self.scanned} entries scanned ({stream}), {found} of the batch", err=True
            )
            self._next += PROGRESS_EVERY


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
                entry_id = _s(raw_id)
                ms, seq = entry_id_key(entry_id)
                data_bytes = data if isinstance(data, bytes) else str(data).encode()
                records.append(
                    Record((ms, seq, rank), name, entry_id, type(event).__name__, data_bytes)
                )
            if progress is not None:
                progress.add(len(entries), name, found + len(records))
        found += len(records)
        per_stream.append(records)
    return list(heapq.merge(*per_stream))


def _open_out(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdout.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "wb")  # type: ignore[return-value]
    return open(path, "wb")


@click.command(name="export")
@click.argument("batch_id")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    help="File to write (.jsonl, or .jsonl.gz to compress; - for stdout).",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def export(batch_id: str, output: str, as_json: bool) -> None:
    """Write every event of BATCH_ID from the four streams, in stream order, one JSON line each:
    {type, stream, entry_id, data}. Progress goes to stderr for big streams."""
    common.quiet_logs(as_json)
    if as_json and output == "-":
        raise click.UsageError("--json and -o - would both write to stdout")
    s = settings.load()

    async def main() -> list[Record]:
        r = await open_redis(s)
        try:
            return await collect(r, settings.keys_for(s), batch_id, Progress(True))
        finally:
            await r.aclose()

    started = time.perf_counter()
    records = common.run(main)
    if not any(rec.type == "BatchRegistered" for rec in records):
        raise errors.NotFound(f"no batch {batch_id!r} in the streams under prefix {s.prefix!r}")
    out = _open_out(output)
    try:
        for rec in records:
            out.write(rec.line())
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    by_stream = {name: sum(rec.stream == name for rec in records) for name in STREAMS}
    view = {
        "batch_id": batch_id,
        "output": output,
        "events": len(records),
        "by_stream": by_stream,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        common.emit_json(view)
    else:
        click.echo(
            f"exported {len(records)} events of {batch_id} to {output} "
            + " ".join(f"{k}={v}" for k, v in by_stream.items()),
            err=True,
        )


# --- import -------------------------------------------------------------------------------------


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


def read_export(path: Path) -> dict[str, list[tuple[str, str, bytes, Event]]]:
    """The file's events per stream, validated: (entry id, type, data, event)."""
    per: dict[str, list[tuple[str, str, bytes, Event]]] = {name: [] for name in STREAMS}
    try:
        lines = list(_lines(path))
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise errors.BadFile(f"cannot read {path}: {exc}") from exc
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = _line.decode(text)
        except msgspec.DecodeError as exc:
            raise errors.BadFile(f"{path}:{number}: not an export line: {exc}") from exc
        if line.stream not in per:
            raise errors.BadFile(f"{path}:{number}: unknown stream {line.stream!r}")
        if not _ENTRY_ID.match(line.entry_id):
            raise errors.BadFile(f"{path}:{number}: bad entry id {line.entry_id!r}")
        if line.type not in EVENT_TYPES:
            raise errors.BadFile(f"{path}:{number}: unknown event type {line.type!r}")
        data = bytes(line.data)
        try:
            event = codec.decode({"type": line.type.encode(), "data": data})
        except codec.DecodeError as exc:
            raise errors.BadFile(f"{path}:{number}: {exc}") from exc
        rows = per[line.stream]
        if rows and entry_id_key(line.entry_id) <= entry_id_key(rows[-1][0]):
            raise errors.BadFile(f"{path}:{number}: entry ids of {line.stream} are not increasing")
        rows.append((line.entry_id, line.type, data, event))
    return per


async def _holds_batch(r: Any, keys: Keys, batch_id: str) -> bool:
    if await r.exists(keys.batch(batch_id)) or await r.hexists(keys.batch_index, batch_id):
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


async def load(
    r: Any, keys: Keys, per: dict[str, list[tuple[str, str, bytes, Event]]]
) -> dict[str, Any]:
    """Append the events (original ids where possible) and move every consumer group of the
    target streams past them, in one MULTI/EXEC; then rebuild the imported batches."""
    batch_ids = [e.batch_id for _, _, _, e in per[STREAMS[0]] if isinstance(e, BatchRegistered)]
    if not batch_ids:
        raise errors.BadFile("the file holds no BatchRegistered event: nothing to import")
    for b in batch_ids:
        if await _holds_batch(r, keys, b):
            raise errors.Conflict(
                f"prefix {keys.prefix!r} already holds batch {b!r}; refusing to import it twice "
                "(import into another --prefix, or delete that namespace first)"
            )
    for attempt in range(1, IMPORT_TRIES + 1):
        async with r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*(keys.stream(name) for name in STREAMS))
                preserved: dict[str, bool] = {}
                groups: dict[str, list[str]] = {}
                for name in STREAMS:
                    stream = keys.stream(name)
                    last = await pipe.xrevrange(stream, max="+", min="-", count=1)
                    last_id = _s(last[0][0]) if last else None
                    rows = per[name]
                    preserved[name] = (
                        not rows
                        or last_id is None
                        or entry_id_key(last_id) < entry_id_key(rows[0][0])
                    )
                    try:
                        infos = await pipe.xinfo_groups(stream)
                    except ResponseError:
                        infos = []
                    groups[name] = []
                    for info in infos:
                        delivered = _s(info["last-delivered-id"])
                        if last_id is not None and entry_id_key(delivered) < entry_id_key(last_id):
                            raise errors.Conflict(
                                f"group {_s(info['name'])!r} of {stream} has not read every entry "
                                "yet; importing now would hand it the imported events too. Let the "
                                "consumers catch up, or import into a fresh --prefix"
                            )
                        groups[name].append(_s(info["name"]))
                pipe.multi()
                for name in STREAMS:
                    stream = keys.stream(name)
                    for entry_id, type_name, data, _ in per[name]:
                        pipe.xadd(
                            stream,
                            {"type": type_name, "data": data},
                            id=entry_id if preserved[name] else "*",
                        )
                    for group in groups[name]:
                        pipe.xgroup_setid(stream, group, id="$")
                    if name in GROUPS and GROUPS[name] not in groups[name]:
                        pipe.xgroup_create(stream, GROUPS[name], id="$", mkstream=True)
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
    raise errors.Conflict(f"the target streams kept changing during {IMPORT_TRIES} attempts")


@click.command(name="import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--prefix", default=None, help="Key namespace to load into [default: $CJS_PREFIX].")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def import_(file: Path, prefix: str | None, as_json: bool) -> None:
    """Load an export FILE (.jsonl or .jsonl.gz) into a namespace and rebuild its projections,
    so that status, results, positions and replay work as on the original. Refuses a namespace
    that already holds the batch."""
    common.quiet_logs(as_json)
    s = settings.load()
    keys = settings.keys_for(s, prefix)
    started = time.perf_counter()
    per = read_export(file)

    async def main() -> dict[str, Any]:
        r = await open_redis(s)
        try:
            return await load(r, keys, per)
        finally:
            await r.aclose()

    view = common.run(main)
    view = {
        "file": str(file),
        "prefix": keys.prefix,
        **view,
        "events": sum(len(v) for v in per.values()),
        "by_stream": {name: len(v) for name, v in per.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        common.emit_json(view)
    else:
        kept = ", ".join(
            f"{k}: {'original ids' if v else 'new ids'}"
            for k, v in view["ids_preserved"].items()
            if view["by_stream"][k]
        )
        click.echo(
            f"imported {view['events']} events of {', '.join(view['batches'])} into prefix "
            f"{keys.prefix!r} ({kept}); projections rebuilt"
        )
