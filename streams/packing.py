"""Commands packed by hiredis (C) on redis-py's asyncio connections.

redis-py's asyncio connections pack every command in Python, one encode and one bytes join
per argument; its synchronous client packs with hiredis when it is installed, the asyncio
one does not. A comparison sends about 80 arguments (its request's XADD, the LPS commit
script, its share of the callback script's batch): packing them was 5–8 % of a worker's CPU
(issue 11). `hiredis.pack_command` gives the same bytes (tests/test_packing.py); a value
redis-py refuses (None, bool, ...) is refused here too, as redis-py's DataError.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.exceptions import DataError

_PACKING: dict[type[Any], type[Any]] = {}
# What hiredis writes as redis-py would; anything else goes through `_plain` first.
_PLAIN = frozenset({bytes, str, int, float})
_UTF8 = frozenset({"utf-8", "utf8"})  # hiredis writes str as strict UTF-8 only


class _HiredisPacking:
    """Mixin for a redis-py asyncio connection class: `pack_command` by hiredis."""

    encoder: Any

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
