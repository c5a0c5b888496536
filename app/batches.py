"""Reading one batch's projection for a front end (the CLI, later a dashboard)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from app.connection import open_redis
from app.errors import NotFound
from app.settings import Settings, keys_for
from app.views import status_view
from lps.breaker import Breaker
from projections.batch import BatchState
from projections.store import load_state
from streams.keys import Keys

T = TypeVar("T")


async def require_batch(r: Any, keys: Keys, batch_id: str) -> BatchState:
    state = await load_state(r, keys, batch_id)
    if state is None:
        raise NotFound(f"no batch {batch_id!r} under prefix {keys.prefix!r}")
    return state


async def read_view(settings: Settings, batch_id: str, view: Callable[[BatchState], T]) -> T:
    """Load one batch's projection from REDIS_URL and build a view of it."""
    r = await open_redis(settings)
    try:
        return view(await require_batch(r, keys_for(settings), batch_id))
    finally:
        await r.aclose()


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
        state = await require_batch(r, keys, batch_id)
        return status_view(state, await batch_breakers(r, keys, state))
    finally:
        await r.aclose()
