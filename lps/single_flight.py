"""One read in flight per key: the callers that need it at the same time share it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """The calls of an LPS page start together and each would miss a reusable read of shared
    provider state (cooldown, breakers) and ask Redis itself (issue 11): here they await the
    first one's read instead."""

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        flight = self._inflight.get(key)
        if flight is None:
            flight = self._inflight[key] = asyncio.ensure_future(read())
            flight.add_done_callback(lambda _: self._inflight.pop(key, None))
        # A caller cancelled while waiting leaves the read to the others.
        return await asyncio.shield(flight)

    def begin(self, key: K) -> asyncio.Future[V] | None:
        """A read of `key` its caller makes itself (sent with other commands) and ends by
        setting the result: calls that would read `key` meanwhile await it instead. None when
        a read of `key` is in flight already (it serves)."""
        if key in self._inflight:
            return None
        flight: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = flight
        flight.add_done_callback(lambda _: self._inflight.pop(key, None))
        return flight
