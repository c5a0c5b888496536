"""Stalled batches and the `cjs stuck` view, in one process. Reclaiming, expiring, releasing
and pruning (both groups, every engine) are in tests/contract/test_pending.py, dead letters in
tests/contract/test_dead_letters.py."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from app import stuck
from app.settings import Settings
from cj.consumer import CJConsumer
from cj.stalls import finalize_stalled, find_stalled, stalled_decision
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import BatchFailed, BatchFinalized, BatchScored
from projections.replay import replay
from projections.store import load_state
from streams.keys import Keys
from streams.reader import _entries
from tests.helpers import (
    answer,
    append_and_read,
    batch_with_wave,
    canonical,
    completed,
    deliver_to,
    events_of,
    failed,
    registration,
    snapshot,
)
from tools import cmd_stuck

# --- stalled batches -----------------------------------------------------------------------------


async def _apply(r: Any, keys: Keys, callbacks: list[Any]) -> None:
    cj = CJConsumer(r, keys, "cj-s", block_ms=10)
    await cj.start()
    await append_and_read(r, keys, callbacks, consumer="cj-s")
    entries = await r.xreadgroup(CJ_GROUP, "cj-s", {keys.callbacks: "0"}, count=1000)
    await cj.handle(_entries(entries))


@pytest.mark.redis
async def test_stalled_batch_with_enough_comparisons_is_scored_and_finalized(
    shared_redis: Any,
) -> None:
    r = shared_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await batch_with_wave(r, keys, n=6)
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
    view = await stuck.collect(r, keys, idle_s=0, batch_idle_s=0)
    [stalled] = view["stalled_batches"]
    assert stalled["batch_id"] == batch_id and stalled["in_flight"] == 2
    assert stalled["pending_correlation_ids"] == missing
    assert stalled["completed"] == len(answered)

    done = await stuck.reclaim(r, keys, Settings(), batch_idle_s=0)
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
    tail = [e for _, e in await events_of(r, keys.batches)][-2:]
    assert isinstance(tail[0], BatchScored) and tail[0].comparisons == len(answered)
    assert isinstance(tail[1], BatchFinalized) and tail[1].reason == "stalled"
    assert tail[1].abandoned == missing
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.status == "finalized" and state.in_flight == 0
    assert state.finalize_reason == "stalled" and state.completed_at
    # Exactly once: nothing left to do, and a callback arriving now is late.
    assert await finalize_stalled(r, keys, batch_id, 0) is None
    await _apply(r, keys, [answer(next(q for q in requests if q.correlation_id == missing[0]))])
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.late_callbacks == 1 and state.completed == len(answered)
    states, _ = await replay(r, keys, {batch_id})
    assert await snapshot(r, keys, batch_id) == canonical(states[batch_id], keys)


@pytest.mark.redis
async def test_stalled_batch_without_enough_comparisons_fails_with_a_reason(
    shared_redis: Any,
) -> None:
    r = shared_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await batch_with_wave(r, keys, n=6)
    q = requests[0]
    await _apply(
        r, keys, [failed(batch_id, q.correlation_id, a=q.essay_a.essay_id, b=q.essay_b.essay_id)]
    )
    done = await stuck.reclaim(r, keys, Settings(), batch_idle_s=0)
    [b] = done["batches"]
    assert (b["event"], b["reason"], b["scored"]) == ("BatchFailed", "stalled", False)
    assert "no comparison succeeded" in b["message"]
    # By number, as planned (2 .. 12: "10" would sort before "2" as a string).
    assert b["abandoned"] == [q.correlation_id for q in requests[1:]]
    last = [e for _, e in await events_of(r, keys.batches)][-1]
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
    shared_redis: Any,
) -> None:
    r = shared_redis
    keys = Keys(f"h{uuid.uuid4().hex[:6]}:")
    batch_id, requests = await batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    await deliver_to(r, keys.requests, LPS_GROUP, "lps-gone")
    await r.xadd(keys.requests, {"type": "ComparisonRequested", "data": "{broken"})
    await deliver_to(r, keys.requests, LPS_GROUP, "lps-gone")
    view = await stuck.collect(r, keys, idle_s=0, batch_idle_s=3600)
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
    quiet = await stuck.collect(r, keys, idle_s=3600, batch_idle_s=3600)
    assert quiet["stuck"] == [] and quiet["groups"][0]["pending"] == len(requests) + 1
