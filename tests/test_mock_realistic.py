"""The `realistic` mock profile: lognormal latency, and a provider-side rate limit shared
through Redis that answers 429 like the Anthropic API (and is classified as its 429 is)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import replace
from typing import Any

import pytest

from events.types import ComparisonRequested, Essay
from lps.providers import mock_limits
from lps.providers.base import ProviderError
from lps.providers.mock import PROFILES, MockProvider, latency_s, profile_from_env
from streams.keys import Keys


def _req(i: int, model: str = "mock-judge-1") -> ComparisonRequested:
    return ComparisonRequested(
        batch_id="b",
        correlation_id=f"c{i}",
        wave=1,
        seed=1,
        model=model,
        essay_a=Essay(f"a{i}", "text", mock_quality=0.0),
        essay_b=Essay(f"b{i}", "text", mock_quality=0.0),
    )


def test_realistic_profile_and_its_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    p = profile_from_env("realistic")
    assert (p.latency_median_ms, p.latency_p99_ms, p.rate_limit_rpm) == (1500, 12000, 600)
    assert p.tokens_per_minute == 600 * 2000
    monkeypatch.setenv("CJS_MOCK_PROFILE", "realistic")
    monkeypatch.setenv("CJS_MOCK_LATENCY_MEDIAN_MS", "150")
    monkeypatch.setenv("CJS_MOCK_RATE_LIMIT_RPM", "6000")
    p = profile_from_env()
    # The tail keeps its proportion to the median unless given.
    assert (p.latency_median_ms, p.latency_p99_ms, p.rate_limit_rpm) == (150, 1200, 6000)
    monkeypatch.setenv("CJS_MOCK_LATENCY_P99_MS", "900")
    monkeypatch.setenv("CJS_MOCK_RATE_LIMIT_TPM", "50000")
    p = profile_from_env()
    assert (p.latency_p99_ms, p.tokens_per_minute) == (900, 50000)
    monkeypatch.setenv("CJS_MOCK_LATENCY_P99_MS", "100")
    with pytest.raises(ValueError, match="P99"):
        profile_from_env()


def test_latency_is_lognormal_with_the_median_and_p99_asked_for() -> None:
    p = PROFILES["realistic"]
    rng = random.Random(5)
    draws = sorted(latency_s(p, rng) for _ in range(40_000))
    assert statistics.median(draws) == pytest.approx(1.5, rel=0.03)
    assert draws[int(0.99 * len(draws))] == pytest.approx(12.0, rel=0.1)
    assert min(draws) > 0


def _fast(rpm: float, **kw: Any) -> Any:
    return replace(
        PROFILES["realistic"], latency_median_ms=0.0, rate_limit_rpm=rpm, rejection_ms=0.0, **kw
    )


async def _outcomes(providers: list[MockProvider], n: int) -> list[Any]:
    out: list[Any] = []
    for i in range(n):
        try:
            out.append(await providers[i % len(providers)].judge(_req(i)))
        except ProviderError as exc:
            out.append(exc)
    return out


def _check_429(exc: Any, rpm: int) -> None:
    assert isinstance(exc, ProviderError)
    d = exc.detail
    assert (d.error_type, d.retryable, d.status_code) == ("rate_limit", True, 429)
    # Whole seconds, as the API sends them; honoured by the retry policy and the cooldown.
    assert d.retry_after_s is not None and d.retry_after_s >= 1 and d.retry_after_s % 1 == 0
    assert exc.headers["anthropic-ratelimit-requests-limit"] == str(rpm)
    assert exc.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert exc.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert "retry-after" in exc.headers


def test_in_process_bucket_allows_its_burst_then_answers_429() -> None:
    # 600/min with one second of burst: ten calls at once, then 429s.
    provider = MockProvider(_fast(600), seed=1)
    out = asyncio.run(_outcomes([provider], 14))
    allowed = [o for o in out if not isinstance(o, ProviderError)]
    assert len(allowed) == 10
    assert allowed[0].rate_limits["anthropic-ratelimit-requests-limit"] == "600"
    assert allowed[0].rate_limits["anthropic-ratelimit-requests-remaining"] == "9"
    assert allowed[-1].rate_limits["anthropic-ratelimit-tokens-limit"] == str(600 * 2000)
    for exc in out[10:]:
        _check_429(exc, 600)


def test_tokens_per_minute_limit_binds_too() -> None:
    # 960 tokens a call; 60,000 tokens/min with one second of burst holds one call.
    provider = MockProvider(_fast(600, rate_limit_tpm=60_000.0), seed=1)
    out = asyncio.run(_outcomes([provider], 3))
    assert not isinstance(out[0], ProviderError)
    assert all(isinstance(o, ProviderError) for o in out[1:])


def test_local_bucket_refills_at_its_rate() -> None:
    now = [1000.0]
    bucket = mock_limits.LocalBucket(clock=lambda: now[0])
    takes = [bucket.take("m", 60, 1e9, 1.0, 1).allowed for _ in range(3)]
    assert takes == [True, False, False]
    refused = bucket.take("m", 60, 1e9, 1.0, 1)
    assert refused.wait_ms == pytest.approx(1000.0)
    now[0] += 1.0
    assert bucket.take("m", 60, 1e9, 1.0, 1).allowed


async def _shared_limit(r: Any, prefix: str) -> None:
    keys = Keys(prefix)
    providers = []
    for _ in range(3):  # three workers, one limit
        provider = MockProvider(_fast(60, rate_burst_s=20.0), seed=1)
        provider.bind_redis(r, keys)
        providers.append(provider)
    started = time.monotonic()
    out = await _outcomes(providers, 30)
    elapsed = time.monotonic() - started
    allowed = [o for o in out if not isinstance(o, ProviderError)]
    # 60/min with 20 s of burst holds 20 calls, whichever worker makes them, and refills
    # one a second while the calls run.
    assert 20 <= len(allowed) <= 20 + elapsed + 1
    assert not any(isinstance(o, ProviderError) for o in out[:20])
    for exc in out:
        if isinstance(exc, ProviderError):
            _check_429(exc, 60)
    assert await r.exists(mock_limits.key(keys, "mock-judge-1"))


async def test_limit_is_shared_through_fakeredis(fake_redis: Any) -> None:
    await _shared_limit(fake_redis, "mr:")


@pytest.mark.redis
async def test_limit_is_shared_through_a_real_redis(shared_redis: Any) -> None:
    await _shared_limit(shared_redis, "mr-real:")
