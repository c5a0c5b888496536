"""The step lease (cj/step_lease.py) on every engine: one consumer at a time runs a batch's
step, and a consumer that finds it running leaves a note that makes the holder run it again."""

from __future__ import annotations

import asyncio
from typing import Any

from cj.step_lease import StepLease, lease_keys
from streams.keys import Keys
from tests.contract.engines import Engine


async def test_a_step_asked_for_while_another_runs_it_is_run_again_by_the_holder(
    engine: Engine, r: Any, keys: Keys
) -> None:
    first, second = StepLease(r, keys, "cj-1"), StepLease(await engine.client(), keys, "cj-2")
    running, go_on = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    async def step() -> bool:
        runs.append("cj-1")
        if len(runs) == 1:
            running.set()
            await go_on.wait()
        return len(runs) == 1

    async def other_step() -> bool:
        runs.append("cj-2")
        return True

    holder = asyncio.create_task(first.run("b1", step))
    await running.wait()
    assert await second.run("b1", other_step) is False  # it leaves a note instead
    assert await second.run("b1", other_step) is False  # notes are one: it runs again once
    go_on.set()
    assert await holder is True
    assert runs == ["cj-1", "cj-1"]
    # Let go: nothing of the lease is left, and the next one asking runs the step itself.
    assert not any([await r.exists(name) for name in lease_keys(keys, "b1")])
    assert await second.run("b1", other_step) is True
    assert runs[-1] == "cj-2"


async def test_the_lease_is_let_go_when_the_step_fails(engine: Engine, r: Any, keys: Keys) -> None:
    lease = StepLease(r, keys, "cj-1")

    async def failing() -> bool:
        raise RuntimeError("the step failed")

    try:
        await lease.run("b2", failing)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the step's error is the caller's")
    assert not any([await r.exists(name) for name in lease_keys(keys, "b2")])


async def test_a_lease_of_another_holder_is_not_let_go(engine: Engine, r: Any, keys: Keys) -> None:
    """A holder whose lease expired while it ran does not delete its successor's lease."""
    lease = StepLease(r, keys, "cj-1")
    name = lease_keys(keys, "b3")[0]

    async def outlived() -> bool:
        await r.set(name, "cj-2")  # as if it had expired and cj-2 had claimed it
        return True

    assert await lease.run("b3", outlived) is True
    assert await r.get(name) in (b"cj-2", "cj-2")


async def test_a_holder_takes_back_the_lease_its_failed_release_left(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """A step whose release a Redis fault stopped leaves the lease in its holder's name: that
    holder's next step takes it back at once; another consumer still leaves a note."""
    name = lease_keys(keys, "b4")[0]
    await r.set(name, "cj-1", px=600_000)  # as the failed release left it
    runs: list[str] = []

    async def step() -> bool:
        runs.append("ran")
        return True

    assert await StepLease(await engine.client(), keys, "cj-2").run("b4", step) is False
    assert await StepLease(r, keys, "cj-1").run("b4", step) is True
    assert runs == ["ran", "ran"]  # its own step, then again for cj-2's note
    assert not any([await r.exists(n) for n in lease_keys(keys, "b4")])
