"""The Redis client: a shared server when a URL is given, else an embedded in-process Redis."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from copy import copy
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster, TransactionStrategy
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.redact import mask_url
from streams.packing import install as packed_by_hiredis
from streams.packing import packing

# RESP2, as every reply here is read (issue 11): redis-py 8 asks for RESP3 by default, and
# hiredis builds a RESP3 map (HGETALL, a batch's pairs and callbacks) about five times slower
# than the flat RESP2 array redis-py then pairs up: 0.84 against 0.16 ms of client CPU for a
# 1,089-field hash. redis-py 5 to 7 spoke RESP2 unless asked. The cluster client too
# (`Cluster`: it mends the one thing of redis-py 8.1's cluster transactions that RESP2 breaks).
PROTOCOL = 2

# What CLIENT SETINFO tells the server, given once: left to redis-py, a pool made from a URL
# looks its own version up in the installed packages' metadata for every connection it opens
# (≈ 0.5 ms of CPU each, 2.6 ms on a busy machine): at start-up, and again for every
# connection after Redis comes back.
DRIVER = DriverInfo(lib_version=redis.__version__)


class TopologyChanged(RedisConnectionError):
    """The cluster moved under a command: a blocked XREADGROUP on a key whose slot moved
    away (`UNBLOCKED the stream key no longer exists`), or a connection of a node closed by
    a refresh of the slots while a command was on it (redis-py then fails with an
    AttributeError). Transient, like a lost connection: the worker waits and reads again."""


def _moved(exc: Exception, what: object) -> Exception:
    if isinstance(exc, AttributeError):
        return TopologyChanged(f"connection closed under {what!r}: {exc}")
    if isinstance(exc, ResponseError) and str(exc).startswith("UNBLOCKED"):
        return TopologyChanged(str(exc))
    return exc


class _Pipeline(ClusterPipeline):
    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute(*args, **kwargs)
        except (AttributeError, ResponseError) as exc:
            raise _moved(exc, "pipeline") from exc

    # redis-py runs each command of a cluster transaction (WATCH, the reads under it, the
    # commands after MULTI) in a thread with an event loop of its own, the caller's loop blocked
    # meanwhile (`_Transaction` spares most of them that). When a refresh of the slots is due
    # (after a failover, a MOVED) that thread refreshes first, on the client's lock: bound to
    # the caller's loop it fails (RuntimeError); held by a task of the caller's loop,
    # mid-refresh, it waits forever (a worker hung). So the refresh is done on the caller's
    # loop before a WATCH, and a command of a transaction finding one due (a fault met by
    # another task since) is not sent: the transient fault it is, the caller backs off and
    # goes again.

    async def watch(self, *names: Any) -> None:  # type: ignore[override]
        if self.cluster_client._initialize:
            await self.cluster_client.initialize()
        await super().watch(*names)  # type: ignore[no-untyped-call]
        # redis-py retries a transaction's connection error on a new connection, which holds
        # no WATCH: the MULTI/EXEC would run unguarded (a stale decision appended, or one
        # appended twice). Once watching, a lost connection fails the transaction instead, as
        # redis-py's standalone client does, and the caller reads and decides again.
        strategy = self._execution_strategy
        if isinstance(strategy, TransactionStrategy) and strategy._retry.get_retries():
            strategy._cjs_retry = strategy._retry  # type: ignore[attr-defined]
            once = copy(strategy._retry)
            once.update_retries(0)
            strategy._retry = once

    async def reset(self) -> None:  # type: ignore[override]
        strategy = self._execution_strategy
        if isinstance(strategy, TransactionStrategy):
            strategy._retry = getattr(strategy, "_cjs_retry", strategy._retry)
        await super().reset()  # type: ignore[no-untyped-call]

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._transaction and self.cluster_client._initialize:
            raise TopologyChanged(f"cluster slots being refreshed: {args[0]!r} not sent")
        try:
            return super().execute_command(*args, **kwargs)
        except RuntimeError as exc:
            raise TopologyChanged(f"slots refreshed under {args[0]!r}: {exc}") from exc


class _Transaction(TransactionStrategy):
    """redis-py's cluster transaction, each of its commands handled on the caller's thread
    when it can be.

    What redis-py runs in a thread with an event loop of its own for every command of a
    transaction (WATCH included) is the command's slot from its keys, then queueing it (after
    MULTI) or giving the coroutine that sends it at once (under WATCH) for the caller to
    await. That waits for nothing when the keys are known without asking a node (every
    command sent here) and no refresh of the slots is due: it is done here then, and
    otherwise left to the thread. A thread and an event loop cost ≈ 0.37 ms of CPU and 0.5 ms
    of the caller's loop, stopped meanwhile (session 16); a decision's write sends about ten
    commands."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        client = self._pipe.cluster_client
        if not client._initialize and _keys_known(client, args[0]):
            done, value = _at_once(self._execute_command(*args, **kwargs))
            if done:
                return value
        return super().execute_command(*args, **kwargs)


def _keys_known(client: RedisCluster, command: Any) -> bool:
    """Whether redis-py finds the keys of `command` without asking a node (COMMAND GETKEYS):
    EVAL and EVALSHA, and every command it knows whose keys do not move."""
    name = (command.decode() if isinstance(command, bytes) else str(command)).lower()
    if name in ("eval", "evalsha"):
        return True
    info: Any = client.commands_parser.commands.get(name.split()[0])
    return info is not None and "movablekeys" not in info["flags"]


def _at_once(step: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """(True, its result) when the coroutine `step` runs to its end without waiting for
    anything (its exception, raised, when it fails); else (False, None), `step` closed where
    it would have waited."""
    try:
        step.send(None)
    except StopIteration as end:
        return True, end.value
    step.close()
    return False, None


def _keys_dropped(callback: Callable[..., Any]) -> Callable[..., Any]:
    def call(response: Any, keys: Any = None, **options: Any) -> Any:
        return callback(response, **options)

    return call


class Cluster(RedisCluster):
    """redis-py's `RedisCluster`, with the two faults of a moving cluster it does not
    absorb reported as `TopologyChanged` (a ConnectionError) instead, speaking RESP2.

    redis-py 8.1's cluster transactions hand every reply callback the command's options,
    `keys` among them (its client-side cache's), which RESP2's callbacks do not take
    (HGETALL's: a TypeError; its RESP3 ones happen to); its other paths drop `keys` first.
    So every callback here drops it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command, callback in list(self.response_callbacks.items()):
            self.response_callbacks[command] = _keys_dropped(callback)
        # Commands packed in C, as the standalone client's (streams/packing.py): the nodes
        # known now and those found later (made from these keyword arguments).
        packed = packing(self.connection_kwargs["connection_class"])
        self.connection_kwargs["connection_class"] = packed
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = packed

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, ResponseError) as exc:
            raise _moved(exc, args[0]) from exc

    async def _determine_slot(self, command: Any, *args: Any) -> int:
        # redis-py asks a node (COMMAND GETKEYS, a round trip) for the keys of a command whose
        # keys "move", XREADGROUP among them: every read of every consumer loop, ≈ 11 round
        # trips a comparison in bench/cluster.py (session 16). Its keys are the first half of
        # what follows STREAMS (after GROUP's two names, which may be anything).
        name = command.decode() if isinstance(command, bytes) else str(command)
        start = {"XREADGROUP": 3, "XREAD": 0}.get(name.upper())
        if start is not None:
            upper = [
                (a.decode(errors="replace") if isinstance(a, bytes) else str(a)).upper()
                for a in args
            ]
            if "STREAMS" in upper[start:]:
                at = upper.index("STREAMS", start) + 1
                slots = {self.keyslot(key) for key in args[at : at + (len(args) - at) // 2]}
                if len(slots) == 1:
                    return slots.pop()
        return await super()._determine_slot(command, *args)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = _Pipeline  # type: ignore[type-abstract]
        if isinstance(pipe._execution_strategy, TransactionStrategy):
            pipe._execution_strategy.__class__ = _Transaction
        return pipe


def connect(
    url: str | None,
    *,
    retries: int = 8,
    embedded_ok: bool = True,
    connect_timeout_s: float | None = None,
    cluster: bool = False,
) -> tuple[Any, str]:
    """A client for `url` (each command retried `retries` times before the caller sees the
    error; a TCP connect given up after `connect_timeout_s`), or an embedded Redis (fakeredis)
    when `url` is None; returns it and what it is (the URL with its password masked: it is
    shown and logged). A `url` that is no Redis URL: ValueError.

    With `cluster`, `url` names any node of a Redis Cluster and the client is redis-py's
    `RedisCluster`: it follows MOVED/ASK, refreshes its view of the slots after a failover,
    runs a MULTI/WATCH on the node owning its (one) slot and an EVALSHA where its keys are."""
    if url and cluster:
        return (
            Cluster.from_url(
                url,
                decode_responses=False,
                protocol=PROTOCOL,
                retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
                socket_connect_timeout=connect_timeout_s,
                # A failover leaves slots uncovered for a few seconds: commands wait
                # (ClusterDownError is retried), they are not refused at once.
                require_full_coverage=False,
                reinitialize_steps=1,
                # Per node: every partition's loop blocks on a connection of its own (redis-py's
                # default of 100 runs out with 16 partitions on one master).
                max_connections=4096,
                driver_info=DRIVER,
            ),
            mask_url(url),
        )
    if url:
        client = aioredis.from_url(
            url,
            decode_responses=False,
            protocol=PROTOCOL,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=15,
            socket_connect_timeout=connect_timeout_s,
            driver_info=DRIVER,
        )
        # Commands packed in C (redis-py's asyncio client packs them in Python).
        return packed_by_hiredis(client), mask_url(url)
    if not embedded_ok:
        raise RuntimeError("REDIS_URL is not set: workers need a shared Redis server")
    import fakeredis

    return fakeredis.FakeAsyncRedis(decode_responses=False), "embedded (fakeredis)"
