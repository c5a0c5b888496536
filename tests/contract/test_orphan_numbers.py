"""A correlation id a callback named before it was asked for is never asked for, on every engine.

Correlation ids are numbered per batch (`1`, `2`, ...), so the next ones are easy to name. A
callback naming one before its wave is written is an orphan live (no request has that id
yet); replay folds the callbacks after every wave, so had a later wave asked for the same
pair under that number, the replay would accept the callback and differ from the live
projection. `numbered_ids` passes
over the numbers orphans named, and `_write` voids a wave numbered before an orphan named one
of its ids: the callback stays an orphan live and on replay.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cj.continuation import Decision, advance, decide
from cj.registration import append_registration
from events.streams import CJ_GROUP
from events.types import ComparisonCompleted, ComparisonRequested, WaveSubmitted
from projections.batch import BatchState
from projections.store import CallbackApplier, load_state
from streams.keys import Keys
from streams.reader import ensure_group
from tests.contract.engines import Engine
from tests.helpers import (
    append_and_read,
    apply_callbacks,
    completed,
    events_of,
    registration,
    replay_equals_live,
)


async def _first_wave_answered(r: Any, keys: Keys, batch_id: str) -> Decision:
    """A registered batch whose first wave is written and every request of it answered."""
    await append_registration(r, keys, registration(8, batch_id=batch_id, budget=80))
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    first = await advance(r, keys, batch_id)
    assert first is not None and first.requests
    await _apply(r, keys, [_answer(q) for q in first.requests])
    return first


async def _apply(r: Any, keys: Keys, callbacks: list[Any]) -> None:
    ids = await append_and_read(r, keys, callbacks)
    await apply_callbacks(r, CallbackApplier(r, keys, CJ_GROUP), callbacks, ids)


def _answer(request: ComparisonRequested) -> ComparisonCompleted:
    """A callback answering `request`, for the essays it names."""
    a, b = request.essay_a.essay_id, request.essay_b.essay_id
    return completed(request.batch_id, request.correlation_id, "essay_a", a, b)


async def _asked(r: Any, keys: Keys, batch_id: str) -> list[str]:
    """Every correlation id the batch's waves asked for, in the stream's order."""
    return [
        p.correlation_id
        for _, e in await events_of(r, keys.batches)
        if isinstance(e, WaveSubmitted) and e.batch_id == batch_id
        for p in e.pairs
    ]


async def test_a_number_an_orphan_named_is_passed_over_and_replay_equals_live(
    r: Any, keys: Keys
) -> None:
    first = await _first_wave_answered(r, keys, "b1")
    n = len(first.requests)
    state = await load_state(r, keys, "b1")
    assert state is not None
    planned = decide(state)  # pure: what the next wave would ask under each number
    assert planned is not None and len(planned.requests) >= 3
    # The next wave's first and third numbers, each naming the pair it would be asked for:
    # only such a callback could pass for an answer on replay (any other pair is an orphan).
    forged = [_answer(q) for q in (planned.requests[0], planned.requests[2])]
    assert [c.correlation_id for c in forged] == [str(n + 1), str(n + 3)]
    await _apply(r, keys, forged)
    forged_ids = [c.correlation_id for c in forged]
    state = await load_state(r, keys, "b1")
    assert state is not None and state.orphan_ids == dict.fromkeys(forged_ids, 1)
    second = await advance(r, keys, "b1")
    assert second is not None and len(second.requests) >= 3
    ids = [q.correlation_id for q in second.requests]
    assert ids[:3] == [str(n + 2), str(n + 4), str(n + 5)]
    assert not set(forged_ids) & set(await _asked(r, keys, "b1"))
    replayed = await replay_equals_live(r, keys, "b1")
    assert (replayed.orphans, replayed.submitted) == (2, n + len(ids))
    assert not set(forged_ids) & set(replayed.corr)


async def test_a_wave_numbered_before_an_orphan_named_one_of_its_ids_is_decided_again(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """The orphan comes in on another connection while the wave is decided: the wave naming
    its id is not written; the one decided again passes over it."""
    first = await _first_wave_answered(r, keys, "b1")
    forged = str(len(first.requests) + 2)
    other = await engine.client()
    decisions: list[Decision | None] = []

    def deciding(state: BatchState) -> Decision | None:
        decision = decide(state)
        decisions.append(decision)
        if len(decisions) == 1:
            assert decision is not None
            [asked] = [q for q in decision.requests if q.correlation_id == forged]
            asyncio.run_coroutine_threadsafe(_apply(other, keys, [_answer(asked)]), loop).result(
                timeout=10
            )
        return decision

    loop = asyncio.get_running_loop()
    written = await advance(r, keys, "b1", decider=deciding)
    voided, again = decisions
    assert voided is not None and again is not None and written is not None
    assert forged in [q.correlation_id for q in voided.requests]
    assert [q.correlation_id for q in written.requests] == [
        q.correlation_id for q in again.requests
    ]
    assert forged not in await _asked(r, keys, "b1")
    replayed = await replay_equals_live(r, keys, "b1")
    assert replayed.orphan_ids == {forged: 1} and forged not in replayed.corr


async def test_an_orphan_naming_an_id_outside_the_wave_keeps_the_wave(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """An orphan whose id the wave does not number changes nothing of it: one decision."""
    await _first_wave_answered(r, keys, "b1")
    other = await engine.client()
    decisions: list[Decision | None] = []
    loop = asyncio.get_running_loop()

    def deciding(state: BatchState) -> Decision | None:
        decisions.append(decide(state))
        if len(decisions) == 1:
            asyncio.run_coroutine_threadsafe(
                _apply(other, keys, [completed("b1", "9999")]), loop
            ).result(timeout=10)
        return decisions[-1]

    assert await advance(r, keys, "b1", decider=deciding) is not None
    assert len(decisions) == 1
    state = await replay_equals_live(r, keys, "b1")
    assert state.orphan_ids == {"9999": 1}
