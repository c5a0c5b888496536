"""Keeping a consumer loop alive across Redis restarts, and stopping it promptly.

redis-py retries a command a few times on its own (see streams/client.connect);
when Redis stays away longer than that, the loops of the workers catch the
connection error, wait with a capped exponential backoff and try again, instead
of dying with the process still up (and its consumer silently gone).
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams.metrics import REDIS_RECONNECTS
from streams.reader import GroupReader

log = structlog.get_logger("streams.resilience")

# BusyLoadingError ("LOADING", while Redis replays its AOF) is a ConnectionError.
# NoScriptError means Redis restarted (its script cache is empty) under a pipeline that the
# client retried without reloading its scripts: the next attempt loads them again.
# A Redis Cluster in a failover or a resharding answers, for a while, with errors its client
# did not absorb in its own retries: CLUSTERDOWN / MASTERDOWN (ClusterError), MOVED / ASK
# (AskError) while its view of the slots is stale, TRYAGAIN during a migration, READONLY
# from a demoted master, a slot no node covers (RedisClusterException). A worker waits,
# refreshes its view of the cluster (`refresh_topology`) and goes on; it never exits.
REDIS_DOWN: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    NoScriptError,
    ConnectionError,
    OSError,
    ClusterError,
    AskError,
    TryAgainError,
    ReadOnlyError,
    RedisClusterException,
)


async def refresh_topology(r: object) -> None:
    """Have a cluster client read the slots anew (after MOVED, a failover ...); no-op for a
    single node. Errors are left for the next command to meet."""
    nodes = getattr(r, "nodes_manager", None)
    if nodes is None:
        return
    with contextlib.suppress(Exception):
        await nodes.initialize()


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, waking early when `stop` is set. Returns True when stopped."""
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
    return stop.is_set()


class Backoff:
    """Capped exponential delays: base, 2·base, 4·base, ... up to cap; reset() after a success."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self._next = base

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay

    def reset(self) -> None:
        self._next = self.base

    @property
    def fresh(self) -> bool:
        """No failure since the last reset: the next one starts an outage."""
        return self._next == self.base


async def wait_for_redis(
    stop: asyncio.Event, backoff: Backoff, exc: BaseException, reader: GroupReader, consumer: str
) -> None:
    """After a lost connection: log, back off, and have the reader re-read its own pending
    entries (what it held may have been half done when Redis went away)."""
    if backoff.fresh:  # once per outage, not per attempt
        REDIS_RECONNECTS.labels(reader.group).inc()
    delay = backoff.next()
    log.warning(
        "redis_unavailable",
        consumer=consumer,
        error=f"{type(exc).__name__}: {str(exc)[:200]}",
        retry_in_s=delay,
    )
    reader.rewind()
    if not await sleep_unless(stop, delay):
        await refresh_topology(reader.r)
