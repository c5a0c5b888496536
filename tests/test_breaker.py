"""The breaker for account-wide failures: shared through Redis, fail fast, one probe per window;
and, end to end, a revoked key with 200 queued requests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.settings import Settings
from app.stuck import collect
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import append_registration
from events.types import ErrorDetail
from lps.breaker import Breaker, open_breakers
from lps.providers.anthropic import AnthropicProvider
from lps.providers.registry import make_provider
from projections.store import load_state
from streams.keys import Keys
from tests.anthropic_server import (
    TEST_KEY,
    AnthropicTestServer,
    client_env,
    http_client,
    running_server,
)
from tests.helpers import registration
from tools.cmd_stuck import render

MODEL = "claude-sonnet-4-6"
CJS = [sys.executable, "-c", "from tools.cli import main; main()"]


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


def failure(error_type: Any, *, retryable: bool = False, code: str | None = None) -> ErrorDetail:
    return ErrorDetail(
        error_type=error_type,
        retryable=retryable,
        message=f"HTTP 401 {error_type}_error: invalid x-api-key",
        provider="anthropic",
        model=MODEL,
        status_code=401,
        error_code=code,
    )


def breaker(r: Any, clock: Clock, **kw: Any) -> Breaker:
    return Breaker(r, Keys("br:"), probe_after_s=10.0, clock=clock, **kw)


async def test_an_account_failure_opens_a_shared_breaker_that_fails_fast(fake_redis: Any) -> None:
    clock = Clock()
    a, b = breaker(fake_redis, clock), breaker(fake_redis, clock)  # two workers, one Redis
    ticket = await a.admit("anthropic", MODEL, "c1")
    assert ticket.rejected is None and ticket.gate is not None  # unproven: one at a time
    await a.settle(ticket, failure("authentication"))
    for worker in (a, b):
        rejected = (await worker.admit("anthropic", MODEL, "c2")).rejected
        assert rejected is not None and rejected.error_type == "authentication"
        assert rejected.correlation_id == "c2" and not rejected.retryable
        assert rejected.message.startswith("breaker open since")
    # provider-wide: another model is stopped too
    assert (await b.admit("anthropic", "claude-haiku-4-5")).rejected is not None
    [state] = await open_breakers(fake_redis, Keys("br:"))
    view = state.view(clock.now)
    assert (view["provider"], view["model"], view["reason"]) == (
        "anthropic",
        None,
        "authentication",
    )
    assert view["next_probe_in_s"] == 10.0


async def test_one_probe_per_window_closes_or_reopens(fake_redis: Any) -> None:
    clock = Clock()
    a, b = breaker(fake_redis, clock), breaker(fake_redis, clock)
    await a.observe("anthropic", MODEL, failure("billing"))
    clock.now += 10.0
    probe = await a.admit("anthropic", MODEL)
    assert probe.probe is not None and probe.rejected is None
    assert (await b.admit("anthropic", MODEL)).rejected is not None  # one probe, not two
    await a.settle(probe, failure("billing"))  # still failing: another window
    [state] = await open_breakers(fake_redis, Keys("br:"))
    assert state.failures == 2 and state.probe_at == clock.now + 10.0
    clock.now += 5.0
    assert (await b.admit("anthropic", MODEL)).rejected is not None
    clock.now += 5.0
    probe = await b.admit("anthropic", MODEL)
    assert probe.probe is not None
    await b.settle(probe, None)  # answered: closed for everyone
    assert await open_breakers(fake_redis, Keys("br:")) == []
    assert (await a.admit("anthropic", MODEL)).rejected is None


async def test_a_probe_without_an_answer_leaves_it_open(fake_redis: Any) -> None:
    clock = Clock()
    a = breaker(fake_redis, clock)
    await a.observe("anthropic", MODEL, failure("authentication"))
    clock.now += 10.0
    probe = await a.admit("anthropic", MODEL)
    timeout = ErrorDetail(error_type="timeout", retryable=True, message="t", provider="anthropic")
    await a.settle(probe, timeout)
    assert len(await open_breakers(fake_redis, Keys("br:"))) == 1
    assert (await a.admit("anthropic", MODEL)).rejected is not None  # next window
    # any other answer proves the key: a 500 closes it
    clock.now += 10.0
    probe = await a.admit("anthropic", MODEL)
    await a.settle(
        probe, ErrorDetail(error_type="server_error", retryable=True, message="x", status_code=500)
    )
    assert await open_breakers(fake_redis, Keys("br:")) == []


async def test_permission_is_per_model_and_retryable_failures_never_open(fake_redis: Any) -> None:
    clock = Clock()
    a = breaker(fake_redis, clock)
    await a.observe("anthropic", MODEL, failure("permission"))
    assert (await a.admit("anthropic", MODEL)).rejected is not None
    assert (await a.admit("anthropic", "claude-haiku-4-5")).rejected is None
    [state] = await open_breakers(fake_redis, Keys("br:"))
    assert state.model == MODEL and state.reason == "permission"
    # the server said to retry (x-should-retry: true): not an account failure
    await a.observe("anthropic", "m2", failure("authentication", retryable=True))
    # a spend limit is; a plain 429 is not
    await a.observe("anthropic", "m3", failure("rate_limit", code="spend_limit"))
    await a.observe("other", "m4", failure("rate_limit"))
    reasons = {(s.provider, s.reason) for s in await open_breakers(fake_redis, Keys("br:"))}
    assert reasons == {("anthropic", "permission"), ("anthropic", "spend_limit")}


async def test_unproven_calls_go_one_at_a_time(fake_redis: Any) -> None:
    clock = Clock()
    a = breaker(fake_redis, clock)
    first = await a.admit("anthropic", MODEL)
    second = asyncio.create_task(a.admit("anthropic", MODEL))
    await asyncio.sleep(0.05)
    assert not second.done()  # waits for the first answer
    await a.settle(first, failure("authentication"))
    assert (await second).rejected is not None  # ...which opened the breaker: no second call
    # once a call was answered, calls no longer wait for each other
    b = breaker(fake_redis, clock)
    ok = await b.admit("mock", "m")
    await b.settle(ok, None)
    tickets = await asyncio.gather(*(b.admit("mock", "m") for _ in range(5)))
    assert all(t.gate is None and t.rejected is None for t in tickets)
    # a slow first call holds the others only for gate_timeout_s
    c = breaker(fake_redis, clock, gate_timeout_s=0.05)
    await c.admit("slow", "m")
    assert (await asyncio.wait_for(c.admit("slow", "m"), 1)).rejected is None


async def test_redis_down_fails_open() -> None:
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    b = Breaker(dead, Keys("x:"), gate_timeout_s=0.1)
    try:
        ticket = await b.admit("anthropic", MODEL)
        assert ticket.rejected is None
        await b.settle(ticket, failure("authentication"))  # cannot be written: logged, no raise
        assert (await b.admit("anthropic", MODEL)).rejected is None
    finally:
        await dead.aclose()


# --- end to end: a revoked key and 200 queued requests -----------------------------------------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[AnthropicTestServer]:
    with running_server() as s:
        client_env(monkeypatch, s, tmp_path)
        yield s


def _providers(name: str) -> Any:
    if name == "anthropic":
        return AnthropicProvider.from_env(http_client=http_client())
    return make_provider(name)


@pytest.mark.redis
async def test_revoked_key_with_200_queued_requests(
    server: AnthropicTestServer, real_redis: Any, redis_server: Any
) -> None:
    r = real_redis
    keys = Keys(f"rev{uuid.uuid4().hex[:6]}:")
    server.revoked_keys = {TEST_KEY}
    probe_s = 0.4
    settings = Settings(
        prefix=keys.prefix,
        breaker_probe_s=probe_s,
        retry_base_delay_s=0.001,
        block_ms=20,
    )
    reg = registration(100, budget=200, provider="anthropic", model=MODEL)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    assert await r.xlen(keys.requests) == 200
    runner = InProcess(r, keys, settings, _providers, cj_consumers=1, lps_workers=2, concurrency=8)
    started = time.monotonic()
    runner.start()
    try:
        for _ in range(3000):
            runner.check()
            state = await load_state(r, keys, reg.batch_id)
            if state is not None and state.terminal:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.close()
    elapsed = time.monotonic() - started
    assert state is not None and state.terminal
    calls = server.calls()
    # Calls per breaker window: the first calls (one per worker: until a call is answered,
    # a worker makes one at a time), then one probe per window while requests are queued.
    per_window = Counter(int((c.at - calls[0].at) / probe_s) for c in calls)
    assert max(per_window.values()) <= 2, per_window
    assert len(calls) <= 2 * (1 + int(elapsed / probe_s))
    assert state.failed == 200 and state.completed == 0

    env = {**os.environ, "REDIS_URL": redis_server.url, "CJS_PREFIX": keys.prefix}
    status = json.loads(
        subprocess.run(
            [*CJS, "status", reg.batch_id, "--json"], env=env, capture_output=True, check=True
        ).stdout
    )
    assert status["status"] == "failed" and status["failure_reason"] == "authentication"
    assert status["cost_usd"] == 0.0
    [open_breaker] = status["breakers"]
    assert open_breaker["reason"] == "authentication" and open_breaker["status_code"] == 401
    stuck = await collect(r, keys, idle_s=60, batch_idle_s=900)  # what `cjs stuck` shows
    assert [b["reason"] for b in stuck["breakers"]] == ["authentication"]
    assert "Open provider breakers" in render(stuck)
    print(
        f"\n[revoked key] 200 queued requests, 2 workers x concurrency 8: {len(calls)} provider "
        f"call(s) in {elapsed:.2f}s, per breaker window of {probe_s}s: "
        f"{[per_window[w] for w in sorted(per_window)]}; batch "
        f"{status['status']} ({status['failure_reason']})"
    )
