"""One dead letter at a time: inspect it (essay text hidden unless asked for), redrive it, delete
it. `cjs dlq` lists them (`streams.dlq.read_dead_letters`).

A redrive here is `cjs dlq redrive` (app/dlq.py) for one letter: a parked callback (a valid one
dead-lettered as `max_deliveries`) is applied in place, once, and its batch moves on; any other
letter whose entry would now be accepted is appended again to its stream as a new entry; a
letter that would only be dead-lettered again is refused, with why. Deleting a letter leaves a
parked callback parked: `cjs dlq redrive` still applies it (replay leaves it out until then,
as the live projection does).
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import InputError, NotFound
from app.partitions import number, one_partition
from events.streams import STREAMS, dlq_name
from streams.dlq import letter_view
from streams.keys import Keys

# Essay text is student data: a dead letter shows it only when asked for, and never logs it.
TEXT_KEYS = frozenset({"text"})


def _source_of(dlq_stream: str) -> str:
    """The stream (no prefix) whose dead letters `dlq_stream` ("dlq:<stream>" or "<stream>")
    holds."""
    name = dlq_stream.removeprefix("dlq:")
    if name not in STREAMS:
        raise InputError(f"no dead letters for {dlq_stream!r}: streams are {list(STREAMS)}")
    return name


def hide_text(value: Any) -> Any:
    """`value` (parsed JSON) with every essay text replaced by its length."""
    if isinstance(value, dict):
        return {
            k: (
                f"[{len(v)} characters hidden]"
                if k in TEXT_KEYS and isinstance(v, str)
                else hide_text(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [hide_text(v) for v in value]
    return value


def redact(letter: dict[str, Any]) -> dict[str, Any]:
    """A dead letter (`letter_view`) without essay text: the original entry's `data` is parsed
    and its `text` fields hidden; data that is not JSON is hidden whole (it may hold text). A
    flat entry (events/codec.py) holds a text, if at all, in a nested value (an essay): each
    value that is a JSON object or array is parsed and hidden alike."""
    fields = letter.get("fields")
    if not isinstance(fields, dict):
        hidden: Any = None if fields is None else f"[{len(str(fields))} characters hidden]"
        return {**letter, "fields": hidden, "text_hidden": True}
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name in TEXT_KEYS:
            out[name] = f"[{len(str(value))} characters hidden]"
            continue
        if name != "data":
            out[name] = _nested_hidden(value)
            continue
        try:
            out[name] = json.dumps(hide_text(json.loads(value)), ensure_ascii=False)
        except (TypeError, ValueError):
            out[name] = f"[{len(str(value))} characters hidden: not JSON]"
    return {**letter, "fields": out, "text_hidden": True}


def _nested_hidden(value: Any) -> Any:
    if not (isinstance(value, str) and value[:1] in ("{", "[")):
        return value
    try:
        return json.dumps(hide_text(json.loads(value)), ensure_ascii=False)
    except ValueError:
        return value


def redact_listing(view: dict[str, Any]) -> dict[str, Any]:
    """`read_dead_letters`' view (the `cjs dlq --json` contract) with every letter redacted."""
    return {**view, "dead_letters": [redact(d) for d in view["dead_letters"]]}


async def inspect(
    r: Any,
    keys: Keys,
    dlq_stream: str,
    entry_id: str,
    *,
    show_text: bool = False,
    partition: int | str | None = None,
) -> dict[str, Any]:
    """One dead letter (of `partition`: see `app.partitions.one_partition`) as `cjs dlq
    --json` shows it; essay text hidden unless `show_text`."""
    source = _source_of(dlq_stream)
    keys = one_partition(keys, partition)
    found = await r.xrange(keys.dlq(source), min=entry_id, max=entry_id, count=1)
    if not found:
        raise NotFound(f"no dead letter {entry_id} in {dlq_name(source)}")
    letter = {
        **letter_view(dlq_name(source), found[0][0], found[0][1]),
        "partition": number(keys),
    }
    return letter if show_text else redact(letter)


async def redrive(
    r: Any, keys: Keys, dlq_stream: str, entry_id: str, partition: int | str | None = None
) -> dict[str, Any]:
    """Redrive one dead letter of `partition` (see the module's docstring), atomically and
    once: a second redrive of it finds nothing (NotFound). A re-appended entry is read by the
    consumer group like any new one: a request is judged unless its callback exists already, a
    callback is applied (counted as a duplicate if one was accepted). InputError when the
    letter cannot be used now."""
    from app.dlq import redrive as redrive_letters  # scoring (numpy): only a redrive needs it

    source = _source_of(dlq_stream)
    keys = one_partition(keys, partition)
    found = await r.xrange(keys.dlq(source), min=entry_id, max=entry_id, count=1)
    if not found:
        raise NotFound(f"no dead letter {entry_id} in {dlq_name(source)}")
    letter = letter_view(dlq_name(source), found[0][0], found[0][1])
    if letter["source_stream"] not in (None, source):
        raise InputError(f"dead letter {entry_id} came from {letter['source_stream']}")
    done = await redrive_letters(r, keys, stream=source, letter_ids={entry_id})
    about = {
        "dlq_stream": dlq_name(source),
        "partition": number(keys),
        "entry_id": entry_id,
        "source_stream": source,
        "source_id": letter["source_id"],
        "reason": letter["reason"],
    }
    # One letter selected: at most one of these lists holds anything.
    applied = [a for a in done["applied"] if a["outcome"] != "replayed"]  # replayed: taken first
    if applied:
        return {
            **about,
            "new_entry_id": None,
            "applied": applied[0]["outcome"],
            "batch_id": applied[0]["batch_id"],
            "correlation_id": applied[0]["correlation_id"],
            "advanced": done["advanced"],
        }
    if done["reappended"]:
        return {**about, "new_entry_id": done["reappended"][0]["new_id"]}
    if done["skipped"]:
        raise InputError(f"dead letter {entry_id} cannot be redriven: {done['skipped'][0]['why']}")
    raise NotFound(f"no dead letter {entry_id} in {dlq_name(source)} (redriven meanwhile?)")


async def delete(
    r: Any, keys: Keys, dlq_stream: str, entry_id: str, partition: int | str | None = None
) -> dict[str, Any]:
    """Remove one dead letter (of `partition`) for good."""
    source = _source_of(dlq_stream)
    keys = one_partition(keys, partition)
    if not int(await r.xdel(keys.dlq(source), entry_id)):
        raise NotFound(f"no dead letter {entry_id} in {dlq_name(source)}")
    return {
        "dlq_stream": dlq_name(source),
        "partition": number(keys),
        "entry_id": entry_id,
        "deleted": True,
    }
