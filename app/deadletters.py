"""One dead letter at a time: inspect it (essay text hidden unless asked for), redrive it to the
stream it came from, delete it. `cjs dlq` lists them (`streams.dlq.read_dead_letters`).

Issue 16 adds `cjs dlq redrive` in streams/dlq.py; `redrive` here is the same operation for the
dashboard, kept small and web-independent so the two can become one function at the merge.
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import InputError, NotFound
from app.partitions import number, one_partition
from events.streams import STREAMS, dlq_name
from events.text import as_str
from streams.dlq import letter_view
from streams.keys import Keys

# Essay text is student data: a dead letter shows it only when asked for, and never logs it.
TEXT_KEYS = frozenset({"text"})

# Moves one dead letter back, exactly once however many redrive it at the same time: the XADD
# happens only if this call's XDEL removed the letter. KEYS: 1 the DLQ, 2 the source stream;
# ARGV: 1 the letter's id, then the original fields as name, value, ... Returns the new id or
# false when the letter is gone.
_REDRIVE_LUA = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
"""


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
    and its `text` fields hidden; data that is not JSON is hidden whole (it may hold text)."""
    fields = letter.get("fields")
    if not isinstance(fields, dict):
        hidden: Any = None if fields is None else f"[{len(str(fields))} characters hidden]"
        return {**letter, "fields": hidden, "text_hidden": True}
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name != "data":
            out[name] = value
            continue
        try:
            out[name] = json.dumps(hide_text(json.loads(value)), ensure_ascii=False)
        except (TypeError, ValueError):
            out[name] = f"[{len(str(value))} characters hidden: not JSON]"
    return {**letter, "fields": out, "text_hidden": True}


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
    """Append the dead letter's original fields to its source stream (of the letter's
    partition) as a new entry and remove it from the dead letters, atomically and once (a
    second redrive finds nothing: NotFound). The consumer group reads it like any new entry: a
    request is judged unless its callback exists already, a callback is applied (counted as a
    duplicate if one was accepted)."""
    source = _source_of(dlq_stream)
    keys = one_partition(keys, partition)
    found = await r.xrange(keys.dlq(source), min=entry_id, max=entry_id, count=1)
    if not found:
        raise NotFound(f"no dead letter {entry_id} in {dlq_name(source)}")
    letter = letter_view(dlq_name(source), found[0][0], found[0][1])
    original = letter["fields"]
    if not isinstance(original, dict) or not original:
        raise InputError(f"dead letter {entry_id} kept no fields to redrive")
    if letter["source_stream"] not in (None, source):
        raise InputError(f"dead letter {entry_id} came from {letter['source_stream']}")
    flat: list[str] = []
    for name, value in original.items():
        flat += [str(name), value if isinstance(value, str) else json.dumps(value)]
    new_id = await r.eval(_REDRIVE_LUA, 2, keys.dlq(source), keys.stream(source), entry_id, *flat)
    if not new_id:
        raise NotFound(f"no dead letter {entry_id} in {dlq_name(source)} (redriven meanwhile?)")
    return {
        "dlq_stream": dlq_name(source),
        "partition": number(keys),
        "entry_id": entry_id,
        "source_stream": source,
        "source_id": letter["source_id"],
        "new_entry_id": as_str(new_id),
        "reason": letter["reason"],
    }


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
