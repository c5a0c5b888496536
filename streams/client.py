"""The Redis client: a shared server when a URL is given, else an embedded in-process Redis."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.redact import mask_url


def connect(
    url: str | None,
    *,
    retries: int = 8,
    embedded_ok: bool = True,
    connect_timeout_s: float | None = None,
) -> tuple[Any, str]:
    """A client for `url` (each command retried `retries` times before the caller sees the
    error; a TCP connect given up after `connect_timeout_s`), or an embedded Redis (fakeredis)
    when `url` is None; returns it and what it is (the URL with its password masked: it is
    shown and logged). A `url` that is no Redis URL: ValueError."""
    if url:
        client = aioredis.from_url(
            url,
            decode_responses=False,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=15,
            socket_connect_timeout=connect_timeout_s,
        )
        return client, mask_url(url)
    if not embedded_ok:
        raise RuntimeError("REDIS_URL is not set: workers need a shared Redis server")
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=False), "embedded (fakeredis)"
