"""Connecting to the Redis the settings name, or to an embedded one (fakeredis)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import RedisUnavailable
from app.settings import Settings


def connect(settings: Settings, *, embedded_ok: bool = True) -> tuple[Any, str]:
    """A client for REDIS_URL, or an embedded in-process Redis (fakeredis) when none is set."""
    if settings.redis_url:
        client = aioredis.from_url(
            settings.redis_url,
            decode_responses=False,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=settings.redis_retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=15,
        )
        return client, settings.redis_url
    if not embedded_ok:
        raise RuntimeError("REDIS_URL is not set: workers need a shared Redis server")
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=False), "embedded (fakeredis)"


async def open_redis(settings: Settings, *, need_server: bool = True) -> Any:
    """A client for a command that reads a shared Redis (`need_server`), else maybe embedded."""
    if need_server and not settings.redis_url:
        raise RedisUnavailable(
            "REDIS_URL is not set. This command reads a shared Redis; e.g. REDIS_URL=redis://localhost:6379/0"
        )
    client, _ = connect(settings)
    return client
