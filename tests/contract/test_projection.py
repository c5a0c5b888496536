"""The batch projection on every engine (invariants 1–4 of docs/design.md): callback.lua
accepts a callback once per correlation id and counts duplicates, orphans (an id never asked,
or asked for other essays) and late ones apart; it applies an entry once; in any order it
builds what the Python fold (replay) builds; and replay against the live namespace folds only
what the `cj` group applied."""

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
    naming,
    registration,
    snapshot,
    wave,
)

B = "b1"


async def _batch(
    r: Any,
    keys: Keys,
    n_pairs: int,
    budget: int | None = None,
    pairs: list[tuple[str, str, str]] | None = None,
) -> None:
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    await append_registration(r, keys, registration(4, batch_id=B, budget=budget))
    pairs = pairs or [(f"c{i}", "e0", "e1") for i in range(n_pairs)]
    await append_batch_event(r, keys, wave(B, 1, pairs))


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


# Essay ids JSON escapes (a quote, a backslash) or writes as UTF-8: the script compares
# encodings, which must agree with Python's comparison of the ids themselves.
ODD_A, ODD_B = 'é"1', "a\\b/ü"


@pytest.mark.parametrize("page", [True, False], ids=["page", "each"])
async def test_a_callback_naming_other_essays_than_its_pair_is_an_orphan(
    r: Any, keys: Keys, page: bool
) -> None:
    """The winner is read against the pair recorded for the correlation id: a callback with a
    known id but other essays (swapped, another pair's, another batch's) answers no request of
    ours. An orphan, paid for by nobody, the request still pending; the right answer after it
    is accepted. Python's fold (replay) and the script agree."""
    pairs = [("c0", "e0", "e1"), ("c1", "e2", "e3"), ("c2", ODD_A, ODD_B)]
    await _batch(r, keys, 3, pairs=pairs)
    usd = 0.25
    wrong = [
        naming(completed(B, "c0", cost_usd=usd), "e1", "e0"),  # swapped
        naming(completed(B, "c0", cost_usd=usd), "e2", "e3"),  # c1's essays
        naming(failed(B, "c0", cost_usd=usd), "e3", "x9"),  # another batch's (a reused id)
        naming(completed(B, "c2", cost_usd=usd), ODD_B, ODD_A),  # swapped
    ]
    right = [
        completed(B, "c0", "essay_b", cost_usd=usd),
        naming(completed(B, "c2", cost_usd=usd), ODD_A, ODD_B),
        naming(completed(B, "c0", "essay_a", cost_usd=usd), "e1", "e0"),  # swapped, answered
    ]
    ids = await append_and_read(r, keys, wrong + right)
    outcomes = await _apply(r, keys, wrong, ids[:4], page)
    assert outcomes == [("orphan", -3)] * 4
    live = await load_state(r, keys, B)
    assert live is not None
    assert live.corr == {"c0": "pending", "c1": "pending", "c2": "pending"}
    assert (live.orphans, live.orphan_ids, live.callbacks_received) == (4, {"c0": 3, "c2": 1}, 4)
    assert (live.in_flight, live.completed, live.failed, live.cost_nusd) == (3, 0, 0, 0)

    outcomes = await _apply(r, keys, right, ids[4:], page)
    assert outcomes == [("accepted", 2), ("accepted", 1), ("orphan", -3)]
    live = await load_state(r, keys, B)
    assert live is not None
    assert live.corr["c0"] == f"c {ids[4]} essay_b" and live.corr["c2"] == f"c {ids[5]} essay_a"
    assert (live.orphans, live.orphan_ids, live.duplicates) == (5, {"c0": 4, "c2": 1}, 0)
    assert (live.completed, live.in_flight, live.callbacks_received) == (2, 1, 7)
    assert live.cost_nusd == 2 * round(usd * 1e9)
    states, _ = await replay(r, keys, {B})
    assert await snapshot(r, keys, B) == canonical(states[B], keys)


async def test_a_callback_of_an_id_whose_pair_is_not_stored_is_accepted_by_its_id(
    r: Any, keys: Keys
) -> None:
    """A projection stored in part (old data): without the pair, the id alone decides."""
    await _batch(r, keys, 2)
    await r.hdel(pkeys.batch_pairs(keys, B), "c0")
    events = [naming(completed(B, "c0"), "e7", "e8"), naming(completed(B, "c1"), "e1", "e0")]
    ids = await append_and_read(r, keys, events)
    assert await _apply(r, keys, events, ids) == [("accepted", 1), ("orphan", -3)]


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
# cost in USD, the essays it names: its pair's, swapped or others)
ESSAYS = {"pair": ("e0", "e1"), "swapped": ("e1", "e0"), "other": ("e2", "e3")}
ops_strategy = st.lists(
    st.tuples(
        st.integers(0, 7),
        st.booleans(),
        st.booleans(),
        st.sampled_from([0.0, 0.000123456, 0.0375, 1.1, 1e-9]),
        st.sampled_from(["pair", "pair", "swapped", "other"]),
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
    ops: list[tuple[int, bool, bool, float, str]],
    data: st.DataObject,
) -> None:
    """Consumers apply callbacks in delivery order, not stream order; whatever the order (and
    wherever the batch is closed by force), the projection is what the replay builds."""
    order = data.draw(st.permutations(range(len(ops))))
    finalize_after = data.draw(st.none() | st.integers(0, len(ops) - 1))
    keys = engine.namespace()  # one per example
    await _batch(r, keys, n_pairs, budget=6)
    events = [
        naming(
            (
                completed(B, f"c{i}", "essay_a" if a else "essay_b", cost_usd=cost)
                if ok
                else failed(B, f"c{i}", cost_usd=cost)
            ),
            *ESSAYS[essays],
        )
        for i, ok, a, cost, essays in ops
    ]
    ids = await append_and_read(r, keys, events)
    for step, index in enumerate(order):
        if step == finalize_after:
            state = await load_state(r, keys, B)
            assert state is not None
            abandoned = sorted(c for c, v in state.corr.items() if v == "pending")
            await append_batch_event(
                r, keys, BatchFinalized(batch_id=B, reason="budget", abandoned=abandoned)
            )
        await _apply(r, keys, [events[index]], [ids[index]])
    states, _ = await replay(r, keys, {B})
    assert await snapshot(r, keys, B) == canonical(states[B], keys)
    live = await load_state(r, keys, B)
    assert live is not None
    assert live.completed + live.failed == live.accepted <= live.submitted <= live.denominator
    assert live.callbacks_received == len(events)
    assert live.accepted + live.duplicates + live.orphans + live.late_callbacks == len(events)
    # Every callback but orphans (an id never asked, or other essays) is paid for, summed
    # exactly whatever the order.
    paid = [c for i, _, _, c, essays in ops if i < n_pairs and essays == "pair"]
    assert live.cost_nusd == sum(round(c * 1e9) for c in paid)
    assert live.orphans == len(ops) - len(paid)


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
