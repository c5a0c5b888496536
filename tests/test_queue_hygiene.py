"""Queue hygiene in one process: reclaiming and expiring stuck entries in both groups,
poison isolation, release at shutdown, dead consumers, the pending gauge, stalled
batches, dead letters and the `cjs stuck` / `cjs dlq` views."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from cj.consumer import CJConsumer
from cj.continuation import advance
from cj.registration import append_registration
from cj.stalls import finalize_stalled, find_stalled, stalled_decision
from events import codec
from events.settings import Settings
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import (
    BatchFailed,
    BatchFinalized,
    BatchScored,
    ComparisonFailed,
    ComparisonRequested,
    RequestExpired,
)
from lps.providers.base import Judgement
from lps.worker import LPSWorker
from projections.replay import replay
from projections.store import load_state
from streams.dlq import read_dead_letters
from streams.keys import Keys
from streams.paging import read_stream
from streams.pending import (
    HANDOFF_CONSUMER,
    pending_details,
    prune_consumer,
    prune_dead_consumers,
)
from streams.reader import _entries
from tests.helpers import append_and_read, canonical, completed, failed, registration, snapshot
from tools import cmd_stuck


def _stuck(action: str) -> float:
    return REGISTRY.get_sample_value("lps_stuck_items_total", {"action": action}) or 0.0


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def _events(r: Any, stream: str) -> list[tuple[str, Any]]:
    return [(i, codec.decode(f)) async for i, f in read_stream(r, stream)]


async def _batch_with_wave(
    r: Any, keys: Keys, n: int = 6, **kw: Any
) -> tuple[str, list[ComparisonRequested]]:
    reg = registration(n, batch_id=f"b-{uuid.uuid4().hex[:8]}", **kw)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    requests = [e for _, e in await _events(r, keys.requests) if isinstance(e, ComparisonRequested)]
    return reg.batch_id, [q for q in requests if q.batch_id == reg.batch_id]


async def _deliver_to(r: Any, stream: str, group: str, consumer: str) -> list[str]:
    """Read everything new into `consumer` (a consumer that then 'dies')."""
    reply = await r.xreadgroup(group, consumer, {stream: ">"}, count=10_000)
    return [i.decode() for _, items in reply for i, _ in items]


async def _set_deliveries(
    r: Any, stream: str, group: str, owner: str, ids: list[str], count: int
) -> None:
    """Make entries look delivered `count` times and long idle, still owned by `owner`."""
    await r.xclaim(stream, group, owner, 0, ids, idle=600_000, retrycount=count, justid=True)


class RecordingJudge:
    """A provider that notes, for each request it judges, how many entries its worker holds."""

    name = "mock"

    def __init__(self, r: Any, stream: str, consumer: str) -> None:
        self.r, self.stream, self.consumer = r, stream, consumer
        self.seen: list[tuple[str, int]] = []

    async def judge(self, request: ComparisonRequested) -> Judgement:
        held = await pending_details(self.r, self.stream, LPS_GROUP, consumer=self.consumer)
        self.seen.append((request.correlation_id, len(held)))
        return Judgement(winner="essay_a", confidence=3.0, justification="recorded")

    async def aclose(self) -> None:
        return None


@pytest.mark.redis
async def test_lps_reclaim_expires_after_max_deliveries_and_isolates_suspects(
    real_redis: Any,
) -> None:
    r = real_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await _batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    ids = await _deliver_to(r, keys.requests, LPS_GROUP, "lps-dead")
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
    expired = [e for _, e in await _events(r, keys.dispatches) if isinstance(e, RequestExpired)]
    assert [(e.correlation_id, e.deliveries, e.consumer) for e in expired] == [
        (by_id[expire_id].correlation_id, 3, "lps-dead")
    ]
    callbacks = [e for _, e in await _events(r, keys.callbacks)]
    assert sorted(c.correlation_id for c in callbacks) == sorted(q.correlation_id for q in requests)
    failed_cb = [c for c in callbacks if isinstance(c, ComparisonFailed)]
    assert [c.error.error_type for c in failed_cb] == ["expired"]
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0
    # A second pass finds nothing.
    assert await worker.reclaim() == []


@pytest.mark.redis
async def test_cj_reclaim_reapplies_idle_callbacks_and_dead_letters_after_max_deliveries(
    real_redis: Any,
) -> None:
    r = real_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await _batch_with_wave(r, keys)
    cj = CJConsumer(r, keys, "cj-live", processing_timeout_s=0.5, max_deliveries=3)
    await cj.start()
    cids = [q.correlation_id for q in requests[:3]]
    ids = await append_and_read(r, keys, [completed(batch_id, c) for c in cids], consumer="cj-dead")
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
    assert letter["fields"]["type"] == "ComparisonCompleted" and letter["group"] == CJ_GROUP
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    assert await cj.reclaim() == []


@pytest.mark.redis
async def test_shutdown_releases_unstarted_bundle_items_to_the_handoff_consumer(
    real_redis: Any,
) -> None:
    r = real_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await _batch_with_wave(r, keys, mode="serial_bundle")
    started = asyncio.Event()
    judged: list[str] = []

    class SlowJudge:
        name = "mock"

        async def judge(self, request: ComparisonRequested) -> Judgement:
            judged.append(request.correlation_id)
            started.set()
            await asyncio.sleep(0.05)
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
    callbacks = [e for _, e in await _events(r, keys.callbacks)]
    assert len(callbacks) == len(requests) == len({c.correlation_id for c in callbacks})
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0
    assert batch_id


async def _prune_case(r: Any) -> None:
    stream, group = f"s{uuid.uuid4().hex[:6]}", "g"
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

    await _until(idle_enough)
    removed = await prune_dead_consumers(r, stream, group, dead_after_ms=30, keep=["me"])
    assert removed == ["empty"]
    names = sorted(i["name"].decode() for i in await r.xinfo_consumers(stream, group))
    assert names == ["holder", "me"]
    # The atomic re-check: a consumer with something pending is never deleted.
    assert await prune_consumer(r, stream, group, "holder", min_idle_ms=0) is False
    assert (await r.xpending(stream, group))["pending"] == 1


@pytest.mark.redis
async def test_dead_consumers_are_pruned_only_when_idle_with_nothing_pending(
    real_redis: Any,
) -> None:
    await _prune_case(real_redis)


async def test_dead_consumer_pruning_runs_on_fakeredis_too(fake_redis: Any) -> None:
    await _prune_case(fake_redis)


@pytest.mark.redis
async def test_maintenance_sets_the_pending_gauge_and_prunes(real_redis: Any) -> None:
    r = real_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    _, requests = await _batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    await _deliver_to(r, keys.requests, LPS_GROUP, "lps-busy")
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


# --- stalled batches -----------------------------------------------------------------------------


async def _apply(r: Any, keys: Keys, callbacks: list[Any]) -> None:
    cj = CJConsumer(r, keys, "cj-s", block_ms=10)
    await cj.start()
    await append_and_read(r, keys, callbacks, consumer="cj-s")
    entries = await r.xreadgroup(CJ_GROUP, "cj-s", {keys.callbacks: "0"}, count=1000)
    await cj.handle(_entries(entries))


@pytest.mark.redis
async def test_stalled_batch_with_enough_comparisons_is_scored_and_finalized(
    real_redis: Any,
) -> None:
    r = real_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await _batch_with_wave(r, keys, n=6)
    winner = {True: "essay_a", False: "essay_b"}
    answered = requests[:-2]
    await _apply(
        r,
        keys,
        [
            completed(
                batch_id,
                q.correlation_id,
                winner[(q.essay_a.mock_quality or 0) >= (q.essay_b.mock_quality or 0)],
                q.essay_a.essay_id,
                q.essay_b.essay_id,
            )
            for q in answered
        ],
    )
    missing = sorted(q.correlation_id for q in requests[-2:])
    # Not stalled for a long timeout; stalled at once for a zero timeout.
    assert await find_stalled(r, keys, 3600) == []
    view = await cmd_stuck.collect(r, keys, idle_s=0, batch_idle_s=0)
    [stalled] = view["stalled_batches"]
    assert stalled["batch_id"] == batch_id and stalled["in_flight"] == 2
    assert stalled["pending_correlation_ids"] == missing
    assert stalled["completed"] == len(answered)

    done = await cmd_stuck.reclaim(r, keys, Settings(), batch_idle_s=0)
    assert done["batches"] == [
        {
            "batch_id": batch_id,
            "event": "BatchFinalized",
            "reason": "stalled",
            "message": None,
            "scored": True,
            "abandoned": missing,
        }
    ]
    tail = [e for _, e in await _events(r, keys.batches)][-2:]
    assert isinstance(tail[0], BatchScored) and tail[0].comparisons == len(answered)
    assert isinstance(tail[1], BatchFinalized) and tail[1].reason == "stalled"
    assert tail[1].abandoned == missing
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.status == "finalized" and state.in_flight == 0
    assert state.finalize_reason == "stalled" and state.completed_at
    # Exactly once: nothing left to do, and a callback arriving now is late.
    assert await finalize_stalled(r, keys, batch_id, 0) is None
    await _apply(r, keys, [completed(batch_id, missing[0])])
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.late_callbacks == 1 and state.completed == len(answered)
    states, _ = await replay(r, keys, {batch_id})
    assert await snapshot(r, keys, batch_id) == canonical(states[batch_id], keys)


@pytest.mark.redis
async def test_stalled_batch_without_enough_comparisons_fails_with_a_reason(
    real_redis: Any,
) -> None:
    r = real_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await _batch_with_wave(r, keys, n=6)
    await _apply(r, keys, [failed(batch_id, requests[0].correlation_id)])
    done = await cmd_stuck.reclaim(r, keys, Settings(), batch_idle_s=0)
    [b] = done["batches"]
    assert (b["event"], b["reason"], b["scored"]) == ("BatchFailed", "stalled", False)
    assert "no comparison succeeded" in b["message"]
    assert b["abandoned"] == sorted(q.correlation_id for q in requests[1:])
    last = [e for _, e in await _events(r, keys.batches)][-1]
    assert isinstance(last, BatchFailed) and last.reason == "stalled"
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.status == "failed" and state.in_flight == 0
    states, _ = await replay(r, keys, {batch_id})
    assert await snapshot(r, keys, batch_id) == canonical(states[batch_id], keys)


def test_stalled_decision_is_pure_and_needs_a_connected_graph() -> None:
    from datetime import UTC, datetime, timedelta

    from projections.batch import apply_batch_event, apply_callback, register
    from tests.helpers import wave

    reg = registration(4, batch_id="b")
    state = register(reg)
    apply_batch_event(
        state, wave("b", 1, [("c1", "e0", "e1"), ("c2", "e2", "e3"), ("c3", "e1", "e2")])
    )
    apply_callback(state, completed("b", "c1", "essay_a", "e0", "e1"), "1-0")
    apply_callback(state, completed("b", "c2", "essay_a", "e2", "e3"), "2-0")
    later = datetime.now(UTC) + timedelta(hours=1)
    assert stalled_decision(state, 7200, later) is None  # not idle long enough
    decision = stalled_decision(state, 60, later)
    assert decision is not None
    [event] = decision.events
    assert isinstance(event, BatchFailed) and "do not connect" in event.message
    assert event.abandoned == ["c3"]
    apply_callback(state, completed("b", "c3", "essay_a", "e1", "e2"), "3-0")
    state.last_event_at = reg.occurred_at
    decision = stalled_decision(state, 60, later)
    assert decision is not None
    assert [type(e) for e in decision.events] == [BatchScored, BatchFinalized]


# --- outside entries, the views ----------------------------------------------------------------


@pytest.mark.redis
async def test_stuck_view_names_batch_correlation_and_essays_of_each_stuck_entry(
    real_redis: Any,
) -> None:
    r = real_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await _batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    await _deliver_to(r, keys.requests, LPS_GROUP, "lps-gone")
    await r.xadd(keys.requests, {"type": "ComparisonRequested", "data": "{broken"})
    await _deliver_to(r, keys.requests, LPS_GROUP, "lps-gone")
    view = await cmd_stuck.collect(r, keys, idle_s=0, batch_idle_s=3600)
    lps = next(g for g in view["groups"] if g["group"] == "lps")
    assert lps["pending"] == len(requests) + 1 and lps["lag"] == 0
    assert [c["consumer"] for c in lps["consumers"]] == ["lps-gone"]
    cj = next(g for g in view["groups"] if g["group"] == "cj")
    assert cj["exists"] is False  # read-only: the view creates no group
    by_cid = {e["correlation_id"]: e for e in view["stuck"] if e["correlation_id"]}
    for q in requests:
        e = by_cid[q.correlation_id]
        assert e["batch_id"] == batch_id and e["consumer"] == "lps-gone" and e["deliveries"] == 1
        assert e["essay_ids"] == [q.essay_a.essay_id, q.essay_b.essay_id]
        assert e["stream"] == "lps:requests" and e["group"] == "lps"
    [bad] = [e for e in view["stuck"] if not e["correlation_id"]]
    assert bad["undecodable"] == "invalid_data"
    text = cmd_stuck.render(view)
    assert "lps-gone" in text and "Stalled batches" in text and batch_id[:11] in text
    # A high threshold lists nothing but still counts.
    quiet = await cmd_stuck.collect(r, keys, idle_s=3600, batch_idle_s=3600)
    assert quiet["stuck"] == [] and quiet["groups"][0]["pending"] == len(requests) + 1
