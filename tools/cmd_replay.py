"""`cjs replay`: rebuild batch projections from the streams and compare them with (or write them
over) the live ones.

The rebuild uses the same pure `apply` functions as the live consumers (projections/replay.py),
in memory, up to the instant the live projection was read (`Horizon`: callbacks still pending in
the `cj` group are not applied yet by anyone, so they are left out on both sides). Equal means
byte-for-byte equal hashes, the batch index entry included.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click
from redis.exceptions import WatchError

from app import errors, settings
from app.connection import open_redis
from events.names import Keys
from projections.batch import BatchState
from projections.replay import (
    Horizon,
    ReplayResult,
    horizon_from,
    no_gc,
    queue_horizon,
    replay_live,
)
from projections.store import encode_state, list_batches, queue_state_write
from tools import common

DIFF_LIMIT = 100
REBUILD_TRIES = 5
UNKNOWN_BATCH_FIELD = "orphans_unknown_batch"

Flat = dict[str, dict[str, str]]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def expected_of(state: BatchState | None, keys: Keys) -> Flat:
    """The projection keys a batch must have (its hashes and its index entry)."""
    if state is None:
        return {}
    out = encode_state(state, keys)
    out[keys.batch_index] = {state.batch_id: state.registered_at}
    return out


def diff(live: Flat, replayed: Flat, limit: int = DIFF_LIMIT) -> tuple[list[dict[str, Any]], int]:
    """Field-level differences, at most `limit` of them, and how many there are in all."""
    rows: list[dict[str, Any]] = []
    count = 0
    for key in sorted(set(live) | set(replayed)):
        a, b = live.get(key, {}), replayed.get(key, {})
        if key not in live or key not in replayed:
            count += 1
            if len(rows) < limit:
                rows.append(
                    {
                        "key": key,
                        "field": None,
                        "live": None if key not in live else f"{len(a)} fields",
                        "replayed": None if key not in replayed else f"{len(b)} fields",
                    }
                )
            continue
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                count += 1
                if len(rows) < limit:
                    rows.append(
                        {"key": key, "field": name, "live": a.get(name), "replayed": b.get(name)}
                    )
    return rows, count


@dataclass
class Snapshot:
    horizon: Horizon
    live: dict[str, Flat] = field(default_factory=dict)


async def read_snapshot(r: Any, keys: Keys, batch_ids: list[str]) -> Snapshot:
    """The live projections of `batch_ids` and the horizon, read at one instant (one MULTI)."""
    async with r.pipeline(transaction=True) as pipe:
        queue_horizon(pipe, keys)
        for b in batch_ids:
            for name in keys.batch_keys(b):
                pipe.hgetall(name)
            pipe.hget(keys.batch_index, b)
        replies = await pipe.execute(raise_on_error=False)
    snap = Snapshot(await horizon_from(r, keys, *replies[:3]))
    per = len(keys.batch_keys("x")) + 1
    for i, b in enumerate(batch_ids):
        chunk = replies[3 + i * per : 3 + (i + 1) * per]
        flat: Flat = {}
        for name, value in zip(keys.batch_keys(b), chunk[:-1], strict=True):
            if isinstance(value, dict) and value:
                flat[name] = {_s(k): _s(v) for k, v in value.items()}
        if chunk[-1] is not None and not isinstance(chunk[-1], Exception):
            flat[keys.batch_index] = {b: _s(chunk[-1])}
        snap.live[b] = flat
    return snap


def compare(
    snap: Snapshot, result: ReplayResult, keys: Keys, batch_ids: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for b in batch_ids:
        rows_b, count = diff(snap.live.get(b, {}), expected_of(result.states.get(b), keys))
        rows.append(
            {
                "batch_id": b,
                "matches_live": count == 0,
                "diff_count": count,
                "diff": rows_b,
                "in_streams": b in result.states,
                "in_projection": bool(snap.live.get(b)),
            }
        )
    return rows


async def check(
    r: Any, keys: Keys, batch_ids: list[str] | None
) -> tuple[ReplayResult, list[dict[str, Any]]]:
    """Replay `batch_ids` (every batch of the index and the streams when None) and compare."""
    with no_gc():
        return await _check(r, keys, batch_ids)


async def _check(
    r: Any, keys: Keys, batch_ids: list[str] | None
) -> tuple[ReplayResult, list[dict[str, Any]]]:
    ids = batch_ids if batch_ids is not None else await list_batches(r, keys)
    snap = await read_snapshot(r, keys, ids)
    result = await replay_live(
        r, keys, set(batch_ids) if batch_ids is not None else None, horizon=snap.horizon
    )
    if batch_ids is None:
        extra = sorted(
            set(result.states) - set(ids), key=lambda b: (result.states[b].registered_at, b)
        )
        if extra:  # registered in the streams, missing from the index: their keys were lost
            more = await read_snapshot(r, keys, extra)
            snap.live.update(more.live)
            ids = ids + extra
    return result, compare(snap, result, keys, ids)


async def rebuild(r: Any, keys: Keys, batch_ids: list[str] | None) -> dict[str, Any]:
    """Write the replayed projections over the live ones, atomically.

    Optimistic: the batch hashes, the index and the stats hash are WATCHed before the horizon is
    read; a consumer applying a callback or advancing a batch meanwhile touches one of them, the
    EXEC fails and the rebuild starts over.
    """
    for attempt in range(1, REBUILD_TRIES + 1):
        ids = batch_ids if batch_ids is not None else await list_batches(r, keys)
        async with r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(keys.batch_index, keys.stats, *(keys.batch(b) for b in ids))
                started = time.perf_counter()
                result, rows = await check(r, keys, batch_ids)
                checked = time.perf_counter()
                if batch_ids is None:
                    known = set(ids)
                    new = [b for b in result.states if b not in known]
                    if new:  # batches missing from the index: watch them too, then go on
                        await pipe.watch(*(keys.batch(b) for b in new))
                stale = [row["batch_id"] for row in rows if not row["in_streams"]]
                pipe.multi()
                with no_gc():
                    for state in result.states.values():
                        queue_state_write(pipe, keys, state, full=True)
                for b in stale:  # in the index but registered nowhere in the streams
                    for name in keys.batch_keys(b):
                        pipe.delete(name)
                    pipe.hdel(keys.batch_index, b)
                if batch_ids is None:
                    if result.unknown_batch_callbacks:
                        pipe.hset(keys.stats, UNKNOWN_BATCH_FIELD, result.unknown_batch_callbacks)
                    else:
                        pipe.hdel(keys.stats, UNKNOWN_BATCH_FIELD)
                await pipe.execute()
            except WatchError:
                continue
        return {
            "result": result,
            "before": rows,
            "stale_removed": stale,
            "attempts": attempt,
            "seconds_replay_and_compare": round(checked - started, 3),
            "seconds_write": round(time.perf_counter() - checked, 3),
        }
    raise errors.Conflict(
        f"the projections kept changing during {REBUILD_TRIES} rebuild attempts: consumers are "
        "applying callbacks; stop the cj workers and run it again"
    )


def _summary(result: ReplayResult) -> dict[str, Any]:
    return {
        "events": result.events,
        "seconds": round(result.seconds, 4),
        "events_per_s": round(result.events / result.seconds) if result.seconds > 0 else None,
        "callbacks_applied": result.callbacks_applied,
        "callbacks_unapplied": result.callbacks_unapplied,
        "undecodable": result.undecodable,
    }


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

    Prints {batch_id, matches_live, diff, events, seconds}; exits 1 when they differ.
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

    async def main() -> dict[str, Any]:
        r = await open_redis(s)
        keys = settings.keys_for(s)
        try:
            started = time.perf_counter()
            if do_rebuild:
                done = await rebuild(r, keys, ids)
                result: ReplayResult = done["result"]
                _, after = await check(r, keys, ids)
                view: dict[str, Any] = {
                    "rebuilt": True,
                    "batches_written": len(result.states),
                    "mismatched_before": [
                        row["batch_id"] for row in done["before"] if not row["matches_live"]
                    ],
                    "stale_removed": done["stale_removed"],
                    "orphans_unknown_batch": result.unknown_batch_callbacks
                    if ids is None
                    else None,
                    "attempts": done["attempts"],
                }
                rows = after
            else:
                result, rows = await check(r, keys, ids)
                view = {}
            if ids is not None and not rows[0]["in_streams"] and not rows[0]["in_projection"]:
                raise errors.NotFound(f"no batch {batch_id!r} under prefix {keys.prefix!r}")
            summary = _summary(result)
            summary["seconds"] = round(time.perf_counter() - started, 4)
            if ids is not None:
                row = rows[0]
                return {
                    "batch_id": row["batch_id"],
                    "matches_live": row["matches_live"],
                    "diff": row["diff"],
                    "diff_count": row["diff_count"],
                    **summary,
                    **view,
                }
            return {
                "matches_live": all(row["matches_live"] for row in rows),
                "batches": len(rows),
                "mismatched": [row for row in rows if not row["matches_live"]],
                **summary,
                **view,
            }
        finally:
            await r.aclose()

    out = common.run(main)
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
    click.echo(
        f"{what}: replay {verdict}; {out['events']} events in {out['seconds']:.3f}s "
        f"({out['callbacks_unapplied']} callbacks not yet applied by the cj group)"
    )
    rows = out.get("diff") or [d for m in out.get("mismatched", []) for d in m["diff"]]
    for row in rows[:40]:
        where = f"{row['key']} {row['field'] or ''}"
        click.echo(f"  {where}: live={row['live']!r} replayed={row['replayed']!r}")
