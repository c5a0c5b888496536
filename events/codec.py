"""The stream-entry codec. An entry has one of three forms, and every one decodes whatever the
type (docs/design.md, "Streams and the wire format"):

- `{type, data}`: the type's name and the event as JSON. The per-batch events are written so,
  and every entry was before session 5.
- flat, for the per-comparison events (`FLAT_TYPES`: requests and callbacks): first a field
  named after the event's type whose value is the flat layout's version (`FLAT_VERSION`), then
  each field of the event that is written, its own stream field (strings raw, numbers as
  decimal text, everything else as compact JSON): `ComparisonRequested 1 batch_id b1 ...`.
- flat as session 5 wrote it: `type` and the type's name first, then the fields as above
  (`type ComparisonRequested batch_id b1 ...`). Read, no longer written: its type name took
  19 B of every entry, the version takes 1."""

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

# An entry's fields as Redis returns them (bytes keys) or as `encode` makes them (str keys):
# keys typed Any because Mapping is invariant in its keys, so a union of the two would
# accept neither dict as written.
EntryFields = Mapping[Any, bytes | str]

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
    name: str  # the stream field's: `usage.input_tokens` for a field of a nested struct
    key: bytes  # `"input_tokens":`, how the field opens in its object's JSON
    raw: bool  # a string, written raw (quoted in the JSON)
    default: Any  # msgspec.NODEFAULT when required
    parent: bytes  # b"usage" for `usage.input_tokens`; b"" at the top
    nested: tuple[_Field, ...] | None  # a struct's fields, when it is written field by field
    struct: type | None  # that struct's type


def _flat_fields(cls: type[msgspec.Struct], prefix: str = "") -> tuple[_Field, ...]:
    """How `cls` is written flat: its fields in declaration order (a stable order, so that the
    entries of a stream node share their field names: see `encode`), without `event_id` and
    `occurred_at`, which the entry id gives (`EntryStamped`). A field that is a struct (an
    essay, `usage`, `error`) is written as one field per its own, named `parent.child`, at the
    top level only: `{"essay_id":"S047"}` takes 21 B of a listpack, `essay_a.essay_id` `S047` 6."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    out = []
    for f in info.fields:
        if f.name in ("event_id", "occurred_at") and not prefix:
            continue
        kind = f.type
        raw = isinstance(kind, mi.StrType) or (
            isinstance(kind, mi.LiteralType) and all(isinstance(v, str) for v in kind.values)
        )
        default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
        nested = None
        struct = None
        if isinstance(kind, mi.StructType) and not prefix:
            struct = kind.cls
            nested = _flat_fields(kind.cls, f"{f.name}.")
        key = _encoder.encode(f.name) + b":"
        out.append(_Field(prefix + f.name, key, raw, default, prefix[:-1].encode(), nested, struct))
    return tuple(out)


FLAT_TYPES: frozenset[type[Event]] = frozenset(
    cls for cls in EVENT_TYPES.values() if issubclass(cls, EntryStamped)
)
"""The event types written flat: the per-comparison ones, hundreds per batch of one type in a
stream, whose field names a stream node then stores once (its master entry). The per-batch
events (a few per wave, of mixed types, in `cj:batches` and `lps:dispatches`) keep `data`:
flat, each would store its field names itself, for nothing saved."""
FLAT_VERSION = b"1"
"""The value of a flat entry's first field, whose name is the event's type: the version of the
flat layout. Redis keeps it as a one-byte listpack integer where a `type` field stored the
type's name (19 B) in every entry. A reader takes the versions it knows (this one) and
dead-letters the others (`unknown_type`), so a later layout is never misread."""
_FLAT = {cls: _flat_fields(cls) for cls in FLAT_TYPES}
# Type name -> stream field name (as bytes) -> its field: how a flat entry is read back.
_FLAT_READ = {
    cls.__name__.encode(): {
        f.name.encode(): f for top in fields for f in (top, *(top.nested or ()))
    }
    for cls, fields in _FLAT.items()
}
_INT_FLOATS = float(2**53)
_ESCAPED = bytes(range(32)) + b'"\\'  # what a JSON string cannot hold as it is


def _flat_writer(
    cls: type[Event], fields: tuple[_Field, ...]
) -> Callable[[Event], dict[str, bytes]]:
    """The function writing a `cls` flat, made from its fields: one statement per field, no
    loop over field descriptions (every request and callback goes through it)."""
    space: dict[str, Any] = {"astuple": astuple, "_value": _value, "_nested": _write_nested}
    lines = ["def write(event):", f"    out = {{{cls.__name__!r}: {FLAT_VERSION!r}}}"]
    lines.append("    values = astuple(event)")
    for place, f in enumerate(fields, start=2):  # event_id and occurred_at come first
        lines.append(f"    v = values[{place}]")
        indent = "    "
        if f.default is not msgspec.NODEFAULT:
            space[f"D{place}"], space[f"T{place}"] = f.default, type(f.default)
            lines.append(f"    if not (v == D{place} and type(v) is T{place}):")
            indent = "        "
        if f.raw:
            lines.append(f"{indent}out[{f.name!r}] = v.encode()")
        elif f.nested is not None:
            space[f"N{place}"] = {g.key[1:-2].decode(): (g.name, g.raw) for g in f.nested}
            lines.append(f"{indent}_nested(out, {f.name!r}, v, N{place})")
        else:
            lines.append(f"{indent}out[{f.name!r}] = _value(v)")
    lines.append("    return out")
    exec("\n".join(lines), space)  # the names and literals are the type's, never input
    writer: Callable[[Event], dict[str, bytes]] = space["write"]
    return writer


def encode(event: Event) -> dict[str, bytes]:
    """`event`'s stream fields: flat for `FLAT_TYPES` (see the module's docstring; a field
    equal to its default is left out, as in JSON, and a float with an integral value is
    written as an integer: Redis keeps "2" as a small integer in the listpack, "2.0" as a
    string; both decode to 2.0), `{type, data}` for the others."""
    writer = _WRITERS.get(type(event))
    if writer is not None:
        return writer(event)
    return {"type": type(event).__name__.encode(), "data": encode_json(event)}


def _write_nested(
    out: dict[str, bytes], name: str, value: Any, fields: dict[str, tuple[str, bool]]
) -> None:
    """A struct field, a stream field per field of it that msgspec writes (its defaults left
    out); a struct of defaults alone is named whole, so that it is there."""
    written = to_builtins(value)
    if not written:
        out[name] = _encoder.encode(value)
    for child, child_value in written.items():
        child_name, child_raw = fields[child]
        out[child_name] = child_value.encode() if child_raw else _value(child_value)  # type: ignore[attr-defined]


def _value(value: Any) -> bytes:
    if type(value) is int or (type(value) is float and _integral(value)):
        return b"%d" % value
    return _encoder.encode(value)


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


class _Template(NamedTuple):
    """How the JSON of a flat entry with given field names is made: `format % order(values)`
    (`values` all of the entry's, `order` drops `type`'s and puts a nested struct's fields
    together); `raw_at` are the places (after `order`) of the values written as JSON strings,
    `raws` picks them, to check for what needs escaping."""

    format: bytes
    order: Callable[[tuple[bytes, ...]], Any]
    raw_at: tuple[int, ...]
    raws: Callable[[tuple[bytes, ...]], Any]


_TEMPLATES: dict[tuple[bytes, tuple[bytes, ...]], _Template | None] = {}
_MAX_TEMPLATES = 1024  # names come from producers: a bound on what they can make this hold


def _picker(places: list[int]) -> Callable[[tuple[bytes, ...]], Any]:
    """A function of a tuple giving the items at `places`, as a tuple or list."""
    if len(places) > 1:
        return operator.itemgetter(*places)
    return lambda values: [values[i] for i in places]


def _template(type_name: bytes, names: tuple[bytes, ...]) -> _Template | None:
    """The template of a flat entry of type `type_name` with the field names `names`, either
    flat form (the type in a `type` field or as a field's name); None if the type is not
    written flat, the names hold neither, or a `data` (no flat entry has one: the byte filter
    of replay and the archive, `projections.replay.mentions`, would read it as the JSON)."""
    known = _FLAT_READ.get(type_name)
    if known is None or (b"type" not in names and type_name not in names) or b"data" in names:
        return None
    # Top-level members in order of first appearance: (key, raw, place) for a value, or
    # (key, [(key, raw, place), ...]) for a struct written field by field.
    members: list[tuple[bytes, Any, Any]] = []
    groups: dict[bytes, list[tuple[bytes, bool, int]]] = {}
    for place, name in enumerate(names):
        if name == b"type" or name == type_name:  # what says the type, not a field of it
            continue
        f = known.get(name)
        parent = f.parent if f is not None else b""
        if f is None and b"." in name:
            head, _, tail = name.partition(b".")
            top = known.get(head)
            if top is not None and top.nested is not None:  # a newer field of a known struct
                parent, f = head, None
                name = tail
        if parent:
            if parent not in groups:
                groups[parent] = []
                members.append((known[parent].key, groups[parent], None))
            key = f.key if f is not None else _json_key(name)
            groups[parent].append((key, f.raw if f is not None else True, place))
            continue
        # A field the type does not have (a newer producer's) is kept, as a string.
        key = f.key if f is not None else _json_key(name)
        members.append((key, f.raw if f is not None else True, place))
    fmt = b"{"
    order: list[int] = []
    raw_at: list[int] = []
    for i, (key, what, place) in enumerate(members):
        fmt += (b"," if i else b"") + key.replace(b"%", b"%%")
        if place is not None:
            fmt += b'"%b"' if what else b"%b"
            raw_at += [len(order)] if what else []
            order.append(place)
            continue
        fmt += b"{"
        for j, (child_key, raw, child_place) in enumerate(what):
            fmt += (b"," if j else b"") + child_key.replace(b"%", b"%%")
            fmt += b'"%b"' if raw else b"%b"
            raw_at += [len(order)] if raw else []
            order.append(child_place)
        fmt += b"}"
    return _Template(fmt + b"}", _picker(order), tuple(raw_at), _picker(raw_at))


def _json_key(name: bytes) -> bytes:
    return _encoder.encode(name.decode(errors="replace")) + b":"


def flat_json(type_name: bytes, fields: Mapping[bytes, bytes]) -> bytes | None:
    """The JSON object of a flat entry (its fields but the one naming its type), as `data`
    would hold it; None if `type_name` is not written flat (see `_template`). Entries of a
    stream mostly have the same names in the same order: their template is made once (this
    runs for every entry every reader reads)."""
    names = tuple(fields)
    template = _TEMPLATES.get((type_name, names))
    if template is None:
        template = _template(type_name, names)
        if template is None:
            return None
        if len(_TEMPLATES) < _MAX_TEMPLATES:
            _TEMPLATES[(type_name, names)] = template
    values = tuple(template.order(tuple(fields.values())))
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


def entry_data(fields: EntryFields) -> tuple[bytes, bytes] | None:
    """An entry's type name and its event's JSON, in any of the three forms (the module's
    docstring); None when it is none of them (see `undecodable` for why)."""
    raw: Mapping[Any, Any] = fields
    for first in raw:  # the first name (a loop's first step costs less than next(iter(...)))
        if first in _FLAT_READ and raw[first] == FLAT_VERSION:  # flat, as written now
            try:  # (`_flat`, inline: every request and callback read comes this way)
                data = flat_json(first, raw)
            except TypeError:  # a str value among bytes
                data = flat_json(first, _as_bytes(fields))
            return None if data is None else (first, data)
        break
    else:
        return None
    type_name = raw.get(b"type")
    if type(type_name) is not bytes:  # no `type`, or str names or values (tests, tools)
        raw = _as_bytes(fields)
        first = next(iter(raw))
        if first in _FLAT_READ and raw[first] == FLAT_VERSION:
            return _flat(first, raw, fields)
        type_name = raw.get(b"type")
        if type_name is None:  # flat, its type named elsewhere than first, or nothing
            return _named_elsewhere(raw, fields)
    data = raw.get(b"data")
    if data is None:  # the flat form of session 5: `type` first
        return None if len(raw) == 1 else _flat(type_name, raw, fields)
    if type(data) is not bytes:
        data = data.encode()
    return type_name, data


def _flat(
    type_name: bytes, raw: Mapping[bytes, Any], fields: EntryFields
) -> tuple[bytes, bytes] | None:
    try:
        data = flat_json(type_name, raw)
    except TypeError:  # a str value among bytes
        data = flat_json(type_name, _as_bytes(fields))
    return None if data is None else (type_name, data)


def _named_elsewhere(raw: Mapping[bytes, bytes], fields: EntryFields) -> tuple[bytes, bytes] | None:
    """A flat entry without `type` (names and values bytes) whose type names a field other
    than its first: another producer's order, its value the version."""
    type_name = next((name for name in raw if name in _FLAT_READ), None)
    if type_name is None or raw[type_name] != FLAT_VERSION:
        return None
    return _flat(type_name, raw, fields)


def _type_field(raw: Mapping[bytes, Any]) -> bytes | None:
    """The field of a flat entry without `type` that names its type: a type written flat,
    wherever it is, else a capitalised first field whose value is a number (a version) when
    that is not a per-batch type's name (a type this reader does not know)."""
    named = next((name for name in raw if name in _FLAT_READ), None)
    if named is not None:
        return named
    first, value = next(iter(raw.items()), (b"", b""))
    if first[:1].isupper() and type(value) is bytes and value.isdigit():
        return None if as_str(first) in EVENT_TYPES else first
    return None


def stated_type(fields: Mapping[Any, Any]) -> str | None:
    """The type an entry says it has, without decoding it (a dead letter's copy of its fields,
    shown): its `type`, or the name of a flat entry's type field."""
    raw = _as_bytes(fields)
    value = raw.get(b"type")
    if value is not None:
        return as_str(value) if type(value) is bytes else None
    named = _type_field(raw) if b"data" not in raw else None
    return as_str(named) if named is not None else None


def undecodable(fields: EntryFields) -> DecodeError:
    """Why an entry `entry_data` gives nothing for is not an event: `unknown_type` for the flat
    form of a type or of a version this reader does not know (a capitalised first field whose
    value is a number: written by a newer producer, redriven once readers know it), else
    `missing_field`."""
    raw = _as_bytes(fields)
    present = ", ".join(sorted(as_str(name) for name in raw)) or "none"
    named = _type_field(raw) if b"type" not in raw and b"data" not in raw else None
    if named in _FLAT_READ:
        if raw[named] != FLAT_VERSION:
            return DecodeError(
                "unknown_type",
                f"{as_str(named)} in flat layout version {as_str(raw[named])[:20]!r}, "
                f"this reader knows version {FLAT_VERSION.decode()}",
            )
    elif named is not None:
        version = as_str(raw[named])[:20]
        return DecodeError("unknown_type", f"{as_str(named)[:100]} (flat, version {version})")
    return DecodeError("missing_field", f"fields present: {present}")


def _as_bytes(fields: EntryFields) -> dict[bytes, bytes]:
    return {
        (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
        for k, v in fields.items()
    }


def decode(fields: EntryFields, entry_id: str | None = None) -> Event:
    """Decode one entry's fields, any form; raises DecodeError with a reason label. Given
    the entry's id, an event without `occurred_at` takes the id's time (the server's), not
    the decoding moment, and one without `event_id` the entry id, so that every reading of
    the entry decodes the same event."""
    try:
        found = entry_data(fields)
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid_data", str(exc)[:300]) from exc
    if found is None:
        raise undecodable(fields)
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
    stamp_time, stamp_id = OCCURRED_AT not in data, EVENT_ID not in data
    if stamp_time and stamp_id:  # the usual entry (EntryStamped): one call, no kwargs dict
        return msgspec.structs.replace(event, occurred_at=entry_iso(entry_id), event_id=entry_id)
    if stamp_time:
        return msgspec.structs.replace(event, occurred_at=entry_iso(entry_id))
    if stamp_id:
        return msgspec.structs.replace(event, event_id=entry_id)
    return event


def decode_as(fields: EntryFields, cls: type[T], entry_id: str | None = None) -> T:
    event = decode(fields, entry_id)
    if not isinstance(event, cls):
        raise DecodeError("unexpected_type", f"{type(event).__name__} where {cls.__name__} belongs")
    return event


def to_builtins(event: Event) -> dict[str, object]:
    out = msgspec.to_builtins(event)
    assert isinstance(out, dict)
    return out


_WRITERS = {cls: _flat_writer(cls, fields) for cls, fields in _FLAT.items()}
