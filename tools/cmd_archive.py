"""`cjs archive`: one archive-and-trim pass by hand (what the reaper role does on a schedule;
app/retention.py does the work)."""

from __future__ import annotations

from typing import Any

import click

from app import settings
from app.archive import store_for
from app.retention import run_pass
from tools import common


@click.command()
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    help="Archive batches finished at least this many seconds ago [default: $CJS_RETENTION_S].",
)
@click.option(
    "--dry-run", is_flag=True, help="Say what would be archived and trimmed; change nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def archive(older_than: float | None, dry_run: bool, as_json: bool) -> None:
    """Archive finished batches to CJS_ARCHIVE_URL, then trim the streams below the oldest entry
    still needed, and expire old dead letters.

    A batch finished (finalized or failed) at least --older-than seconds ago, with nothing of
    it pending or undelivered in a consumer group, is written with all its events to the
    archive, read back, counted, hashed and replayed against its projection; only then its
    projection shrinks to a manifest. Streams are trimmed below the oldest entry of any batch
    not archived, never below a group's oldest pending entry or last-delivered id. status,
    results, positions, replay, export and validate read archived batches from the archive.
    """
    common.quiet_logs(as_json)
    s = settings.load()
    store = store_for(s)
    age = s.retention_s if older_than is None else older_than

    async def one_pass(r: Any) -> dict[str, Any]:
        report = await run_pass(
            r,
            settings.keys_for(s),
            store,
            older_than_s=age,
            dlq_retention_s=s.dlq_retention_s,
            dry_run=dry_run,
        )
        return report.as_dict()

    out = common.with_redis(s, one_pass)
    if as_json:
        common.emit_json(out)
        return
    verb = "would archive" if dry_run else "archived"
    click.echo(
        f"{verb} {len(out['archived'])} batch(es) to {out['archive_url']} "
        f"(finished {age:g}s ago or more); {len(out['skipped'])} skipped"
    )
    for row in out["archived"]:
        click.echo(f"  {row['batch_id']}: {row['events']} events, {row['stored_bytes']} bytes")
    for row in out["skipped"]:
        click.echo(f"  skipped {row['batch_id']}: {row['reason']}")
    trimmed = ", ".join(f"{k} {v}" for k, v in out["trimmed"].items())
    click.echo(f"{'would trim' if dry_run else 'trimmed'}: {trimmed or 'nothing'}")
    for name, why in out["blocked"].items():
        click.echo(f"  {name} kept from {why['entry_id']}: {why['reason']}")
    if out["dead_letters_trimmed"]:
        click.echo(f"dead letters expired: {out['dead_letters_trimmed']}")
    for problem in out["problems"]:
        click.echo(f"problem: {problem}", err=True)
