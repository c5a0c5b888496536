"""Reading batch projections for a front end (the CLI, the dashboard): one batch's view,
or the list of batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec

from app.connection import open_redis
from app.errors import NotFound
from app.settings import Settings, keys_for
from app.views import status_view
from events.text import as_str
from events.types import NANO_USD, BatchConfig
from lps.breaker import Breaker
from projections import keys as pkeys
from projections.batch import BatchState
from projections.store import batch_fields, load_state
from streams.keys import Keys

if TYPE_CHECKING:
    from app.archive import Manifest

T = TypeVar("T")


async def require_batch(r: Any, keys: Keys, batch_id: str) -> BatchState:
    state = await load_state(r, keys, batch_id)
    if state is None:
        raise NotFound(f"no batch {batch_id!r} under prefix {keys.prefix!r}")
    return state


async def load_batch(
    r: Any, keys: Keys, batch_id: str, archive_options: Mapping[str, Any] | None = None
) -> tuple[BatchState, Manifest | None]:
    """The batch's state from its live projection, or replayed from its archive (with the
    archive's manifest) once it is archived."""
    state = await load_state(r, keys, batch_id)
    if state is not None:
        return state, None
    # Only a batch without a live projection needs the archive code (and what it loads): a
    # live batch's `cjs status` starts without it.
    from app.archive import archived_manifest, archived_state

    manifest = await archived_manifest(r, keys, batch_id)
    if manifest is None:
        raise NotFound(f"no batch {batch_id!r} under prefix {keys.prefix!r}")
    state, _ = await archived_state(manifest, archive_options)
    return state, manifest


def mark_archived(view: T, manifest: Manifest | None) -> T:
    """A view of an archived batch says so: its fields, plus `archived: true`."""
    if manifest is None or not isinstance(view, dict):
        return view
    return cast(T, {**view, "archived": True})


async def read_view(settings: Settings, batch_id: str, view: Callable[[BatchState], T]) -> T:
    """Load one batch (live, or archived: from its archive) from REDIS_URL and build a view."""
    r = await open_redis(settings)
    try:
        keys = keys_for(settings)
        state, manifest = await load_batch(r, keys, batch_id, settings.archive_options)
        return mark_archived(view(state), manifest)
    finally:
        await r.aclose()


STATUSES = ("registered", "running", "finalized", "failed")
LIST_LIMIT = 50
"""Batches a list shows unless told otherwise (`cjs batches --limit`, `/api/batches?limit=`)."""
# `--status open` stands for the statuses a batch can still leave.
OPEN = ("registered", "running")
_LISTED = (
    "status",
    "registered_at",
    "last_event_at",
    "completed_at",
    "finalize_reason",
    "denominator",
    "submitted",
    "completed",
    "failed",
    "in_flight",
    "waves",
)
_NUMBERS = frozenset({"denominator", "submitted", "completed", "failed", "in_flight", "waves"})
_config = msgspec.json.Decoder(BatchConfig)


async def _configs(r: Any, keys: Keys, batch_ids: list[str]) -> list[BatchConfig | None]:
    """The batches' configs (None where a batch has none): one pipelined round trip."""
    async with r.pipeline(transaction=False) as pipe:
        for batch_id in batch_ids:
            pipe.hget(pkeys.batch_docs(keys, batch_id), "config")
        raw = await pipe.execute()
    return [None if value is None else _config.decode(value) for value in raw]


async def list_view(
    r: Any, keys: Keys, *, statuses: Iterable[str] = (), limit: int | None = None
) -> dict[str, Any]:
    """The batches of the namespace, newest registration first, with their counters, cost,
    mode, provider and model (from each batch's scalar hash and config: two pipelined round
    trips, no essays or scores loaded); only those in `statuses` when given ("open" for
    registered and running). `cjs batches` and the dashboard's lists."""
    wanted = {s for name in statuses for s in (OPEN if name == "open" else (name,))}
    listed = list(reversed(await batch_fields(r, keys, *_LISTED, "cost_nusd")))
    configs = await _configs(r, keys, [batch_id for batch_id, _ in listed])
    counts: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for (batch_id, values), config in zip(listed, configs, strict=True):
        row: dict[str, Any] = {"batch_id": batch_id}
        *counters, cost_nusd = values
        for name, value in zip(_LISTED, counters, strict=True):
            text = as_str(value) if value is not None else ""
            row[name] = int(text or 0) if name in _NUMBERS else (text or None)
        accepted = row["completed"] + row["failed"]
        row["completion_pct"] = (
            round(100.0 * accepted / row["denominator"], 2) if row["denominator"] else 0.0
        )
        row["cost_usd"] = round(int(as_str(cost_nusd or b"0")) / NANO_USD, 6)
        row["mode"] = config.mode if config else None
        row["provider"] = config.provider if config else None
        row["model"] = config.model if config else None
        status = row["status"] or "?"
        counts[status] = counts.get(status, 0) + 1
        if wanted and status not in wanted:
            continue
        rows.append(row)
    shown = rows if limit is None else rows[:limit]
    return {
        "prefix": keys.prefix,
        "total": len(listed),
        "counts": counts,
        "matching": len(rows),
        "batches": shown,
    }


async def batch_breakers(r: Any, keys: Keys, state: BatchState) -> list[dict[str, Any]]:
    """The open breakers of the batch's provider and model."""
    found = await Breaker(r, keys).states(state.config.provider, state.config.model)
    now = time.time()
    return [b.view(now) for b in found]


async def read_status(settings: Settings, batch_id: str) -> dict[str, Any]:
    """`status_view` of one batch, with the open breakers that stop its requests."""
    r = await open_redis(settings)
    try:
        keys = keys_for(settings)
        state, manifest = await load_batch(r, keys, batch_id, settings.archive_options)
        view = status_view(state, await batch_breakers(r, keys, state))
        return mark_archived(view, manifest)
    finally:
        await r.aclose()
