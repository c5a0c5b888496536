"""The whole pipeline on a real redis-server: several CJ consumers and LPS workers, both modes."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from app.settings import Settings
from app.wiring import InProcess, cj_consumer
from cj.continuation import advance
from cj.registration import append_registration
from cj.step_lease import StepLease, lease_keys
from events import codec
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import (
    BundleDispatched,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    Essay,
    Mode,
    ProviderAttemptFailed,
)
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from projections.replay import replay
from projections.store import CallbackApplier, load_state
from streams.client import connect
from streams.keys import Keys
from streams.paging import read_stream
from tests.helpers import canonical, registration, snapshot
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis


async def _events(r: Any, stream: str) -> list[tuple[str, Any]]:
    return [(entry_id, codec.decode(fields)) async for entry_id, fields in read_stream(r, stream)]


async def _wait_terminal(r: Any, keys: Keys, batch_id: str, runner: InProcess) -> Any:
    for _ in range(3000):
        runner.check()
        state = await load_state(r, keys, batch_id)
        assert state is not None
        if state.terminal:
            return state
        await asyncio.sleep(0.01)
    assert state is not None
    raise AssertionError(f"batch not finalized: {state.accepted}/{state.denominator}")


async def _run_to_end(
    r: Any,
    keys: Keys,
    settings: Settings,
    batch_id: str,
    profile: str,
    *,
    cj: int,
    lps: int,
    concurrency: int = 8,
) -> Any:
    """The registered batch started and run to its end by consumers and workers in this
    process, on the mock judge with `profile`; its final state."""
    runner = InProcess(
        r,
        keys,
        settings,
        lambda name: make_provider(name, mock_profile=PROFILES[profile]),
        cj_consumers=cj,
        lps_workers=lps,
        concurrency=concurrency,
    )
    runner.start()
    await advance(r, keys, batch_id)
    try:
        return await _wait_terminal(r, keys, batch_id, runner)
    finally:
        await runner.close()


@pytest.mark.parametrize(
    ("mode", "profile"), [("per_request", "flaky"), ("serial_bundle", "flaky")]
)
async def test_every_request_ends_in_exactly_one_accepted_callback(
    shared_redis: Any, mode: Mode, profile: str
) -> None:
    r = shared_redis
    keys = Keys(f"p{uuid.uuid4().hex[:6]}:")
    settings = Settings(
        retry_base_delay_s=0.001,
        retry_max_delay_s=0.01,
        cooldown_rate_limit_s=0.005,
        cooldown_overloaded_s=0.005,
        block_ms=50,
    )
    reg = registration(24, batch_id="b-" + mode, mode=mode, budget=150)
    await append_registration(r, keys, reg)
    state = await _run_to_end(r, keys, settings, reg.batch_id, profile, cj=2, lps=2, concurrency=4)

    requests = [e for _, e in await _events(r, keys.requests) if isinstance(e, ComparisonRequested)]
    callbacks = [e for _, e in await _events(r, keys.callbacks)]
    dispatches = [e for _, e in await _events(r, keys.dispatches)]
    per_corr = Counter(c.correlation_id for c in callbacks)
    assert set(per_corr) == {q.correlation_id for q in requests}
    assert set(per_corr.values()) == {1}, "one callback per request"
    assert state.accepted == len(requests) == state.submitted <= state.denominator
    assert state.completed == sum(isinstance(c, ComparisonCompleted) for c in callbacks)
    assert state.failed == sum(isinstance(c, ComparisonFailed) for c in callbacks)
    # Provider calls = failed attempts + completed comparisons; flaky produced some of each.
    attempts = [d for d in dispatches if isinstance(d, ProviderAttemptFailed)]
    assert attempts and {a.error.error_type for a in attempts} <= {
        "rate_limit",
        "overloaded",
        "server_error",
        "timeout",
        "max_tokens",
    }
    bundles = [d for d in dispatches if isinstance(d, BundleDispatched)]
    if mode == "serial_bundle":
        assert bundles and all(1 <= b.size <= 64 for b in bundles)
        assert sum(b.size for b in bundles) == len(requests)
        # One failing item never takes its bundle down: items after a failure still complete.
        for bundle in bundles:
            outcomes = {
                c.correlation_id: c for c in callbacks if c.correlation_id in bundle.correlation_ids
            }
            assert len(outcomes) == bundle.size
    else:
        assert not bundles
    # Requests name their essays by id alone (anchors, texts: registered once per batch).
    for q in requests:
        assert (q.essay_a, q.essay_b) == (Essay(q.essay_a.essay_id), Essay(q.essay_b.essay_id))
        assert q.mode == mode and q.provider == "mock" and q.content_key
    for stream, group in ((keys.requests, LPS_GROUP), (keys.callbacks, CJ_GROUP)):
        assert (await r.xpending(stream, group))["pending"] == 0
    states, _ = await replay(r, keys, {reg.batch_id})
    assert await snapshot(r, keys, reg.batch_id) == canonical(states[reg.batch_id], keys)


async def test_a_step_lease_left_by_a_dead_consumer_does_not_stall_the_batch(
    shared_redis: Any,
) -> None:
    """A consumer killed while it held a batch's step lease (cj/step_lease.py) leaves the lease
    behind: the live consumers only leave notes for it, and their sweep takes the steps."""
    r = shared_redis
    keys = Keys(f"p{uuid.uuid4().hex[:6]}:")
    settings = Settings(block_ms=50, reaper_interval_s=0.05)
    reg = registration(16, batch_id="b-lease", budget=60)
    await append_registration(r, keys, reg)
    lease, note = lease_keys(keys, reg.batch_id)
    await r.set(lease, "killed-consumer", px=600_000)  # outlives the test: only the sweep helps
    state = await _run_to_end(r, keys, settings, reg.batch_id, "ideal", cj=2, lps=1)
    assert state.waves > 1, "the later waves were taken while the lease was held"
    assert await r.get(lease) in (b"killed-consumer", "killed-consumer")
    assert await r.exists(note), "the consumers asked for steps and left notes"
    finals = [e for _, e in await _events(r, keys.batches) if type(e).__name__ == "BatchFinalized"]
    assert len(finals) == 1
    states, _ = await replay(r, keys, {reg.batch_id})
    assert await snapshot(r, keys, reg.batch_id) == canonical(states[reg.batch_id], keys)


async def test_a_delivery_whose_reply_was_lost_is_read_again_by_its_consumer(
    shared_redis: Any,
) -> None:
    """Redis delivers a read's entries before it answers. When the reply is lost (a dropped
    connection) and the client retries the read, the consumer holds entries it never saw,
    which nobody else claims. Here the lost reply is made exact: the callback is appended and
    read for the running consumer in one MULTI, so it never reaches the consumer's own read.
    The consumer's reaper pass must read it again, or the batch waits for it for ever."""
    r = shared_redis
    keys = Keys(f"p{uuid.uuid4().hex[:6]}:")
    settings = Settings(block_ms=50, reaper_interval_s=0.05, processing_timeout_s=0.2)
    reg = registration(8, batch_id="b-lost-reply", budget=40)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    requests = [e for _, e in await _events(r, keys.requests) if isinstance(e, ComparisonRequested)]
    consumer = cj_consumer(r, keys, settings, "cj-lost-reply")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop, sweep_every_s=settings.reaper_interval_s))

    def callback(q: ComparisonRequested) -> dict[str, bytes]:
        return codec.encode(_answer(q))

    try:
        await _until(_consumer_reading(r, keys))
        async with r.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.callbacks, callback(requests[0]))
            pipe.xreadgroup(CJ_GROUP, "cj-lost-reply", {keys.callbacks: ">"}, count=1)
            lost_id, _ = await pipe.execute()
        for q in requests[1:]:
            await r.xadd(keys.callbacks, callback(q))

        async def all_applied() -> bool:
            state = await load_state(r, keys, reg.batch_id)
            assert state is not None
            pending = (await r.xpending(keys.callbacks, CJ_GROUP))["pending"]
            return state.callbacks_received >= len(requests) and pending == 0

        await _until(all_applied)
    finally:
        stop.set()
        await task
    state = await load_state(r, keys, reg.batch_id)
    assert state is not None
    assert state.callbacks_received == len(requests) and state.duplicates == 0
    assert lost_id


async def test_after_a_redis_fault_the_consumer_advances_batches_whose_advance_was_lost(
    redis_server: RedisServer, real_redis: Any
) -> None:
    """A fault between a page's apply (its callbacks acknowledged: never delivered again) and
    its batch's advance leaves the batch complete and still: here the wave's callbacks are
    applied as a consumer that then died applied them (delivered to it, acknowledged by the
    apply, no advance). A running consumer that meets a Redis fault (its connection killed)
    sweeps once Redis answers again, not a reaper pass later (600 s here)."""
    r = real_redis
    keys = Keys(f"p{uuid.uuid4().hex[:6]}:")
    settings = Settings(block_ms=50, reaper_interval_s=600)
    reg = registration(8, batch_id="b-lost-advance", budget=40)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    requests = [e for _, e in await _events(r, keys.requests) if isinstance(e, ComparisonRequested)]
    client, _ = connect(redis_server.url, retries=0)  # the fault reaches the consumer's loop
    consumer = cj_consumer(client, keys, settings, "cj-running")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop, sweep_every_s=settings.reaper_interval_s))

    async def next_wave_planned() -> bool:
        state = await load_state(r, keys, reg.batch_id)
        return state is not None and state.waves >= 2

    try:
        await _until(_consumer_reading(r, keys))
        callbacks = [_answer(q) for q in requests]
        async with r.pipeline(transaction=True) as pipe:
            for c in callbacks:
                pipe.xadd(keys.callbacks, codec.encode(c))
            pipe.xreadgroup(CJ_GROUP, "cj-died", {keys.callbacks: ">"}, count=len(callbacks))
            *ids, _ = await pipe.execute()
        applier = CallbackApplier(r, keys, CJ_GROUP)
        results = await applier.apply_page(
            [(c, i.decode()) for c, i in zip(callbacks, ids, strict=True)]
        )
        assert [o for o, _ in results] == [b"accepted"] * len(callbacks)
        state = await load_state(r, keys, reg.batch_id)
        assert state is not None and (state.in_flight, state.waves) == (0, 1)
        await r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await _until(next_wave_planned, 20.0)
    finally:
        stop.set()
        await task
        await client.aclose()


async def test_a_step_cancelled_while_redis_is_down_ends_cancelled(
    redis_server: RedisServer,
) -> None:
    """The step lease lets go of its lease after its step, also when the step fails. When the
    step is cancelled while Redis is down, that release fails too; its ConnectionError took
    the cancellation's place, and the CJ consumer's loop, taking it for an outage, went on:
    a consumer that could not be cancelled (asyncio.run's teardown waited for ever)."""
    client, _ = connect(redis_server.url, retries=0)
    lease = StepLease(client, Keys(f"p{uuid.uuid4().hex[:6]}:"), "cj-1")
    down = asyncio.Event()

    async def step() -> bool:
        redis_server.stop(kill=True)
        down.set()
        await asyncio.Event().wait()  # until cancelled
        return True

    task = asyncio.create_task(lease.run("b-cancelled", step))
    try:
        await down.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await client.aclose()


def _consumer_reading(r: Any, keys: Keys) -> Callable[[], Awaitable[bool]]:
    """Whether a CJ consumer reads `keys`' callbacks (past its start-up sweep), for `_until`."""

    async def consumer_reading() -> bool:
        try:
            return bool(await r.xinfo_consumers(keys.callbacks, CJ_GROUP))
        except Exception:  # the group is not there yet
            return False

    return consumer_reading


def _answer(q: ComparisonRequested) -> ComparisonCompleted:
    """The judge's answer to `q` (essay A wins)."""
    return ComparisonCompleted(
        batch_id=q.batch_id,
        correlation_id=q.correlation_id,
        essay_a_id=q.essay_a.essay_id,
        essay_b_id=q.essay_b.essay_id,
        winner="essay_a",
        confidence=3.0,
    )


async def _until(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {condition.__name__}")
        await asyncio.sleep(0.01)
