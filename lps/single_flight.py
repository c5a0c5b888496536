"""One read in flight per key: the callers that need it at the same time share it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

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
            flight = self._register(key, asyncio.ensure_future(read()))
        # A caller cancelled while waiting leaves the read to the others.
        return await asyncio.shield(flight)

    def along(
        self,
        pipe: Any,
        keys: Iterable[K],
        queue: Callable[[Any, K], int],
        learn: Callable[[K, list[Any] | BaseException], V],
    ) -> Callable[[list[Any] | BaseException], None]:
        """Reads of `keys` sent on `pipe`, a pipeline of the caller's (executed without raising
        on a reply that is an error), shared as `run`'s are: calls that would read a key
        meanwhile await its read. A key whose read is in flight already is left to it.
        `queue(pipe, key)` queues a key's commands (returns how many), `learn(key, replies)`
        makes its value of their replies, or of the exception that stopped the round trip.
        Returns what ends the reads, to be called once with the replies of these commands (in
        order) or that exception, whatever happens: nobody waits for ever. It never raises."""
        started: list[tuple[K, asyncio.Future[V], int]] = []
        for key in keys:
            if key not in self._inflight:
                flight = self._register(key, asyncio.get_running_loop().create_future())
                started.append((key, flight, queue(pipe, key)))

        def take(replies: list[Any] | BaseException) -> None:
            at = 0
            for key, flight, n in started:
                mine = replies[at : at + n] if isinstance(replies, list) else replies
                at += n
                # Every flight ends, and `take` does not raise (the caller's other reads end
                # after it), even when `learn` fails on a reply: a flight left open held every
                # later read of its key for ever (`run` awaits it, `along` skips it). What
                # `learn` raised goes to those waiting for that key.
                try:
                    value = learn(key, mine)
                except Exception as exc:
                    if not flight.done():
                        flight.set_exception(exc)
                        flight.exception()  # retrieved: nobody need be waiting for it
                    continue
                if not flight.done():
                    flight.set_result(value)

        return take

    def _register(self, key: K, flight: asyncio.Future[V]) -> asyncio.Future[V]:
        """`flight` as the read in flight of `key` until it is done."""
        self._inflight[key] = flight
        flight.add_done_callback(lambda _: self._inflight.pop(key, None))
        return flight
