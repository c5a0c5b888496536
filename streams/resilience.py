"""Keeping a consumer loop alive across Redis restarts and failures, and stopping it promptly.

redis-py retries a command a few times on its own (see streams/client.connect);
when Redis stays away longer than that, or answers with an error that passes (out of
memory, read-only after a failover, loading, busy: the table is streams/errors.py),
the loops of the workers wait with a capped exponential backoff and try again, instead
of dying (a supervisor restarting them would only make a crash loop of it).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from redis.exceptions import RedisClusterException, RedisError

from streams.errors import Policy, kind_of, policy_of
from streams.metrics import REDIS_RECONNECTS
from streams.reader import GroupReader

log = structlog.get_logger("streams.resilience")

# What a worker loop catches and hands to `policy_of`: a bug among these is raised again.
# A Redis Cluster in a failover or a resharding raises, for a while, errors its client did
# not absorb in its own retries (some are no RedisError: a slot no node covers); they are
# classified like the single-node ones and the worker refreshes its view of the slots.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    RedisError,
    RedisClusterException,
    ConnectionError,
    OSError,
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
) -> Policy:
    """After a Redis error that passes (streams/errors.py): log it, drop the connections if
    the policy says so, back off, and have the reader re-read its own pending entries (what
    it held may have been half done). Raises `exc` again when it is no such error (a bug).
    A `recreate` is the caller's to do (it knows where the group belongs); returns the policy."""
    policy = policy_of(exc)
    if policy is None:
        raise exc
    if backoff.fresh:  # once per outage, not per attempt
        REDIS_RECONNECTS.labels(reader.group).inc()
    if policy is Policy.RECONNECT:
        await disconnect(reader.r)
    delay = backoff.next()
    log.warning(
        "redis_unavailable",
        consumer=consumer,
        error_kind=kind_of(exc),
        policy=str(policy),
        error=str(exc)[:200],
        retry_in_s=delay,
    )
    reader.rewind()
    if not await sleep_unless(stop, delay):
        await refresh_topology(reader.r)
    return policy


async def disconnect(r: Any) -> None:
    """Drop every pooled connection of `r`: the next command connects afresh (to wherever the
    URL points now, after a failover)."""
    pool = getattr(r, "connection_pool", None)
    if pool is not None:
        with contextlib.suppress(Exception):
            await pool.disconnect()
