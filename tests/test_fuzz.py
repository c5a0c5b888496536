"""A fuzzed provider never stops a worker: random statuses, bodies that are not JSON or not a
message, truncated bodies and dropped connections on every endpoint (messages, batch create,
retrieve, results, list), for per_request and batch_api requests alike. Every request still
ends in exactly one callback."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from events import codec
from events.types import ComparisonRequested, Essay, Mode, new_id
from lps.cooldown import Cooldown
from lps.providers.anthropic import AnthropicProvider
from lps.retry import RetryPolicy
from lps.worker import LPSWorker
from streams.keys import Keys
from tests.anthropic_server import AnthropicTestServer, client_env, http_client, running_server

MODEL = "claude-sonnet-4-6"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[AnthropicTestServer]:
    with running_server() as s:
        client_env(monkeypatch, s, tmp_path)
        yield s


def _requests(n: int, mode: Mode) -> list[ComparisonRequested]:
    return [
        ComparisonRequested(
            batch_id=f"fuzz-{mode}-{new_id()[:4]}",
            correlation_id=new_id(),
            wave=1,
            essay_a=Essay(f"a{i}", f"First essay {i}."),
            essay_b=Essay(f"b{i}", f"Second essay {i}."),
            mode=mode,
            provider="anthropic",
            model=MODEL,
            preferred_bundle_size=n,
        )
        for i in range(n)
    ]


async def test_a_fuzzed_provider_never_stops_a_worker(
    fake_redis: Any, keys: Keys, server: AnthropicTestServer
) -> None:
    r = fake_redis
    server.fuzz(0.35, seed=7)
    server.batch_polls_until_end = 2
    requests = _requests(40, "per_request") + [
        q for _ in range(6) for q in _requests(4, "batch_api")
    ]
    for q in requests:
        await r.xadd(keys.requests, codec.encode(q))
    stop = asyncio.Event()
    workers = [
        LPSWorker(
            r,
            Keys(keys.prefix),
            f"lps-{i}",
            lambda _: AnthropicProvider.from_env(http_client=http_client()),
            policy=RetryPolicy(max_attempts=4, base_delay_s=0.001, max_delay_s=0.005),
            block_ms=20,
            processing_timeout_s=0.3,
            max_deliveries=20,
            batch_poll_interval_s=0.01,
            concurrency=4,
            cooldown=Cooldown(r, keys, default_s={"rate_limit": 0.01, "overloaded": 0.01}),
        )
        for i in range(2)
    ]
    tasks = [asyncio.create_task(w.run(stop, maintenance_every_s=0.05)) for w in workers]
    try:
        for _ in range(3000):
            assert not any(t.done() for t in tasks), "a worker stopped"
            answered = {
                getattr(codec.decode(f), "correlation_id", "")
                for _, f in await r.xrange(keys.callbacks)
            }
            if answered >= {q.correlation_id for q in requests}:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("not every request was answered")
        assert not any(t.done() for t in tasks), "a worker stopped"
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    callbacks = [codec.decode(f) for _, f in await r.xrange(keys.callbacks)]
    per_request = Counter(getattr(c, "correlation_id", "") for c in callbacks)
    assert set(per_request) == {q.correlation_id for q in requests}
    assert (await r.xpending(keys.requests, "lps"))["pending"] == 0
    kinds = Counter(type(c).__name__ for c in callbacks)
    endpoints = Counter(k.rsplit(" ", 1)[0] for k in server.fuzzed.elements())
    assert endpoints["POST /v1/messages"] and endpoints["POST /v1/messages/batches"]
    assert endpoints["GET /v1/messages/batches/{id}"]
    print(
        f"\n[fuzz] {sum(server.fuzzed.values())} of {len(server.requests)} HTTP requests fuzzed "
        f"({dict(endpoints)}); {len(requests)} requests -> {dict(kinds)}, duplicates "
        f"{sum(per_request.values()) - len(per_request)}; both workers still running"
    )
