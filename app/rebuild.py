"""Rebuild and check projections partition by partition: each partition's projections, index
and stats are its own (one slot of a cluster), so a replay over several runs once in each and
its results are put together."""

from __future__ import annotations

from typing import Any

from app.errors import Conflict
from projections import rebuild as projection_rebuild
from projections.rebuild import check as projection_check
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
