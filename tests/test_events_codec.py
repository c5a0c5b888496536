"""The wire format: two fields, JSON data, a reason for anything else (dead letters on every
engine: tests/contract/test_dead_letters.py)."""

from __future__ import annotations

import json

import pytest

from events import codec
from events.types import EVENT_TYPES
from tests.helpers import completed


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


def test_every_event_type_round_trips_by_name() -> None:
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
