"""`cjs dlq`: the dead letters (`dlq:<stream>`): entries a consumer could not use, with why."""

from __future__ import annotations

import json
from typing import Any

import click

from app import settings
from app.connection import open_redis
from events.consumer import _s
from events.names import STREAMS, Keys
from tools import common


def _row(dlq_name: str, entry_id: Any, fields: dict[Any, Any]) -> dict[str, Any]:
    f = {_s(k): _s(v) for k, v in fields.items()}
    try:
        original: Any = json.loads(f.get("fields", "{}"))
    except json.JSONDecodeError:
        original = f.get("fields")
    return {
        "dlq_stream": dlq_name,
        "entry_id": _s(entry_id),
        "source_stream": f.get("source_stream"),
        "source_id": f.get("source_id"),
        "reason": f.get("reason"),
        "detail": f.get("detail"),
        "group": f.get("group"),
        "consumer": f.get("consumer"),
        "at": f.get("at"),
        "fields": original,
    }


async def collect(
    r: Any, keys: Keys, *, stream: str | None = None, limit: int = 100
) -> dict[str, Any]:
    """Dead letters of every stream (or of `stream`), newest first, up to `limit` per stream."""
    names = [stream] if stream else list(STREAMS)
    counts: dict[str, int] = {}
    letters: list[dict[str, Any]] = []
    for name in names:
        dlq = keys.dlq(name)
        n = int(await r.xlen(dlq))
        counts[name] = n
        if n:
            entries = await r.xrevrange(dlq, max="+", min="-", count=limit)
            letters.extend(_row(f"dlq:{name}", entry_id, fields) for entry_id, fields in entries)
    by_reason: dict[str, int] = {}
    for letter in letters:
        by_reason[letter["reason"] or "?"] = by_reason.get(letter["reason"] or "?", 0) + 1
    return {
        "prefix": keys.prefix,
        "counts": counts,
        "total": sum(counts.values()),
        "shown_by_reason": by_reason,
        "dead_letters": letters,
    }


@click.command()
@click.option(
    "--stream",
    "stream",
    default=None,
    metavar="S",
    help=f"Only the dead letters of stream S (one of {', '.join(STREAMS)}).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Newest entries shown per stream.",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def dlq(stream: str | None, limit: int, as_json: bool) -> None:
    """List dead letters: undecodable entries and entries delivered too often, each with the
    reason, the original stream and entry id, and the original fields.

    JSON: {counts: {stream: n}, total, dead_letters: [{dlq_stream, entry_id, source_stream,
    source_id, reason, detail, group, consumer, at, fields}]}.
    """
    common.quiet_logs(as_json)
    if stream is not None and stream.startswith("dlq:"):
        stream = stream[4:]
    s = settings.load()
    keys = settings.keys_for(s)

    async def main() -> dict[str, Any]:
        r = await open_redis(s)
        try:
            return await collect(r, keys, stream=stream, limit=limit)
        finally:
            await r.aclose()

    view = common.run(main)
    if as_json:
        common.emit_json(view)
        return
    click.echo(
        f"dead letters: {view['total']}  "
        + "  ".join(f"{k}={v}" for k, v in view["counts"].items())
    )
    for d in view["dead_letters"]:
        original = d["fields"]
        if isinstance(original, dict):
            original = json.dumps(original)[:120]
        click.echo(
            f"  {d['at'] or '-':<27} {d['source_stream'] or '-':<13} "
            f"{d['source_id'] or '-':<16} {d['reason'] or '-':<15} {(d['detail'] or '')[:60]}"
        )
        click.echo(f"      fields: {original}")
