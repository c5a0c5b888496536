"""The Redis server's clock: the one time every worker agrees on (entry ids carry it too)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def server_time(r: Any) -> datetime:
    """Now, by the Redis server (TIME)."""
    seconds, micros = await r.time()
    return EPOCH + timedelta(seconds=int(seconds), microseconds=int(micros))
