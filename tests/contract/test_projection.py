"""The batch projection on every engine (invariants 1–4 of docs/design.md): callback.lua
accepts a callback once per correlation id and counts duplicates, orphans and late ones
apart; it applies an entry once; in any order it builds what the Python fold (replay)
builds; and replay against the live namespace folds only what the `cj` group applied."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cj.consumer import CJConsumer
from cj.registration import append_registration
from events import codec
from events.streams import CJ_GROUP
from events.types import BatchFinalized
from projections import keys as pkeys
from projections.replay import replay, replay_live
from projections.store import CallbackApplier, load_state
from streams.keys import Keys
from streams.reader import Entry, ensure_group
from tests.contract.engines import Engine
from tests.helpers import (
    append_and_read,
    append_batch_event,
    apply_callbacks,
    canonical,
    completed,
    failed,
    registration,
    snapshot,
    wave,
)

B = "b1"


async def _batch(r: Any, keys: Keys, n_pairs: int, budget: int | None = None) -> None:
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    await append_registration(r, keys, registration(4, batch_id=B, budget=budget))
    await append_batch_event(r, keys, wave(B, 1, [(f"c{i}", "e0", "e1") for i in range(n_pairs)]))


async def _apply(
    r: Any, keys: Keys, events: list[Any], ids: list[str], page: bool = True
) -> list[tuple[str, int]]:
    """callback.lua on each (event, entry id), in that order: [(outcome, in_flight left)]."""
    applier = CallbackApplier(r, keys, CJ_GROUP)
    replies = await apply_callbacks(r, applier, events, ids, page=page)
    return [(outcome.decode(), int(left)) for outcome, left in replies]


# The page's script (the consumer's) and a script call per callback (a redrive's) answer alike.
@pytest.mark.parametrize("page", [True, False], ids=["page", "each"])
async def test_a_callback_is_accepted_once_and_duplicates_orphans_late_are_counted_apart(
    r: Any, keys: Keys, page: bool
) -> None:
    await _batch(r, keys, 3)
    events = [
        completed(B, "c0"),
        completed(B, "c0", "essay_b"),
        completed(B, "nope"),
        failed(B, "c1"),
        completed(B, "c2"),  # after the batch is closed, c2 abandoned: late
        completed("no-such-batch", "c9"),
    ]
    ids = await append_and_read(r, keys, events)
    outcomes = await _apply(r, keys, events[:4], ids[:4], page)
    closing = BatchFinalized(batch_id=B, reason="stable", abandoned=["c2"])
    await append_batch_event(r, keys, closing)
    outcomes += await _apply(r, keys, events[4:], ids[4:], page)

    assert outcomes == [
        ("accepted", 2),
        ("duplicate", -1),
        ("orphan", -1),
        ("accepted", 1),
        ("late", -1),
        ("orphan", -2),  # of an unknown batch
    ]
    live = await load_state(r, keys, B)
    assert live is not None and live.status == "finalized" and live.in_flight == 0
    assert (live.completed, live.failed, live.duplicates) == (1, 1, 1)
    assert (live.orphans, live.orphan_ids, live.late_callbacks) == (1, {"nope": 1}, 1)
    assert live.completed + live.failed == 2 <= live.submitted <= live.denominator
    assert live.callbacks_received == 5
    assert live.corr["c0"] == f"c {ids[0]} essay_a" and live.corr["c2"] == "abandoned"
    # A callback naming no known batch is counted once, in the namespace's stats.
    assert await r.hget(pkeys.stats(keys), "orphans_unknown_batch") == b"1"
    # The Python fold of the same streams builds the same projection.
    states, _ = await replay(r, keys, {B})
    assert await snapshot(r, keys, B) == canonical(states[B], keys)


async def test_a_callback_entry_applied_twice_counts_once(r: Any, keys: Keys) -> None:
    """Two consumers racing on one entry (a reclaim) both run the script: the second finds the
    entry acknowledged and changes nothing (idempotence by entry id)."""
    await _batch(r, keys, 1)
    consumer = CJConsumer(r, keys, "cj-a")
    await consumer.start()
    ids = await append_and_read(r, keys, [completed(B, "c0")], consumer="cj-a")
    assert await _apply(r, keys, [completed(B, "c0")] * 2, ids * 2) == [
        ("accepted", 0),
        ("replayed", -1),
    ]
    state = await load_state(r, keys, B)
    assert state is not None
    assert (state.completed, state.duplicates, state.callbacks_received) == (1, 0, 1)
    first = await snapshot(r, keys, B)
    # Through the consumer too: handling the entry again leaves the projection as it was.
    [(_, fields)] = await r.xrange(keys.callbacks, min=ids[0], max=ids[0])
    await consumer.handle([Entry(ids[0], fields)])
    await consumer.handle([Entry(ids[0], fields)])
    assert await snapshot(r, keys, B) == first


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


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n_pairs=st.integers(1, 6), ops=ops_strategy, data=st.data())
async def test_lua_apply_in_any_order_equals_replay(
    engine: Engine,
    r: Any,
    n_pairs: int,
    ops: list[tuple[int, bool, bool, float]],
    data: st.DataObject,
) -> None:
    """Consumers apply callbacks in delivery order, not stream order; whatever the order (and
    wherever the batch is closed by force), the projection is what the replay builds."""
    order = data.draw(st.permutations(range(len(ops))))
    finalize_after = data.draw(st.none() | st.integers(0, len(ops) - 1))
    keys = engine.namespace()  # one per example
    await _batch(r, keys, n_pairs, budget=6)
    events = [
        (
            completed(B, f"c{i}", "essay_a" if a else "essay_b", cost_usd=cost)
            if ok
            else failed(B, f"c{i}", cost_usd=cost)
        )
        for i, ok, a, cost in ops
    ]
    ids = await append_and_read(r, keys, events)
    for step, index in enumerate(order):
        if step == finalize_after:
            state = await load_state(r, keys, B)
            abandoned = sorted(c for c, v in state.corr.items() if v == "pending")
            await append_batch_event(
                r, keys, BatchFinalized(batch_id=B, reason="budget", abandoned=abandoned)
            )
        await _apply(r, keys, [events[index]], [ids[index]])
    states, _ = await replay(r, keys, {B})
    assert await snapshot(r, keys, B) == canonical(states[B], keys)
    live = await load_state(r, keys, B)
    assert live.completed + live.failed == live.accepted <= live.submitted <= live.denominator
    assert live.callbacks_received == len(events)
    assert live.accepted + live.duplicates + live.orphans + live.late_callbacks == len(events)
    # Every callback but orphans is paid for, summed exactly whatever the order.
    known = {f"c{i}" for i in range(n_pairs)}
    assert live.cost_nusd == sum(round(c * 1e9) for i, _, _, c in ops if f"c{i}" in known)


async def test_replay_of_a_live_namespace_leaves_what_the_group_has_not_applied(
    r: Any, keys: Keys
) -> None:
    """Callbacks not yet delivered, or delivered and still pending, are the group's to apply:
    replay folds only entries up to its last-delivered id that are not pending, whether or not
    anything is pending."""
    await _batch(r, keys, 4)
    events = [completed(B, f"c{i}") for i in range(3)]
    ids = await append_and_read(r, keys, events[:1], consumer="w")
    for event in events[1:]:  # appended, not delivered
        ids.append((await r.xadd(keys.callbacks, codec.encode(event))).decode())
    await _apply(r, keys, events[:1], ids[:1])

    async def check(applied: int, unapplied: int) -> None:
        result = await replay_live(r, keys, {B})
        assert (result.callbacks_applied, result.callbacks_unapplied) == (applied, unapplied)
        assert await snapshot(r, keys, B) == canonical(result.states[B], keys)

    await check(1, 2)  # nothing pending, two never delivered
    await r.xreadgroup(CJ_GROUP, "w", {keys.callbacks: ">"}, count=1)
    await check(1, 2)  # one pending, one never delivered
    await r.xreadgroup(CJ_GROUP, "w", {keys.callbacks: ">"}, count=1)
    await _apply(r, keys, events[1:], ids[1:])
    await check(3, 0)
    live = await load_state(r, keys, B)
    assert live is not None and (live.completed, live.duplicates, live.in_flight) == (3, 0, 1)
