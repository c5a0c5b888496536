"""The wire format: `{type, data}` with JSON data, or flat fields for the per-comparison events,
both read; a reason for anything else (dead letters on every engine:
tests/contract/test_dead_letters.py)."""

from __future__ import annotations

import json

import msgspec
import pytest

from app.views import results_view
from events import codec
from events.clock import entry_iso
from events.types import (
    EVENT_TYPES,
    BatchFailed,
    BatchFinalized,
    BatchRegistered,
    BatchScored,
    BundleDispatched,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    EntryStamped,
    ErrorDetail,
    Essay,
    EssayScore,
    Event,
    ProviderAttemptFailed,
    RequestExpired,
    TokenUsage,
    WaveSubmitted,
)
from projections.batch import apply_batch_event, register
from streams.reader import Fields
from tests.helpers import completed, failed, registration, wave


def test_entry_has_exactly_type_and_json_data_with_ids_and_time() -> None:
    event = BatchFinalized(batch_id="b", reason="budget")
    fields = codec.encode(event)
    assert set(fields) == {"type", "data"}
    assert fields["type"] == b"BatchFinalized"
    data = json.loads(fields["data"])
    assert {"event_id", "occurred_at", "batch_id"} <= set(data)
    assert data["occurred_at"].endswith("Z") and len(data["occurred_at"]) == 27
    assert codec.decode(fields) == event
    assert codec.decode({k: v.decode() for k, v in fields.items()}) == event


def test_a_per_comparison_event_is_identified_and_dated_by_its_entry_id() -> None:
    """Requests and callbacks leave `event_id` and `occurred_at` out (the producer's are
    dropped): read back with the entry id, they are that id and its time, at every reading."""
    stamp = {"event_id": "e1", "occurred_at": "2023-11-14T22:13:21.000000Z"}
    for built in (completed("b", "c1"), failed("b", "c1", "timeout"), _one_of_each()[5]):
        event = msgspec.structs.replace(built, **stamp)  # a producer's own: dropped on the wire
        fields = codec.encode(event)
        data = _json(fields)
        assert not {"event_id", "occurred_at"} & set(data)
        assert {"batch_id", "correlation_id"} <= set(data)
        back = codec.decode(fields, "1700000000000-7")
        assert back.event_id == "1700000000000-7"
        assert back.occurred_at == "2023-11-14T22:13:20.000000Z"
        expected = msgspec.structs.replace(
            event, event_id="1700000000000-7", occurred_at=back.occurred_at
        )
        assert back == expected == codec.decode(fields, "1700000000000-7")
        assert codec.decode(fields).event_id == ""  # no entry id: nothing to invent


def test_per_comparison_entries_written_with_ids_and_times_keep_them() -> None:
    """Entries written before #13's last step carry `event_id` and `occurred_at`: kept."""
    stored: Fields = {
        b"type": b"ComparisonRequested",
        b"data": b'{"event_id":"dcfa7214180e496ba21ead093b550922","occurred_at":'
        b'"2026-12-02T06:21:31.127801Z","batch_id":"3e2782a60c1b48ca9170209287e4ac82",'
        b'"correlation_id":"f04a483610f84c669268d2fb3689504d","wave":1,"essay_a":'
        b'{"essay_id":"S047"},"essay_b":{"essay_id":"S038"},"seed":1,'
        b'"content_key":"4d03179e087e59b6"}',
    }
    request = codec.decode(stored, "1764656491127-0")
    assert isinstance(request, ComparisonRequested)
    assert request.event_id == "dcfa7214180e496ba21ead093b550922"
    assert request.occurred_at == "2026-12-02T06:21:31.127801Z"
    assert (request.essay_a.essay_id, request.seed) == ("S047", 1)
    stored = {
        b"type": b"ComparisonCompleted",
        b"data": b'{"event_id":"935f81a3c57b4eaabf9f34829e92f31d","occurred_at":'
        b'"2026-12-02T06:21:31.205492Z","batch_id":"3e2782a60c1b48ca9170209287e4ac82",'
        b'"correlation_id":"f04a483610f84c669268d2fb3689504d","essay_a_id":"S047",'
        b'"essay_b_id":"S038","winner":"essay_a","confidence":2.0,"justification":'
        b'"mock judgement from latent qualities","provider":"mock","model":"mock-judge-1",'
        b'"usage":{"input_tokens":900,"output_tokens":60}}',
    }
    callback = codec.decode(stored, "1764656491205-3")
    assert callback.event_id == "935f81a3c57b4eaabf9f34829e92f31d"
    assert callback.occurred_at == "2026-12-02T06:21:31.205492Z"
    stored = {
        b"type": b"ComparisonFailed",
        b"data": b'{"event_id":"5a0c3e1f2b9d4c7e8f6a1b2c3d4e5f60","occurred_at":'
        b'"2026-12-02T06:21:32.000000Z","batch_id":"3e2782a60c1b48ca9170209287e4ac82",'
        b'"correlation_id":"891b4c6e24804aa19112478955e5b45c","essay_a_id":"S037",'
        b'"essay_b_id":"S047","error":{"error_type":"timeout","retryable":true,"message":"t"},'
        b'"attempts":3}',
    }
    failure = codec.decode(stored, "1764656492000-0")
    assert failure.event_id == "5a0c3e1f2b9d4c7e8f6a1b2c3d4e5f60"
    assert failure.occurred_at == "2026-12-02T06:21:32.000000Z"
    assert getattr(failure, "attempts", None) == 3


def _json(fields: dict[str, bytes]) -> dict[str, object]:
    """The event's JSON object, in either form of entry."""
    found = codec.entry_data(fields)
    assert found is not None
    out = json.loads(found[1])
    assert isinstance(out, dict)
    return out


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
        if type(event) in codec.FLAT_TYPES:  # the type names the first field, the version
            assert next(iter(fields.items())) == (type(event).__name__, codec.FLAT_VERSION)
        else:
            assert fields["type"] == type(event).__name__.encode()
        if isinstance(event, EntryStamped):  # dated and identified by the entry id
            event = msgspec.structs.replace(event, event_id="", occurred_at="")
            assert codec.decode(fields) == event
            continue
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


def test_fields_equal_to_their_defaults_are_not_written_and_decode_back() -> None:
    """msgspec tells a default by identity; the codec by value: a 0.0 computed at run time and
    a model name read from a config (equal to the defaults, other objects) are left out."""
    model = "-".join(["mock", "judge", "1"])
    event = msgspec.structs.replace(
        completed("b", "c1"), latency_ms=float("0"), cost_usd=0.5 - 0.5, model=model
    )
    assert b'"latency_ms":0.0' in msgspec.json.encode(event)  # what msgspec alone writes
    fields = codec.encode(event)
    data = _json(fields)
    assert not {"latency_ms", "cost_usd", "provider", "attempts"} & set(data)
    assert data["model"] == "mock-judge-1"  # the callback's model has no default
    assert codec.decode(fields) == event
    request = ComparisonRequested(
        batch_id="b",
        correlation_id="c1",
        wave=1,
        essay_a=Essay("a"),
        essay_b=Essay("b"),
        model=model,
        overrides={},
    )
    data = _json(codec.encode(request))
    assert not {"model", "mode", "provider", "overrides", "seed"} & set(data)
    assert data["essay_a"] == {"essay_id": "a"}
    assert codec.decode(codec.encode(request)) == request


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


def test_entries_written_before_issue_9_still_decode_and_fold() -> None:
    """Old BatchScored (MAP-based ssr, no reliabilities or bands), a `stable` finalize,
    a config without the stopping rule and a request without content key or occurrence:
    all decode, with the new fields at their defaults, and fold into a batch state."""
    old_config = {"mode": "per_request", "total_budget": 10, "wave_size": 4, "seed": 3}
    registered = codec.decode(
        {
            "type": "BatchRegistered",
            "data": json.dumps(
                {
                    "batch_id": "old",
                    "essays": [{"essay_id": "a", "text": "x"}, {"essay_id": "b", "text": "y"}],
                    "config": {**old_config, "stability_threshold": 0.05},
                    "denominator": 1,
                }
            ),
        }
    )
    scored = codec.decode(
        {
            "type": "BatchScored",
            "data": json.dumps(
                {
                    "batch_id": "old",
                    "wave": 1,
                    "scores": [{"essay_id": "a", "theta": 0.5, "se": 1.0, "grade": "C"}],
                    "ssr": -224.0,
                    "split_half": None,
                }
            ),
        }
    )
    finalized = codec.decode(
        {"type": "BatchFinalized", "data": json.dumps({"batch_id": "old", "reason": "stable"})}
    )
    request = codec.decode(
        {
            "type": "ComparisonRequested",
            "data": json.dumps(
                {
                    "batch_id": "old",
                    "correlation_id": "c1",
                    "wave": 1,
                    "essay_a": {"essay_id": "a", "text": "x"},
                    "essay_b": {"essay_id": "b", "text": "y"},
                }
            ),
        }
    )
    assert isinstance(registered, BatchRegistered) and isinstance(scored, BatchScored)
    assert isinstance(finalized, BatchFinalized) and isinstance(request, ComparisonRequested)
    assert registered.config.target_reliability == 0.8  # the new rule's default
    assert scored.reliability is None and scored.scores[0].grade_band == []
    assert scored.graded  # scores were graded at every wave then (issue 13: only the last)
    assert scored.scores[0].grade_confidence is None and scored.rank_stability is None
    assert finalized.reason == "stable"
    assert (request.content_key, request.occurrence) == ("", 0)
    state = register(registered)
    for event in (scored, finalized):
        state = apply_batch_event(state, event)
    assert state.finalize_reason == "stable" and state.scores == scored
    view = results_view(state)
    assert view["reliability"] is None and view["ssr"] == -224.0
    assert "before reliabilities" in view["reliabilities"]["posterior"]["n_a"]


def test_wave_pairs_and_bare_scores_are_written_as_rows_and_read_back_as_before() -> None:
    pairs = wave("b", 2, [("c1", "S1", "S2"), ("c2", "S2", "S3")])
    data = json.loads(codec.encode(pairs)["data"])
    assert "pairs" not in data and data["pair_rows"] == [["c1", "S1", "S2"], ["c2", "S2", "S3"]]
    assert codec.decode(codec.encode(pairs)) == pairs and not pairs.pair_rows
    bare = BatchScored(
        batch_id="b",
        wave=2,
        scores=[EssayScore(essay_id="S1", theta=0.25, se=0.5), EssayScore("S2", -1.0, 0.75)],
        graded=False,
    )
    data = json.loads(codec.encode(bare)["data"])
    assert "scores" not in data and data["score_rows"] == [["S1", 0.25, 0.5], ["S2", -1.0, 0.75]]
    assert codec.decode(codec.encode(bare)) == bare
    graded = msgspec.structs.replace(bare, scores=[EssayScore("S1", 0.25, 0.5, rank=1)])
    data = json.loads(codec.encode(graded)["data"])  # a graded score keeps its names
    assert data["scores"] == [{"essay_id": "S1", "theta": 0.25, "se": 0.5, "rank": 1}]
    assert codec.decode(codec.encode(graded)) == graded


def test_waves_and_scores_written_with_names_still_decode() -> None:
    """Stored entries of before the rows (session 4): objects per pair and per score."""
    stored: Fields = {
        b"type": b"WaveSubmitted",
        b"data": b'{"event_id":"67d9b37a80584af0b3eeea16e831f820","occurred_at":'
        b'"2026-12-02T06:21:31.127801Z","batch_id":"3e2782a60c1b48ca9170209287e4ac82","wave":1,'
        b'"pairs":[{"correlation_id":"f04a483610f84c669268d2fb3689504d","essay_a":"S047",'
        b'"essay_b":"S038"}]}',
    }
    old = codec.decode(stored, "1764656491127-0")
    assert isinstance(old, WaveSubmitted) and not old.pair_rows
    assert [(p.correlation_id, p.essay_a, p.essay_b) for p in old.pairs] == [
        ("f04a483610f84c669268d2fb3689504d", "S047", "S038")
    ]
    stored = {
        b"type": b"BatchScored",
        b"data": b'{"event_id":"8edd2c5a58ee47949c15f85304e7ca2b","occurred_at":'
        b'"2026-12-02T06:21:31.334292Z","batch_id":"3e2782a60c1b48ca9170209287e4ac82","wave":1,'
        b'"scores":[{"essay_id":"S046","theta":1.042017,"se":0.703209}],"comparisons":100,'
        b'"graded":false}',
    }
    scored = codec.decode(stored, "1764656491334-0")
    assert isinstance(scored, BatchScored) and not scored.score_rows
    assert scored.scores == [EssayScore("S046", 1.042017, 0.703209)]
    assert not scored.graded and scored.comparisons == 100


# --- flat entries (requests and callbacks: one stream field per event field) ------------------

# As session 4 wrote them: `{type, data}`, no event_id / occurred_at (the entry id gives both).
SESSION_4 = {
    b"ComparisonRequested": b'{"batch_id":"nwqs2isorbcjez5e","correlation_id":"mjp357rwv4crzut3",'
    b'"wave":1,"essay_a":{"essay_id":"S047"},"essay_b":{"essay_id":"S038"},"seed":1,'
    b'"content_key":"4d03179e087e59b6"}',
    b"ComparisonCompleted": b'{"batch_id":"nwqs2isorbcjez5e","correlation_id":"mjp357rwv4crzut3",'
    b'"essay_a_id":"S047","essay_b_id":"S038","winner":"essay_a","confidence":2.0,'
    b'"justification":"mock judgement from latent qualities","provider":"mock",'
    b'"model":"mock-judge-1","usage":{"input_tokens":900,"output_tokens":60}}',
    b"ComparisonFailed": b'{"batch_id":"nwqs2isorbcjez5e","correlation_id":"x7kq2mzt4wbnaq3e",'
    b'"essay_a_id":"S037","essay_b_id":"S047","error":{"error_type":"timeout","retryable":true,'
    b'"message":"t"},"attempts":3}',
}


# As session 5 wrote the same events flat, `type` first (what Redis gives back: bytes).
SESSION_5 = {
    b"ComparisonRequested": {
        b"type": b"ComparisonRequested",
        b"batch_id": b"nwqs2isorbcjez5e",
        b"correlation_id": b"mjp357rwv4crzut3",
        b"wave": b"1",
        b"essay_a.essay_id": b"S047",
        b"essay_b.essay_id": b"S038",
        b"seed": b"1",
        b"content_key": b"4d03179e087e59b6",
    },
    b"ComparisonCompleted": {
        b"type": b"ComparisonCompleted",
        b"batch_id": b"nwqs2isorbcjez5e",
        b"correlation_id": b"mjp357rwv4crzut3",
        b"essay_a_id": b"S047",
        b"essay_b_id": b"S038",
        b"winner": b"essay_a",
        b"confidence": b"2",
        b"justification": b"mock judgement from latent qualities",
        b"provider": b"mock",
        b"model": b"mock-judge-1",
        b"usage.input_tokens": b"900",
        b"usage.output_tokens": b"60",
    },
    b"ComparisonFailed": {
        b"type": b"ComparisonFailed",
        b"batch_id": b"nwqs2isorbcjez5e",
        b"correlation_id": b"x7kq2mzt4wbnaq3e",
        b"essay_a_id": b"S037",
        b"essay_b_id": b"S047",
        b"error.error_type": b"timeout",
        b"error.retryable": b"true",
        b"error.message": b"t",
        b"attempts": b"3",
    },
}


def test_requests_and_callbacks_are_written_flat_and_the_rest_as_json_data() -> None:
    assert {ComparisonRequested, ComparisonCompleted, ComparisonFailed} == codec.FLAT_TYPES
    for event in _one_of_each():
        fields = codec.encode(event)
        if type(event) in codec.FLAT_TYPES:
            assert "data" not in fields and "type" not in fields
            assert next(iter(fields.items())) == (type(event).__name__, b"1")
            assert not {"event_id", "occurred_at", "schema_version"} & set(fields)
        else:
            assert set(fields) == {"type", "data"}
    callback = msgspec.structs.replace(completed("b", "c1"), confidence=2.0, latency_ms=0.25)
    fields = codec.encode(callback)
    # Strings raw, numbers as decimal text (an integral float as an integer), nested as JSON.
    assert fields["batch_id"] == b"b" and fields["winner"] == b"essay_a"
    assert (fields["confidence"], fields["latency_ms"]) == (b"2", b"0.25")
    assert codec.decode(fields) == callback
    request = _one_of_each()[5]
    assert isinstance(request, ComparisonRequested)
    flat = codec.encode(request)
    assert flat["wave"] == b"1" and flat["overrides"] == b'{"k":"v"}'  # a dict: JSON
    # A struct: a field per field of it that is not at its default (a string raw, ...).
    essay = request.essay_a
    assert flat["essay_a.essay_id"] == essay.essay_id.encode()
    assert flat["essay_a.text"] == essay.text.encode()
    assert flat["essay_a.anchor_grade"] == msgspec.json.encode(essay.anchor_grade)  # str | None
    assert "essay_a" not in flat and "essay_a.sha256" not in flat
    used = msgspec.structs.replace(completed("b", "c1"), usage=TokenUsage(input_tokens=900))
    assert codec.encode(used)["usage.input_tokens"] == b"900"  # Redis keeps it as an integer


def test_a_flat_entry_keeps_its_field_order_and_leaves_defaults_out() -> None:
    """Entries of a stream node that have the same names in the same order share them (the
    node's master entry): the order is the type's, whatever the values."""
    one = codec.encode(completed("b", "c1"))
    two = codec.encode(completed("other", "c2", "essay_b", cost_usd=0.0))
    assert list(one) == list(two)
    assert (
        list(one)
        == [
            "ComparisonCompleted",
            "batch_id",
            "correlation_id",
            "essay_a_id",
            "essay_b_id",
            "winner",
            "confidence",
            "justification",
            "provider",
            "model",
            "usage",
        ][: len(one)]
    )


@pytest.mark.parametrize(
    "text",
    ['quote " and \\ backslash', "new\nline\ttab\x01", "é ü 漢字 🙂", "%s %b %%", "{}", "", " "],
)
def test_any_string_round_trips_flat(text: str) -> None:
    event = ComparisonCompleted(
        batch_id="b",
        correlation_id="c1",
        essay_a_id=text or "a",
        essay_b_id="e1",
        winner="essay_b",
        confidence=0.75,
        justification=text,
        provider=text,
        latency_ms=12.5,
        usage=TokenUsage(input_tokens=3),
        prompt_sha256=text,
        cost_usd=1e-06,
    )
    fields = codec.encode(event)
    assert codec.decode(fields) == event
    assert codec.decode(
        {k.encode(): v for k, v in fields.items()}, "1-0"
    ) == msgspec.structs.replace(event, event_id="1-0", occurred_at="1970-01-01T00:00:00.001000Z")
    assert codec.decode({k: v.decode() for k, v in fields.items()}) == event  # str names
    # The event's JSON made from the fields is what `data` holds: what the archive writes.
    found = codec.entry_data(fields)
    assert found is not None and msgspec.json.decode(found[1], type=ComparisonCompleted) == event


def test_session_4_entries_with_json_data_decode_as_their_flat_equals() -> None:
    """Entries written as `{type, data}` before requests and callbacks went flat keep decoding,
    to the same events as the same events written now."""
    for type_name, data in SESSION_4.items():
        old = codec.decode({b"type": type_name, b"data": data}, "1764656491127-3")
        flat = codec.encode(old)
        assert "data" not in flat and type(old) in codec.FLAT_TYPES
        stored = {k.encode(): v for k, v in flat.items()}
        assert codec.decode(stored, "1764656491127-3") == old
        assert old.event_id == "1764656491127-3"
        assert old.occurred_at == "2025-12-02T06:21:31.127000Z"
    failure = codec.decode({b"type": b"ComparisonFailed", b"data": SESSION_4[b"ComparisonFailed"]})
    assert isinstance(failure, ComparisonFailed) and failure.attempts == 3


def test_session_5_flat_entries_decode_as_the_same_events_written_now() -> None:
    """Entries written flat with `type` first (session 5) keep decoding, to the events of their
    session 4 form, whose new form makes the same JSON (what an archive holds) byte for byte;
    their fields in another order too."""
    for type_name, stored in SESSION_5.items():
        old = codec.decode(stored, "1764656491127-3")
        assert old == codec.decode(
            {b"type": type_name, b"data": SESSION_4[type_name]}, "1764656491127-3"
        )
        now = {k.encode(): v for k, v in codec.encode(old).items()}
        assert next(iter(now)) == type_name and b"type" not in now
        assert (
            list(now)[1:] == list(stored)[1:]
            and list(now.values())[1:] == list(stored.values())[1:]
        )
        assert codec.entry_data(now) == codec.entry_data(stored)
        # The JSON session 5's reader made of it (its archive lines), with `confidence` 2 the
        # one difference from session 4's `data`.
        made = SESSION_4[type_name].replace(b'"confidence":2.0', b'"confidence":2')
        assert codec.entry_data(now) == (type_name, made)
        assert codec.decode(now, "1764656491127-3") == old
        reordered = dict(reversed(list(stored.items())))  # `type` last
        assert codec.decode(reordered, "1764656491127-3") == old
        as_text = {k.decode(): v.decode() for k, v in stored.items()}  # a tool's str fields
        assert codec.decode(as_text, "1764656491127-3") == old


def test_the_new_flat_form_round_trips_in_any_order_and_as_str() -> None:
    """The type is the first field's name and its value the layout's version, stored by Redis
    as a one-byte integer: read back as b"1"."""
    for event in _one_of_each():
        if type(event) not in codec.FLAT_TYPES:
            continue
        event = msgspec.structs.replace(event, event_id="1-0", occurred_at=entry_iso("1-0"))
        written = codec.encode(event)
        stored = {k.encode(): v for k, v in written.items()}
        assert next(iter(stored.items())) == (type(event).__name__.encode(), b"1")
        assert codec.decode(stored, "1-0") == event
        assert codec.decode({k: v.decode() for k, v in written.items()}, "1-0") == event
        mixed = {k: v.decode() for k, v in stored.items()}  # bytes names, str values
        assert codec.decode(mixed, "1-0") == event
        moved = dict(list(stored.items())[1:] + list(stored.items())[:1])  # the type last
        assert codec.decode(moved, "1-0") == event
        assert codec.entry_data(moved) == codec.entry_data(stored)
        session_5 = {b"type": type(event).__name__.encode(), **dict(list(stored.items())[1:])}
        assert codec.entry_data(session_5) == codec.entry_data(stored)


def test_a_flat_entry_with_fields_in_another_order_or_unknown_ones_decodes() -> None:
    """The format is public: another producer may order fields otherwise, put the type last, add
    a field of a newer version (kept in the event's JSON as a string, ignored by the type) or
    write its own time (read as it is, checked like any `occurred_at`)."""
    event = msgspec.structs.replace(
        completed("b", "c1"), usage=TokenUsage(input_tokens=9, output_tokens=2)
    )
    fields = {k.encode(): v for k, v in codec.encode(event).items()}
    shuffled = dict(reversed(list(fields.items())))
    output_tokens = shuffled.pop(b"usage.output_tokens")  # a struct's fields apart
    shuffled[b"future_field"] = b'x"y'
    shuffled[b"usage.output_tokens"] = output_tokens
    shuffled[b"usage.future_kind"] = b"7"  # a field a newer TokenUsage has
    shuffled[b"occurred_at"] = b"2023-11-14T22:13:21.000000Z"
    back = codec.decode(shuffled, "1700000000000-7")
    assert back == msgspec.structs.replace(
        event, event_id="1700000000000-7", occurred_at="2023-11-14T22:13:21.000000Z"
    )
    found = codec.entry_data(shuffled)
    assert found is not None and json.loads(found[1])["future_field"] == 'x"y'
    assert json.loads(found[1])["usage"] == {
        "input_tokens": 9,
        "output_tokens": 2,
        "future_kind": "7",
    }


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"type": b"ComparisonRequested"}, "missing_field"),
        ({b"type": b"ComparisonCompleted", b"batch_id": b"b"}, "invalid_data"),
        ({b"type": b"BatchFinalized", b"batch_id": b"b", b"reason": b"budget"}, "missing_field"),
        (
            {
                b"type": b"ComparisonRequested",
                b"batch_id": b"b",
                b"correlation_id": b"c",
                b"wave": b"one",
                b"essay_a": b'{"essay_id":"a"}',
                b"essay_b": b'{"essay_id":"b"}',
            },
            "invalid_data",
        ),
        (
            {
                b"type": b"ComparisonRequested",
                b"batch_id": b'\xff\xfe"',
                b"correlation_id": b"c",
                b"wave": b"1",
                b"essay_a": b'{"essay_id":"a"}',
                b"essay_b": b'{"essay_id":"b"}',
            },
            "invalid_data",
        ),
        ({b"ComparisonRequested": b"1"}, "invalid_data"),  # no field at all
        ({b"ComparisonCompleted": b"1", b"batch_id": b"b", b"data": b"{}"}, "missing_field"),
        ({b"BatchFinalized": b"1", b"batch_id": b"b", b"reason": b"budget"}, "missing_field"),
        ({b"batch_id": b"b", b"correlation_id": b"c"}, "missing_field"),
        ({b"ComparisonRetried": b"1", b"batch_id": b"b"}, "unknown_type"),  # a newer type
        ({b"ComparisonCompleted": b"2", b"batch_id": b"b"}, "unknown_type"),  # a newer layout
        ({b"batch_id": b"b", b"ComparisonCompleted": b"x"}, "unknown_type"),
        (
            {
                b"type": b"ComparisonRequested",
                b"batch_id": b"b",
                b"correlation_id": b"c",
                b"wave": b'1,"batch_id":"x"',
                b"essay_a": b'{"essay_id":"a"}',
                b"essay_b": b'{"essay_id":"b"}',
                b"seed": b"[1",
            },
            "invalid_data",
        ),
    ],
)
def test_bad_flat_entries_raise_with_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    """Only the per-comparison types are read flat (a batch event without `data` is not an
    event); a value that is not what its field holds is `invalid_data`; a flat entry of a type
    or a layout version this reader does not know is `unknown_type` (dead-lettered, redriven
    once the readers know it)."""
    with pytest.raises(codec.DecodeError) as err:
        codec.decode(fields)
    assert err.value.reason == reason


def test_unknown_flat_types_and_versions_are_named_in_the_reason() -> None:
    with pytest.raises(codec.DecodeError) as err:
        codec.decode({b"ComparisonRetried": b"1", b"batch_id": b"b"})
    assert err.value.detail == "ComparisonRetried (flat, version 1)"
    with pytest.raises(codec.DecodeError) as err:
        codec.decode({"batch_id": "b", "ComparisonFailed": "7"})
    assert "ComparisonFailed" in err.value.detail and "version '7'" in err.value.detail
    with pytest.raises(codec.DecodeError) as err:
        codec.decode({b"hello": b"1"})
    assert (err.value.reason, err.value.detail) == ("missing_field", "fields present: hello")


def test_the_byte_filter_finds_a_batch_in_either_form() -> None:
    """Replay and the archive skip entries of other batches before decoding
    (`projections.replay.mentions`): a flat entry's `batch_id` is one of its values."""
    from projections.replay import mentions

    def raw(fields: dict[str, bytes]) -> list[bytes]:
        return [x for k, v in fields.items() for x in (k.encode(), v)]

    flat = raw(codec.encode(completed("b-1", "c1")))
    data = raw({"type": b"ComparisonCompleted", "data": codec.encode_json(completed("b-1", "c1"))})
    moved = [b"data", data[3], b"type", data[1]]  # `data` first: another producer's order
    for entry in (flat, data, moved):
        assert mentions(entry, [b"b-1"]) and not mentions(entry, [b"b-2"])
    assert not mentions(flat, [b"b-"])  # a value equals the id, not merely contains it
