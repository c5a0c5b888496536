"""Connecting to the Redis the settings name, or to an embedded one (fakeredis).

A command line must say at once, and in one line, when that Redis cannot be used: `open_redis`
checks the connection before the command does anything (one attempt, within
CJS_REDIS_CONNECT_TIMEOUT_S), where the client itself would retry for seconds; a worker instead
waits for Redis to come (streams/resilience.py). URLs are shown with their password masked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from app.errors import ConfigError, RedisUnavailable
from app.settings import Settings
from events.redact import mask_url
from streams import client as streams_client

EMBEDDED = "embedded (fakeredis)"


def connect(settings: Settings, *, embedded_ok: bool = True) -> tuple[Any, str]:
    """A client for REDIS_URL, or an embedded in-process Redis (fakeredis) when none is set;
    with what it is (the URL masked). A REDIS_URL that is no Redis URL is a ConfigError."""
    url = settings.redis_url
    if not url and not embedded_ok:
        raise _missing_url("workers need a shared Redis")
    try:
        client, _ = streams_client.connect(
            url,
            retries=settings.redis_retries,
            embedded_ok=embedded_ok,
            connect_timeout_s=settings.redis_connect_timeout_s,
            cluster=settings.redis_cluster,
        )
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL {mask_url(url)!r} is not a Redis URL: {exc}") from exc
    return client, mask_url(url) if url else EMBEDDED


def _missing_url(why: str) -> ConfigError:
    return ConfigError(f"REDIS_URL is not set: {why}; e.g. REDIS_URL=redis://localhost:6379/0")


async def check_reachable(client: Any, settings: Settings) -> None:
    """One connection, handshake and PING within CJS_REDIS_CONNECT_TIMEOUT_S, without the
    client's retries; RedisUnavailable naming the (masked) URL and the reason otherwise.
    A cluster client: its first view of the cluster (CLUSTER SLOTS from REDIS_URL's node)."""
    timeout = settings.redis_connect_timeout_s
    where = mask_url(settings.redis_url)
    if not hasattr(client, "connection_pool"):  # RedisCluster
        async with _usable(f"Redis Cluster at {where}", timeout * 2):
            await client.initialize()
            await client.ping()
        return
    pool = client.connection_pool
    conn = pool.connection_class(**{**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)})
    try:
        async with _usable(f"Redis at {where}", timeout, " (CJS_REDIS_CONNECT_TIMEOUT_S)"):
            await conn.connect()
            await conn.send_command("PING")
            await conn.read_response()
    finally:
        await conn.disconnect()


@contextlib.asynccontextmanager
async def _usable(what: str, timeout: float, hint: str = "") -> AsyncIterator[None]:
    """RedisUnavailable naming `what` when the block takes longer than `timeout` seconds or
    meets a Redis or network error."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as exc:
        raise RedisUnavailable(f"{what} did not answer within {timeout:g}s{hint}") from exc
    except (RedisError, OSError) as exc:
        raise RedisUnavailable(f"cannot use {what}: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """An error's text for one line: its message, or its class when it has none."""
    text = str(exc).strip()
    return text or type(exc).__name__


async def open_checked(settings: Settings, *, need_server: bool = True) -> tuple[Any, str]:
    """A checked client and what it is: REDIS_URL's server (required when `need_server`),
    else the embedded Redis."""
    if need_server and not settings.redis_url:
        raise _missing_url("this command reads a shared Redis")
    client, where = connect(settings)
    if settings.redis_url:
        try:
            await check_reachable(client, settings)
        except BaseException:
            await client.aclose()
            raise
    return client, where


async def open_redis(settings: Settings, *, need_server: bool = True) -> Any:
    """A client for a command that reads a shared Redis (`need_server`), else maybe embedded."""
    client, _ = await open_checked(settings, need_server=need_server)
    return client
