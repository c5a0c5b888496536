"""`cjs dlq`: the dead letters (`dlq:<stream>`): entries a consumer could not use, with why;
`cjs dlq redrive` puts those that can be used now back (app/dlq.py)."""

from __future__ import annotations

import json

import click

from app import settings
from events.streams import STREAMS
from streams.dlq import read_dead_letters
from tools import common

# `--stream S`: a stream by its name, or by its dead letters' (`dlq:<stream>`).
stream_option = click.option(
    "--stream",
    "stream",
    type=click.Choice([*STREAMS, *(f"dlq:{name}" for name in STREAMS)]),
    default=None,
    metavar="S",
    help=f"Only the dead letters of stream S (one of {', '.join(STREAMS)}).",
)


def _stream_name(stream: str | None) -> str | None:
    if stream is not None and stream.startswith("dlq:"):
        return stream[4:]
    return stream


@click.group(invoke_without_command=True)
@stream_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Newest entries shown per stream.",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.pass_context
def dlq(ctx: click.Context, stream: str | None, limit: int, as_json: bool) -> None:
    """List dead letters: undecodable entries and entries delivered too often, each with the
    reason, the original stream and entry id, and the original fields.

    A letter holds at most CJS_DLQ_MAX_ENTRY_BYTES of the original fields (`truncated` when
    cut), with their size and SHA-256; the whole entry stays in its stream. `parked` counts
    valid callbacks dead-lettered (as max_deliveries, or by hand), waiting for a redrive.

    With CJS_PARTITIONS > 1 they are those of every partition, each letter with its
    `partition`.

    JSON: {counts: {stream: n}, total, parked: {stream: n}, dead_letters: [{dlq_stream,
    entry_id, source_stream, source_id, reason, detail, group, consumer, at, fields,
    fields_bytes, fields_sha256, truncated, partition}]}.
    """
    if ctx.invoked_subcommand is not None:
        return
    common.quiet_logs(as_json)
    stream = _stream_name(stream)
    s = settings.load()
    keys = settings.keys_for(s)

    view = common.with_redis(s, lambda r: read_dead_letters(r, keys, stream=stream, limit=limit))
    if as_json:
        common.emit_json(view)
        return
    click.echo(
        f"dead letters: {view['total']}  "
        + "  ".join(f"{k}={v}" for k, v in view["counts"].items())
        + (
            "  parked: " + "  ".join(f"{k}={v}" for k, v in view["parked"].items())
            if view["parked"]
            else ""
        )
    )
    for d in view["dead_letters"]:
        original = d["fields"]
        if isinstance(original, dict):
            original = json.dumps(original)[:120]
        elif isinstance(original, str):
            original = original[:120]
        where = d["source_stream"] or "-"
        if keys.partitions > 1:
            where += f"@p{d['partition']}"
        click.echo(
            f"  {d['at'] or '-':<27} {where:<13} "
            f"{d['source_id'] or '-':<16} {d['reason'] or '-':<15} {(d['detail'] or '')[:60]}"
        )
        size = f" ({d['fields_bytes']} bytes, cut)" if d.get("truncated") else ""
        click.echo(f"      fields: {original}{size}")


@dlq.command()
@stream_option
@click.option("--reason", default=None, metavar="R", help="Only letters with reason R.")
@click.option("--id", "letter_ids", multiple=True, metavar="ID", help="Only this letter (repeat).")
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def redrive(
    stream: str | None,
    reason: str | None,
    letter_ids: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
) -> None:
    """Put dead letters that can be used now back: parked callbacks (valid ones
    dead-lettered as max_deliveries, or by hand) are applied in place (once; their batch
    then moves on), other letters whose entry would now be accepted are appended again to
    their stream; the rest stay.

    JSON: {dry_run, applied: [{source_id, letter_id, batch_id, correlation_id, outcome}],
    reappended: [{stream, letter_id, source_id, new_id, ...}], skipped: [{stream,
    letter_id, source_id, why}], advanced: [batch_id]}.
    """
    common.quiet_logs(as_json)
    stream = _stream_name(stream)
    s = settings.load()
    keys = settings.keys_for(s)

    from app.dlq import redrive as run_redrive  # scoring (numpy): only the redrive needs it

    out = common.with_redis(
        s,
        lambda r: run_redrive(
            r,
            keys,
            stream=stream,
            reason=reason,
            letter_ids=set(letter_ids) or None,
            dry_run=dry_run,
        ),
    )
    if as_json:
        common.emit_json(out)
        return
    verb = "would apply" if dry_run else "applied"
    click.echo(
        f"{verb} {len(out['applied'])}, re-appended {len(out['reappended'])}, "
        f"skipped {len(out['skipped'])}; batches advanced: {len(out['advanced'])}"
    )
    for a in out["applied"]:
        click.echo(
            f"  applied {a['source_id']} {a['batch_id']} {a['correlation_id']} {a['outcome']}"
        )
    for a in out["reappended"]:
        click.echo(f"  re-appended {a['stream']} {a['source_id']} -> {a['new_id']}")
    for a in out["skipped"]:
        click.echo(f"  skipped {a['stream']} {a['letter_id']} ({a['source_id']}): {a['why']}")
