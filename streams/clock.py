"""The Redis server's clock: the one time every worker agrees on (entry ids carry it too)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def server_time(r: Any) -> datetime:
    """Now, by the Redis server (TIME)."""
    return time_of(await r.time())


def time_of(reply: Any) -> datetime:
    """The moment TIME's reply (seconds, microseconds) says, as the command or a script gives it."""
    seconds, micros = reply
    return EPOCH + timedelta(seconds=int(seconds), microseconds=int(micros))
