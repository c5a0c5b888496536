"""Continuation decisions (pure) and how batches end, through the real consumers on fakeredis.
Racing consumers, the sweep and the atomicity of a decision, on every engine:
tests/contract/test_decision.py."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
from prometheus_client import REGISTRY

from app.settings import Settings
from app.views import results_view
from app.wiring import InProcess
from cj.continuation import (
    SPLIT_HALF_LATER,
    SSR_LATER,
    advance,
    comparisons_of,
    decide,
    final_scores,
    numbered_ids,
    score,
    stop_reason,
)
from cj.grades import graded_scores
from cj.registration import append_registration
from cj.scoring import classical_ssr
from events import codec
from events.types import (
    BatchFailed,
    BatchFinalized,
    BatchScored,
    PairRequest,
    Reliabilities,
    WaveSubmitted,
    new_id,
)
from lps.providers.mock import PROFILES, MockProfile
from lps.providers.registry import make_provider
from projections.batch import apply_batch_event, apply_callback, register
from projections.store import load_state
from streams.keys import Keys
from tests.helpers import completed, failed, registration


def _state_after_wave(n: int = 6, budget: int | None = None, **kw: Any) -> Any:
    state = register(registration(n, batch_id="b", budget=budget, **kw))
    decision = decide(state)
    assert decision is not None
    (wave,) = decision.events
    assert isinstance(wave, WaveSubmitted)
    assert len(decision.requests) == len(wave.pairs) <= state.denominator
    return apply_batch_event(state, wave), wave


def test_first_decision_is_a_wave_within_the_budget() -> None:
    state, wave = _state_after_wave(6, budget=5)
    assert wave.wave == 1 and len(wave.pairs) == 5 == state.submitted == state.in_flight


def test_nothing_happens_while_callbacks_are_in_flight() -> None:
    state, wave = _state_after_wave(6)
    for pair in wave.pairs[:-1]:
        apply_callback(
            state, completed("b", pair.correlation_id, "essay_a", pair.essay_a, pair.essay_b), "1-1"
        )
    assert state.in_flight == 1
    assert decide(state) is None


def test_budget_used_finalizes_after_scoring() -> None:
    state, wave = _state_after_wave(6, budget=8)
    for i, pair in enumerate(wave.pairs):
        apply_callback(
            state,
            completed("b", pair.correlation_id, "essay_a", pair.essay_a, pair.essay_b),
            f"{i}-0",
        )
    decision = decide(state)
    assert decision is not None
    scored, final = decision.events
    assert isinstance(scored, BatchScored) and scored.comparisons == 8
    assert isinstance(final, BatchFinalized) and final.reason == "budget" and final.abandoned == []


def test_scores_of_a_wave_before_the_last_are_ungraded_and_shown_graded() -> None:
    """A running batch's scores carry θ and SE alone (a fraction of the bytes); what shows
    them grades them with the function CJ grades the last scores with: same grades."""
    state, wave = _state_after_wave(8, budget=40)
    for i, pair in enumerate(wave.pairs):
        winner = "essay_a" if i % 3 else "essay_b"
        apply_callback(
            state, completed("b", pair.correlation_id, winner, pair.essay_a, pair.essay_b), f"{i}-0"
        )
    decision = decide(state)
    assert decision is not None
    scored, second = decision.events
    assert isinstance(scored, BatchScored) and isinstance(second, WaveSubmitted)
    assert not scored.graded and scored.reliability is not None
    assert all(s.grade is None and not s.grade_probabilities for s in scored.scores)
    assert scored.warnings == [] and scored.grade_boundaries == {}
    thin = len(codec.encode(scored)["data"])
    graded = graded_scores(scored, state.essays, state.config.grade_scale, final=False)
    assert graded.graded and all(s.grade_probabilities for s in graded.scores)
    assert [s.rank for s in graded.scores] == list(range(1, 9))
    assert thin < len(codec.encode(graded)["data"]) / 2
    state = apply_batch_event(state, scored)
    view = results_view(state)
    assert [e["grade_probabilities"] for e in view["essays"]] == [
        s.grade_probabilities for s in graded.scores
    ]
    assert view["warnings"] == graded.warnings
    # The last scores are graded when written: grading them again changes nothing.
    final = score(state, final=True)
    assert final.graded and all(s.rank for s in final.scores)
    assert graded_scores(final, state.essays, state.config.grade_scale, final=True) == final
    # What `decide` writes last (the last wave's scores completed, not fitted again) is the
    # same event.
    completed_last = final_scores(state, score(state))
    same = {"event_id": final.event_id, "occurred_at": final.occurred_at}
    assert msgspec.structs.replace(completed_last, **same) == final
    assert final.reliability is not None and final.reliability.split_half_na != SPLIT_HALF_LATER


def test_the_classical_ssr_is_computed_for_the_last_scores_alone() -> None:
    """Nothing decides on the classical SSR: a running batch's scores say it comes at the end
    (the fields still decode), and the last scores carry the value `classical_ssr` gives."""
    state, wave = _state_after_wave(10, budget=45)
    k = 0
    while True:
        for pair in wave.pairs:
            # The essay numbered higher wins, but one time in four: scores that spread.
            a_higher = int(pair.essay_a[1:]) > int(pair.essay_b[1:])
            winner = "essay_a" if a_higher != (k % 4 == 0) else "essay_b"
            apply_callback(
                state,
                completed("b", pair.correlation_id, winner, pair.essay_a, pair.essay_b),
                f"{k}-0",
            )
            k += 1
        decision = decide(state)
        assert decision is not None
        if decision.terminal is not None:
            break
        for event in decision.events:
            state = apply_batch_event(state, event)
        wave = decision.events[-1]
        assert isinstance(wave, WaveSubmitted)
    running = score(state)
    assert running.reliability is not None and running.reliability.posterior is not None
    assert running.ssr is None and running.reliability.ssr is None
    assert running.reliability.ssr_na == SSR_LATER
    assert codec.decode(codec.encode(running)) == running
    expected = classical_ssr([e.essay_id for e in state.essays], comparisons_of(state))
    assert expected.value is not None
    written = decision.events[0]  # what `decide` wrote when the batch ended
    assert isinstance(written, BatchScored)
    for last in (score(state, final=True), final_scores(state, running), written):
        assert last.reliability is not None
        assert last.ssr == last.reliability.ssr == round(expected.value, 6)
        assert last.reliability.ssr_na == ""


def test_mostly_failures_fail_the_batch_with_a_reason() -> None:
    state, wave = _state_after_wave(6)
    for i, pair in enumerate(wave.pairs):
        cb = (
            failed("b", pair.correlation_id, a=pair.essay_a, b=pair.essay_b)
            if i % 4
            else completed("b", pair.correlation_id, "essay_a", pair.essay_a, pair.essay_b)
        )
        apply_callback(state, cb, f"{i}-0")
    decision = decide(state)
    assert decision is not None
    assert isinstance(decision.terminal, BatchFailed)
    assert decision.terminal.reason == "too_many_failures"
    assert decide(apply_batch_event(state, decision.terminal)) is None


def test_terminal_batches_never_advance() -> None:
    state, _ = _state_after_wave(4)
    apply_batch_event(
        state, BatchFinalized(batch_id="b", reason="stalled", abandoned=list(state.corr))
    )
    assert state.in_flight == 0 and decide(state) is None


async def _run(r: Any, keys: Keys, profile: MockProfile, n: int = 12, **kw: Any) -> Any:
    reg = registration(n, batch_id="run", **kw)
    await append_registration(r, keys, reg)
    runner = InProcess(
        r,
        keys,
        Settings(retry_base_delay_s=0.0, retry_max_delay_s=0.0, block_ms=20),
        lambda name: make_provider(name, mock_profile=profile),
    )
    runner.start()
    await advance(r, keys, reg.batch_id)
    try:
        for _ in range(2000):
            runner.check()
            state = await load_state(r, keys, reg.batch_id)
            assert state is not None
            if state.terminal:
                return state
            await asyncio.sleep(0.01)
    finally:
        await runner.close()
    raise AssertionError("batch did not end")


async def test_a_judge_that_always_fails_ends_the_batch_failed(fake_redis: Any, keys: Keys) -> None:
    broken = MockProfile("broken", latency_ms=0.0, faults=(("max_tokens", 1.0),))
    state = await _run(fake_redis, keys, broken)
    assert state.status == "failed" and state.finalize_reason == "failed"
    assert "too_many_failures" in state.failure_message
    assert state.completed == 0 and state.failed == state.submitted


async def test_the_stopping_rule_ends_a_batch_as_reliable_before_its_budget(
    fake_redis: Any, keys: Keys
) -> None:
    """24 essays the mock judge tells apart easily: R passes 0.8 early, so the batch ends
    `reliable` once every essay has had its minimum of 10 comparisons, well before the
    budget (all 276 pairs, under the default cap of 30 per essay)."""
    profile = dataclasses.replace(PROFILES["cj_generic_batch"], latency_ms=0.0)
    state = await _run(fake_redis, keys, profile, n=24)
    assert state.status == "finalized" and state.finalize_reason == "reliable"
    assert state.denominator == 276 and 120 <= state.submitted < 160  # cap: all 276 pairs
    final = state.scores
    assert final is not None and final.reliability is not None
    assert final.reliability.posterior is not None and final.reliability.posterior >= 0.8
    assert final.rank_stability is not None and final.rank_stability >= 0.99
    # The last scores carry the split-half reliability; every earlier wave says when.
    assert final.reliability.split_half_splits == 20 and final.reliability.split_half is not None
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in REGISTRY.collect()
        for s in metric.samples
    }
    assert samples[("cj_batches_finalized_total", (("reason", "reliable"),))] >= 1
    assert samples[("cj_callbacks_total", (("outcome", "accepted"),))] >= state.accepted


def _scored(state: Any, reliability: float | None, rank: float | None, comparisons: int) -> Any:
    return BatchScored(
        batch_id=state.batch_id,
        wave=state.waves,
        scores=[],
        comparisons=comparisons,
        reliability=Reliabilities(posterior=reliability),
        rank_stability=rank,
    )


def test_stop_reason_on_synthetic_batches() -> None:
    """The rule, with the defaults (R >= 0.80, ρ >= 0.99, 10 comparisons per essay), on a
    registered 20-essay batch whose counters are set by hand."""
    state = register(registration(20, batch_id="s", budget=150))
    state.waves, state.submitted = 5, 100  # 100 comparisons: exactly 10 per essay
    assert stop_reason(state, _scored(state, 0.85, 0.995, 100)) == "reliable"
    assert stop_reason(state, _scored(state, 0.79, 0.995, 100)) is None  # R short
    assert stop_reason(state, _scored(state, 0.85, 0.98, 100)) is None  # ranking moving
    assert stop_reason(state, _scored(state, 0.85, 0.995, 99)) is None  # 9.9 per essay
    assert stop_reason(state, _scored(state, None, 0.995, 100)) is None  # no R
    assert stop_reason(state, _scored(state, 0.85, None, 100)) is None  # first wave
    state.submitted = 150  # the cap
    assert stop_reason(state, _scored(state, 0.5, 0.5, 150)) == "budget"
    assert stop_reason(state, _scored(state, 0.85, 0.995, 150)) == "reliable"
    lax = dataclasses.replace(
        state, config=msgspec.structs.replace(state.config, target_reliability=0.5)
    )
    lax.submitted = 100
    assert stop_reason(lax, _scored(lax, 0.6, 0.995, 100)) == "reliable"


def test_old_stable_batches_still_decode_and_are_never_advanced() -> None:
    state, _ = _state_after_wave(4)
    apply_batch_event(state, BatchFinalized(batch_id="b", reason="stable"))
    assert state.finalize_reason == "stable" and decide(state) is None


async def test_the_reaper_role_ends_a_batch_nobody_answers(fake_redis: Any, keys: Keys) -> None:
    """No LPS worker runs: after CJS_BATCH_IDLE_TIMEOUT_S the reaper ends the batch with events,
    abandoning what is in flight, so nothing waits for ever."""
    r = fake_redis
    reg = registration(6, batch_id="lonely")
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    settings = Settings(batch_idle_timeout_s=0.05, reaper_interval_s=0.02)
    runner = InProcess(r, keys, settings, make_provider, cj_consumers=0, lps_workers=0, reapers=1)
    runner.start()
    try:
        for _ in range(500):
            state = await load_state(r, keys, reg.batch_id)
            assert state is not None
            if state.terminal:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.close()
    assert state is not None
    assert state.status == "failed" and state.failure_message.startswith("stalled")
    assert state.in_flight == 0 and set(state.corr.values()) == {"abandoned"}
    assert state.submitted == len(state.corr) > 0


# --- permanent failures, account failures, the money cap --------------------------------------


def _answer(state: Any, wave: Any, outcome: Any) -> None:
    """Apply one callback per pair of `wave`: `outcome(index, pair)` builds it, made to name
    the pair's essays (a callback naming others answers no request: an orphan)."""
    for i, pair in enumerate(wave.pairs):
        callback = msgspec.structs.replace(
            outcome(i, pair), essay_a_id=pair.essay_a, essay_b_id=pair.essay_b
        )
        apply_callback(state, callback, f"{100 + i}-0")


def test_pairs_that_failed_for_good_are_never_asked_again() -> None:
    state, wave = _state_after_wave(8, budget=28)
    permanent = {
        p.correlation_id: kind
        for p, kind in zip(wave.pairs[:2], ["refusal", "invalid_request"], strict=True)
    }
    transient = wave.pairs[2].correlation_id

    def outcome(i: int, pair: Any) -> Any:
        if pair.correlation_id in permanent:
            return failed("b", pair.correlation_id, permanent[pair.correlation_id])
        if pair.correlation_id == transient:
            return failed("b", pair.correlation_id, "server_error")
        return completed("b", pair.correlation_id, "essay_a", pair.essay_a, pair.essay_b)

    _answer(state, wave, outcome)
    decision = decide(state)
    assert decision is not None and decision.requests
    asked = {frozenset((q.essay_a.essay_id, q.essay_b.essay_id)) for q in decision.requests}
    pairs = {p.correlation_id: frozenset((p.essay_a, p.essay_b)) for p in wave.pairs}
    assert not asked & {pairs[c] for c in permanent}


def test_an_account_failure_ends_the_batch_named_by_it() -> None:
    state, wave = _state_after_wave(6)
    _answer(state, wave, lambda i, p: failed("b", p.correlation_id, "authentication"))
    decision = decide(state)
    assert decision is not None
    assert (
        isinstance(decision.terminal, BatchFailed) and decision.terminal.reason == "authentication"
    )
    # With comparisons to score, it is finalized with that reason instead.
    state, wave = _state_after_wave(6)
    _answer(
        state,
        wave,
        lambda i, p: (
            completed("b", p.correlation_id, "essay_a", p.essay_a, p.essay_b)
            if i < 8
            else failed(
                "b", p.correlation_id, "rate_limit", error_code="enforced_spend_limit_reached"
            )
        ),
    )
    decision = decide(state)
    assert decision is not None and isinstance(decision.terminal, BatchFinalized)
    assert decision.terminal.reason == "spend_limit"


def test_the_money_cap_ends_the_batch_before_a_wave_would_pass_it() -> None:
    state, wave = _state_after_wave(8, max_cost_usd=0.05)
    # wave 1: 16 comparisons at $0.002 = $0.032; wave 2 (8 more) would make $0.048: fits
    _answer(
        state,
        wave,
        lambda i, p: completed(
            "b", p.correlation_id, "essay_a", p.essay_a, p.essay_b, cost_usd=0.002
        ),
    )
    decision = decide(state)
    assert decision is not None and decision.requests and decision.terminal is None
    assert state.cost_usd == 0.032
    # at $0.003 each, wave 2 ($0.024 more) would pass the cap: the batch ends first
    state, wave = _state_after_wave(8, max_cost_usd=0.05)
    _answer(
        state,
        wave,
        lambda i, p: completed(
            "b", p.correlation_id, "essay_a", p.essay_a, p.essay_b, cost_usd=0.003
        ),
    )
    decision = decide(state)
    assert decision is not None and not decision.requests
    assert isinstance(decision.terminal, BatchFinalized)
    assert decision.terminal.reason == "cost_limit"


def test_correlation_ids_are_numbered_in_their_batch_and_never_repeat() -> None:
    """The k-th pair a batch ever planned is `k`: the next wave goes on from the last (a pair
    asked again after a failure is a new pair, with a new number), and so does an early
    (overlapping) wave."""
    state, first = _state_after_wave(8, budget=40)
    n = len(first.pairs)
    assert [p.correlation_id for p in first.pairs] == [str(k) for k in range(1, n + 1)]
    _answer(
        state,
        first,
        lambda i, p: (
            failed("b", p.correlation_id, "server_error")
            if i == 0
            else completed("b", p.correlation_id, "essay_a", p.essay_a, p.essay_b)
        ),
    )
    decision = decide(state)
    assert decision is not None
    _, second = decision.events
    assert isinstance(second, WaveSubmitted)
    assert [p.correlation_id for p in second.pairs] == [
        str(k) for k in range(n + 1, n + 1 + len(second.pairs))
    ]
    assert [q.correlation_id for q in decision.requests] == [p.correlation_id for p in second.pairs]
    for event in decision.events:
        state = apply_batch_event(state, event)
    # An early wave, decided while most of the second is still out: numbered on from it.
    _answer(
        state,
        WaveSubmitted(batch_id="b", wave=2, pairs=second.pairs[: len(second.pairs) // 2 + 1]),
        lambda i, p: completed("b", p.correlation_id, "essay_b", p.essay_a, p.essay_b),
    )
    early = decide(state, overlap=0.5)
    assert early is not None
    third = next(e for e in early.events if isinstance(e, WaveSubmitted))
    state = apply_batch_event(state, third)
    ids = [p for w in (first, second, third) for p in w.pairs]
    assert [p.correlation_id for p in ids] == [str(k) for k in range(1, len(ids) + 1)]
    assert len(state.pairs) == state.submitted == len(ids)


def test_a_batch_of_before_with_random_ids_is_numbered_on_from_its_count() -> None:
    """A batch upgraded mid-way holds random ids: its next pairs are numbered from the pairs it
    has, mixing the forms, every id unique; a number somehow taken already is passed over."""
    state = register(registration(6, batch_id="b"))
    old = [PairRequest(new_id(), "S000", f"S00{i}") for i in range(1, 5)]
    state = apply_batch_event(state, WaveSubmitted(batch_id="b", wave=1, pairs=old))
    assert numbered_ids(state, 3) == ["5", "6", "7"]
    state.pairs["6"] = (1, "S001", "S002")  # (cannot happen: a defence)
    assert numbered_ids(state, 3) == ["7", "8", "9"]


def test_ids_still_in_flight_are_listed_by_number() -> None:
    """Numbered ids read in order (2 before 10), random ids of before after them: a batch's
    abandoned requests and the stalled view list them so, not as strings sort."""
    from cj.stalls import pending_ids
    from events.ids import id_order

    assert sorted(["10", "2", "c2", "1", "abcdefghijklmnop"], key=id_order) == [
        "1",
        "2",
        "10",
        "abcdefghijklmnop",
        "c2",
    ]
    state = register(registration(12, batch_id="b1"))
    state = dataclasses.replace(state, corr={str(k): "pending" for k in (10, 2, 9)})
    assert pending_ids(state) == ["2", "9", "10"]
