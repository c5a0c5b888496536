"""The shared provider limiter (lps/limiter.py, limiter.lua): GCRA grants in Redis, AIMD from
the provider's headers and 429s, per-worker concurrency from the paced rate, and concurrent
takers (separate workers, separate connections) that never exceed the rate together."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis

from events.types import ComparisonRequested, ErrorDetail, Essay
from lps import keys as lkeys
from lps.limiter import LimitedProvider, LimiterSettings, SharedLimiter
from lps.providers.base import Judgement, ProviderError
from lps.providers.mock import PROFILES, MockProvider
from streams.keys import Keys

MODEL = "mock-judge-1"


def _keys() -> Keys:
    return Keys(f"lim{uuid.uuid4().hex[:6]}:")


def _req(i: int) -> ComparisonRequested:
    return ComparisonRequested(
        batch_id="b",
        correlation_id=f"c{i}",
        wave=1,
        seed=1,
        model=MODEL,
        essay_a=Essay(f"a{i}", "t", mock_quality=0.0),
        essay_b=Essay(f"b{i}", "t", mock_quality=0.0),
    )


def _headers(limit: int, left: int) -> dict[str, str]:
    return {
        "anthropic-ratelimit-requests-limit": str(limit),
        "anthropic-ratelimit-requests-remaining": str(left),
    }


def _judgement(headers: dict[str, str]) -> Judgement:
    return Judgement(winner="essay_a", confidence=3.0, justification="j", rate_limits=headers)


def _429(limit: int, retry_after_s: float = 0.0) -> ProviderError:
    detail = ErrorDetail(
        error_type="rate_limit",
        retryable=True,
        message="429",
        status_code=429,
        retry_after_s=retry_after_s,
    )
    return ProviderError(detail, headers=_headers(limit, 0))


async def test_grants_are_spaced_at_the_paced_rate_within_the_horizon(fake_redis: Any) -> None:
    keys = _keys()
    # 600/min paced at 98 %: one grant every 60000 / 588 ms; the horizon holds ten of them.
    limiter = SharedLimiter(fake_redis, keys, LimiterSettings(rpm=600, horizon_s=1.0))
    lane = limiter.lane("mock", MODEL)
    reply = await limiter.take(lane, 15, 1000)
    assert reply is not None
    waits, retry_ms = reply
    step = 60000 / (600 * 0.98)
    assert len(waits) == 10 and waits[0] == 0.0
    for a, b in itertools.pairwise(waits):
        assert b - a == pytest.approx(step, abs=2.0)
    # The eleventh would be past the horizon: asked again once it is not.
    assert retry_ms == pytest.approx(step * 10 - 1000, abs=3.0)
    assert lane.rate_r == pytest.approx(588) and lane.limit_r == 600
    state = await limiter.state("mock", MODEL)
    assert state["lim_r"] == 600 and state["rate_r"] == pytest.approx(588)


async def test_tokens_per_minute_pace_too(fake_redis: Any) -> None:
    # 100 calls a minute allowed by requests, but 60,000 tokens a minute at 3,000 a call:
    # 20 calls a minute, one every 3 s (at 98 %: 3.06 s).
    limiter = SharedLimiter(
        fake_redis, _keys(), LimiterSettings(rpm=100, tpm=60_000, horizon_s=1.0)
    )
    lane = limiter.lane("mock", MODEL)
    reply = await limiter.take(lane, 3, 3000)
    assert reply is not None
    waits, retry_ms = reply
    assert waits == [0.0]
    assert retry_ms == pytest.approx(3000 / 0.98 - 1000, abs=3.0)


async def test_without_a_known_limit_calls_are_not_paced_until_headers_tell(
    fake_redis: Any,
) -> None:
    keys = _keys()
    limiter = SharedLimiter(fake_redis, keys, LimiterSettings())
    lane = limiter.lane("mock", MODEL)
    assert await limiter.take(lane, 5, 1000) is None
    # Asked again only after recheck_s: in between, no round trip.
    assert lane.unlimited_until > limiter.clock()
    assert await lane.acquire() == 0.0
    # Nothing known: no key left behind (nor by a 429 that tells no limit).
    await lane.failed(_429(0))
    assert not await fake_redis.exists(lkeys.limiter(keys, "mock", MODEL))
    await lane.replied(_judgement(_headers(1200, 50)), 0.01)
    assert lane.limit_r == 1200 and lane.rate_r == pytest.approx(1176)
    reply = await limiter.take(lane, 2, 1000)
    assert reply is not None and len(reply[0]) == 2
    # A reply without headers (a mock with no limit) is no news: nothing sent.
    before = await limiter.state("mock", MODEL)
    await lane.replied(_judgement({}), 0.01)
    assert await limiter.state("mock", MODEL) == before


async def test_aimd_decrease_on_429_once_per_window_then_additive_increase(
    fake_redis: Any,
) -> None:
    keys = _keys()
    settings = LimiterSettings(rpm=600, feedback_every_s=0.0, decrease_every_s=60.0)
    limiter = SharedLimiter(fake_redis, keys, settings)
    lane = limiter.lane("mock", MODEL)
    await limiter.take(lane, 1, 1000)
    await lane.failed(_429(600))
    assert lane.rate_r == pytest.approx(588 * 0.7)
    # The 429s of one overshoot arrive together: one decrease for them.
    await lane.failed(_429(600))
    assert lane.rate_r == pytest.approx(588 * 0.7)
    assert lane.limited_calls == 2
    # Nothing left in the bucket: hold.
    await asyncio.sleep(0.05)
    await lane.replied(_judgement(_headers(600, 0)), 0.01)
    assert lane.rate_r == pytest.approx(588 * 0.7)
    # Room left: grows by 5 % of the limit per second of successes, up to 98 % of it.
    await asyncio.sleep(0.2)
    await lane.replied(_judgement(_headers(600, 7)), 0.01)
    assert 588 * 0.7 + 600 * 0.05 * 0.15 < lane.rate_r < 588 * 0.7 + 600 * 0.05 * 0.5
    for _ in range(3):
        await asyncio.sleep(0.35)
        await lane.replied(_judgement(_headers(600, 7)), 0.01)
    assert lane.rate_r < 588
    # A lower limit told by the provider is the truth at once.
    await lane.replied(_judgement(_headers(300, 7)), 0.01)
    assert lane.limit_r == 300 and lane.rate_r == pytest.approx(294)


async def test_a_429_holds_every_grant_until_its_retry_after(fake_redis: Any) -> None:
    limiter = SharedLimiter(fake_redis, _keys(), LimiterSettings(rpm=6000))
    lane = limiter.lane("mock", MODEL)
    await lane.failed(_429(6000, retry_after_s=0.5))
    reply = await limiter.take(lane, 1, 1000)
    assert reply is not None and reply[0][0] == pytest.approx(500, abs=20)


async def test_concurrency_grows_with_the_rate_and_latency(fake_redis: Any) -> None:
    settings = LimiterSettings(rpm=0, min_concurrency=4, max_concurrency=100, horizon_s=1.0)
    limiter = SharedLimiter(fake_redis, _keys(), settings)
    lane = limiter.lane("mock", MODEL)
    assert lane.concurrency == 4  # no limit known: the worker's own setting
    lane.latency_s = 2.0
    lane.learned(600.0, 0.0, 600.0, 0.0)  # 10/s over 2 s + a 1 s horizon
    assert lane.concurrency == 39
    lane.learned(60000.0, 0.0, 60000.0, 0.0)
    assert lane.concurrency == 100


async def test_the_limiter_fails_open_when_redis_fails() -> None:
    class Broken:
        def register_script(self, _: str) -> Any:
            async def run(**_: Any) -> Any:
                raise ConnectionError("down")

            return run

    limiter = SharedLimiter(Broken(), _keys(), LimiterSettings(rpm=60))
    lane = limiter.lane("mock", MODEL)
    assert await asyncio.wait_for(lane.acquire(), 1.0) < 0.5


async def _concurrent_takers(url_or_client: Any, rpm: float, workers: int, calls: int) -> None:
    """`workers` limiters (one connection each, as separate processes have) take `calls`
    grants each, all at once; the grants, wherever they came from, keep to the rate."""
    keys = _keys()
    shared = not isinstance(url_or_client, str)
    clients = [
        url_or_client if shared else aioredis.from_url(url_or_client) for _ in range(workers)
    ]
    settings = LimiterSettings(rpm=rpm, target=1.0, horizon_s=0.25)
    limiters = [SharedLimiter(c, keys, settings) for c in clients]
    granted: list[float] = []

    async def one(limiter: SharedLimiter) -> None:
        await limiter.lane("mock", MODEL).acquire()
        granted.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(one(lim) for lim in limiters for _ in range(calls)))
    elapsed = time.monotonic() - started
    if not shared:
        for c in clients:
            await c.aclose()
    per_s = rpm / 60.0
    granted.sort()
    total = workers * calls
    # Every grant was made: as fast as the rate allows, not much slower.
    assert elapsed >= (total - 1) / per_s * 0.95
    # In any window, at most the rate's worth (+1 for the window's edges, +2 for a wake-up
    # that came late and one that did not): never a burst.
    for i, t in enumerate(granted):
        j = i
        while j < len(granted) and granted[j] - t < 0.5:
            j += 1
        assert j - i <= 0.5 * per_s + 3, (i, j - i)


async def test_concurrent_takers_never_exceed_the_rate_on_fakeredis(fake_redis: Any) -> None:
    await _concurrent_takers(fake_redis, rpm=1200, workers=4, calls=8)


@pytest.mark.redis
async def test_concurrent_takers_never_exceed_the_rate_on_a_real_redis(
    shared_redis_server: Any,
) -> None:
    await _concurrent_takers(shared_redis_server.url, rpm=2400, workers=4, calls=20)


async def _workers_at_the_mock_limit(r: Any, workers: int, calls: int, rpm: float) -> None:
    """Workers behind the limiter keep the realistic mock's provider-side limit: (almost)
    no 429, at about the limit."""
    keys = _keys()
    profile = replace(
        PROFILES["realistic"], latency_median_ms=20.0, latency_p99_ms=160.0, rate_limit_rpm=rpm
    )
    lanes = []
    providers = []
    for _ in range(workers):
        mock = MockProvider(profile, seed=1)
        mock.bind_redis(r, keys)
        limiter = SharedLimiter(r, keys, LimiterSettings(rpm=rpm))
        providers.append(LimitedProvider(mock, limiter))
        lanes.append(limiter.lane("mock", MODEL))
    outcomes: list[bool] = []

    async def call(provider: LimitedProvider, i: int) -> None:
        try:
            await provider.judge(_req(i))
            outcomes.append(True)
        except ProviderError as exc:
            assert exc.detail.error_type == "rate_limit"
            outcomes.append(False)

    started = time.monotonic()
    await asyncio.gather(
        *(call(p, k * calls + i) for k, p in enumerate(providers) for i in range(calls))
    )
    elapsed = time.monotonic() - started
    assert outcomes.count(False) <= 0.02 * len(outcomes)
    assert sum(lane.limited_calls for lane in lanes) == outcomes.count(False)
    assert elapsed >= (len(outcomes) - rpm / 60) / (rpm / 60)  # the mock's burst, then its rate
    assert await r.exists(lkeys.limiter(keys, "mock", MODEL))


async def test_workers_behind_the_limiter_keep_the_mock_limit_on_fakeredis(
    fake_redis: Any,
) -> None:
    await _workers_at_the_mock_limit(fake_redis, workers=3, calls=10, rpm=1800)


@pytest.mark.redis
async def test_workers_behind_the_limiter_keep_the_mock_limit_on_a_real_redis(
    shared_redis_server: Any,
) -> None:
    clients = [aioredis.from_url(shared_redis_server.url) for _ in range(1)]
    try:
        await _workers_at_the_mock_limit(clients[0], workers=4, calls=25, rpm=3000)
    finally:
        for c in clients:
            await c.aclose()
