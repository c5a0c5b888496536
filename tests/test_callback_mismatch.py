"""A callback answers the pair its correlation id was asked for, or no request of ours.

The winner ("essay_a" / "essay_b") is read against the pair a wave recorded for the id: a
callback with a known id but other essays (swapped, another pair's, another batch's: an LPS
bug, an injection, a reused id) is an orphan, as one naming an unknown id is, and the request
stays pending. Here the Python fold; callback.lua equal to it on every engine, and replay equal
to live: tests/contract/test_projection.py. The consumer's log says why an orphan was one.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from structlog.testing import capture_logs

from cj.consumer import CJConsumer
from cj.registration import append_registration
from events import codec
from events.streams import CJ_GROUP
from events.types import BatchFinalized
from projections.batch import BatchState, apply_batch_event, apply_callback, register
from projections.rebuild import check
from projections.store import load_state
from streams.keys import Keys
from streams.reader import Entry
from tests.helpers import append_batch_event, completed, failed, naming, registration, wave

B = "b1"
PAIRS = [("c0", "e0", "e1"), ("c1", "e2", "e3")]
OTHER_BATCH_PAIR = ("e3", "e1")  # c0 of another batch (a reused id)


def _state() -> BatchState:
    return apply_batch_event(register(registration(4, batch_id=B)), wave(B, 1, PAIRS))


WRONG = {
    "swapped": ("e1", "e0"),
    "another pair's": ("e2", "e3"),
    "another batch's": OTHER_BATCH_PAIR,
}


@pytest.mark.parametrize("essays", list(WRONG.values()), ids=list(WRONG))
def test_a_known_id_naming_other_essays_is_an_orphan_and_its_request_stays_pending(
    essays: tuple[str, str],
) -> None:
    state = _state()
    for n, callback in enumerate([completed(B, "c0", cost_usd=0.5), failed(B, "c0")], 1):
        state, out = apply_callback(state, naming(callback, *essays), f"{10 + n}-0")
        assert out == "orphan"
        assert state.corr == {"c0": "pending", "c1": "pending"}
        assert (state.orphans, state.orphan_ids, state.callbacks_received) == (n, {"c0": n}, n)
        assert (state.completed, state.failed, state.duplicates, state.late_callbacks) == (0,) * 4
        assert (state.in_flight, state.cost_nusd) == (2, 0)
    state, out = apply_callback(state, completed(B, "c0", "essay_b", cost_usd=0.5), "20-0")
    assert out == "accepted" and state.corr["c0"] == "c 20-0 essay_b"
    assert (state.completed, state.in_flight, state.orphans, state.cost_nusd) == (
        1,
        1,
        2,
        5 * 10**8,
    )


def test_other_essays_for_an_answered_or_abandoned_id_are_orphans_not_duplicates_or_late() -> None:
    state = _state()
    state, _ = apply_callback(state, completed(B, "c0"), "10-0")
    # Earlier in the stream than the accepted answer: a duplicate would replace it.
    state, out = apply_callback(state, naming(completed(B, "c0", "essay_b"), "e1", "e0"), "5-0")
    assert out == "orphan" and state.corr["c0"] == "c 10-0 essay_a" and state.duplicates == 0
    state = apply_batch_event(state, BatchFinalized(batch_id=B, reason="stable", abandoned=["c1"]))
    state, out = apply_callback(state, naming(failed(B, "c1", cost_usd=1.0), "e3", "e2"), "11-0")
    assert out == "orphan" and state.corr["c1"] == "abandoned"
    assert (state.late_callbacks, state.cost_nusd, state.orphans) == (0, 0, 2)
    assert state.orphan_ids == {"c0": 1, "c1": 1}


def test_an_id_whose_pair_is_not_recorded_is_accepted_by_its_id() -> None:
    """A state stored in part (old data): the id alone decides, as before."""
    state = _state()
    del state.pairs["c0"]
    state, out = apply_callback(state, naming(completed(B, "c0"), "e9", "e8"), "10-0")
    assert out == "accepted" and state.orphans == 0


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def redis_and_keys(request: pytest.FixtureRequest) -> tuple[Any, Keys]:
    if request.param == "fakeredis":
        return request.getfixturevalue("fake_redis"), Keys("t:")
    return request.getfixturevalue("shared_redis"), Keys(f"t{uuid.uuid4().hex[:8]}:")


async def test_the_consumer_logs_why_an_orphan_is_one_and_replay_equals_live(
    redis_and_keys: tuple[Any, Keys],
) -> None:
    r, keys = redis_and_keys
    consumer = CJConsumer(r, keys, "cj-a")
    await consumer.start()
    await append_registration(r, keys, registration(4, batch_id=B))
    await append_batch_event(r, keys, wave(B, 1, PAIRS))
    callbacks = [
        naming(completed(B, "c0"), "e1", "e0"),
        completed(B, "never-asked"),
        completed("no-such-batch", "c0"),
        naming(failed(B, "c1"), *OTHER_BATCH_PAIR),
        completed(B, "c0"),
    ]
    for callback in callbacks:
        await r.xadd(keys.callbacks, codec.encode(callback))
    page = await r.xreadgroup(CJ_GROUP, "cj-a", {keys.callbacks: ">"}, count=10)
    entries = [Entry(i.decode(), fields) for i, fields in page[0][1]]
    with capture_logs() as logs:
        await consumer.handle(entries)
    [line] = [e for e in logs if e["event"] == "callback_orphan"]
    assert (line["count"], line["unknown_batch"], line["essay_mismatch"]) == (4, 1, 2)
    reasons = [(x["correlation_id"], x["reason"]) for x in line["examples"]]
    assert reasons == [
        ("c0", "essay_mismatch"),
        ("never-asked", "unknown_correlation_id"),
        ("c0", "unknown_batch"),
        ("c1", "essay_mismatch"),
    ]
    mismatch = line["examples"][0]
    assert (mismatch["essay_a_id"], mismatch["essay_b_id"]) == ("e1", "e0")
    assert "essay number" not in repr(logs)  # ids, never an essay's text
    live = await load_state(r, keys, B)
    assert live is not None and live.corr == {
        "c0": f"c {entries[4].entry_id} essay_a",
        "c1": "pending",
    }
    assert (live.orphans, live.orphan_ids) == (3, {"c0": 1, "never-asked": 1, "c1": 1})
    _, [row] = await check(r, keys, [B])  # replay of the streams == the live projection
    assert row["matches_live"], row
