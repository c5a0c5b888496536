"""The shared provider/model cooldown, on fakeredis and on a real redis-server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from events.types import ErrorDetail
from lps import keys as lkeys
from lps.cooldown import Cooldown
from streams.keys import Keys

MODEL = "claude-sonnet-4-6"


@dataclass
class FakeClock:
    now: float = 2_000_000.0
    sleeps: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(params=["fake", "real"])
def redis_client(request: pytest.FixtureRequest) -> Any:
    """fakeredis, and a real redis-server (skipped without one unless CJS_REQUIRE_REDIS=1)."""
    if request.param == "fake":
        return request.getfixturevalue("fake_redis")
    return request.getfixturevalue("real_redis")


def detail(
    error_type: Any, retryable: bool = True, retry_after: float | None = None
) -> ErrorDetail:
    return ErrorDetail(
        error_type=error_type,
        retryable=retryable,
        message="m",
        provider="anthropic",
        model=MODEL,
        retry_after_s=retry_after,
    )


async def test_trigger_sets_a_shared_expiring_key(redis_client: Any) -> None:
    clock = FakeClock()
    keys = Keys("t:")
    a = Cooldown(redis_client, keys, clock=clock)
    b = Cooldown(redis_client, keys, clock=clock)  # another worker, same redis
    assert await a.remaining("anthropic", MODEL) == 0.0
    assert await a.trigger("anthropic", MODEL, 5.0) == pytest.approx(5.0)
    assert await b.remaining("anthropic", MODEL) == pytest.approx(5.0)
    assert await b.remaining("anthropic", "other-model") == 0.0
    key = lkeys.cooldown(keys, "anthropic", MODEL)
    assert key == f"t:lps:cooldown:anthropic:{MODEL}"
    ttl = await redis_client.pttl(key)
    assert 0 < ttl <= 5000
    clock.now += 2.0
    assert await b.remaining("anthropic", MODEL) == pytest.approx(3.0)
    clock.now += 3.5
    assert await b.remaining("anthropic", MODEL) == 0.0


async def test_a_cooldown_is_only_ever_extended(redis_client: Any) -> None:
    clock = FakeClock()
    c = Cooldown(redis_client, Keys("t:"), clock=clock)
    await c.trigger("anthropic", MODEL, 10.0)
    assert await c.trigger("anthropic", MODEL, 2.0) == pytest.approx(10.0)
    assert await c.remaining("anthropic", MODEL) == pytest.approx(10.0)
    assert await c.trigger("anthropic", MODEL, 20.0) == pytest.approx(20.0)
    assert await c.remaining("anthropic", MODEL) == pytest.approx(20.0)


async def test_cooldown_is_capped(redis_client: Any) -> None:
    c = Cooldown(redis_client, Keys("t:"), clock=FakeClock(), max_s=30.0)
    assert await c.trigger("anthropic", MODEL, 3600.0) == pytest.approx(30.0)
    assert await c.trigger("anthropic", MODEL, float("inf")) == pytest.approx(30.0)


async def test_note_error_honours_retry_after_and_defaults(redis_client: Any) -> None:
    clock = FakeClock()
    c = Cooldown(
        redis_client, Keys("t:"), clock=clock, default_s={"rate_limit": 5.0, "overloaded": 2.0}
    )
    assert await c.note_error(detail("rate_limit", retry_after=3.0)) == pytest.approx(3.0)
    await c.clear("anthropic", MODEL)
    assert await c.note_error(detail("rate_limit")) == pytest.approx(5.0)
    await c.clear("anthropic", MODEL)
    assert await c.note_error(detail("overloaded")) == pytest.approx(2.0)
    await c.clear("anthropic", MODEL)
    # a spend limit (429, not retryable) or other errors do not cool anyone down
    assert await c.note_error(detail("rate_limit", retryable=False)) == 0.0
    assert await c.note_error(detail("server_error")) == 0.0
    assert await c.note_error(detail("timeout")) == 0.0
    assert await c.remaining("anthropic", MODEL) == 0.0
    # the key can be named explicitly (a detail without provider/model)
    bare = ErrorDetail(error_type="overloaded", retryable=True, message="m")
    assert await c.note_error(bare, provider="mock", model="m1") == pytest.approx(2.0)
    assert await c.remaining("mock", "m1") == pytest.approx(2.0)


async def test_wait_sleeps_out_the_cooldown(redis_client: Any) -> None:
    clock = FakeClock()
    c = Cooldown(redis_client, Keys("t:"), clock=clock)
    assert await c.wait("anthropic", MODEL, clock.sleep) == 0.0
    assert clock.sleeps == []
    await c.trigger("anthropic", MODEL, 4.0)
    assert await c.wait("anthropic", MODEL, clock.sleep, max_wait_s=1.5) == pytest.approx(1.5)
    assert await c.wait("anthropic", MODEL, clock.sleep) == pytest.approx(2.5)
    assert await c.wait("anthropic", MODEL, clock.sleep) == 0.0
    assert clock.sleeps == [pytest.approx(1.5), pytest.approx(2.5)]


async def test_prefixes_keep_runs_apart(redis_client: Any) -> None:
    clock = FakeClock()
    await Cooldown(redis_client, Keys("run1:"), clock=clock).trigger("anthropic", MODEL, 5.0)
    assert (
        await Cooldown(redis_client, Keys("run2:"), clock=clock).remaining("anthropic", MODEL)
        == 0.0
    )


async def test_redis_down_fails_open() -> None:
    dead = aioredis.from_url(
        "redis://127.0.0.1:1/0", socket_connect_timeout=0.2, retry_on_timeout=False
    )
    c = Cooldown(dead, Keys("t:"), clock=FakeClock())
    try:
        assert await c.remaining("anthropic", MODEL) == 0.0
        assert await c.trigger("anthropic", MODEL, 5.0) == 0.0
    finally:
        await dead.aclose()


async def test_a_fresh_read_is_reused_and_a_cooldown_set_here_is_known_at_once(
    redis_client: Any,
) -> None:
    clock = FakeClock()
    keys = Keys("fresh:")
    mine = Cooldown(redis_client, keys, clock=clock, fresh_s=0.1)
    other = Cooldown(redis_client, keys, clock=clock)
    assert await mine.remaining("anthropic", MODEL) == 0.0
    await other.note_error(detail("rate_limit", retry_after=5.0))
    # Within fresh_s the earlier read stands: another worker's cooldown is seen late...
    assert await mine.remaining("anthropic", MODEL) == 0.0
    clock.now += 0.2
    # ...by at most fresh_s.
    assert await mine.remaining("anthropic", MODEL) == pytest.approx(4.8)
    await mine.note_error(detail("overloaded", retry_after=30.0))
    assert await mine.remaining("anthropic", MODEL) == pytest.approx(30.0)


async def test_wait_looks_again_after_sleeping(redis_client: Any) -> None:
    """Another worker extends the cooldown while this one sleeps: it sleeps again, for what
    is left, instead of calling 0.8 s too early."""
    clock = FakeClock()
    keys = Keys("again:")
    mine = Cooldown(redis_client, keys, clock=clock, fresh_s=0.1)
    other = Cooldown(redis_client, keys, clock=clock)
    await other.trigger("anthropic", MODEL, 1.0)

    async def sleep(seconds: float) -> None:
        await clock.sleep(seconds)
        if len(clock.sleeps) == 1:  # meanwhile another worker meets a 429 asking for 0.8 s
            await other.trigger("anthropic", MODEL, 0.8)

    slept = await mine.wait("anthropic", MODEL, sleep)
    assert clock.sleeps == [pytest.approx(1.0), pytest.approx(0.8)]
    assert slept == pytest.approx(1.8)
    assert await mine.remaining("anthropic", MODEL, fresh=True) == 0.0
    # The bound holds across the sleeps.
    await other.trigger("anthropic", MODEL, 5.0)
    clock.now += 0.2  # past fresh_s: the new cooldown is seen
    assert await mine.wait("anthropic", MODEL, clock.sleep, max_wait_s=2.0) == pytest.approx(2.0)
    assert await mine.remaining("anthropic", MODEL, fresh=True) == pytest.approx(2.8)
