"""LPS planning: bundle sizes, grouping, and reading on while a long unit runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from events import codec
from events.text import as_str
from events.types import (
    MAX_BUNDLE_SIZE,
    BundleDispatched,
    ComparisonCompleted,
    ComparisonRequested,
    ErrorDetail,
    Essay,
    Mode,
)
from lps.breaker import Breaker, BreakerState, Ticket
from lps.cooldown import Cooldown
from lps.modes import bundle_size, plan_units
from lps.providers.base import Judgement
from lps.providers.mock import PROFILES, MockProvider
from lps.worker import LPSWorker
from streams.keys import Keys
from streams.metrics import STUCK_ITEMS
from streams.reader import Entry
from tests.helpers import decode_callback


def _req(
    i: int, mode: Mode = "serial_bundle", model: str = "m", pref: int = 64, **kw: Any
) -> ComparisonRequested:
    kw.setdefault("batch_id", "b")
    kw.setdefault("correlation_id", f"c{i}")
    return ComparisonRequested(
        wave=1,
        essay_a=Essay("a", "x"),
        essay_b=Essay("b", "y"),
        mode=mode,
        model=model,
        preferred_bundle_size=pref,
        **kw,
    )


def test_bundle_size_caps_and_falls_back() -> None:
    assert bundle_size(10) == 10
    assert bundle_size(500) == MAX_BUNDLE_SIZE == 64
    assert bundle_size(0) == 64 and bundle_size(-3) == 64


def test_units_group_by_provider_model_and_overrides_and_respect_the_hint() -> None:
    items = [(Entry(f"{i}-0", {}), _req(i, pref=3)) for i in range(7)]
    items += [(Entry(f"{i}-1", {}), _req(i, model="other")) for i in range(2)]
    items += [(Entry(f"{i}-2", {}), _req(i, overrides={"temperature": "0"})) for i in range(2)]
    items += [(Entry(f"{i}-3", {}), _req(i, mode="per_request")) for i in range(3)]
    units = plan_units(items)
    sizes = sorted(len(u) for u in units)
    assert sizes == [1, 1, 1, 1, 2, 2, 3, 3]
    for unit in units:
        keys = {(r.mode, r.model, tuple(sorted(r.overrides.items()))) for _, r in unit}
        assert len(keys) == 1
    assert sum(len(u) for u in units) == len(items)


class GatedJudge:
    """A provider whose answers for batch `slow` wait until the test opens the gate."""

    name = "gated"
    supports_message_batches = False

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def judge(self, request: ComparisonRequested) -> Judgement:
        if request.batch_id == "slow":
            self.started.set()
            await self.gate.wait()
        return Judgement(winner="essay_a", confidence=3.0, justification="ok")

    async def aclose(self) -> None:
        return None


async def test_a_long_bundle_does_not_stop_the_worker_reading(fake_redis: Any, keys: Keys) -> None:
    r = fake_redis
    judge = GatedJudge()
    worker = LPSWorker(r, keys, "w", lambda _: judge, block_ms=10, concurrency=4)

    async def append(batch: str, n: int) -> None:
        for i in range(n):
            req = _req(i, provider="gated", batch_id=batch, correlation_id=f"{batch}{i}")
            await r.xadd(keys.requests, codec.encode(req))

    async def answered(batch: str) -> int:
        return sum(decode_callback(f).batch_id == batch for _, f in await r.xrange(keys.callbacks))

    await append("slow", 3)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, maintenance_every_s=60))
    await asyncio.wait_for(judge.started.wait(), 5)
    await append("fast", 3)
    for _ in range(500):
        if await answered("fast") == 3:
            break
        await asyncio.sleep(0.01)
    assert await answered("fast") == 3, "requests behind a long bundle were not read"
    assert await answered("slow") == 0
    judge.gate.set()
    for _ in range(500):
        if await answered("slow") == 3:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert await answered("slow") == 3
    assert (await r.xpending(keys.requests, "lps"))["pending"] == 0


async def test_batch_api_on_a_provider_without_message_batches_is_judged_in_sequence(
    fake_redis: Any, keys: Keys
) -> None:
    r = fake_redis
    worker = LPSWorker(r, keys, "w", lambda _: MockProvider(PROFILES["ideal"], seed=1))
    assert not worker.provider("mock").supports_message_batches
    await worker.start()
    for i in range(3):
        await r.xadd(keys.requests, codec.encode(_req(i, mode="batch_api", provider="mock")))
    assert await worker.step() == 3
    await worker.close()
    (bundle,) = [codec.decode(f) for _, f in await r.xrange(keys.dispatches)]
    assert isinstance(bundle, BundleDispatched)
    assert bundle.mode == "batch_api" and bundle.size == 3 and bundle.provider_batch_id is None
    callbacks = [codec.decode(f) for _, f in await r.xrange(keys.callbacks)]
    assert all(isinstance(c, ComparisonCompleted) for c in callbacks) and len(callbacks) == 3
    assert (await r.xpending(keys.requests, "lps"))["pending"] == 0


async def test_answers_are_looked_up_per_batch_and_old_markers_still_count(
    fake_redis: Any, keys: Keys
) -> None:
    """A request is answered when its batch's `lps:answered` hash holds its correlation id; a
    Message Batch intent written before (no batch ids) is checked against the string markers
    of that time (`lps:done:<cid>`)."""
    from lps import keys as lkeys
    from lps.modes.batch_api import Intent
    from lps.recorder import answered

    r = fake_redis
    await r.hset(lkeys.answered(keys, "b1"), "c1", "t")
    await r.set(lkeys.done(keys, "c9"), "t")
    flags = await answered(r, keys, [("b1", "c1"), ("b1", "c2"), ("b2", "c1"), ("", "c9")])
    assert flags == [True, False, False, True]
    # Looked up one hash per batch: the answers still come back in the requests' order.
    await r.hset(lkeys.answered(keys, "b2"), "c3", "t")
    mixed = [("b2", "c3"), ("", "c8"), ("b1", "c2"), ("b2", "c1"), ("", "c9"), ("b1", "c1")]
    assert await answered(r, keys, mixed) == [True, False, False, False, True, True]
    assert await answered(r, keys, []) == []
    # A page of one batch (one HMGET, without a pipeline): the same answers.
    assert await answered(r, keys, [("b1", "c2"), ("b1", "c1")]) == [False, True]
    assert await answered(r, keys, [("b2", "c3")]) == [True]
    old = Intent("i", 1.0, 1, "anthropic", "m", ["c9"]).fields()
    del old["batch_ids"]
    intent = Intent.of(old)
    assert intent is not None and intent.batch_ids == [] and intent.correlation_ids == ["c9"]


class _CountingGets:
    """A Redis client that counts GETs (the cooldown's reads)."""

    def __init__(self, r: Any) -> None:
        self.r = r
        self.gets = 0

    async def get(self, key: str) -> Any:
        self.gets += 1
        return await self.r.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.r, name)


async def test_a_page_reads_the_cooldown_once_not_once_per_call(
    fake_redis: Any, keys: Keys
) -> None:
    """The calls of a page start together: each used to miss the worker's cached cooldown
    read and send a GET of its own (issue 11). Now they share one read."""
    r = fake_redis
    counting = _CountingGets(r)
    cooldown = Cooldown(counting, keys, fresh_s=60.0)
    worker = LPSWorker(
        r,
        keys,
        "w",
        lambda _: MockProvider(PROFILES["ideal"], seed=1),
        concurrency=8,
        cooldown=cooldown,
    )
    await worker.start()
    for i in range(8):
        await r.xadd(keys.requests, codec.encode(_req(i, mode="per_request", provider="mock")))
    assert await worker.step() == 8
    await worker.close()
    assert len(await r.xrange(keys.callbacks)) == 8
    assert counting.gets == 1


class _CountingBreaker(Breaker):
    """A breaker that counts its reads of Redis (a pipeline of HGETALLs each, or those the
    worker sends with a page's answered marks)."""

    reads = 0

    async def states(self, provider: str, model: str) -> list[BreakerState]:
        self.reads += 1
        return await super().states(provider, model)

    def read_in(
        self, pipe: Any, due: list[tuple[str, str]]
    ) -> Callable[[list[Any] | BaseException], None]:
        self.reads += len(due)
        return super().read_in(pipe, due)


async def test_a_page_reads_the_breakers_once_not_once_per_call(
    fake_redis: Any, keys: Keys
) -> None:
    """As the cooldown: once the breaker read the worker reuses is stale, the calls of the
    next page used to miss it together and each send its own HGETALLs (issue 11)."""
    r = fake_redis
    now = [1000.0]
    breaker = _CountingBreaker(r, keys, fresh_s=0.1, clock=lambda: now[0])
    worker = LPSWorker(
        r,
        keys,
        "w",
        lambda _: MockProvider(PROFILES["ideal"], seed=1),
        concurrency=8,
        breaker=breaker,
    )
    await worker.start()
    for page in range(2):
        now[0] += 1.0  # the last read is stale
        before = breaker.reads
        for i in range(8):
            req = _req(8 * page + i, mode="per_request", provider="mock")
            await r.xadd(keys.requests, codec.encode(req))
        assert await worker.step() == 8
        # The first page: its read and the first call's own, fresh one (the model is not
        # proven yet, `Breaker.admit`); after that one read a page.
        assert breaker.reads - before == (2 if page == 0 else 1)
    await worker.close()
    assert len(await r.xrange(keys.callbacks)) == 16


async def test_a_page_reads_its_breakers_with_its_answered_marks(
    fake_redis: Any, keys: Keys
) -> None:
    """The breakers a page's calls would read first are read in the round trip of its answered
    marks (issue 11): an open breaker found so stops the page's calls as before, and a read
    that fails there teaches nothing (the call reads itself, and fails open)."""
    from lps import keys as lkeys

    r = fake_redis
    now = [1000.0]
    breaker = _CountingBreaker(r, keys, fresh_s=0.1, clock=lambda: now[0])
    await breaker.observe("mock", "m", None)  # proven: no per-process gate
    worker = LPSWorker(
        r, keys, "w", lambda _: MockProvider(PROFILES["ideal"], seed=1), breaker=breaker
    )
    await worker.start()
    await r.set(lkeys.breaker(keys, "mock"), "not a hash")  # WRONGTYPE for HGETALL
    for i in range(3):
        await r.xadd(keys.requests, codec.encode(_req(i, mode="per_request", provider="mock")))
    assert await worker.step() == 3
    # The page's read failed, and taught nothing: the calls read again (and fail open).
    assert breaker.reads >= 2
    assert len(await r.xrange(keys.callbacks)) == 3
    await r.delete(lkeys.breaker(keys, "mock"))
    detail = ErrorDetail(error_type="authentication", retryable=False, message="revoked")
    await breaker.open(detail, "mock", "m")
    now[0] += 1.0
    for i in range(3, 6):
        await r.xadd(keys.requests, codec.encode(_req(i, mode="per_request", provider="mock")))
    assert await worker.step() == 3
    await worker.close()
    callbacks = [codec.decode(f) for _, f in await r.xrange(keys.callbacks)]
    assert [type(c).__name__ for c in callbacks[3:]] == ["ComparisonFailed"] * 3


async def test_a_page_reads_the_cooldown_with_its_answered_marks(
    fake_redis: Any, keys: Keys
) -> None:
    """On the worker's own client, the cooldown's read goes with the page's answered marks
    (issue 11): the calls then find it fresh, and a cooldown in force is seen by them."""
    from lps import keys as lkeys

    r = fake_redis
    now = [1000.0]
    cooldown = Cooldown(r, keys, fresh_s=60.0, clock=lambda: now[0])
    own_reads: list[Any] = []
    read = cooldown._read

    async def counted(key: tuple[str, str], now: float) -> float:  # `_read`'s names
        own_reads.append(key)
        return await read(key, now)

    cooldown._read = counted  # type: ignore[method-assign]
    worker = LPSWorker(
        r, keys, "w", lambda _: MockProvider(PROFILES["ideal"], seed=1), cooldown=cooldown
    )
    await worker.start()
    await r.set(lkeys.cooldown(keys, "mock", "m"), repr(now[0] - 5))  # over already
    for i in range(4):
        await r.xadd(keys.requests, codec.encode(_req(i, mode="per_request", provider="mock")))
    assert await worker.step() == 4
    await worker.close()
    assert own_reads == [] and cooldown._seen[("mock", "m")] == (now[0] - 5, now[0])
    assert len(await r.xrange(keys.callbacks)) == 4


async def test_a_read_sent_with_other_commands_is_shared_and_always_ends(
    fake_redis: Any, keys: Keys
) -> None:
    """Calls that would read the breakers or the cooldown while a read sent with a page's
    answered marks is on its way await it (no read of their own), and a round trip that
    fails ends it as a failed read ends (fail open): nobody waits for ever."""
    r = fake_redis
    now = [1000.0]
    breaker = _CountingBreaker(r, keys, fresh_s=0.1, clock=lambda: now[0])
    cooldown = Cooldown(r, keys, fresh_s=0.1, clock=lambda: now[0])
    await breaker.observe("mock", "m", None)  # proven: no per-process gate
    for round_trip_fails in (False, True):
        now[0] += 1.0
        pipe = r.pipeline(transaction=False)
        takes = [state.read_in(pipe, [("mock", "m")]) for state in (breaker, cooldown)]
        calls = asyncio.gather(
            *(breaker.admit("mock", "m") for _ in range(3)),
            *(cooldown.remaining("mock", "m") for _ in range(3)),
        )
        await asyncio.sleep(0)
        if round_trip_fails:
            for take in takes:
                take(ConnectionError("lost"))
        else:
            replies = await pipe.execute(raise_on_error=False)
            takes[0](replies[:2])
            takes[1](replies[2:])
        done = await asyncio.wait_for(calls, 1.0)
        assert (
            all(isinstance(t, Ticket) and t.rejected is None for t in done[:3])
            and done[3:] == [0.0] * 3
        )
        assert breaker.reads == (1 if not round_trip_fails else 2)  # read_in's alone
        # What a read teaches: a failed one nothing (the next call reads again).
        assert (breaker.admit_now("mock", "m") is None) == round_trip_fails
    assert cooldown._seen[("mock", "m")] == (0.0, now[0] - 1.0)  # the failed one taught nothing


async def test_only_calls_that_read_the_cooldown_have_it_read_with_their_page(
    fake_redis: Any, keys: Keys
) -> None:
    """A Message Batch (`batch_api`) never looks at the cooldown: its page does not read it
    (no read is made that was not made before); the breakers it does read."""
    r = fake_redis
    worker = LPSWorker(
        r,
        keys,
        "w",
        lambda _: MockProvider(PROFILES["ideal"], seed=1),
        cooldown=Cooldown(r, keys, fresh_s=0.1),
        breaker=Breaker(r, keys, fresh_s=0.1),
    )
    entry = Entry("1-0", {})
    batch = [(entry, _req(0, mode="batch_api", provider="mock"))]
    judged = [(entry, _req(1, mode="per_request", provider="mock"))]
    assert [read.func.__self__ for read in worker._page_reads(batch)] == [worker.breaker]  # type: ignore[attr-defined]
    reads = worker._page_reads(judged + batch)
    assert [read.func.__self__ for read in reads] == [worker.breaker, worker.cooldown]  # type: ignore[attr-defined]


async def test_reads_sent_with_the_answered_marks_do_not_make_them_fail(
    fake_redis: Any, keys: Keys
) -> None:
    from lps import keys as lkeys
    from lps.recorder import answered

    r = fake_redis
    await r.hset(lkeys.answered(keys, "b1"), "c1", "t")
    await r.set("not-a-hash", "x")
    heard: list[Any] = []

    def also(pipe: Any) -> Callable[[list[Any] | BaseException], None]:
        pipe.hgetall("not-a-hash")
        pipe.get("not-a-hash")

        def take(replies: list[Any] | BaseException) -> None:
            assert not isinstance(replies, BaseException), replies  # the round trip was made
            heard.extend(replies)

        return take

    flags = await answered(r, keys, [("b1", "c1"), ("b1", "c2")], also=[also, also])
    assert flags == [True, False]
    assert len(heard) == 4
    assert isinstance(heard[0], Exception) and heard[1] == b"x"
    await r.set(lkeys.answered(keys, "b2"), "x")
    with pytest.raises(Exception, match="WRONGTYPE"):
        await answered(r, keys, [("b2", "c1")], also=[also])


async def test_calls_missing_the_breaker_read_together_share_one_read(
    fake_redis: Any, keys: Keys
) -> None:
    """Calls beyond a page's first ones start as others end, after the page's read may have
    gone stale: those that miss it together send one read, not one each (issue 11)."""
    now = [1000.0]
    breaker = _CountingBreaker(fake_redis, keys, fresh_s=0.1, clock=lambda: now[0])
    await breaker.observe("mock", "m", None)  # proven: no per-process gate
    tickets = await asyncio.gather(*(breaker.admit("mock", "m", f"c{i}") for i in range(8)))
    assert breaker.reads == 1 and all(t.rejected is None for t in tickets)
    now[0] += 1.0
    await asyncio.gather(*(breaker.admit("mock", "m", f"d{i}") for i in range(8)))
    assert breaker.reads == 2
    # An open breaker is still seen by every call (a found breaker is not reused).
    detail = ErrorDetail(error_type="authentication", retryable=False, message="revoked")
    await breaker.open(detail, "mock", "m")
    now[0] += 1.0
    rejected = await asyncio.gather(*(breaker.admit("mock", "m", f"e{i}") for i in range(4)))
    assert all(t.rejected is not None for t in rejected)


def test_a_request_is_named_with_its_batch_unless_its_id_is_a_random_one_of_before() -> None:
    """Correlation ids are numbered per batch: what names a request among every batch's (an
    LPS key, a Message Batch item) holds its batch id; a random id of before names it alone,
    so that keys written before the upgrade are found (and archived) again."""
    from app.retention import _request_keys
    from events.ids import request_key
    from lps import keys as lkeys

    keys = Keys("t:")
    old = "mjp357rwv4crzut3"
    assert request_key("b1", "12") == "b1:12" != request_key("b2", "12")
    assert request_key("b1", old) == old
    assert lkeys.message_batch(keys, "b1", "12") == "t:lps:batchapi:b1:12"
    assert lkeys.message_batch(keys, "b1", old) == f"t:lps:batchapi:{old}"
    # The archiver deletes both forms, and the answer markers only random ids ever had.
    assert _request_keys(keys, "b1", ["1", old]) == [
        lkeys.answered(keys, "b1"),
        "t:lps:batchapi:b1:1",
        f"t:lps:batchapi:{old}",
        f"t:lps:done:{old}",
    ]


@pytest.mark.redis
async def test_refresh_in_hand_warns_only_for_requests_another_worker_took(
    real_redis: Any, keys: Keys
) -> None:
    """Requests stay in hand until their page is handled, after their commits acknowledged
    them: a refresh then finds them answered, not lost; only one another worker claimed is
    `claim_lost` (the warning and the `lost` stuck-items count)."""
    r = real_redis
    worker = LPSWorker(r, keys, "w", lambda _: MockProvider(PROFILES["ideal"], seed=1))
    await worker.start()
    ids = [
        as_str(await r.xadd(keys.requests, codec.encode(_req(i, provider="mock"))))
        for i in range(3)
    ]
    await r.xreadgroup("lps", "w", {keys.requests: ">"}, count=10)
    await r.xack(keys.requests, "lps", ids[0])  # answered by this worker's commit
    await r.xclaim(keys.requests, "lps", "other", 0, ids[1:2])  # taken while it looked dead
    worker.in_hand.update(ids)
    before = STUCK_ITEMS.labels("lost")._value.get()
    with capture_logs() as logs:
        await worker.refresh_in_hand()
    await worker.close()
    lost = [e for e in logs if e["event"] == "claim_lost"]
    assert [(e["entries"], e["entry_ids"]) for e in lost] == [(1, ids[1:2])]
    assert STUCK_ITEMS.labels("lost")._value.get() - before == 1
