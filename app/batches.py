"""Reading one batch's projection for a front end (the CLI, later a dashboard)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from app.archive import Manifest, archived_manifest, archived_state
from app.connection import open_redis
from app.errors import NotFound
from app.settings import Settings, keys_for
from projections.batch import BatchState
from projections.store import load_state
from streams.keys import Keys

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
