"""What `cjs replay` reports: one batch (or all) replayed from the streams and compared with the
live projection, optionally written over it first (projections/rebuild.py does the work)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from app.errors import Conflict, NotFound
from events.streams import CALLBACKS
from projections import keys as pkeys
from projections import rebuild as projection_rebuild
from projections.rebuild import check as projection_check
from projections.rebuild import expected_of, summary
from projections.replay import ReplayResult
from streams.keys import Keys


def _groups(keys: Keys, batch_ids: list[str] | None) -> list[tuple[Keys, list[str] | None]]:
    """Where a replay of `batch_ids` runs: each batch's partition with its batches, or every
    partition (all of its batches) when None. A partition's projections, index and stats are
    its own, rebuilt and compared within it (one slot of a cluster: one MULTI each)."""
    if batch_ids is None:
        return [(part, None) for part in keys.all_partitions()]
    out: dict[Keys, list[str]] = {}
    for b in batch_ids:
        out.setdefault(keys.for_batch(b), []).append(b)
    return list(out.items())


def merge(results: list[ReplayResult]) -> ReplayResult:
    """Replays of several partitions as one: their states and counts together."""
    if len(results) == 1:
        return results[0]
    out = ReplayResult(states={}, horizon=results[0].horizon)
    for one in results:
        out.states.update(one.states)
        for name in (
            "events",
            "batch_events",
            "callbacks_applied",
            "callbacks_unapplied",
            "unknown_batch_callbacks",
            "undecodable",
        ):
            setattr(out, name, getattr(out, name) + getattr(one, name))
        out.seconds += one.seconds
    return out


async def rebuild(r: Any, keys: Keys, batch_ids: list[str] | None) -> dict[str, Any]:
    """`projections.rebuild.rebuild` in each partition concerned (atomic within each), with
    its give-up reported as a Conflict."""
    done = []
    try:
        for part, ids in _groups(keys, batch_ids):
            done.append(await projection_rebuild.rebuild(r, part, ids))
    except (projection_rebuild.KeptChanging, projection_rebuild.StreamTrimmed) as exc:
        raise Conflict(str(exc)) from exc
    if len(done) == 1:
        return done[0]
    return {
        "result": merge([d["result"] for d in done]),
        "before": [row for d in done for row in d["before"]],
        "stale_removed": [b for d in done for b in d["stale_removed"]],
        "attempts": max(d["attempts"] for d in done),
        "seconds_replay_and_compare": round(sum(d["seconds_replay_and_compare"] for d in done), 3),
        "seconds_write": round(sum(d["seconds_write"] for d in done), 3),
    }


async def check(
    r: Any, keys: Keys, batch_ids: list[str] | None
) -> tuple[ReplayResult, list[dict[str, Any]]]:
    """`projections.rebuild.check` in each partition concerned; the rows in `batch_ids`' order
    (partition by partition for all)."""
    results = []
    rows: list[dict[str, Any]] = []
    for part, ids in _groups(keys, batch_ids):
        result, part_rows = await projection_check(r, part, ids)
        results.append(result)
        rows += part_rows
    if batch_ids is not None:
        order = {b: k for k, b in enumerate(batch_ids)}
        rows.sort(key=lambda row: order.get(row["batch_id"], len(order)))
    return merge(results), rows


async def archived_replay_view(
    r: Any, keys: Keys, batch_id: str, archive_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """An archived batch replayed from its archive and compared with the projection it had
    when it was archived (its sha256 is in the manifest); None when it is not archived."""
    from app.archive import archived_manifest, archived_state, canonical_sha256  # import cycle

    started = time.perf_counter()
    manifest = await archived_manifest(r, keys, batch_id)
    if manifest is None:
        return None
    state, per = await archived_state(manifest, archive_options)
    replayed = canonical_sha256(expected_of(state, Keys()))
    matches = replayed == manifest.projection_sha256
    seconds = time.perf_counter() - started
    return {
        "batch_id": batch_id,
        "matches_live": matches,
        "diff": []
        if matches
        else [
            {
                "key": "projection_sha256",
                "field": None,
                "live": manifest.projection_sha256,
                "replayed": replayed,
            }
        ],
        "diff_count": 0 if matches else 1,
        "events": manifest.events,
        "seconds": round(seconds, 4),
        "events_per_s": round(manifest.events / seconds) if seconds > 0 else None,
        "callbacks_applied": len(per[CALLBACKS]),
        "callbacks_unapplied": 0,
        "undecodable": 0,
        "archived": True,
        "archive_url": manifest.url,
    }


async def replay_view(
    r: Any,
    keys: Keys,
    batch_ids: list[str] | None,
    *,
    write: bool,
    archive_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Replay `batch_ids` (one batch, or every batch when None) and compare with the live keys;
    with `write`, rebuild them first and compare the result. An archived batch is replayed
    from its archive (there is nothing in Redis to rebuild)."""
    if batch_ids is not None and len(batch_ids) == 1:
        archived = await archived_replay_view(r, keys, batch_ids[0], archive_options)
        if archived is not None:
            return archived
    started = time.perf_counter()
    view: dict[str, Any] = {}
    if write:
        done = await rebuild(r, keys, batch_ids)
        result: ReplayResult = done["result"]
        _, rows = await check(r, keys, batch_ids)
        view = {
            "rebuilt": True,
            "batches_written": len(result.states),
            "mismatched_before": [
                row["batch_id"] for row in done["before"] if not row["matches_live"]
            ],
            "stale_removed": done["stale_removed"],
            "orphans_unknown_batch": result.unknown_batch_callbacks if batch_ids is None else None,
            "attempts": done["attempts"],
        }
    else:
        result, rows = await check(r, keys, batch_ids)
    if batch_ids is not None and not rows[0]["in_streams"] and not rows[0]["in_projection"]:
        raise NotFound(f"no batch {batch_ids[0]!r} under prefix {keys.prefix!r}")
    sizes = summary(result)
    sizes["seconds"] = round(time.perf_counter() - started, 4)
    if batch_ids is not None:
        row = rows[0]
        # `events` is the batch's own (its cj:batches events and applied callbacks); the
        # entries read to find them are `entries_scanned`.
        sizes["entries_scanned"] = sizes["events"]
        sizes["events"] = result.batch_events
        return {
            "batch_id": row["batch_id"],
            "matches_live": row["matches_live"],
            "diff": row["diff"],
            "diff_count": row["diff_count"],
            **sizes,
            **view,
        }
    return {
        "matches_live": all(row["matches_live"] for row in rows),
        "batches": len(rows),
        "mismatched": [row for row in rows if not row["matches_live"]],
        # Archived batches are not replayed from the streams (`cjs replay BATCH` reads one).
        "archived_batches": sum(
            [int(await r.hlen(pkeys.archived_index(part))) for part in keys.all_partitions()]
        ),
        **sizes,
        **view,
    }
