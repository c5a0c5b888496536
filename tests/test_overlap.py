"""Overlapping waves (CJS_WAVE_OVERLAP): the next wave is planned once a share of the current
one is back, from the fit so far, without the pairs in flight; A/B balance stays exact, the
counters equal the streams, there is one BatchFinalized, replay equals the projection, and
the stopping rule judges accepted comparisons only. Pure decisions, then whole batches
through the real consumers on fakeredis and on a real redis-server."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import uuid
from collections import Counter
from typing import Any

import msgspec
import pytest

from app.settings import Settings
from app.wiring import InProcess
from cj.continuation import WaveGate, advance, decide, overlap_threshold
from cj.pairs import pair_key, position_balance
from cj.registration import append_registration
from cj.stopping import per_essay
from events.types import BatchFinalized, BatchScored, ComparisonCompleted, WaveSubmitted
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from projections.batch import PENDING, BatchState, apply_batch_event, apply_callback, register
from projections.replay import replay
from projections.store import load_state
from streams.keys import Keys
from tests.helpers import canonical, completed, events_of, registration, snapshot


def _history_balance(state: BatchState) -> dict[str, int]:
    from cj.continuation import history_of

    return position_balance(history_of(state))


def _answer(state: BatchState, pairs: list[Any], start: int) -> None:
    """Judged as a judge that ranks the essays by their number, mostly (one upset in five)."""
    for k, pair in enumerate(pairs):
        a_wins = int(pair.essay_a[1:]) < int(pair.essay_b[1:])
        if (start + k) % 5 == 4:
            a_wins = not a_wins
        winner = "essay_a" if a_wins else "essay_b"
        cb = completed(state.batch_id, pair.correlation_id, winner, pair.essay_a, pair.essay_b)
        apply_callback(state, cb, f"{start + k}-0")


def _first_wave(n: int = 20, **kw: Any) -> tuple[BatchState, WaveSubmitted]:
    state = register(registration(n, batch_id="ov", **kw))
    decision = decide(state, 0.8)
    assert decision is not None
    (first,) = decision.events
    assert isinstance(first, WaveSubmitted)
    return apply_batch_event(state, first), first


def test_the_next_wave_comes_once_the_share_is_back_without_the_pairs_in_flight() -> None:
    state, first = _first_wave(20)
    size = len(first.pairs)
    assert size == 40 and overlap_threshold(state, 0.8) == 8
    assert overlap_threshold(state, 1.0) == 0
    _answer(state, first.pairs[:31], 0)  # 9 still out: more than 20 %
    assert decide(state, 0.8) is None
    _answer(state, first.pairs[31:32], 100)  # 8 out
    assert decide(state, 1.0) is None  # overlap off: all must be back
    decision = decide(state, 0.8)
    assert decision is not None
    scored, second = decision.events
    assert isinstance(scored, BatchScored) and isinstance(second, WaveSubmitted)
    # Scored on the 32 accepted comparisons only; the next wave planned on that fit.
    assert scored.wave == 1 and scored.comparisons == 32
    in_flight = {pair_key(p.essay_a, p.essay_b) for p in first.pairs[32:]}
    assert in_flight.isdisjoint(pair_key(p.essay_a, p.essay_b) for p in second.pairs)
    assert [r.correlation_id for r in decision.requests] == [p.correlation_id for p in second.pairs]
    state = apply_batch_event(apply_batch_event(state, scored), second)
    # Exact counters and balance over every request, the ones in flight included.
    assert state.submitted == size + len(second.pairs)
    assert state.in_flight == 8 + len(second.pairs)
    assert set(_history_balance(state).values()) <= {-1, 0, 1}
    # Wave 2's share back while wave 1's stragglers are still out: they hold nothing up.
    ahead = copy.deepcopy(state)
    _answer(ahead, second.pairs[: len(second.pairs) - len(second.pairs) // 5], 300)
    assert ahead.in_flight > overlap_threshold(ahead, 0.8) and ahead.in_flight > 8
    third = decide(ahead, 0.8)
    assert third is not None and isinstance(third.events[-1], WaveSubmitted)
    # Stragglers of wave 1 coming back change nothing until wave 2's own share is back.
    _answer(state, first.pairs[32:], 200)
    assert state.in_flight == len(second.pairs)
    assert decide(state, 0.8) is None


def test_the_end_waits_for_every_callback_and_comes_once() -> None:
    """A batch whose budget is spent by its first wave: at the overlap point there is
    nothing to plan, so nothing happens; the end is decided when all are back."""
    state, first = _first_wave(20, budget=40)
    _answer(state, first.pairs[:35], 0)
    assert state.in_flight == 5 <= overlap_threshold(state, 0.8)
    assert decide(state, 0.8) is None
    _answer(state, first.pairs[35:], 100)
    decision = decide(state, 0.8)
    assert decision is not None and isinstance(decision.terminal, BatchFinalized)
    assert decision.terminal.reason == "budget" and decision.terminal.abandoned == []
    for event in decision.events:
        state = apply_batch_event(state, event)
    assert decide(state, 0.8) is None


def test_the_stopping_rule_judges_accepted_comparisons_only() -> None:
    """At an overlap point the rule counts what is back, never what is in flight; when it
    holds there, no wave is planned and the batch ends (reliable) once the rest is back."""

    def lax(state: BatchState, minimum: float) -> None:
        # Reliability and stability always hold: the minimum per essay decides.
        state.config = msgspec.structs.replace(
            state.config,
            target_reliability=0.0,
            rank_stability=-1.0,
            min_comparisons_per_essay=minimum,
        )

    def wave_two(minimum: float) -> tuple[BatchState, WaveSubmitted]:
        state, first = _first_wave(20)
        lax(state, minimum)
        _answer(state, first.pairs, 0)  # 40 comparisons, 4 per essay: short of the minimum
        decision = decide(state, 0.8)
        assert decision is not None
        for event in decision.events:
            state = apply_batch_event(state, event)
        (second,) = [e for e in decision.events if isinstance(e, WaveSubmitted)]
        assert overlap_threshold(state, 0.8) >= 1
        _answer(state, second.pairs[:-1], 100)  # all back but one
        return state, second

    state, second = wave_two(0.0)
    m = len(second.pairs)
    # Needed: what the batch would have with the one in flight counted. It is not back.
    state, _ = wave_two(per_essay(40 + m, 20))
    decision = decide(state, 0.8)
    assert decision is not None and decision.terminal is None
    scored, third = decision.events
    assert isinstance(scored, BatchScored) and scored.comparisons == 40 + m - 1
    assert isinstance(third, WaveSubmitted)
    # Needed: what is back. The rule holds there, so the batch waits for the rest.
    state, second = wave_two(per_essay(40 + m - 1, 20))
    assert decide(state, 0.8) is None
    _answer(state, second.pairs[-1:], 200)
    decision = decide(state, 0.8)
    assert decision is not None and isinstance(decision.terminal, BatchFinalized)
    assert decision.terminal.reason == "reliable" and decision.terminal.abandoned == []
    (final,) = [e for e in decision.events if isinstance(e, BatchScored)]
    assert final.comparisons == 40 + m


def test_the_gate_tries_at_the_threshold_and_learns_from_what_it_decides() -> None:
    gate = WaveGate(0.8)
    state, first = _first_wave(20)
    assert gate.wants("ov", 0) and gate.wants("ov", 30)  # not seen yet: tried once
    assert gate.decide(state) is None  # 40 in flight: learns its threshold, 8
    assert not gate.wants("ov", 9) and gate.wants("ov", 8)
    _answer(state, first.pairs[:32], 0)
    decision = gate.decide(state)
    assert decision is not None
    (second,) = [e for e in decision.events if isinstance(e, WaveSubmitted)]
    # 8 stragglers of wave 1 and wave 2's own share.
    at = 8 + len(second.pairs) // 5
    assert not gate.wants("ov", at + 1) and gate.wants("ov", at)
    # Stragglers back first: tried, declined without a fit (wave 2's share is not back),
    # and the threshold learnt again, lower.
    state = apply_batch_event(apply_batch_event(state, decision.events[0]), second)
    _answer(state, first.pairs[32:], 100)
    assert gate.decide(state) is None
    assert not gate.wants("ov", len(second.pairs) // 5 + 1)
    assert gate.wants("ov", len(second.pairs) // 5)
    off = WaveGate(1.0)
    assert off.wants("x", 0) and not off.wants("x", 1)
    with pytest.raises(ValueError):
        WaveGate(0.0)


async def _run_batches(
    r: Any, keys: Keys, overlap: float, batches: int = 2, n: int = 24
) -> list[BatchState]:
    # Latency spread wide enough that the end of a wave is late: the waves do overlap.
    profile = dataclasses.replace(
        PROFILES["realistic"], latency_median_ms=5.0, latency_p99_ms=60.0, rate_limit_rpm=0.0
    )
    settings = Settings(
        wave_overlap=overlap, retry_base_delay_s=0.0, retry_max_delay_s=0.0, block_ms=20
    )
    regs = [registration(n, batch_id=f"ov-{i}", budget=140) for i in range(batches)]
    for reg in regs:
        await append_registration(r, keys, reg)
    runner = InProcess(
        r,
        keys,
        settings,
        lambda name: make_provider(name, mock_profile=profile),
        cj_consumers=2,
        lps_workers=2,
        concurrency=16,
    )
    runner.start()
    for reg in regs:
        await advance(r, keys, reg.batch_id)
    states: list[BatchState] = []
    try:
        for reg in regs:
            for _ in range(3000):
                runner.check()
                state = await load_state(r, keys, reg.batch_id)
                assert state is not None
                if state.terminal:
                    states.append(state)
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError(f"{reg.batch_id} did not end")
    finally:
        await runner.close()
    return states


async def _check_overlapping_batches(r: Any) -> None:
    keys = Keys(f"ov{uuid.uuid4().hex[:6]}:")
    states = await _run_batches(r, keys, 0.8)
    batch_events = await events_of(r, keys.batches)
    callbacks = await events_of(r, keys.callbacks)
    replayed, _ = await replay(r, keys, {s.batch_id for s in states})
    overlapped = 0
    for state in states:
        mine = [(i, e) for i, e in batch_events if getattr(e, "batch_id", "") == state.batch_id]
        finals = [e for _, e in mine if isinstance(e, BatchFinalized)]
        assert len(finals) == 1 and finals[0].abandoned == []
        waves = [(i, e) for i, e in mine if isinstance(e, WaveSubmitted)]
        answered = {
            e.correlation_id: i
            for i, e in callbacks
            if isinstance(e, ComparisonCompleted) and e.batch_id == state.batch_id
        }
        # A wave planned on a fit of fewer comparisons than were asked before it: planned
        # while some were in flight (this judge never fails).
        sizes = {w.wave: len(w.pairs) for _, w in waves}
        for _, scored in mine:
            if isinstance(scored, BatchScored) and scored.wave < len(waves):
                asked_before = sum(n for k, n in sizes.items() if k <= scored.wave)
                overlapped += scored.comparisons < asked_before
        # Exact counters, the balance over every request, and no pair asked twice.
        asked = [p for _, w in waves for p in w.pairs]
        assert state.submitted == len(asked) == state.accepted
        assert state.completed == len(answered) and state.in_flight == 0
        assert PENDING not in state.corr.values()
        keys_asked = Counter(pair_key(p.essay_a, p.essay_b) for p in asked)
        assert max(keys_asked.values()) == 1
        assert set(_history_balance(state).values()) <= {-1, 0, 1}
        assert await snapshot(r, keys, state.batch_id) == canonical(replayed[state.batch_id], keys)
    assert overlapped > 0


async def test_overlapping_batches_keep_every_invariant_on_fakeredis(fake_redis: Any) -> None:
    await _check_overlapping_batches(fake_redis)


@pytest.mark.redis
async def test_overlapping_batches_keep_every_invariant_on_a_real_redis(
    shared_redis: Any,
) -> None:
    await _check_overlapping_batches(shared_redis)


def test_the_money_cap_counts_the_requests_still_in_flight() -> None:
    """An early wave is priced with the requests still out: they will be paid too."""
    state, first = _first_wave(20)
    _answer(state, first.pairs[:32], 0)  # 8 still out
    per = 0.01
    state.config = msgspec.structs.replace(state.config, cost_per_comparison_usd=per)
    decision = decide(copy.deepcopy(state), 0.8)
    assert decision is not None
    m = len(decision.requests)
    # Room for the wave alone, not for the wave and the 8 in flight: nothing early.
    state.config = msgspec.structs.replace(state.config, max_cost_usd=per * (m + 4))
    assert decide(state, 0.8) is None
    state.config = msgspec.structs.replace(state.config, max_cost_usd=per * (m + 8.5))
    assert decide(state, 0.8) is not None
