"""The mock judge: seeded, position-biased, and failing only in the shared error taxonomy."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import msgspec
import pytest

from events.types import ERROR_TYPES, ComparisonRequested, Essay
from lps.providers.base import ProviderError
from lps.providers.mock import (
    PROFILES,
    MockProvider,
    _outcome_draws,
    _rng,
    profile_from_env,
    quality_of,
    win_probability,
)


def _req(i: int, q_a: float = 0.0, q_b: float = 0.0, seed: int = 1) -> ComparisonRequested:
    return ComparisonRequested(
        batch_id="b",
        correlation_id=f"c{i}",
        wave=1,
        seed=seed,
        essay_a=Essay(f"a{i}", "text", mock_quality=q_a),
        essay_b=Essay(f"b{i}", "text", mock_quality=q_b),
    )


async def _judge_all(provider: MockProvider, requests: list[ComparisonRequested]) -> list[str]:
    return [(await provider.judge(r)).winner for r in requests]


def test_env_overrides_apply_to_the_chosen_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CJS_MOCK_PROFILE", "slow")
    monkeypatch.setenv("CJS_MOCK_POSITION_BIAS", "0.9")
    monkeypatch.setenv("CJS_MOCK_LATENCY_MS", "0")
    profile = profile_from_env()
    assert (profile.name, profile.position_bias, profile.latency_ms) == ("slow", 0.9, 0.0)
    with pytest.raises(ValueError, match="unknown mock profile"):
        profile_from_env("nope")


def test_same_seed_same_judgements_and_position_bias_shows() -> None:
    profile = PROFILES["cj_generic_batch"]
    zero = type(profile)(profile.name, position_bias=0.3, noise=0.5, latency_ms=0.0)
    requests = [_req(i) for i in range(4000)]
    first = asyncio.run(_judge_all(MockProvider(zero), requests))
    again = asyncio.run(_judge_all(MockProvider(zero), requests))
    assert first == again
    share_a = Counter(first)["essay_a"] / len(first)
    # Equal qualities: slot A wins about σ(0.3) ≈ 0.574 of the time (noise flattens it a little).
    assert 0.54 < share_a < 0.60
    assert abs(win_probability(0.0, 0.0, 0.3) - 0.5744) < 1e-3


def test_outcomes_follow_content_pair_slots_and_occurrence_not_ids_or_attempts() -> None:
    """What lets a replay separate a mode's effect from noise: the same judgement for the
    same batch content, pair, slots and occurrence, whatever the (random) batch and
    correlation ids and however often a worker had to retry."""
    zero = type(PROFILES["cj_generic_batch"])("z", latency_ms=0.0)

    def req(i: int, **kw: object) -> ComparisonRequested:
        base = {"batch_id": "b", "correlation_id": f"c{i}", "content_key": "k", "occurrence": 0}
        return msgspec.structs.replace(_req(i), **{**base, **kw})

    requests = [req(i) for i in range(400)]
    first = asyncio.run(_judge_all(MockProvider(zero), requests))
    renamed = [req(i, batch_id="other", correlation_id=f"x{i}", wave=7) for i in range(400)]
    assert asyncio.run(_judge_all(MockProvider(zero), renamed)) == first
    retried = MockProvider(zero)
    retried._attempts = {f"c{i}": 2 for i in range(400)}  # a third attempt for each
    assert asyncio.run(_judge_all(retried, requests)) == first
    other_key = [req(i, content_key="k2") for i in range(400)]
    again = [req(i, occurrence=1) for i in range(400)]
    assert asyncio.run(_judge_all(MockProvider(zero), other_key)) != first
    assert asyncio.run(_judge_all(MockProvider(zero), again)) != first


def test_ideal_judge_always_prefers_the_better_essay() -> None:
    requests = [_req(i, q_a=(i % 3) - 1.0, q_b=0.0) for i in range(30)]
    winners = asyncio.run(_judge_all(MockProvider(PROFILES["ideal"]), requests))
    for r, w in zip(requests, winners, strict=True):
        q_a, q_b = r.essay_a.mock_quality, r.essay_b.mock_quality
        assert q_a is not None and q_b is not None
        if q_a != q_b:
            assert (w == "essay_a") == (q_a > q_b)


def test_flaky_faults_use_the_error_taxonomy_with_retry_after_on_rate_limits() -> None:
    flaky = type(PROFILES["flaky"])("flaky", latency_ms=0.0, faults=PROFILES["flaky"].faults)
    provider = MockProvider(flaky)
    seen: Counter[str] = Counter()

    async def run() -> None:
        for i in range(2000):
            try:
                await provider.judge(_req(i))
            except ProviderError as exc:
                d = exc.detail
                assert d.error_type in ERROR_TYPES and d.provider == "mock"
                assert d.retryable == (d.error_type != "max_tokens")
                if d.error_type == "rate_limit":
                    assert d.retry_after_s is not None and d.status_code == 429
                seen[d.error_type] += 1

    asyncio.run(run())
    assert set(seen) == {"rate_limit", "overloaded", "server_error", "timeout", "max_tokens"}
    assert 0.18 < sum(seen.values()) / 2000 < 0.32


def test_quality_from_text_rewards_longer_richer_essays() -> None:
    short = Essay("s", "It was good. It was nice.")
    rich = Essay("r", " ".join(f"word{i} remarkable perspective nuanced" for i in range(60)))
    assert quality_of(rich) > quality_of(short)
    assert quality_of(Essay("q", "x", mock_quality=1.25)) == 1.25


def test_attempts_are_counted_per_request_of_its_batch() -> None:
    """Correlation ids are numbered per batch: request `1` of one batch failing does not make
    request `1` of another a second attempt (faults are drawn per attempt)."""
    always = type(PROFILES["flaky"])("always", latency_ms=0.0, faults=(("overloaded", 1.0),))

    def one(batch_id: str) -> ComparisonRequested:
        return msgspec.structs.replace(_req(0), batch_id=batch_id, correlation_id="1")

    provider = MockProvider(always)
    for batch_id in ("b1", "b1", "b2"):
        with pytest.raises(ProviderError):
            asyncio.run(provider.judge(one(batch_id)))
    assert provider._attempts == {"b1:1": 2, "b2:1": 1}


def test_outcome_draws_are_those_of_a_generator_seeded_per_call() -> None:
    """The mock's reused generator gives the numbers a new `_rng(*pair)` gave (issue 11):
    the same judgements for a seed."""
    gen = random.Random(7)
    gen.gauss(0.0, 1.0)  # a half-used Box–Muller pair must not leak into the next call
    for k in range(200):
        pair: tuple[object, object, object, object, object] = (
            k % 5,
            f"content-{k % 3}",
            f"e{k}",
            f"e{k + 1}",
            k % 2,
        )
        fresh = _rng(*pair)
        assert _outcome_draws(gen, pair, 0.5) == (fresh.gauss(0.0, 0.5), fresh.random())
    # Whatever the parts' types (the seed is formatted as `_rng` writes it, `str`).
    for pair in [(None, "", "é", "e 2", 0), (2**70, "k", "a", "b", 3), (True, 1.5, "a", "b", 1)]:
        fresh = _rng(*pair)
        assert _outcome_draws(gen, pair, 0.5) == (fresh.gauss(0.0, 0.5), fresh.random())
