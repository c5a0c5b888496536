"""Mode batch_api through the LPS worker, the real SDK and the loopback Anthropic server:
requests stay pending while the Message Batch runs, and a restarted worker resumes polling
the same batch instead of paying for another."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from events import codec
from events.streams import LPS_GROUP
from events.types import (
    BundleDispatched,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    Essay,
    ProviderAttemptFailed,
    new_id,
)
from lps.message_batches import custom_id_for
from lps.providers.anthropic import AnthropicProvider
from lps.worker import LPSWorker
from streams.keys import Keys
from streams.paging import read_stream
from tests.anthropic_server import (
    AnthropicTestServer,
    batch_errored,
    client_env,
    http_client,
    running_server,
)

MODEL = "claude-sonnet-4-6"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[AnthropicTestServer]:
    with running_server() as s:
        client_env(monkeypatch, s, tmp_path)
        yield s


def _requests(n: int) -> list[ComparisonRequested]:
    return [
        ComparisonRequested(
            batch_id="b1",
            correlation_id=new_id(),
            wave=1,
            essay_a=Essay(f"a{i}", f"First essay {i}."),
            essay_b=Essay(f"b{i}", f"Second essay {i}."),
            mode="batch_api",
            provider="anthropic",
            model=MODEL,
            preferred_bundle_size=n,
        )
        for i in range(n)
    ]


def _worker(r: Any, keys: Keys, name: str) -> LPSWorker:
    return LPSWorker(
        r,
        keys,
        name,
        lambda _: AnthropicProvider.from_env(http_client=http_client()),
        block_ms=20,
        processing_timeout_s=60.0,
        batch_poll_interval_s=0.01,
    )


async def _events(r: Any, stream: str) -> list[Any]:
    return [codec.decode(f) async for _, f in read_stream(r, stream)]


async def _until(predicate: Any, what: str) -> None:
    for _ in range(1000):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_batch_is_polled_to_the_end_and_resumed_by_another_worker(
    fake_redis: Any, keys: Keys, server: AnthropicTestServer
) -> None:
    r = fake_redis
    server.batch_polls_until_end = 10_000  # runs until the test lets it end
    requests = _requests(5)
    server.batch_results[custom_id_for(requests[2].correlation_id)] = batch_errored()
    for q in requests:
        await r.xadd(keys.requests, codec.encode(q))

    first = _worker(r, keys, "lps-a")
    stop_a = asyncio.Event()
    task_a = asyncio.create_task(first.run(stop_a, maintenance_every_s=60))

    async def dispatched() -> bool:
        return any(isinstance(e, BundleDispatched) for e in await _events(r, keys.dispatches))

    await _until(dispatched, "the Message Batch to be submitted")
    # While it runs, its requests are pending: nothing was acknowledged, nothing answered.
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 5
    assert await r.xlen(keys.callbacks) == 0
    stop_a.set()  # the worker stops mid-poll: it must leave the batch to the next holder
    await task_a
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 5

    (batch,) = server.batches.values()
    batch.polls_until_end = batch.polls + 1
    server.batch_polls_until_end = 1  # a second batch, if one were made, would end at once
    second = _worker(r, keys, "lps-b")
    await second.start()
    actions = await second.reclaim()  # released entries are idle past the timeout at once
    await second.close()
    assert len(actions) == 5

    assert len(server.batches) == 1, "resumed the same batch, did not submit a second"
    assert len(server.calls("/v1/messages/batches")) == 1
    callbacks = [e for e in await _events(r, keys.callbacks)]
    assert Counter(c.correlation_id for c in callbacks) == Counter(
        q.correlation_id for q in requests
    )
    failed = [c for c in callbacks if isinstance(c, ComparisonFailed)]
    assert [f.correlation_id for f in failed] == [requests[2].correlation_id]
    assert failed[0].error.error_type == "invalid_request"
    assert sum(isinstance(c, ComparisonCompleted) for c in callbacks) == 4
    attempts = [
        e for e in await _events(r, keys.dispatches) if isinstance(e, ProviderAttemptFailed)
    ]
    assert [a.correlation_id for a in attempts] == [requests[2].correlation_id]
    # The prompt's fingerprint travels on the failure events too.
    assert (
        len(failed[0].prompt_sha256) == 64 and attempts[0].prompt_sha256 == failed[0].prompt_sha256
    )
    completed_ = [c for c in callbacks if isinstance(c, ComparisonCompleted)]
    assert all(len(c.prompt_sha256) == 64 for c in completed_)
    (bundle,) = [e for e in await _events(r, keys.dispatches) if isinstance(e, BundleDispatched)]
    assert bundle.mode == "batch_api" and bundle.provider_batch_id == batch.id and bundle.size == 5
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0
