"""`cjs dlq`: the dead letters (`dlq:<stream>`): entries a consumer could not use, with why."""

from __future__ import annotations

import json
from typing import Any

import click

from app import settings
from app.connection import open_redis
from events.streams import STREAMS
from streams.dlq import read_dead_letters
from tools import common


@click.command()
@click.option(
    "--stream",
    "stream",
    type=click.Choice([*STREAMS, *(f"dlq:{name}" for name in STREAMS)]),
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

    With CJS_PARTITIONS > 1 they are those of every partition, each letter with its
    `partition`.

    JSON: {counts: {stream: n}, total, dead_letters: [{dlq_stream, entry_id, source_stream,
    source_id, reason, detail, group, consumer, at, fields, partition}]}.
    """
    common.quiet_logs(as_json)
    if stream is not None and stream.startswith("dlq:"):
        stream = stream[4:]
    s = settings.load()
    keys = settings.keys_for(s)

    async def main() -> dict[str, Any]:
        r = await open_redis(s)
        try:
            return await read_dead_letters(r, keys, stream=stream, limit=limit)
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
        where = d["source_stream"] or "-"
        if keys.partitions > 1:
            where += f"@p{d['partition']}"
        click.echo(
            f"  {d['at'] or '-':<27} {where:<13} "
            f"{d['source_id'] or '-':<16} {d['reason'] or '-':<15} {(d['detail'] or '')[:60]}"
        )
        click.echo(f"      fields: {original}")
