"""The stream-entry codec. An entry is `{type, data}` with the event as JSON in `data`, or, for
the per-comparison events (`EntryStamped`: requests and callbacks), flat: `type`, then each
field of the event that is written its own stream field (strings raw, numbers as decimal text,
everything else as compact JSON). Both forms decode, whatever the type (docs/design.md, "Streams
and the wire format")."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import msgspec
from msgspec import inspect as mi
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


class _Field(NamedTuple):
    name: str
    key: bytes  # `"name":`, how the field opens in the event's JSON
    raw: bool  # a string, written raw (quoted in the JSON)
    default: Any  # msgspec.NODEFAULT when required


def _flat_fields(cls: type[Event]) -> tuple[_Field, ...]:
    """How `cls` is written flat: its fields in declaration order (a stable order, so that the
    entries of a stream node share their field names: see `encode`), without `event_id` and
    `occurred_at`, which the entry id gives (`EntryStamped`)."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    out = []
    for f in info.fields:
        if f.name in ("event_id", "occurred_at"):
            continue
        kind = f.type
        raw = isinstance(kind, mi.StrType) or (
            isinstance(kind, mi.LiteralType) and all(isinstance(v, str) for v in kind.values)
        )
        default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
        out.append(_Field(f.name, _encoder.encode(f.name) + b":", raw, default))
    return tuple(out)


FLAT_TYPES: frozenset[type[Event]] = frozenset(
    cls for cls in EVENT_TYPES.values() if issubclass(cls, EntryStamped)
)
"""The event types written flat: the per-comparison ones, hundreds per batch of one type in a
stream, whose field names a stream node then stores once (its master entry). The per-batch
events (a few per wave, of mixed types, in `cj:batches` and `lps:dispatches`) keep `data`:
flat, each would store its field names itself, for nothing saved."""
_FLAT = {cls: _flat_fields(cls) for cls in FLAT_TYPES}
# Type name -> field name (as bytes) -> its field: how a flat entry is read back.
_FLAT_READ = {
    cls.__name__.encode(): {f.name.encode(): f for f in fields} for cls, fields in _FLAT.items()
}
# Per type, per field: (name, written raw, default, its type), unpacked per event.
_WRITE = {
    cls: tuple((f.name, f.raw, f.default, type(f.default)) for f in fields)
    for cls, fields in _FLAT.items()
}
_INT_FLOATS = float(2**53)
_ESCAPED = bytes(range(32)) + b'"\\'  # what a JSON string cannot hold as it is


def encode(event: Event) -> dict[str, bytes]:
    if type(event) in _FLAT:
        return encode_flat(event)
    return {"type": type(event).__name__.encode(), "data": encode_json(event)}


def encode_flat(event: Event) -> dict[str, bytes]:
    """`event` as flat stream fields (see the module's docstring): a field equal to its default
    is left out, as in JSON. A float with an integral value is written as an integer (Redis
    keeps "2" as a small integer in the listpack, "2.0" as a string; both decode to 2.0)."""
    out = {"type": type(event).__name__.encode()}
    # astuple: one call for every value; the first two are event_id and occurred_at.
    for (name, raw, default, default_type), value in zip(
        _WRITE[type(event)], astuple(event)[2:], strict=True
    ):
        if value == default and type(value) is default_type:
            continue
        if raw:
            out[name] = value.encode()
        elif type(value) is int or (type(value) is float and _integral(value)):
            out[name] = b"%d" % value
        else:
            out[name] = _encoder.encode(value)
    return out


def _integral(value: float) -> bool:
    return value.is_integer() and -_INT_FLOATS < value < _INT_FLOATS


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


class _Template(NamedTuple):
    """How the JSON of a flat entry with given field names is made: `format % values` (all its
    values, `type`'s printed as nothing); `raw_at` are the values written as JSON strings,
    `raws` picks them, to check for what needs escaping."""

    format: bytes
    raw_at: tuple[int, ...]
    raws: Callable[[tuple[bytes, ...]], Any]


_TEMPLATES: dict[tuple[bytes, tuple[bytes, ...]], _Template | None] = {}
_MAX_TEMPLATES = 1024  # names come from producers: a bound on what they can make this hold


def _template(type_name: bytes, names: tuple[bytes, ...]) -> _Template | None:
    known = _FLAT_READ.get(type_name)
    if known is None or b"type" not in names:
        return None
    out = b"{"
    raw_at = []
    comma = b""
    for i, name in enumerate(names):
        if name == b"type":
            out += b"%.0b"
            continue
        f = known.get(name)
        # A field the type does not have (a newer producer's) is kept, as a string.
        key = f.key if f is not None else _encoder.encode(name.decode(errors="replace")) + b":"
        raw = f.raw if f is not None else True
        out += comma + key.replace(b"%", b"%%") + (b'"%b"' if raw else b"%b")
        comma = b","
        if raw:
            raw_at.append(i)
    raws: Callable[[tuple[bytes, ...]], Any] = (
        operator.itemgetter(*raw_at) if len(raw_at) > 1 else lambda v: [v[i] for i in raw_at]
    )
    return _Template(out + b"}", tuple(raw_at), raws)


def flat_json(type_name: bytes, fields: Mapping[bytes, bytes]) -> bytes | None:
    """The JSON object of a flat entry (its fields but `type`), as `data` would hold it; None
    if `type_name` is not written flat. Entries of a stream mostly have the same names in the
    same order: their template is made once (this runs for every entry every reader reads)."""
    names = tuple(fields)
    template = _TEMPLATES.get((type_name, names))
    if template is None:
        template = _template(type_name, names)
        if template is None:
            return None
        if len(_TEMPLATES) < _MAX_TEMPLATES:
            _TEMPLATES[(type_name, names)] = template
    values = tuple(fields.values())
    raw = b"".join(template.raws(values))
    if len(raw.translate(None, _ESCAPED)) != len(raw):
        quoted = list(values)
        for i in template.raw_at:
            quoted[i] = _quoted(values[i])
        values = tuple(quoted)
    return template.format % values


def _quoted(value: bytes) -> bytes:
    """The inside of the JSON string of `value` (UTF-8)."""
    return _encoder.encode(value.decode())[1:-1]  # UnicodeDecodeError: invalid_data


def entry_data(fields: Mapping[bytes | str, bytes | str]) -> tuple[bytes, bytes] | None:
    """An entry's type name and its event's JSON, in either form; None without a type, or
    without `data` for a type that is not written flat (or `type` alone)."""
    raw: Mapping[Any, Any] = fields
    type_name = raw.get(b"type")
    if type(type_name) is not bytes:  # str names or values (tests, tools; Redis gives bytes)
        raw = _as_bytes(fields)
        type_name = raw.get(b"type")
        if type_name is None:
            return None
    data = raw.get(b"data")
    if data is None:
        if len(raw) == 1:
            return None
        try:
            data = flat_json(type_name, raw)
        except TypeError:  # a str value among bytes
            data = flat_json(type_name, _as_bytes(fields))
        if data is None:
            return None
    elif type(data) is not bytes:
        data = data.encode()
    return type_name, data


def _as_bytes(fields: Mapping[bytes | str, bytes | str]) -> dict[bytes, bytes]:
    return {
        (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
        for k, v in fields.items()
    }


def decode(fields: Mapping[bytes | str, bytes | str], entry_id: str | None = None) -> Event:
    """Decode one entry's fields, either form; raises DecodeError with a reason label. Given
    the entry's id, an event without `occurred_at` takes the id's time (the server's), not
    the decoding moment, and one without `event_id` the entry id, so that every reading of
    the entry decodes the same event."""
    try:
        found = entry_data(fields)
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid_data", str(exc)[:300]) from exc
    if found is None:
        present = ", ".join(sorted(as_str(name) for name in fields)) or "none"
        raise DecodeError("missing_field", f"fields present: {present}")
    type_name, data = found
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
