"""The batch projection: pure apply semantics, the Lua transcription equal to it,
replay equal to live."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cj.continuation import Decision, queue_decision
from cj.registration import append_registration
from events.streams import CJ_GROUP
from events.types import BatchFinalized
from projections.batch import apply_batch_event, apply_callback, register
from projections.replay import replay
from projections.store import CallbackApplier, load_state
from streams.keys import Keys
from streams.reader import ensure_group
from tests.helpers import (
    append_and_read,
    canonical,
    completed,
    failed,
    registration,
    snapshot,
    wave,
)

B = "b1"


def _state(n_pairs: int = 3) -> Any:
    reg = registration(4, batch_id=B)
    state = register(reg)
    return apply_batch_event(state, wave(B, 1, [(f"c{i}", "e0", "e1") for i in range(n_pairs)]))


def test_accepts_once_and_counts_duplicates_orphans_and_late_apart() -> None:
    state = _state(3)
    state, out = apply_callback(state, completed(B, "c0"), "10-0")
    assert out == "accepted" and state.completed == 1 and state.in_flight == 2
    state, out = apply_callback(state, completed(B, "c0", "essay_b"), "11-0")
    assert out == "duplicate" and state.completed == 1 and state.duplicates == 1
    state, out = apply_callback(state, completed(B, "nope"), "12-0")
    assert out == "orphan" and state.orphans == 1 and state.orphan_ids == {"nope": 1}
    state, out = apply_callback(state, failed(B, "c1"), "13-0")
    assert out == "accepted" and state.failed == 1
    state = apply_batch_event(state, BatchFinalized(batch_id=B, reason="stable", abandoned=["c2"]))
    assert state.in_flight == 0 and state.status == "finalized"
    state, out = apply_callback(state, completed(B, "c2"), "14-0")
    assert out == "late" and state.late_callbacks == 1 and state.completed == 1
    assert state.completed + state.failed == 2 <= state.submitted <= state.denominator
    assert state.callbacks_received == 5


def test_earliest_entry_wins_whatever_the_order() -> None:
    first, second = _state(1), _state(1)
    cb_early, cb_late = failed(B, "c0"), completed(B, "c0")
    apply_callback(first, cb_early, "5-0")
    apply_callback(first, cb_late, "9-0")
    apply_callback(second, cb_late, "9-0")
    apply_callback(second, cb_early, "5-0")
    assert first.corr == second.corr == {"c0": "f 5-0 server_error"}
    assert (first.completed, first.failed, first.duplicates) == (0, 1, 1)
    assert (second.completed, second.failed, second.duplicates) == (0, 1, 1)


async def _append_batch_event(r: Any, keys: Keys, event: Any) -> None:
    state = await load_state(r, keys, event.batch_id)
    async with r.pipeline(transaction=True) as pipe:
        pipe.multi()
        queue_decision(pipe, keys, state, Decision(events=[event]))
        await pipe.execute()


# An operation: (correlation index (>= n_pairs means unknown), completed?, winner is a?,
# cost in USD)
ops_strategy = st.lists(
    st.tuples(
        st.integers(0, 7),
        st.booleans(),
        st.booleans(),
        st.sampled_from([0.0, 0.000123456, 0.0375, 1.1, 1e-9]),
    ),
    min_size=1,
    max_size=40,
)


async def _scenario(
    r: Any,
    keys: Keys,
    n_pairs: int,
    ops: list[tuple[int, bool, bool, float]],
    order: list[int],
    finalize_after: int | None,
) -> None:
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    await append_registration(r, keys, registration(4, batch_id=B, budget=6))
    await _append_batch_event(r, keys, wave(B, 1, [(f"c{i}", "e0", "e1") for i in range(n_pairs)]))
    events = [
        (
            completed(B, f"c{i}", "essay_a" if a else "essay_b", cost_usd=cost)
            if ok
            else failed(B, f"c{i}", cost_usd=cost)
        )
        for i, ok, a, cost in ops
    ]
    ids = await append_and_read(r, keys, events)
    applier = CallbackApplier(r, keys, CJ_GROUP)
    for step, index in enumerate(order):
        if finalize_after is not None and step == finalize_after:
            state = await load_state(r, keys, B)
            abandoned = sorted(c for c, v in state.corr.items() if v == "pending")
            await _append_batch_event(
                r, keys, BatchFinalized(batch_id=B, reason="budget", abandoned=abandoned)
            )
        async with r.pipeline(transaction=False) as pipe:
            await applier.queue(pipe, events[index], ids[index])
            await pipe.execute()
    states, _ = await replay(r, keys, {B})
    assert await snapshot(r, keys, B) == canonical(states[B], keys)
    live = await load_state(r, keys, B)
    assert live.completed + live.failed == live.accepted <= live.submitted <= live.denominator
    assert live.callbacks_received == len(events)
    assert live.accepted + live.duplicates + live.orphans + live.late_callbacks == len(events)
    # Every callback but orphans is paid for, summed exactly whatever the order.
    known = {f"c{i}" for i in range(n_pairs)}
    assert live.cost_nusd == sum(round(c * 1e9) for i, _, _, c in ops if f"c{i}" in known)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n_pairs=st.integers(1, 6), ops=ops_strategy, data=st.data())
def test_lua_apply_in_any_order_equals_replay_fakeredis(
    n_pairs: int, ops: list[tuple[int, bool, bool, float]], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(ops))))
    finalize_after = data.draw(st.none() | st.integers(0, len(ops) - 1))

    async def main() -> None:
        r = fakeredis.FakeAsyncRedis()
        await _scenario(r, Keys("t:"), n_pairs, ops, list(order), finalize_after)
        await r.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_lua_apply_in_any_order_equals_replay_real_redis(redis_server: Any) -> None:
    """The same property on a real redis-server (its Lua, its stream ids)."""

    @settings(max_examples=40, deadline=None)
    @given(n_pairs=st.integers(1, 6), ops=ops_strategy, data=st.data())
    def check(n_pairs: int, ops: list[tuple[int, bool, bool, float]], data: st.DataObject) -> None:
        order = data.draw(st.permutations(range(len(ops))))
        finalize_after = data.draw(st.none() | st.integers(0, len(ops) - 1))

        async def main() -> None:
            r = aioredis.from_url(redis_server.url)
            await _scenario(
                r, Keys(f"{uuid.uuid4().hex[:8]}:"), n_pairs, ops, list(order), finalize_after
            )
            await r.aclose()

        asyncio.run(main())

    check()


async def test_replayed_entry_is_applied_once(fake_redis: Any, keys: Keys) -> None:
    """A callback entry applied by two consumers (reclaim race) counts once: idempotent by
    entry id."""
    r = fake_redis
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    await append_registration(r, keys, registration(4, batch_id=B))
    await _append_batch_event(r, keys, wave(B, 1, [("c0", "e0", "e1")]))
    ids = await append_and_read(r, keys, [completed(B, "c0")])
    applier = CallbackApplier(r, keys, CJ_GROUP)
    outcomes = []
    for _ in range(2):
        async with r.pipeline(transaction=False) as pipe:
            await applier.queue(pipe, completed(B, "c0"), ids[0])
            outcomes.append((await pipe.execute())[0][0])
    assert outcomes == [b"accepted", b"replayed"]
    state = await load_state(r, keys, B)
    assert (state.completed, state.duplicates, state.callbacks_received) == (1, 0, 1)
