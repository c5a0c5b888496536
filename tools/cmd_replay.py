"""`cjs replay`: rebuild batch projections from the streams and compare them with (or write them
over) the live ones (app/replay.py, projections/rebuild.py)."""

from __future__ import annotations

import sys
from typing import Any

import click

from app import settings
from app.replay import replay_view
from tools import common


@click.command()
@click.argument("batch_id", required=False)
@click.option("--all", "all_batches", is_flag=True, help="Every batch of the namespace.")
@click.option(
    "--rebuild",
    "do_rebuild",
    is_flag=True,
    help="Write the replayed projections over the live ones (index and stats included).",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def replay(batch_id: str | None, all_batches: bool, do_rebuild: bool, as_json: bool) -> None:
    """Rebuild BATCH_ID (or --all) from the streams and compare with the live projection.

    Prints {batch_id, matches_live, diff, events (the batch's), entries_scanned, seconds};
    exits 1 when they differ.
    With --rebuild the replayed projections replace the live ones (after lost `proj:*`
    keys or a changed projection); stop the cj workers first, or the rebuild retries.
    """
    _run(batch_id, all_batches, do_rebuild, as_json)


def _run(batch_id: str | None, all_batches: bool, do_rebuild: bool, as_json: bool) -> None:
    common.quiet_logs(as_json)
    if bool(batch_id) == all_batches:
        raise click.UsageError("give a BATCH_ID or --all (not both)")
    s = settings.load()
    ids = None if all_batches else [batch_id or ""]

    out = common.with_redis(
        s,
        lambda r: replay_view(
            r, settings.keys_for(s), ids, write=do_rebuild, archive_options=s.archive_options
        ),
    )
    if as_json:
        common.emit_json(out)
    else:
        _print(out)
    if not out["matches_live"]:
        sys.exit(1)


def _print(out: dict[str, Any]) -> None:
    what = f"batch {out['batch_id']}" if "batch_id" in out else f"{out['batches']} batches"
    verdict = (
        "matches the live projection" if out["matches_live"] else "DIFFERS from the live projection"
    )
    if out.get("rebuilt"):
        click.echo(
            f"rebuilt {out['batches_written']} batch projection(s) from the streams "
            f"({len(out['mismatched_before'])} differed before, "
            f"{len(out['stale_removed'])} stale removed)"
        )
    scanned = f" ({out['entries_scanned']} stream entries read)" if "entries_scanned" in out else ""
    click.echo(
        f"{what}: replay {verdict}; {out['events']} events{scanned} in {out['seconds']:.3f}s "
        f"({out['callbacks_unapplied']} callbacks not yet applied by the cj group)"
    )
    for name, lost in (out.get("trimmed") or {}).items():
        click.echo(
            f"  WARNING: {name} lost {lost['entries_lost']} entries (it now begins at "
            f"{lost['first_entry_id']}): the replay is incomplete"
        )
    rows = out.get("diff") or [d for m in out.get("mismatched", []) for d in m["diff"]]
    for row in rows[:40]:
        where = f"{row['key']} {row['field'] or ''}"
        click.echo(f"  {where}: live={row['live']!r} replayed={row['replayed']!r}")
