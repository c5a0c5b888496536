"""Connecting to the Redis the settings name, or to an embedded one (fakeredis)."""

from __future__ import annotations

from typing import Any

from app.errors import RedisUnavailable
from app.settings import Settings
from streams import client as streams_client


def connect(settings: Settings, *, embedded_ok: bool = True) -> tuple[Any, str]:
    """A client for REDIS_URL, or an embedded in-process Redis (fakeredis) when none is set."""
    return streams_client.connect(
        settings.redis_url, retries=settings.redis_retries, embedded_ok=embedded_ok
    )


async def open_redis(settings: Settings, *, need_server: bool = True) -> Any:
    """A client for a command that reads a shared Redis (`need_server`), else maybe embedded."""
    if need_server and not settings.redis_url:
        raise RedisUnavailable(
            "REDIS_URL is not set. This command reads a shared Redis; e.g. REDIS_URL=redis://localhost:6379/0"
        )
    client, _ = connect(settings)
    return client
