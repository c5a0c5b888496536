"""Mode batch_api with worker PROCESSES on a real redis-server and the loopback Anthropic server:
`kill -9` while the Message Batch is being created, while it is polled, and while its results
are fetched. The next worker finds the batch (adopting the one that was created but never
recorded), nothing is paid for twice, and every request ends in exactly one accepted callback.

Every wait polls a condition with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from events.types import BundleDispatched, ComparisonRequested
from lps.message_batches import custom_id_for
from tests.anthropic_server import TEST_KEY, AnthropicTestServer, Reply, client_env, running_server
from tests.helpers import registration
from tests.redis_server import RedisServer
from tests.test_worker_processes import (
    Procs,
    assert_one_accepted_callback_per_request,
    consumer_of,
    events_of,
    held_by,
    state_of,
    submit,
    until,
)

pytestmark = pytest.mark.redis

MODEL = "claude-sonnet-4-6"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[AnthropicTestServer]:
    with running_server() as s:
        client_env(monkeypatch, s, tmp_path)
        yield s


@pytest.fixture
def procs(
    tmp_path: Path, redis_server: RedisServer, server: AnthropicTestServer
) -> Iterator[Procs]:
    p = Procs(tmp_path, redis_server)
    p.env.update(
        {
            "ANTHROPIC_API_KEY": TEST_KEY,
            "ANTHROPIC_BASE_URL": server.url,
            "ANTHROPIC_CONFIG_DIR": str(tmp_path / "anthropic-config"),
            "CJS_BATCH_POLL_S": "0.05",
            "CJS_BREAKER_PROBE_S": "1",
        }
    )
    yield p
    p.close()


async def test_kill_9_during_create_poll_and_results_pays_nothing_twice(
    procs: Procs, real_redis: Any, server: AnthropicTestServer
) -> None:
    r, keys = real_redis, procs.keys
    procs.spawn("cj")
    figures: list[str] = []
    # Two workers: one takes the batch and is killed; the other, already running, takes over
    # (and a fresh one is started to be the next spare).
    workers = [procs.spawn("lps"), procs.spawn("lps")]

    async def phase(name: str, last: bool) -> None:
        # The spare must be up: it is the one that takes over.
        await procs.started(*workers, timeout=60)
        reg = registration(
            6,
            budget=12,
            mode="batch_api",
            provider="anthropic",
            model=MODEL,
            batch_id=f"{name}-{uuid.uuid4().hex[:6]}",
        )
        before = set(server.batches)
        server.batch_polls_until_end = 10_000  # ends when the phase lets it
        if name == "create":
            # The batch is created, but its creator hangs before it learns the id.
            server.script_batch_create(Reply(delay_s=120, create_first=True))
        if name == "results":
            server.results_delay_s = 120
        await submit(r, keys, reg)
        requests = {
            custom_id_for(e.batch_id, e.correlation_id)
            for _, e in await events_of(r, keys.requests)
            if isinstance(e, ComparisonRequested) and e.batch_id == reg.batch_id
        }
        holder: list[Any] = []

        async def created() -> bool:
            if len(set(server.batches) - before) != 1:
                return False
            for w in workers:
                if len(await held_by(r, keys, consumer_of("lps", w))) == len(requests):
                    holder[:] = [w]
                    return True
            return False

        await until(created, 60, f"{name}: the Message Batch created, its requests held")
        (victim,) = holder
        (batch_id,) = set(server.batches) - before
        batch = server.batches[batch_id]
        if name == "poll":

            async def polled() -> bool:
                return batch.polls >= 2

            await until(polled, 30, "polling")
        if name == "results":
            batch.polls_until_end = batch.polls + 1

            async def fetching() -> bool:
                return any(
                    c.path.endswith(f"{batch_id}/results")
                    for c in server.calls(f"/v1/messages/batches/{batch_id}/results", "GET")
                )

            await until(fetching, 30, "fetching results")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        # Let the batch end on the next holder's polls; results answer at once again.
        batch.polls_until_end = batch.polls + 2
        server.results_delay_s = 0.0
        workers.remove(victim)
        if not last:
            workers.append(procs.spawn("lps"))

        async def finished() -> bool:
            return (await state_of(r, keys, reg.batch_id)).terminal

        took = await until(finished, 60, f"{name}: batch finished by the next worker")
        # A duplicate callback is possible (a worker slow past the processing timeout); an
        # accepted one per request is not negotiable.
        state, _ = await assert_one_accepted_callback_per_request(
            r, keys, reg.batch_id, duplicates_allowed=True
        )
        assert state.status == "finalized"
        # One Message Batch for the phase: nothing created twice, nothing paid twice.
        assert set(server.batches) - before == {batch_id}
        items = Counter(str(i["custom_id"]) for i in batch.requests)
        assert set(items) == requests and set(items.values()) == {1}
        billed = Counter(line.custom_id for line in server.billed() if line.batch_id == batch_id)
        assert set(billed.values()) == {1} and len(billed) == len(requests)
        recorded = [
            e
            for _, e in await events_of(r, keys.dispatches)
            if isinstance(e, BundleDispatched) and e.provider_batch_id == batch_id
        ]
        assert len(recorded) == 1  # recorded once, by its creator or by whoever adopted it
        if name == "create":
            assert recorded[0].consumer != consumer_of("lps", victim)
            adopted = [e for w in workers for e in procs.log_of(w)]
            assert any(
                e.get("event") == "message_batch_adopted" and e.get("provider_batch_id") == batch_id
                for e in adopted
            )
        figures.append(f"{name}: 1 batch, {len(requests)} items billed once, {took:.1f}s")

    phases = ("create", "poll", "results")
    for name in phases:
        await phase(name, last=name == phases[-1])
    print("\n[kill -9, batch_api] " + "; ".join(figures))
