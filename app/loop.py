"""The event loop a worker runs on: uvloop where it is installed, else asyncio's own.

A worker's event loop carries every request, callback and Redis round trip: with asyncio's
loop (callbacks, futures and socket readiness in Python) a Redis round trip of the pipeline's
kind (an HGET, a MULTI/EXEC pipeline) took ≈ 340 µs of client CPU, with uvloop's (the same
in C, on libuv) ≈ 290 µs, 8 tasks at once against one redis-server (issue 11).
`CJS_EVENT_LOOP=asyncio` runs on asyncio's loop instead, e.g. to tell a fault of uvloop's
from one of ours."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopKind = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, T], kind: LoopKind = "uvloop") -> T:
    """`asyncio.run(main)`, on uvloop's loop when `kind` asks for it and it is installed."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # a platform without its wheels (Windows): asyncio's loop
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


def running_kind() -> str:
    """The kind of the running loop ("uvloop" or "asyncio"), as a worker logs it."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
