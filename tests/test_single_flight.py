"""`SingleFlight`: one read in flight per key, shared by the callers that need it meanwhile,
and never left open (a flight left open would hold every later read of its key for ever)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lps.single_flight import SingleFlight


class _Pipe:
    def __init__(self) -> None:
        self.commands: list[str] = []

    def get(self, key: str) -> None:
        self.commands.append(key)


def _queue(pipe: Any, key: str) -> int:
    pipe.get(key)
    return 1


async def test_callers_meanwhile_share_one_read() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    reads = 0
    gate = asyncio.Event()

    async def read() -> str:
        nonlocal reads
        reads += 1
        await gate.wait()
        return "v"

    callers = [asyncio.create_task(flights.run("k", read)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*callers) == ["v"] * 5
    assert reads == 1
    assert await flights.run("k", read) == "v" and reads == 2  # done: the next one reads


async def test_reads_along_a_pipeline_end_with_its_replies() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    pipe = _Pipe()
    take = flights.along(pipe, ["a", "b"], _queue, lambda key, rows: f"{key}={rows}")
    waiting = asyncio.create_task(flights.run("b", _never))
    await asyncio.sleep(0)
    assert pipe.commands == ["a", "b"]
    # A key already in flight is left to its read: not queued twice.
    flights.along(pipe, ["b"], _queue, lambda key, rows: "")
    assert pipe.commands == ["a", "b"]
    take(["1", "2"])
    assert await waiting == "b=['2']"


async def test_a_failing_learn_ends_every_flight_of_the_round_trip() -> None:
    """`learn` raising on one key's replies (a reply of a shape it does not expect) used to
    leave that key's flight, and those after it, open: every later read of them waited for
    ever, and an LPS worker's calls with them. Now those waiting for that key get the error,
    the others their values, and `take` itself does not raise (the caller's other reads, of
    another state on the same pipeline, end after it)."""
    flights: SingleFlight[str, str] = SingleFlight()

    def learn(key: str, rows: Any) -> str:
        if key == "a":
            raise IndexError("no reply")
        return f"{key}={rows}"

    take = flights.along(_Pipe(), ["a", "b"], _queue, learn)
    on_a = asyncio.create_task(flights.run("a", _never))
    on_b = asyncio.create_task(flights.run("b", _never))
    await asyncio.sleep(0)
    take([])
    with pytest.raises(IndexError):
        await asyncio.wait_for(on_a, 1.0)
    assert await asyncio.wait_for(on_b, 1.0) == "b=[]"

    async def read() -> str:
        return "fresh"

    # Nothing is left in flight: the next read of either key is made afresh.
    assert await flights.run("a", read) == "fresh"
    assert await flights.run("b", read) == "fresh"


async def _never() -> str:
    await asyncio.Event().wait()
    return ""
