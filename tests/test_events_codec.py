"""The wire format: two fields, JSON data, and dead letters for anything else."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cj.consumer import CJConsumer
from events import codec
from events.streams import CJ_GROUP
from events.types import (
    EVENT_TYPES,
    BatchFailed,
    BatchFinalized,
    BatchScored,
    BundleDispatched,
    ComparisonRequested,
    ErrorDetail,
    EssayScore,
    Event,
    ProviderAttemptFailed,
    RequestExpired,
)
from projections import keys as pkeys
from streams.keys import Keys
from tests.helpers import completed, failed, registration, wave


def test_entry_has_exactly_type_and_json_data_with_ids_and_time() -> None:
    event = completed("b", "c1")
    fields = codec.encode(event)
    assert set(fields) == {"type", "data"}
    assert fields["type"] == b"ComparisonCompleted"
    data = json.loads(fields["data"])
    assert {"event_id", "occurred_at", "batch_id", "correlation_id"} <= set(data)
    assert data["occurred_at"].endswith("Z") and len(data["occurred_at"]) == 27
    assert codec.decode(fields) == event
    assert codec.decode({k: v.decode() for k, v in fields.items()}) == event


def _one_of_each() -> list[Event]:
    reg = registration(3, batch_id="b")
    a, b = reg.essays[0], reg.essays[1]
    detail = ErrorDetail(error_type="rate_limit", retryable=True, message="m", status_code=429)
    return [
        reg,
        wave("b", 1, [("c1", a.essay_id, b.essay_id)]),
        BatchScored(
            batch_id="b",
            wave=1,
            scores=[EssayScore(essay_id="e0", theta=0.5, se=0.1, rank=1, grade="F")],
            max_delta=0.2,
            grade_boundaries={"E": 0.1},
            warnings=["w"],
        ),
        BatchFinalized(batch_id="b", reason="stalled", abandoned=["c2"]),
        BatchFailed(batch_id="b", reason="stalled", message="m", abandoned=["c3"]),
        ComparisonRequested(
            batch_id="b", correlation_id="c1", wave=1, essay_a=a, essay_b=b, overrides={"k": "v"}
        ),
        BundleDispatched(
            bundle_id="u",
            mode="serial_bundle",
            provider="mock",
            model="m",
            consumer="lps-1",
            correlation_ids=["c1"],
            batch_ids=["b"],
            size=1,
        ),
        ProviderAttemptFailed(
            batch_id="b", correlation_id="c1", attempt=2, error=detail, will_retry=True
        ),
        RequestExpired(
            batch_id="b",
            correlation_id="c1",
            entry_id="1-0",
            consumer="x",
            deliveries=3,
            idle_s=1.5,
        ),
        completed("b", "c1"),
        failed("b", "c1", "timeout"),
    ]


def test_every_event_type_round_trips() -> None:
    events = _one_of_each()
    assert {type(e).__name__ for e in events} == set(EVENT_TYPES)
    for event in events:
        fields = codec.encode(event)
        assert fields["type"] == type(event).__name__.encode()
        assert codec.decode(fields) == event
        assert codec.decode(fields, "1700000000000-0") == event  # occurred_at present: kept
    assert set(EVENT_TYPES) == {
        "BatchRegistered",
        "WaveSubmitted",
        "BatchScored",
        "BatchFinalized",
        "BatchFailed",
        "ComparisonRequested",
        "BundleDispatched",
        "ProviderAttemptFailed",
        "RequestExpired",
        "ComparisonCompleted",
        "ComparisonFailed",
    }


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"type": b"ComparisonCompleted"}, "missing_field"),
        ({b"type": b"Nope", b"data": b"{}"}, "unknown_type"),
        ({b"type": b"ComparisonCompleted", b"data": b"{not json"}, "invalid_data"),
        ({b"type": b"ComparisonCompleted", b"data": b'{"batch_id": 3}'}, "invalid_data"),
    ],
)
def test_bad_entries_raise_with_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(codec.DecodeError) as err:
        codec.decode(fields)
    assert err.value.reason == reason


async def test_undecodable_callbacks_are_dead_lettered_and_acknowledged(
    fake_redis: Any, keys: Keys
) -> None:
    r = fake_redis
    consumer = CJConsumer(r, keys, "c1", block_ms=10)
    await consumer.start()
    bad_id = (
        await r.xadd(keys.callbacks, {"type": "ComparisonCompleted", "data": "garbage"})
    ).decode()
    await r.xadd(keys.callbacks, {"hello": "world"})
    await r.xadd(keys.callbacks, codec.encode(completed("no-such-batch", "c9")))
    assert await consumer.step() == 3
    dlq = await r.xrange(keys.dlq("cj:callbacks"))
    assert len(dlq) == 2
    first = {k.decode(): v.decode() for k, v in dlq[0][1].items()}
    assert first["reason"] == "invalid_data" and first["source_id"] == bad_id
    assert json.loads(first["fields"]) == {"type": "ComparisonCompleted", "data": "garbage"}
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    # The valid callback for an unknown batch is an orphan, counted globally.
    assert await r.hget(pkeys.stats(keys), "orphans_unknown_batch") == b"1"
