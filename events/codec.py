"""The stream-entry codec: every entry is exactly `{type, data}` with JSON data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import msgspec
from msgspec.structs import astuple

from events.clock import entry_iso
from events.text import as_str
from events.types import (
    EVENT_TYPES,
    BatchScored,
    EntryStamped,
    EssayScore,
    Event,
    WaveSubmitted,
    with_defaults_omitted,
)

T = TypeVar("T", bound=Event)
E = TypeVar("E", bound=Event)

OCCURRED_AT = b'"occurred_at"'
EVENT_ID = b'"event_id"'

_encoder = msgspec.json.Encoder()
_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


class DecodeError(ValueError):
    """An entry that is not a well-formed event; `reason` is a short stable label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(event: Event) -> dict[str, bytes]:
    return {"type": type(event).__name__.encode(), "data": encode_json(event)}


def encode_json(event: Event) -> bytes:
    if isinstance(event, EntryStamped) and (event.event_id or event.occurred_at):
        # The entry id says both (see EntryStamped); "" is the default, left out.
        event = msgspec.structs.replace(event, event_id="", occurred_at="")
    event = with_defaults_omitted(event)
    if isinstance(event, WaveSubmitted) and event.pairs:
        return _in_rows(event, "pairs", "pair_rows", [list(astuple(p)) for p in event.pairs])
    if isinstance(event, BatchScored) and event.scores and all(map(_bare, event.scores)):
        rows = [[s.essay_id, s.theta, s.se] for s in event.scores]
        return _in_rows(event, "scores", "score_rows", rows)
    return _encoder.encode(event)


def _bare(score: EssayScore) -> bool:
    """A score of θ and SE alone (a wave's before the batch's last)."""
    return score == EssayScore(essay_id=score.essay_id, theta=score.theta, se=score.se)


def _in_rows(event: Event, name: str, rows_name: str, rows: list[list[object]]) -> bytes:
    """`event` with its list `name` written as rows (one array per item, in the field order),
    under `rows_name`: the per-item names made half of a `WaveSubmitted` or `BatchScored`."""
    out = msgspec.to_builtins(event)
    assert isinstance(out, dict)
    del out[name]
    out[rows_name] = rows
    return _encoder.encode(out)


def _field(fields: Mapping[bytes | str, bytes | str], name: str) -> bytes | None:
    value = fields.get(name.encode())
    if value is None:
        value = fields.get(name)
    if value is None:
        return None
    return value.encode() if isinstance(value, str) else value


def decode(fields: Mapping[bytes | str, bytes | str], entry_id: str | None = None) -> Event:
    """Decode one entry's fields; raises DecodeError with a reason label. Given the entry's
    id, an event without `occurred_at` takes the id's time (the server's), not the decoding
    moment, and one without `event_id` the entry id, so that every reading of the entry
    decodes the same event."""
    type_name = _field(fields, "type")
    data = _field(fields, "data")
    if type_name is None or data is None:
        present = ", ".join(sorted(as_str(name) for name in fields)) or "none"
        raise DecodeError("missing_field", f"fields present: {present}")
    decoder = _decoders.get(as_str(type_name))
    if decoder is None:
        raise DecodeError("unknown_type", as_str(type_name)[:100])
    try:
        event: Event = decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError("invalid_data", str(exc)[:300]) from exc
    return with_entry_time(event, data, entry_id)


def with_entry_time(event: E, data: bytes, entry_id: str | None) -> E:
    """`event` (decoded from `data`), its missing `occurred_at` set to the entry id's time and
    its missing `event_id` to the entry id. (An escaped quote inside a string cannot make
    either name appear: the test on the raw bytes is exact.)"""
    if entry_id is None:
        return event
    changes: dict[str, str] = {}
    if OCCURRED_AT not in data:
        changes["occurred_at"] = entry_iso(entry_id)
    if EVENT_ID not in data:
        changes["event_id"] = entry_id
    return msgspec.structs.replace(event, **changes) if changes else event


def decode_as(
    fields: Mapping[bytes | str, bytes | str], cls: type[T], entry_id: str | None = None
) -> T:
    event = decode(fields, entry_id)
    if not isinstance(event, cls):
        raise DecodeError("unexpected_type", f"{type(event).__name__} where {cls.__name__} belongs")
    return event


def to_builtins(event: Event) -> dict[str, object]:
    out = msgspec.to_builtins(event)
    assert isinstance(out, dict)
    return out
