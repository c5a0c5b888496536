"""What `cjs replay` reports: one batch (or all) replayed from the streams and compared with the
live projection, optionally written over it first (projections/rebuild.py does the work)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from app.errors import NotFound
from app.rebuild import check, rebuild
from events.streams import CALLBACKS
from projections import keys as pkeys
from projections.rebuild import expected_of, summary
from projections.replay import ReplayResult
from streams.keys import Keys


async def archived_replay_view(
    r: Any, keys: Keys, batch_id: str, archive_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """An archived batch replayed from its archive and compared with the projection it had
    when it was archived (its sha256 is in the manifest); None when it is not archived."""
    from app.archive import archived_manifest, archived_state, canonical_sha256  # fsspec, gzip

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
