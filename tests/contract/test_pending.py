"""Pending entries on every engine (invariant 6 of docs/design.md): entries idle past the
processing timeout are reclaimed and handled again, and after `max_deliveries` end (an LPS
request as ComparisonFailed(expired), a CJ callback in the dead letters); suspects are
claimed one at a time; entries handed back at shutdown are taken at once by a live worker;
dead consumers go only when idle with nothing pending; the pending gauge is kept."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from cj.consumer import CJConsumer
from events import codec
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import ComparisonFailed, ComparisonRequested, RequestExpired
from lps.providers.base import Judgement
from lps.worker import LPSWorker
from projections.store import load_state
from streams.consumer import LOST_AFTER_MS
from streams.dlq import read_dead_letters
from streams.keys import Keys
from streams.pending import (
    HANDOFF_CONSUMER,
    pending_details,
    prune_consumer,
    prune_dead_consumers,
)
from tests.helpers import (
    Judge,
    answer,
    append_and_read,
    batch_with_wave,
    deliver_to,
    events_of,
    until,
)

MAX_DELIVERIES = 3


def _stuck(action: str) -> float:
    return REGISTRY.get_sample_value("lps_stuck_items_total", {"action": action}) or 0.0


async def _set_deliveries(
    r: Any,
    stream: str,
    group: str,
    owner: str,
    ids: list[str],
    count: int,
    *,
    idle_ms: int = 600_000,
) -> None:
    """Make entries look delivered `count` times and idle `idle_ms` (long), still owned by
    `owner`."""
    await r.xclaim(stream, group, owner, 0, ids, idle=idle_ms, retrycount=count, justid=True)


class RecordingJudge:
    """A provider that notes, for each request it judges, how many entries its worker holds."""

    name = "mock"
    supports_message_batches = False

    def __init__(self, r: Any, stream: str, consumer: str) -> None:
        self.r, self.stream, self.consumer = r, stream, consumer
        self.seen: list[tuple[str, int]] = []

    async def judge(self, request: ComparisonRequested) -> Judgement:
        held = await pending_details(self.r, self.stream, LPS_GROUP, consumer=self.consumer)
        self.seen.append((request.correlation_id, len(held)))
        return Judgement(winner="essay_a", confidence=3.0, justification="recorded")

    async def aclose(self) -> None:
        return None


async def test_lps_reclaim_expires_after_max_deliveries_and_isolates_suspects(
    r: Any, keys: Keys
) -> None:
    batch_id, requests = await batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    ids = await deliver_to(r, keys.requests, LPS_GROUP, "lps-dead")
    assert len(ids) == len(requests) >= 6
    by_id = dict(zip(ids, requests, strict=True))
    expire_id, suspect_id, fresh = ids[0], ids[1], ids[2:]
    await _set_deliveries(r, keys.requests, LPS_GROUP, "lps-dead", [expire_id], 3)
    await _set_deliveries(r, keys.requests, LPS_GROUP, "lps-dead", [suspect_id], 2)
    await _set_deliveries(r, keys.requests, LPS_GROUP, "lps-dead", fresh, 1)
    judge = RecordingJudge(r, keys.requests, "lps-live")
    worker = LPSWorker(
        r, keys, "lps-live", lambda _: judge, processing_timeout_s=0.5, max_deliveries=3
    )
    await worker.start()
    before = (_stuck("expired"), _stuck("reclaimed"))
    try:
        actions = await worker.reclaim()
    finally:
        await worker.close()

    got = {a.entry_id: a for a in actions}
    assert got[expire_id].action == "expired" and got[expire_id].deliveries == 4
    assert got[suspect_id].action == "reclaimed" and got[suspect_id].deliveries == 3
    assert all(got[i].action == "reclaimed" and got[i].deliveries == 2 for i in fresh)
    assert all(a.consumer == "lps-dead" and a.batch_id == batch_id for a in actions)
    assert (_stuck("expired") - before[0], _stuck("reclaimed") - before[1]) == (1, len(ids) - 1)
    # The fresh ones were judged together; the suspect alone, after them, holding only itself.
    order = [cid for cid, _ in judge.seen]
    suspect_cid = by_id[suspect_id].correlation_id
    assert order[-1] == suspect_cid and dict(judge.seen)[suspect_cid] == 1
    assert max(held for cid, held in judge.seen if cid != suspect_cid) == len(fresh)
    # Expired: RequestExpired + ComparisonFailed(expired); every request exactly one callback.
    expired = [e for _, e in await events_of(r, keys.dispatches) if isinstance(e, RequestExpired)]
    assert [(e.correlation_id, e.deliveries, e.consumer) for e in expired] == [
        (by_id[expire_id].correlation_id, 3, "lps-dead")
    ]
    callbacks = [e for _, e in await events_of(r, keys.callbacks)]
    assert sorted(c.correlation_id for c in callbacks) == sorted(q.correlation_id for q in requests)
    failed_cb = [c for c in callbacks if isinstance(c, ComparisonFailed)]
    assert [c.error.error_type for c in failed_cb] == ["expired"]
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0
    # A second pass finds nothing.
    assert await worker.reclaim() == []


async def test_cj_reclaim_reapplies_idle_callbacks_and_dead_letters_after_max_deliveries(
    r: Any, keys: Keys
) -> None:
    batch_id, requests = await batch_with_wave(r, keys)
    cj = CJConsumer(r, keys, "cj-live", processing_timeout_s=0.5, max_deliveries=3)
    await cj.start()
    cids = [q.correlation_id for q in requests[:3]]
    ids = await append_and_read(r, keys, [answer(q) for q in requests[:3]], consumer="cj-dead")
    await _set_deliveries(r, keys.callbacks, CJ_GROUP, "cj-dead", ids[:2], 1)
    await _set_deliveries(r, keys.callbacks, CJ_GROUP, "cj-dead", ids[2:], 3)
    before = (_stuck("reclaimed"), _stuck("dead_lettered"))

    actions = await cj.reclaim()

    assert [(a.entry_id, a.action, a.deliveries) for a in actions] == [
        (ids[0], "reclaimed", 2),
        (ids[1], "reclaimed", 2),
        (ids[2], "dead_lettered", 4),
    ]
    assert {a.batch_id for a in actions} == {batch_id}
    assert [a.correlation_id for a in actions] == cids
    assert (_stuck("reclaimed") - before[0], _stuck("dead_lettered") - before[1]) == (2, 1)
    state = await load_state(r, keys, batch_id)
    assert state is not None and (state.completed, state.callbacks_received) == (2, 2)
    assert state.corr[cids[2]] == "pending"
    view = await read_dead_letters(r, keys, stream="cj:callbacks")
    assert view["counts"] == {"cj:callbacks": 1}
    letter = view["dead_letters"][0]
    assert letter["reason"] == "max_deliveries" and letter["source_id"] == ids[2]
    assert next(iter(letter["fields"].items())) == ("ComparisonCompleted", "1")  # as written
    assert letter["group"] == CJ_GROUP
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    assert await cj.reclaim() == []


@pytest.mark.parametrize("service", ["cj", "lps"])
async def test_the_last_allowed_delivery_is_used_and_one_more_ends_the_entry(
    r: Any, keys: Keys, service: str
) -> None:
    """The boundary, on both sides: an entry whose reclaim is its `max_deliveries`-th delivery
    is handled; one whose reclaim would be delivery `max_deliveries` + 1 ends (expired or
    dead-lettered) without being handled."""
    batch_id, requests = await batch_with_wave(r, keys)
    last, past = requests[0].correlation_id, requests[1].correlation_id
    judge = Judge()
    consumer: CJConsumer | LPSWorker
    if service == "cj":
        consumer = CJConsumer(
            r, keys, "live", processing_timeout_s=0.5, max_deliveries=MAX_DELIVERIES
        )
        await consumer.start()
        ids = await append_and_read(r, keys, [answer(q) for q in requests[:2]], "dead")
        stream, group = keys.callbacks, CJ_GROUP
    else:
        consumer = LPSWorker(
            r,
            keys,
            "live",
            lambda _: judge,
            processing_timeout_s=0.5,
            max_deliveries=MAX_DELIVERIES,
        )
        await consumer.start()
        delivered = await deliver_to(r, keys.requests, LPS_GROUP, "dead")
        ids = delivered[:2]
        await r.xack(keys.requests, LPS_GROUP, *delivered[2:])  # the others are done with
        stream, group = keys.requests, LPS_GROUP
    await _set_deliveries(r, stream, group, "dead", ids[:1], MAX_DELIVERIES - 1)
    await _set_deliveries(r, stream, group, "dead", ids[1:], MAX_DELIVERIES)
    try:
        actions = await consumer.reclaim()
    finally:
        if isinstance(consumer, LPSWorker):
            await consumer.close()

    ended = "dead_lettered" if service == "cj" else "expired"
    assert sorted((a.entry_id, a.action, a.deliveries) for a in actions) == [
        (ids[0], "reclaimed", MAX_DELIVERIES),
        (ids[1], ended, MAX_DELIVERIES + 1),
    ]
    assert (await r.xpending(stream, group))["pending"] == 0
    if service == "cj":
        state = await load_state(r, keys, batch_id)
        assert state is not None and state.corr[last].startswith("c ")
        assert state.corr[past] == "pending" and state.callbacks_received == 1
        [letter] = (await read_dead_letters(r, keys, stream="cj:callbacks"))["dead_letters"]
        assert (letter["source_id"], letter["reason"]) == (ids[1], "max_deliveries")
    else:
        assert judge.judged == [last]
        callbacks = {e.correlation_id: e for _, e in await events_of(r, keys.callbacks)}
        assert set(callbacks) == {last, past}
        assert not isinstance(callbacks[last], ComparisonFailed)
        failed_past = callbacks[past]
        assert isinstance(failed_past, ComparisonFailed)
        assert failed_past.error.error_type == "expired"


async def test_shutdown_releases_unstarted_bundle_items_to_the_handoff_consumer(
    r: Any, keys: Keys
) -> None:
    batch_id, requests = await batch_with_wave(r, keys, mode="serial_bundle")
    started = asyncio.Event()
    judged: list[str] = []

    class SlowJudge:
        name = "mock"
        supports_message_batches = False

        async def judge(self, request: ComparisonRequested) -> Judgement:
            judged.append(request.correlation_id)
            started.set()
            await asyncio.sleep(0.05)  # a provider call in progress when the stop comes
            return Judgement(winner="essay_b", confidence=2.0, justification="slow")

        async def aclose(self) -> None:
            return None

    worker = LPSWorker(
        r, keys, "lps-a", lambda _: SlowJudge(), processing_timeout_s=5.0, block_ms=50
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, maintenance_every_s=0.1))
    await asyncio.wait_for(started.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)

    assert len(judged) == 1, "the item in progress finishes, the rest are not started"
    assert await pending_details(r, keys.requests, LPS_GROUP, consumer="lps-a") == []
    released = await pending_details(r, keys.requests, LPS_GROUP, consumer=HANDOFF_CONSUMER)
    assert len(released) == len(requests) - 1
    # Handed back untouched: the delivery is given back and the entry is already "timed out".
    assert {p["deliveries"] for p in released} == {0}
    assert min(p["idle_ms"] for p in released) >= 5000
    # Any live worker takes them on its next reaper pass, as first deliveries.
    judged.clear()
    other = LPSWorker(r, keys, "lps-b", lambda _: SlowJudge(), processing_timeout_s=5.0)
    await other.start()
    try:
        actions = await other.reclaim()
    finally:
        await other.close()
    assert len(actions) == len(released) and {a.deliveries for a in actions} == {1}
    assert {a.consumer for a in actions} == {HANDOFF_CONSUMER}
    assert len(judged) == len(released)
    callbacks = [e for _, e in await events_of(r, keys.callbacks)]
    assert len(callbacks) == len(requests) == len({c.correlation_id for c in callbacks})
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0
    assert batch_id


async def test_dead_consumers_are_pruned_only_when_idle_with_nothing_pending(
    r: Any, keys: Keys
) -> None:
    stream, group = keys.stream("s"), "g"
    await r.xgroup_create(stream, group, id="0", mkstream=True)
    for i in range(3):
        await r.xadd(stream, {"i": str(i)})
    await r.xreadgroup(group, "holder", {stream: ">"}, count=1)  # keeps one pending
    for name in ("me", "empty"):  # read one each, then acknowledge it: nothing pending
        await r.xreadgroup(group, name, {stream: ">"}, count=1)
        rows = await pending_details(r, stream, group, consumer=name)
        await r.xack(stream, group, *[row["entry_id"] for row in rows])
    # Too recent: nobody goes.
    assert await prune_dead_consumers(r, stream, group, dead_after_ms=60_000) == []

    async def idle_enough() -> bool:
        infos = await r.xinfo_consumers(stream, group)
        return min(int(i["idle"]) for i in infos) >= 30

    await until(idle_enough)
    removed = await prune_dead_consumers(r, stream, group, dead_after_ms=30, keep=["me"])
    assert removed == ["empty"]
    names = sorted(i["name"].decode() for i in await r.xinfo_consumers(stream, group))
    assert names == ["holder", "me"]
    # The atomic re-check: a consumer with something pending is never deleted.
    assert await prune_consumer(r, stream, group, "holder", min_idle_ms=0) is False
    assert (await r.xpending(stream, group))["pending"] == 1


async def test_maintenance_sets_the_pending_gauge(r: Any, keys: Keys) -> None:
    _, requests = await batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    await deliver_to(r, keys.requests, LPS_GROUP, "lps-busy")
    worker = LPSWorker(
        r,
        keys,
        "lps-m",
        lambda _: RecordingJudge(r, keys.requests, "x"),
        processing_timeout_s=3600,
        dead_consumer_after_s=3600,
    )
    await worker.start()
    try:
        await worker.maintain()
    finally:
        await worker.close()
    value = REGISTRY.get_sample_value(
        "lps_pending_entries", {"stream": "lps:requests", "group": "lps"}
    )
    assert value == len(requests)
    cj = CJConsumer(r, keys, "cj-m")
    await cj.start()
    await cj.maintain()
    assert (
        REGISTRY.get_sample_value("lps_pending_entries", {"stream": "cj:callbacks", "group": "cj"})
        == 0
    )


@pytest.mark.parametrize("service", ["cj", "lps"])
async def test_own_entries_whose_delivery_was_lost_are_read_again_and_handled(
    r: Any, keys: Keys, service: str
) -> None:
    """A read whose reply was lost (the connection dropped after Redis delivered its entries,
    and the client's retry read on after them) leaves entries held by a live consumer that
    never saw them. Nobody else claims a live consumer's own entries, and its reads go on
    from `>`: its reaper pass must read them again, or they stay pending for ever."""
    batch_id, requests = await batch_with_wave(r, keys)
    cids = [q.correlation_id for q in requests[:2]]
    judge = Judge()
    consumer: CJConsumer | LPSWorker
    if service == "cj":
        consumer = CJConsumer(r, keys, "live", processing_timeout_s=0.5, block_ms=10)
        stream, group = keys.callbacks, CJ_GROUP
    else:
        consumer = LPSWorker(
            r, keys, "live", lambda _: judge, processing_timeout_s=0.5, block_ms=10
        )
        stream, group = keys.requests, LPS_GROUP
    await consumer.start()
    try:
        if service == "cj":
            assert await consumer.step() == 0  # past its own backlog, reading from `>`
            ids = await append_and_read(r, keys, [answer(q) for q in requests[:2]], "live")
        else:
            await r.xack(keys.requests, LPS_GROUP, *await deliver_to(r, stream, group, "other"))
            assert await consumer.step() == 0
            for q in requests[:2]:
                await r.xadd(keys.requests, codec.encode(q))
            ids = await deliver_to(r, stream, group, "live")
        await _set_deliveries(r, stream, group, "live", ids, 1)  # long idle, delivered once
        assert await consumer.step() == 0, "its reads go on after the lost entries"
        assert await consumer.reclaim() == [], "nobody claims a live consumer's own entries"

        await consumer.maintain()
        assert await consumer.step() == len(ids)
    finally:
        if isinstance(consumer, LPSWorker):
            await consumer.close()
    assert (await r.xpending(stream, group))["pending"] == 0
    if service == "cj":
        state = await load_state(r, keys, batch_id)
        assert state is not None and state.callbacks_received == 2
        assert all(state.corr[c].startswith("c ") for c in cids)
    else:
        assert sorted(judge.judged) == sorted(cids)


async def _lose(r: Any, stream: str, group: str, consumer: str, idle_ms: int) -> list[str]:
    """Deliver what is new to `consumer` as a read whose reply was lost would (pending to it,
    never seen by it), idle `idle_ms`."""
    ids = await deliver_to(r, stream, group, consumer)
    await _set_deliveries(r, stream, group, consumer, ids, 1, idle_ms=idle_ms)
    return ids


async def test_a_delivery_a_live_cj_consumer_never_got_is_read_again_at_its_next_pass(
    r: Any, keys: Keys
) -> None:
    """A read's reply lost (a connection dropped, the client retrying the read) leaves its
    entries pending to a consumer that never saw them, and nobody claims a live consumer's
    entries: they are read again at its next reaper pass once `LOST_AFTER_MS` idle, not a
    processing timeout (120 s) later, so the batch's last decision, which waits for every
    callback, is not held up that long (a failover in tests/test_cluster.py did so)."""
    batch_id, requests = await batch_with_wave(r, keys)
    cj = CJConsumer(r, keys, "cj-live", processing_timeout_s=120.0, block_ms=10)
    await cj.start()
    assert await cj.step() == 0  # reading new entries now, its own backlog (none) behind it
    fresh = requests[:1]
    for q in fresh:
        await r.xadd(keys.callbacks, codec.encode(answer(q)))
    await _lose(r, keys.callbacks, CJ_GROUP, "cj-live", idle_ms=1_000)
    await cj.maintain()  # only just lost: it may still be on its way
    assert await cj.step() == 0
    for q in requests[1:3]:
        await r.xadd(keys.callbacks, codec.encode(answer(q)))
    lost = await _lose(r, keys.callbacks, CJ_GROUP, "cj-live", idle_ms=LOST_AFTER_MS + 1_000)
    assert await cj.step() == 0  # nothing new: the lost ones are not read by themselves

    await cj.maintain()

    assert await cj.step() == 3  # all of its own pending entries, the fresh one with them
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.completed == 3
    assert len(lost) == 2


async def test_a_request_a_live_lps_worker_never_got_is_read_again_but_not_those_in_hand(
    r: Any, keys: Keys
) -> None:
    """The LPS worker's entries in hand are pending by design, and stay so while their
    calls last: only those pending to it and not in hand are taken for lost."""
    _, requests = await batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    worker = LPSWorker(
        r, keys, "lps-live", lambda _: Judge(), processing_timeout_s=120.0, block_ms=10
    )
    await worker.start()
    try:
        in_hand = [e.entry_id for e in await worker.reader.read()]
        assert len(in_hand) == len(requests)
        worker.in_hand.update(in_hand)  # as `handle` holds a page while its calls last
        await _set_deliveries(r, keys.requests, LPS_GROUP, "lps-live", in_hand, 1, idle_ms=60_000)
        await worker.reread_lost_deliveries()
        assert await worker.reader.read() == []  # nothing was taken for lost
        await r.xadd(keys.requests, codec.encode(requests[0]))  # the same request, sent again
        [lost] = await _lose(r, keys.requests, LPS_GROUP, "lps-live", idle_ms=LOST_AFTER_MS + 1_000)
        await worker.reread_lost_deliveries()
        read = [e.entry_id for e in await worker.reader.read()]
        assert lost in read and set(read) <= {lost, *in_hand}
    finally:
        await worker.close()
