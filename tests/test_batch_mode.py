"""Mode batch_api through the LPS worker, the real SDK and the loopback Anthropic server:
requests stay pending while the Message Batch runs, and a restarted worker resumes polling
the same batch instead of paying for another."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
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
from lps import keys as lkeys
from lps.message_batches import custom_id_for
from lps.modes.batch_api import ORPHAN_SWEEP_AFTER_S, Intent, sweep_orphans
from lps.providers.anthropic import AnthropicProvider
from lps.worker import LPSWorker
from streams.keys import Keys
from streams.paging import read_stream
from tests.anthropic_server import (
    AnthropicTestServer,
    Reply,
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


def _requests(
    n: int, batch_id: str = "b1", ids: list[str] | None = None
) -> list[ComparisonRequested]:
    return [
        ComparisonRequested(
            batch_id=batch_id,
            correlation_id=ids[i] if ids else new_id(),
            wave=1,
            essay_a=Essay(f"a{i}", f"First essay {i}."),
            essay_b=Essay(f"b{i}", f"Second essay {i}."),
            mode="batch_api",
            provider="anthropic",
            model=MODEL,
            preferred_bundle_size=2 * n if ids else n,
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


@contextlib.asynccontextmanager
async def _dispatching(r: Any, keys: Keys) -> AsyncIterator[None]:
    """Worker `lps-a` running until it has submitted its Message Batch; stopped on leaving
    (mid-poll: the batch has not ended)."""
    stop = asyncio.Event()
    task = asyncio.create_task(_worker(r, keys, "lps-a").run(stop, maintenance_every_s=60))

    async def dispatched() -> bool:
        return any(isinstance(e, BundleDispatched) for e in await _events(r, keys.dispatches))

    try:
        await _until(dispatched, "the Message Batch to be submitted")
        yield
    finally:
        stop.set()
        await task


async def _until(predicate: Any, what: str) -> None:
    for _ in range(1000):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_two_batches_with_the_same_numbered_ids_share_a_message_batch_apart(
    fake_redis: Any, keys: Keys, server: AnthropicTestServer
) -> None:
    """Correlation ids are numbered per batch: one bundle holds `1` and `2` of two batches.
    Each request has its own index, item and result, also for the worker that takes the
    Message Batch over: one errored item fails its own request only."""
    r = fake_redis
    server.batch_polls_until_end = 10_000
    requests = _requests(2, "b1", ["1", "2"]) + _requests(2, "b2", ["1", "2"])
    server.batch_results[custom_id_for("b2", "1")] = batch_errored()
    for q in requests:
        await r.xadd(keys.requests, codec.encode(q))
    async with _dispatching(r, keys):
        pass
    (batch,) = server.batches.values()
    assert sorted(str(i["custom_id"]) for i in batch.requests) == ["b1-1", "b1-2", "b2-1", "b2-2"]
    index = [lkeys.message_batch(keys, b, c) for b in ("b1", "b2") for c in "12"]
    assert index[0] == keys.key("lps:batchapi:b1:1")
    assert await r.mget(index) == [batch.id.encode()] * 4
    batch.polls_until_end = batch.polls + 1
    second = _worker(r, keys, "lps-b")
    await second.start()
    assert len(await second.reclaim()) == 4
    await second.close()
    assert len(server.batches) == 1, "resumed the same batch, did not submit a second"
    callbacks = await _events(r, keys.callbacks)
    assert sorted((c.batch_id, c.correlation_id) for c in callbacks) == [
        ("b1", "1"),
        ("b1", "2"),
        ("b2", "1"),
        ("b2", "2"),
    ]
    failed = [(c.batch_id, c.correlation_id) for c in callbacks if isinstance(c, ComparisonFailed)]
    assert failed == [("b2", "1")]


async def test_batch_is_polled_to_the_end_and_resumed_by_another_worker(
    fake_redis: Any, keys: Keys, server: AnthropicTestServer
) -> None:
    r = fake_redis
    server.batch_polls_until_end = 10_000  # runs until the test lets it end
    requests = _requests(5)
    errored = requests[2]
    server.batch_results[custom_id_for(errored.batch_id, errored.correlation_id)] = batch_errored()
    for q in requests:
        await r.xadd(keys.requests, codec.encode(q))

    async with _dispatching(r, keys):
        # While it runs, its requests are pending: nothing was acknowledged, nothing answered.
        assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 5
        assert await r.xlen(keys.callbacks) == 0
    # The worker stopped mid-poll: it must leave the batch to the next holder.
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


async def _run_until_answered(
    r: Any, keys: Keys, worker: LPSWorker, n: int, *, what: str = "every request answered"
) -> asyncio.Task[None]:
    """Run `worker` until `n` callbacks exist; returns its (still running) task."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, maintenance_every_s=0.05))

    async def answered() -> bool:
        assert not task.done(), "the worker stopped"
        return int(await r.xlen(keys.callbacks)) >= n

    await _until(answered, what)
    stop.set()
    await task
    return task


async def test_a_create_without_an_answer_finds_and_adopts_the_batch(
    fake_redis: Any, keys: Keys, server: AnthropicTestServer
) -> None:
    """The create reached the server but the connection dropped before the answer: the worker
    does not know the batch id. It lists recent batches, adopts the one matching its intent
    (same number of requests, created just now) and never creates a second."""
    r = fake_redis
    requests = _requests(4)
    server.script_batch_create(Reply(drop=True, create_first=True))
    for q in requests:
        await r.xadd(keys.requests, codec.encode(q))
    await _run_until_answered(r, keys, _worker(r, keys, "lps-a"), 4)
    assert len(server.batches) == 1 and len(server.calls("/v1/messages/batches")) == 1
    assert server.calls("/v1/messages/batches", "GET")  # it listed them
    (bundle,) = [e for e in await _events(r, keys.dispatches) if isinstance(e, BundleDispatched)]
    assert bundle.provider_batch_id == next(iter(server.batches))
    callbacks = await _events(r, keys.callbacks)
    assert sorted(c.correlation_id for c in callbacks) == sorted(q.correlation_id for q in requests)
    assert all(isinstance(c, ComparisonCompleted) for c in callbacks)
    assert await r.zcard(lkeys.batch_intents(keys)) == 0  # the intent is resolved


async def test_an_abandoned_intents_late_batch_is_cancelled(
    fake_redis: Any, keys: Keys, server: AnthropicTestServer
) -> None:
    """A batch that turns up for an intent whose requests were submitted again (nobody could
    see it when they looked) is an orphan: the maintenance pass cancels it."""
    r = fake_redis
    server.batch_polls_until_end = 10_000
    worker = _worker(r, keys, "lps-a")
    requests = _requests(3)
    provider = worker.provider("anthropic")
    from lps.message_batches import MessageBatches

    orphan_id = await MessageBatches.of(provider).create(
        MessageBatches.of(provider).prepare(requests)
    )
    intent = Intent(
        intent_id="i1",
        at=server.batches[orphan_id].created_at,
        count=3,
        provider="anthropic",
        model=MODEL,
        correlation_ids=[q.correlation_id for q in requests],
        state="abandoned",
    )
    await r.hset(lkeys.batch_intent(keys, "i1"), mapping=intent.fields())
    await r.zadd(lkeys.batch_intents(keys), {"i1": intent.at})
    # A recorded batch of the same size and time is somebody's: never touched.
    kept = await MessageBatches.of(provider).create(MessageBatches.of(provider).prepare(requests))
    await r.zadd(lkeys.recorded_message_batches(keys), {kept: 1.0})
    assert await sweep_orphans(worker.mode_context, now=intent.at + 1) == []  # too early
    cancelled = await sweep_orphans(worker.mode_context, now=intent.at + ORPHAN_SWEEP_AFTER_S + 1)
    assert cancelled == [orphan_id]
    assert server.batches[orphan_id].canceled and not server.batches[kept].canceled
    assert await r.zcard(lkeys.batch_intents(keys)) == 0
    await worker.close()


async def test_sdk_errors_in_polling_never_stop_the_worker(
    fake_redis: Any, keys: Keys, server: AnthropicTestServer
) -> None:
    """An ended batch whose results_url is null makes the SDK raise AnthropicError (no API
    error): classified, retried at the next poll; retryable item results are resubmitted."""
    r = fake_redis
    server.null_results_url_polls = 3
    requests = _requests(4)
    flaky = {custom_id_for(q.batch_id, q.correlation_id) for q in requests[:2]}
    seen: Counter[str] = Counter()

    def item(custom_id: str) -> Any:
        seen[custom_id] += 1
        if custom_id in flaky and seen[custom_id] == 1:
            return batch_errored("overloaded_error", "busy")
        return None

    server.batch_default = item
    for q in requests:
        await r.xadd(keys.requests, codec.encode(q))
    await _run_until_answered(r, keys, _worker(r, keys, "lps-a"), 4)
    callbacks = await _events(r, keys.callbacks)
    assert all(isinstance(c, ComparisonCompleted) for c in callbacks) and len(callbacks) == 4
    assert len(server.batches) == 2  # the overloaded items went again, in a batch of their own
    second = list(server.batches.values())[1]
    assert {i["custom_id"] for i in second.requests} == flaky
    attempts = [
        e for e in await _events(r, keys.dispatches) if isinstance(e, ProviderAttemptFailed)
    ]
    assert sorted(custom_id_for(a.batch_id, a.correlation_id) for a in attempts) == sorted(flaky)
    assert all(a.will_retry and a.error.error_type == "overloaded" for a in attempts)
    retried = [c for c in callbacks if custom_id_for(c.batch_id, c.correlation_id) in flaky]
    assert all(c.attempts == 2 for c in retried)
