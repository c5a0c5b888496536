"""`cjs stuck`: the XPENDING dashboard, stalled batches, and `--reclaim` (the cleanup, now)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import click

from app import settings
from app.connection import open_redis
from app.stuck import act_on_entry, collect, reclaim
from events.streams import CONSUMED, REQUESTS
from tools import common


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _short(value: str | None, width: int = 12) -> str:
    if not value:
        return "-"
    return value if len(value) <= width else value[: width - 1] + "…"


def render(view: dict[str, Any]) -> str:
    """The dashboard as a readable table."""
    lines = [f"cjs stuck  prefix={view['prefix']!r}  at {view['at']}", ""]
    lines.append(f"{'stream':<14} {'group':<6} {'pending':>7} {'lag':>6} {'oldest idle':>11}")
    for g in view["groups"]:
        if not g["exists"]:
            lines.append(f"{g['stream']:<14} {g['group']:<6} {'(no group yet)':>26}")
            continue
        lag = "-" if g["lag"] is None else str(g["lag"])
        lines.append(
            f"{g['stream']:<14} {g['group']:<6} {g['pending']:>7} {lag:>6} "
            f"{_dur(g['oldest_idle_s']):>11}"
        )
        for c in g["consumers"]:
            lines.append(
                f"    {c['consumer']:<40} {c['verdict']:<7} pending {c['pending']:>5}  "
                f"idle {_dur(c['idle_s']):>7}  oldest pending {_dur(c['oldest_pending_idle_s']):>7}"
            )
    lines.append("")
    stuck = view["stuck"]
    lines.append(
        f"Pending entries idle >= {_dur(view['idle_threshold_s'])}: {len(stuck)}"
        + ("  (list truncated)" if view["stuck_truncated"] else "")
    )
    if stuck:
        lines.append(
            f"  {'stream':<13} {'entry id':<16} {'consumer':<28} {'idle':>7} {'deliv':>5}  "
            f"{'batch':<32} {'correlation':<12} essays"
        )
        for e in stuck:
            where = e["stream"]
            if view.get("partitions", 1) > 1:
                where += f"@p{e['partition']}"
            lines.append(
                f"  {where:<13} {e['entry_id']:<16} {_short(e['consumer'], 28):<28} "
                f"{_dur(e['idle_s']):>7} {e['deliveries']:>5}  {_short(e['batch_id'], 32):<32} "
                f"{_short(e['correlation_id']):<12} {' vs '.join(e['essay_ids']) or '-'}"
            )
    lines.append("")
    stalled = view["stalled_batches"]
    lines.append(
        f"Stalled batches (no event for >= {_dur(view['batch_idle_timeout_s'])}): {len(stalled)}"
    )
    for b in stalled:
        lines.append(
            f"  {b['batch_id']}  {b['status']:<10} idle {_dur(b['idle_s']):>7}  wave {b['waves']}  "
            f"submitted {b['submitted']}/{b['denominator']}  completed {b['completed']}  "
            f"failed {b['failed']}  in flight {b['in_flight']}"
        )
    breakers = view.get("breakers") or []
    if breakers:
        lines.append("")
        lines.append(f"Open provider breakers (requests fail fast, no calls): {len(breakers)}")
        for b in breakers:
            lines.append(
                f"  {b['provider']}/{b['model'] or '*'}  {b['reason']}  since {b['opened_at']}  "
                f"failures {b['failures']}  next probe in {_dur(b['next_probe_in_s'])}  "
                f"{_short(b['message'], 80)}"
            )
    if view["dead_letters"]:
        lines.append("")
        lines.append(
            "Dead letters: "
            + ", ".join(f"{k} {v}" for k, v in view["dead_letters"].items())
            + "  (cjs dlq)"
        )
    acted = view.get("acted")
    if acted is not None:
        lines.append("")
        lines.append(
            f"Done: {acted['action']} {acted['stream']} {acted['entry_id']} "
            f"(held by {acted['consumer']}, batch {acted['batch_id'] or '-'})"
        )
    done = view.get("reclaimed")
    if done is not None:
        lines.append("")
        lines.append(
            f"Reclaimed now: {len(done['requests'])} request(s), {len(done['callbacks'])} "
            f"callback(s), {len(done['batches'])} stalled batch(es)"
        )
        for a in done["requests"] + done["callbacks"]:
            lines.append(
                f"  {a['action']:<13} {a['stream']:<13} {a['entry_id']:<16} "
                f"from {_short(a['consumer'], 28)}  deliveries {a['deliveries']}  "
                f"batch {a['batch_id'] or '-'}"
            )
        for b in done["batches"]:
            lines.append(
                f"  {b['event']:<15} {b['batch_id']}  reason {b['reason']}  "
                f"abandoned {len(b['abandoned'])}" + (f"  ({b['message']})" if b["message"] else "")
            )
        if done["skipped_batches"]:
            lines.append(
                "  left for a later pass (their entries were just reclaimed): "
                + ", ".join(done["skipped_batches"])
            )
    return "\n".join(lines)


@click.command()
@click.option(
    "--idle",
    "idle_s",
    type=click.FloatRange(min=0),
    default=None,
    help="List pending entries idle this long [default: CJS_PROCESSING_TIMEOUT_S].",
)
@click.option(
    "--batch-idle",
    "batch_idle_s",
    type=click.FloatRange(min=0),
    default=None,
    help="Stalled after this long without an event [default: CJS_BATCH_IDLE_TIMEOUT_S].",
)
@click.option(
    "--reclaim",
    "do_reclaim",
    is_flag=True,
    help="Clean up now: reclaim/expire stuck entries, end stalled batches.",
)
@click.option("--watch", is_flag=True, help="Refresh a live view until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Pending entries examined per group.",
)
@click.option(
    "--act",
    type=click.Choice(["reclaim", "expire", "dead_letter"]),
    default=None,
    help="Do this to the one pending entry --entry (as the dashboard's buttons do), then show.",
)
@click.option("--entry", "entry_id", default=None, metavar="ID", help="The entry --act is for.")
@click.option(
    "--stream",
    "stream_name",
    type=click.Choice([name for name, _ in CONSUMED]),
    default=REQUESTS,
    show_default=True,
    help="The stream of --entry.",
)
@click.option(
    "--partition",
    type=click.IntRange(min=0),
    default=None,
    help="The partition of --entry (its `partition` in the listing; with CJS_PARTITIONS > 1).",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def stuck(
    idle_s: float | None,
    batch_idle_s: float | None,
    do_reclaim: bool,
    watch: bool,
    interval: float,
    limit: int,
    act: str | None,
    entry_id: str | None,
    stream_name: str,
    partition: int | None,
    as_json: bool,
) -> None:
    """Pending entries per stream and group, entries stuck longer than --idle (with their
    batch, correlation id and essays), and stalled batches.

    --reclaim runs the cleanup a worker's reaper runs, now: requests idle past
    CJS_PROCESSING_TIMEOUT_S are judged again by this command (or expired after
    CJS_MAX_DELIVERIES), stuck callbacks are applied again (or dead-lettered), and each
    stalled batch ends as BatchFinalized (reason stalled, after a BatchScored) when its
    successful comparisons support a scoring, else as BatchFailed (reason stalled).
    --act reclaim|expire|dead_letter --entry ID acts on one pending entry, if it is still idle
    --idle (default 0): reclaim hands it to the live workers at once, expire ends a request
    as ComparisonFailed(expired), dead_letter moves it to dlq:<stream>.
    With CJS_PARTITIONS > 1 the figures are over every partition; an entry says its
    `partition`, which --act needs back as --partition.
    JSON: {streams, groups, stuck: [{stream, group, partition, entry_id, consumer, idle_s,
    deliveries, correlation_id, batch_id, essay_ids}], stalled_batches, breakers (open
    provider breakers), dead_letters[, reclaimed][, acted]}.
    """
    if watch and (as_json or do_reclaim or act):
        raise click.UsageError("--watch shows a live view: use it without --json and --reclaim")
    if (act is None) != (entry_id is None):
        raise click.UsageError("--act and --entry go together")
    common.quiet_logs(as_json)
    s = settings.load()
    keys = settings.keys_for(s)
    idle = s.processing_timeout_s if idle_s is None else idle_s
    batch_idle = s.batch_idle_timeout_s if batch_idle_s is None else batch_idle_s
    dead_after = s.processing_timeout_s

    async def once() -> dict[str, Any]:
        r = await open_redis(s)
        try:
            acted = None
            if act is not None and entry_id is not None:
                acted = await act_on_entry(
                    r,
                    keys,
                    s,
                    stream_name=stream_name,
                    entry_id=entry_id,
                    action=act,
                    min_idle_s=idle_s or 0.0,
                    partition=partition,
                )
            done = await reclaim(r, keys, s, batch_idle_s=batch_idle) if do_reclaim else None
            view = await collect(
                r, keys, idle_s=idle, batch_idle_s=batch_idle, limit=limit, dead_after_s=dead_after
            )
        finally:
            await r.aclose()
        if done is not None:
            view["reclaimed"] = done
        if acted is not None:
            view["acted"] = acted
        return view

    async def live() -> None:
        r = await open_redis(s)
        try:
            while True:
                view = await collect(
                    r,
                    keys,
                    idle_s=idle,
                    batch_idle_s=batch_idle,
                    limit=limit,
                    dead_after_s=dead_after,
                )
                click.clear()
                click.echo(render(view))
                click.echo(f"\nrefreshing every {interval:g}s; Ctrl-C to stop")
                await asyncio.sleep(interval)
        finally:
            await r.aclose()

    if watch:
        with contextlib.suppress(KeyboardInterrupt):
            common.run(live)
        return
    view = common.run(once)
    if as_json:
        common.emit_json(view)
    else:
        click.echo(render(view))
