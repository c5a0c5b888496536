"""Decisions on every engine (invariants 1–5 of docs/design.md).

Several CJ consumers (separate connections) apply hundreds of callbacks with duplicates,
orphans and late arrivals interleaved, while racing to advance and to close the batch;
afterwards the counters equal what the streams say, counted here independently of the
projection code, a replay equals the projection, and there is exactly one `BatchFinalized`.
A decision (a registration, the next wave, the end) is taken on one atomic read of the batch
and appended with its projection writes in one MULTI/EXEC under WATCH of the batch hash: a
decision written by another consumer meanwhile voids it, and nothing of it is written; a
callback applied meanwhile voids a batch's end, while a next wave is written on top of it.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cj.consumer import CJConsumer
from cj.continuation import Decision, advance, decide
from cj.registration import append_registration
from cj.stalls import finalize_stalled, stalled_decision
from events import codec
from events.streams import CJ_GROUP
from events.types import (
    BatchFailed,
    BatchFinalized,
    ComparisonCompleted,
    ComparisonRequested,
    WaveSubmitted,
)
from projections import keys as pkeys
from projections.batch import PENDING, BatchState
from projections.replay import replay
from projections.store import CallbackApplier, load_state
from streams.clock import server_time
from streams.keys import Keys
from streams.paging import read_stream
from streams.reader import ensure_group
from tests.contract.engines import Engine
from tests.contract.recording import recording
from tests.helpers import (
    append_and_read,
    append_batch_event,
    apply_callbacks,
    batch_with_wave,
    canonical,
    completed,
    decode_callback,
    events_of,
    failed,
    registration,
    replay_equals_live,
    snapshot,
    until,
    wave,
)

N_ESSAYS = 30
N_PAIRS = 300
CONSUMERS = 4


async def _drained(r: Any, keys: Keys) -> None:
    """Every callback entry delivered and acknowledged."""

    async def drained() -> bool:
        groups = {g["name"]: g for g in await r.xinfo_groups(keys.callbacks)}
        group = groups[CJ_GROUP.encode()]
        return bool(group["pending"] == 0 and group["lag"] == 0)

    await until(drained, timeout=20)


async def _append(r: Any, keys: Keys, events: list[Any]) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.xadd(keys.callbacks, codec.encode(event))
        await pipe.execute()


async def _race(
    engine: Engine, seed: int, dup_rate: float, orphan_count: int, withheld_rate: float
) -> None:
    rng = random.Random(seed)
    keys = engine.namespace()
    clients = [await engine.client() for _ in range(CONSUMERS + 1)]
    r = clients[-1]
    b = "batch-1"
    reg = registration(N_ESSAYS, batch_id=b, budget=N_PAIRS)
    await append_registration(r, keys, reg)
    ids = [e.essay_id for e in reg.essays]
    pairs = [(ids[i], ids[j]) for i in range(N_ESSAYS) for j in range(i + 1, N_ESSAYS)][:N_PAIRS]
    corr = [f"c{i:05d}" for i in range(len(pairs))]
    await append_batch_event(
        r, keys, wave(b, 1, [(c, a, bb) for c, (a, bb) in zip(corr, pairs, strict=True)])
    )

    pair_of = dict(zip(corr, pairs, strict=True))

    def callback(c: str) -> Any:
        x, y = pair_of[c]  # a callback names the essays it was asked about
        if rng.random() < 0.8:
            return completed(b, c, rng.choice(["essay_a", "essay_b"]), x, y)
        return failed(b, c, rng.choice(["server_error", "rate_limit", "parse_error"]), a=x, b=y)

    withheld = set(rng.sample(corr, int(withheld_rate * len(corr))))
    phase1 = [callback(c) for c in corr if c not in withheld]
    phase1 += [
        callback(c) for c in rng.sample(corr, int(dup_rate * len(corr))) if c not in withheld
    ]
    phase1 += [completed(b, f"orphan-{i}") for i in range(orphan_count)]
    rng.shuffle(phase1)
    phase3 = [callback(c) for c in withheld]
    phase3 += [callback(c) for c in rng.sample(corr, int(dup_rate * len(corr) / 2))]
    phase3 += [completed(b, f"orphan-late-{i}") for i in range(orphan_count // 2)]
    rng.shuffle(phase3)

    consumers = [
        CJConsumer(c, keys, f"cj-{i}", count=rng.choice([7, 50, 100]), block_ms=20)
        for i, c in enumerate(clients[:CONSUMERS])
    ]
    for consumer in consumers:
        await consumer.start()
    stop = asyncio.Event()

    async def consume(consumer: CJConsumer) -> None:
        while not stop.is_set():
            await consumer.step()

    tasks = [asyncio.create_task(consume(c)) for c in consumers]
    try:
        for i in range(0, len(phase1), 211):
            await _append(r, keys, phase1[i : i + 211])
        await _drained(r, keys)
        # Every consumer races to advance (as their sweeps would) and to close the batch by
        # force (as stalled-batch reapers would).
        results = await asyncio.gather(*(advance(c, keys, b) for c in clients[:CONSUMERS]))
        if withheld:
            assert all(d is None for d in results), "advanced while callbacks were in flight"
            closers = await asyncio.gather(
                *(finalize_stalled(c, keys, b, 0) for c in clients[:CONSUMERS])
            )
            assert sum(d is not None for d in closers) == 1
        for i in range(0, len(phase3), 97):
            await _append(r, keys, phase3[i : i + 97])
        await _drained(r, keys)
        await asyncio.gather(*(advance(c, keys, b) for c in clients[:CONSUMERS]))
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    # Count the streams directly, independently of the projection code.
    finals = 0
    async for _, fields in read_stream(r, keys.batches):
        event = codec.decode(fields)
        if isinstance(event, BatchFinalized) and event.batch_id == b:
            finals += 1
    by_corr: dict[str, list[tuple[tuple[int, int], Any]]] = defaultdict(list)
    total = 0
    async for entry_id, fields in read_stream(r, keys.callbacks):
        total += 1
        ms, seq = entry_id.split("-")
        by_corr[decode_callback(fields).correlation_id].append(
            ((int(ms), int(seq)), codec.decode(fields))
        )
    known = set(corr)
    expect = {"completed": 0, "failed": 0, "duplicates": 0, "orphans": 0, "late_callbacks": 0}
    for c, items in by_corr.items():
        if c not in known:
            expect["orphans"] += len(items)
        elif c in withheld:
            expect["late_callbacks"] += len(items)
        else:
            first = min(items, key=lambda t: t[0])[1]
            expect["completed" if isinstance(first, ComparisonCompleted) else "failed"] += 1
            expect["duplicates"] += len(items) - 1

    live = await load_state(r, keys, b)
    assert live is not None
    got = {k: getattr(live, k) for k in expect}
    assert got == expect
    assert live.callbacks_received == total
    assert finals == 1, "exactly one BatchFinalized"
    assert live.terminal
    # Invariant 1: completion never exceeds 100 %.
    assert live.completed + live.failed == live.accepted <= live.submitted <= live.denominator
    # Invariant 3: the projection is what a replay of the streams builds, byte for byte.
    states, _ = await replay(r, keys, {b})
    assert await snapshot(r, keys, b) == canonical(states[b], keys)


@pytest.mark.parametrize("withheld_rate", [0.0, 0.05])
@settings(
    max_examples=2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    dup_rate=st.sampled_from([0.0, 0.1, 0.3]),
    orphan_count=st.integers(0, 60),
)
async def test_invariants_hold_under_concurrent_consumers(
    engine: Engine, withheld_rate: float, seed: int, dup_rate: float, orphan_count: int
) -> None:
    """With every callback answered the consumers themselves end the batch (budget); with some
    withheld nobody may advance, and racing forced ends close it once."""
    await _race(engine, seed, dup_rate, orphan_count, withheld_rate)


async def test_a_crash_between_the_last_callback_and_the_next_wave_is_recovered_by_the_sweep(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """The callback that completes a wave is applied (and acknowledged) but its consumer dies
    before advancing: any consumer's sweep takes the step, exactly once."""
    reg = registration(6, batch_id="crash", budget=15)
    await append_registration(r, keys, reg)
    first = await advance(r, keys, reg.batch_id)
    assert first is not None
    (submitted,) = first.events
    assert isinstance(submitted, WaveSubmitted)
    consumers = [CJConsumer(await engine.client(), keys, f"cj-{i}") for i in range(3)]
    await consumers[0].start()
    callbacks = [
        completed(reg.batch_id, p.correlation_id, "essay_a", p.essay_a, p.essay_b)
        for p in submitted.pairs
    ]
    ids = await append_and_read(r, keys, callbacks, consumer="cj-0")
    await apply_callbacks(r, CallbackApplier(r, keys, "cj"), callbacks, ids)
    # ...and the process dies here, before advance()
    state = await load_state(r, keys, reg.batch_id)
    assert state is not None
    assert state.in_flight == 0 and state.waves == 1 and state.scored_wave == 0
    moved = await asyncio.gather(*(c.sweep() for c in consumers))
    assert sum(moved) == 1
    state = await load_state(r, keys, reg.batch_id)
    assert state is not None
    assert state.scored_wave == 1 and (state.waves == 2 or state.terminal)


async def test_a_registration_is_appended_with_its_projection_in_one_transaction(
    r: Any, keys: Keys
) -> None:
    reg = registration(4, batch_id="b1")
    with recording() as recorder:
        await append_registration(r, keys, reg)
    [unit] = recorder.transactions()
    assert _appended(unit) == [(keys.batches, "BatchRegistered")]
    written = {c[1] for c in unit.texts("HSET")}
    assert {pkeys.batch(keys, "b1"), pkeys.batch_docs(keys, "b1"), pkeys.batch_index(keys)} <= (
        written
    )
    [(_, registered)] = await events_of(r, keys.batches)
    assert registered.event_id == reg.event_id
    assert await snapshot(r, keys, "b1") == canonical(
        (await replay(r, keys, {"b1"}))[0]["b1"], keys
    )


async def test_a_decision_is_written_with_its_events_in_one_transaction_under_watch(
    r: Any, keys: Keys
) -> None:
    reg = registration(4, batch_id="b1", budget=4)
    await append_registration(r, keys, reg)
    with recording() as recorder:
        first = await advance(r, keys, "b1")
    assert first is not None and len(first.requests) == 4
    [read, unit] = recorder.transactions()
    assert set(read.names()) == {"HGETALL"} and ("HGETALL", pkeys.batch(keys, "b1")) in read.texts(
        "HGETALL"
    )
    assert unit.names()[0] == "WATCH" and unit.texts("WATCH")[0][1:] == (pkeys.batch(keys, "b1"),)
    assert [stream for stream, _ in _appended(unit)] == [keys.requests] * 4 + [keys.batches]
    assert {pkeys.batch(keys, "b1"), pkeys.batch_corr(keys, "b1")} <= {
        c[1] for c in unit.texts("HSET")
    }
    # The end: scores and BatchFinalized, with the projection, in one transaction too.
    callbacks = [
        completed("b1", q.correlation_id, "essay_a", q.essay_a.essay_id, q.essay_b.essay_id)
        for q in first.requests
    ]
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    ids = await append_and_read(r, keys, callbacks)
    await apply_callbacks(r, CallbackApplier(r, keys, CJ_GROUP), callbacks, ids)
    with recording() as recorder:
        last = await advance(r, keys, "b1")
    assert last is not None and last.terminal is not None
    [_, unit] = recorder.transactions()
    assert [kind for _, kind in _appended(unit)] == ["BatchScored", "BatchFinalized"]
    assert pkeys.batch(keys, "b1") in {c[1] for c in unit.texts("HSET")}
    state = await load_state(r, keys, "b1")
    assert state is not None and state.status == "finalized"
    assert await snapshot(r, keys, "b1") == canonical(
        (await replay(r, keys, {"b1"}))[0]["b1"], keys
    )


async def _stray(engine: Engine, r: Any, keys: Keys, batch_id: str) -> Any:
    """A coroutine function applying, on another connection, one callback no request asked for
    (it changes the batch hash's counters, as any callback does)."""
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    other = await engine.client()
    stray = completed(batch_id, "unknown-cid")
    [entry_id] = await append_and_read(other, keys, [stray])

    async def apply_stray() -> None:
        await apply_callbacks(other, CallbackApplier(other, keys, CJ_GROUP), [stray], [entry_id])

    return apply_stray


def _meanwhile(
    then: Any, decider: Callable[[BatchState], Decision | None] = decide
) -> tuple[Any, list[Decision | None]]:
    """A decider that runs the coroutine function `then` (on the test's loop) while taking its
    first decision, and the list of the decisions it took."""
    loop = asyncio.get_running_loop()
    decisions: list[Decision | None] = []

    def deciding(state: BatchState) -> Decision | None:
        decision = decider(state)
        decisions.append(decision)
        if len(decisions) == 1:
            asyncio.run_coroutine_threadsafe(then(), loop).result(timeout=10)
        return decision

    return deciding, decisions


async def test_a_callback_applied_while_deciding_a_wave_is_counted_and_the_wave_kept(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """The wave does not depend on what the callback changed: it is written on top of the
    callback's counts, not taken again."""
    await append_registration(r, keys, registration(6, batch_id="b1"))
    deciding, decisions = _meanwhile(await _stray(engine, r, keys, "b1"))
    taken = await advance(r, keys, "b1", decider=deciding)
    [decided] = decisions
    assert taken is not None and decided is not None
    assert [e.event_id for e in taken.events] == [e.event_id for e in decided.events]
    state = await load_state(r, keys, "b1")
    assert state is not None and state.orphans == 1 and state.callbacks_received == 1
    assert state.waves == 1 and state.in_flight == state.submitted == len(taken.requests)
    assert set(state.corr) == {q.correlation_id for q in taken.requests}
    await replay_equals_live(r, keys, "b1")


async def test_a_decision_written_while_deciding_voids_the_other(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """Two consumers decide the same step: the one written second is not written at all, and
    taken again on the new state (where there is nothing to do: the wave is out)."""
    await append_registration(r, keys, registration(6, batch_id="b1"))
    other = await engine.client()
    theirs: list[Decision | None] = []

    async def other_advances() -> None:
        theirs.append(await advance(other, keys, "b1"))

    deciding, decisions = _meanwhile(other_advances)
    assert await advance(r, keys, "b1", decider=deciding) is None
    [voided, again] = decisions
    assert voided is not None and voided.requests and again is None
    [written] = theirs
    assert written is not None and written.requests
    requests = [e for _, e in await events_of(r, keys.requests)]
    assert {q.correlation_id for q in requests} == {q.correlation_id for q in written.requests}
    waves = [e for _, e in await events_of(r, keys.batches) if isinstance(e, WaveSubmitted)]
    assert len(waves) == 1
    await replay_equals_live(r, keys, "b1")


async def _ids_are_numbered_once(r: Any, keys: Keys, batch_id: str) -> list[str]:
    """The correlation ids of every wave and request of the batch, in the streams: each once,
    numbered 1, 2, ... in the order they were planned, as many as the batch counts."""
    waves = [
        e
        for _, e in await events_of(r, keys.batches)
        if isinstance(e, WaveSubmitted) and e.batch_id == batch_id
    ]
    ids = [p.correlation_id for w in waves for p in w.pairs]
    assert ids == [str(k) for k in range(1, len(ids) + 1)]
    requested = [
        e.correlation_id
        for _, e in await events_of(r, keys.requests)
        if isinstance(e, ComparisonRequested) and e.batch_id == batch_id
    ]
    assert requested == ids
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.submitted == len(state.pairs) == len(ids)
    return ids


async def test_a_wave_numbered_on_a_state_another_wave_was_written_on_is_not_written(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """Correlation ids are numbered per batch from its count of pairs: two consumers deciding
    the next wave on the same state number it alike, and only one of them is written; the
    other is decided again on the new state (a wave written on top of another would repeat
    its ids, and the fold would take its pairs for the first's)."""
    reg = registration(8, batch_id="b1", budget=60)
    await append_registration(r, keys, reg)
    first = await advance(r, keys, "b1")
    assert first is not None
    callbacks = [
        completed("b1", q.correlation_id, "essay_a", q.essay_a.essay_id, q.essay_b.essay_id)
        for q in first.requests
    ]
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    ids = await append_and_read(r, keys, callbacks)
    await apply_callbacks(r, CallbackApplier(r, keys, CJ_GROUP), callbacks, ids)
    other = await engine.client()
    theirs: list[Decision | None] = []

    async def other_advances() -> None:
        theirs.append(await advance(other, keys, "b1"))

    deciding, decisions = _meanwhile(other_advances)
    assert await advance(r, keys, "b1", decider=deciding) is None
    [voided, again] = decisions
    [written] = theirs
    assert voided is not None and written is not None and again is None
    same = [q.correlation_id for q in voided.requests]
    assert same == [q.correlation_id for q in written.requests]
    assert same[0] == str(len(first.requests) + 1)
    await _ids_are_numbered_once(r, keys, "b1")
    await replay_equals_live(r, keys, "b1")


async def test_racing_deciders_and_callbacks_never_repeat_a_correlation_id(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """Consumers race to take overlapping waves while callbacks are applied beside them, to
    the batch's end: every id is planned once, numbered in order, and the replay agrees."""
    rng = random.Random(13)
    reg = registration(12, batch_id="race", budget=150)
    await append_registration(r, keys, reg)
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    clients = [await engine.client() for _ in range(3)]
    applier = CallbackApplier(r, keys, CJ_GROUP)
    answered: set[str] = set()

    def early(state: BatchState) -> Decision | None:
        return decide(state, 0.5)

    for _ in range(300):
        state = await load_state(r, keys, "race")
        assert state is not None
        if state.terminal:
            break
        out = sorted(c for c, v in state.corr.items() if v == PENDING and c not in answered)
        chosen = rng.sample(out, min(len(out), rng.randint(1, 8)))
        answered.update(chosen)
        callbacks = [
            completed("race", c, rng.choice(["essay_a", "essay_b"]), *state.pairs[c][1:])
            for c in chosen
        ]
        entry_ids = await append_and_read(r, keys, callbacks)
        await asyncio.gather(
            apply_callbacks(r, applier, callbacks, entry_ids),
            *(advance(c, keys, "race", decider=early) for c in clients),
        )
    else:
        raise AssertionError("the batch did not end")
    ids = await _ids_are_numbered_once(r, keys, "race")
    assert len(ids) > len(reg.essays) * 2, "more than the first wave was planned"
    await replay_equals_live(r, keys, "race")


async def test_a_callback_applied_while_deciding_the_end_voids_it(
    engine: Engine, r: Any, keys: Keys
) -> None:
    """A batch's end names the requests still in flight: it is written only on the state it
    was decided on, so a callback applied meanwhile makes it be taken again."""
    batch_id, _requests = await batch_with_wave(r, keys)
    later = await server_time(r) + timedelta(hours=1)
    deciding, decisions = _meanwhile(
        await _stray(engine, r, keys, batch_id), lambda s: stalled_decision(s, 0, later)
    )
    taken = await advance(r, keys, batch_id, decider=deciding)
    [_, again] = decisions
    assert taken is not None and taken.terminal is not None and again is not None
    assert [e.event_id for e in taken.events] == [e.event_id for e in again.events]
    ends = [e for _, e in await events_of(r, keys.batches) if isinstance(e, BatchFailed)]
    assert len(ends) == 1
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.orphans == 1 and state.terminal and state.in_flight == 0
    await replay_equals_live(r, keys, batch_id)


def _appended(unit: Any) -> list[tuple[str, str]]:
    """(stream, event type) of every append of a unit, in order: plain XADDs, and the appends
    made inside a script (registration and a batch's last event also write range hints; a
    decision's requests are appended by one script, `queue_requests`)."""
    out: list[tuple[str, str]] = []

    def append(stream: str, flat: list[str]) -> None:
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        found = codec.entry_data(fields)  # either form
        assert found is not None
        out.append((stream, found[0].decode()))

    for call in unit.calls:
        args = [a.decode() if isinstance(a, bytes) else str(a) for a in call]
        name = args[0].upper()
        if name == "XADD":
            append(args[1], args[3:])
        elif name in ("EVAL", "EVALSHA"):
            n = int(args[2])
            script_keys, argv = args[3 : 3 + n], args[3 + n :]
            if n == 1 and script_keys[0].endswith("lps:requests"):
                # the requests: per request, its count of names and values, then them
                i = 0
                while i < len(argv):
                    append(script_keys[0], argv[i + 1 : i + 1 + int(argv[i])])
                    i += 1 + int(argv[i])
            elif keys_batches := [k for k in script_keys if k.endswith("cj:batches")]:
                kind = next(
                    (a for a in argv if a in ("BatchRegistered", "BatchFinalized", "BatchFailed")),
                    None,
                )
                if kind is None:  # registration: ARGV[1] is the event's JSON
                    kind = "BatchRegistered" if '"essays"' in argv[0] else "?"
                out.append((keys_batches[0], kind))
    return out
