"""What the production code sends to Redis, cut into its atomic units.

Every command a redis-py asyncio client sends, alone, in a pipeline or in a transaction,
is packed by its connection's `pack_command` (fakeredis connections included). While a
`recording()` is active that method notes the command and the connection, and each
connection's sequence is cut into units, each atomic on the server:

- `transaction`: MULTI ... EXEC, with the WATCH before it and the reads made under that
  WATCH (what a decision was taken on belongs to the unit);
- `script`: one EVAL / EVALSHA outside a transaction;
- `command`: any other single command.

A transaction abandoned before EXEC (UNWATCH, DISCARD, or never finished) is no unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio.connection import AbstractConnection

from streams.packing import _HiredisPacking

Call = tuple[Any, ...]


def _text(arg: Any) -> str:
    return arg.decode(errors="replace") if isinstance(arg, bytes | bytearray) else str(arg)


def normalise(args: Call) -> Call:
    """As `pack_command` sends them: a first argument such as "XINFO GROUPS" is split."""
    first = args[0]
    head = first.split() if isinstance(first, str | bytes) else [first]
    return (*(_text(h) for h in head), *args[1:])


@dataclass
class Unit:
    kind: Literal["transaction", "script", "command"]
    calls: list[Call]

    def names(self) -> list[str]:
        return [_text(call[0]).upper() for call in self.calls]

    def texts(self, name: str) -> list[tuple[str, ...]]:
        """The calls of command `name`, every argument as text."""
        return [
            tuple(_text(a) for a in call) for call in self.calls if _text(call[0]).upper() == name
        ]


@dataclass
class _Connection:
    watching: list[Call] | None = None
    queued: list[Call] | None = None


@dataclass
class Recorder:
    units: list[Unit] = field(default_factory=list)
    _connections: dict[int, _Connection] = field(default_factory=dict)

    def see(self, connection: int, args: Call) -> None:
        call = normalise(args)
        name = _text(call[0]).upper()
        c = self._connections.setdefault(connection, _Connection())
        if name == "WATCH":
            c.watching = [*(c.watching or []), call]
        elif name == "UNWATCH":
            c.watching = None
        elif name == "MULTI":
            c.queued, c.watching = list(c.watching or []), None
        elif name == "EXEC":
            if c.queued is not None:
                self.units.append(Unit("transaction", c.queued))
            c.queued = None
        elif name == "DISCARD":
            c.queued = None
        elif c.queued is not None:
            c.queued.append(call)
        elif c.watching is not None:
            c.watching.append(call)
        elif name in ("EVAL", "EVALSHA"):
            self.units.append(Unit("script", [call]))
        else:
            self.units.append(Unit("command", [call]))

    def transactions(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "transaction"]

    def scripts(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "script"]

    def clear(self) -> None:
        self.units.clear()


@contextmanager
def recording() -> Iterator[Recorder]:
    """Record every command sent by any redis-py asyncio connection inside the block: packed
    by redis-py, or by hiredis (streams/packing.py, which hands redis-py what it does not
    pack itself: that command is recorded once)."""
    recorder = Recorder()
    packing: list[Any] = []  # the connections packing a command now

    def recorded(original: Any) -> Any:
        def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
            if self in packing:
                return original(self, *args)  # type: ignore[no-any-return]
            recorder.see(id(self), args)
            packing.append(self)
            try:
                return original(self, *args)  # type: ignore[no-any-return]
            finally:
                packing.remove(self)

        return pack_command

    classes: list[Any] = [AbstractConnection, _HiredisPacking]
    originals = [cls.__dict__["pack_command"] for cls in classes]
    for cls, original in zip(classes, originals, strict=True):
        cls.pack_command = recorded(original)
    try:
        yield recorder
    finally:
        for cls, original in zip(classes, originals, strict=True):
            cls.pack_command = original
