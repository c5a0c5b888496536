"""Commands packed by hiredis (C) on redis-py's asyncio connections, and sent without a task
of their own when the socket takes them at once.

redis-py's asyncio connections pack every command in Python, one encode and one bytes join
per argument; its synchronous client packs with hiredis when it is installed, the asyncio
one does not. A comparison sends about 80 arguments (its request's XADD, the LPS commit
script, its share of the callback script's batch): packing them was 5–8 % of a worker's CPU
(issue 11). `hiredis.pack_command` gives the same bytes (tests/test_packing.py); a value
redis-py refuses (None, bool, ...) is refused here too, as redis-py's DataError.

redis-py (≥ 5) sends under `asyncio.wait_for` whenever a socket timeout is set (its default
since 6 is 5 s): a Task per command, about half of the ≈ 35 µs of client CPU a round trip
costs beyond its read (issue 11). Here the command is written, and only when the transport
kept some of it in its buffer (the server is slow to read, or hung) is the drain waited
for, under that timeout, by redis-py's own code: what is written when nothing is buffered
is in the kernel already, and there is nothing to wait for. Reads keep their timeout.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError

_PACKING: dict[type[Any], type[Any]] = {}
# What hiredis writes as redis-py would; anything else goes through `_plain` first.
_PLAIN = frozenset({bytes, str, int, float})
_UTF8 = frozenset({"utf-8", "utf8"})  # hiredis writes str as strict UTF-8 only


class _HiredisPacking:
    """Mixin for a redis-py asyncio connection class: `pack_command` by hiredis, and
    `send_packed_command` without a task when nothing is left to wait for."""

    encoder: Any
    socket_timeout: float | None
    is_connected: bool
    _writer: Any

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        base: Any = super()
        try:
            if not self.socket_timeout or not self.is_connected:
                await base.send_packed_command(command, check_health)
                return
            if check_health:
                await base.check_health()
            writer = self._writer
            if writer is None or writer.transport.is_closing():  # lost: redis-py's errors
                await base.send_packed_command(command, False)
                return
            if isinstance(command, str):
                command = command.encode()
            writer.writelines([command] if isinstance(command, bytes) else command)
            transport = writer.transport
            if transport.get_write_buffer_size() or transport.is_closing():
                # Some of it waits in the buffer (or the write failed): the drain, under the
                # socket timeout, and its errors as redis-py has them (it writes nothing more).
                await base.send_packed_command([], False)
        except (AttributeError, RuntimeError) as exc:
            # A send on a connection that is gone fails inside redis-py with neither a
            # ConnectionError nor an OSError, which no retry or error policy takes for a lost
            # connection (the worker's task died):
            # - AttributeError, when another task closed it under the send: redis-py's cluster
            #   client closes every connection of its nodes, those in use too, when a command
            #   meets a failover (bench/failover.py crashed an LPS worker's WAIT so);
            # - RuntimeError ("the handler is closed"), on uvloop (the workers' loop), when
            #   its transport is closed: the server went away (a Redis restart killed an LPS
            #   worker so in tests/test_worker_processes.py).
            # Both are a lost connection, said as one for the retries that handle those. In
            # this method, not a wrapper around it: a coroutine frame more on every command.
            gone = self._writer
            if gone is not None and not gone.transport.is_closing():
                raise
            raise RedisConnectionError(f"Connection lost while sending: {exc}") from exc

    def pack_command(self, *args: Any) -> list[bytes]:
        encoder = self.encoder
        if encoder.encoding.lower() not in _UTF8 or encoder.encoding_errors != "strict":
            return super().pack_command(*args)  # type: ignore[misc,no-any-return]
        # As redis-py does: a command name holding spaces ("SCRIPT LOAD") is several arguments.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        # The check in C: a generator here cost ≈ 0.05 µs an argument (issue 11).
        if not _PLAIN.issuperset(map(type, args)):
            args = tuple(_plain(a) for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


def _plain(value: Any) -> Any:
    """A value as hiredis takes it, or DataError where redis-py refuses it."""
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, bool):  # hiredis would take it as an int
        raise DataError("Invalid input of type: 'bool'. Convert to a bytes, string, int or float")
    return value


def packing(cls: type[Any]) -> type[Any]:
    """`cls` (a redis-py asyncio connection class) with commands packed by hiredis."""
    if issubclass(cls, _HiredisPacking):
        return cls
    if cls not in _PACKING:
        _PACKING[cls] = type(cls.__name__, (_HiredisPacking, cls), {})
    return _PACKING[cls]


def install(client: Any) -> Any:
    """`client` (a redis-py asyncio Redis) whose new connections pack with hiredis; itself."""
    pool = client.connection_pool
    pool.connection_class = packing(pool.connection_class)
    return client
