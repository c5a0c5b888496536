"""`cjs dlq redrive`: dead letters made good again.

Two kinds of letter can be redriven:

- a callback of `cj:callbacks` dead-lettered as `max_deliveries` although it was valid (its
  consumers kept failing, not the callback), or a valid one dead-lettered by hand
  (`cjs stuck --act dead_letter`, the dashboard), both parked: it is applied *in place*, by
  callback.lua with its original entry id, gated by its parking (streams/dlq.py), so that it
  is applied once however many redrives run, and the batch then moves on (`advance`). Letters
  written before parking existed are parked first (`adopt`), once, by taking them out of the
  dead letters;
- any other letter whose entry would now be accepted by its stream's consumers (it decodes,
  is an event they use, its ids and time are valid: e.g. a type unknown to an older version)
  is appended again to its source stream as a new entry, and taken out of the dead letters.

Everything else (still undecodable, a bad id, nobody consumes that stream) stays where it is
and is listed as skipped, with why. `dry_run` says what would happen and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cj.continuation import advance
from events import codec
from events.clock import time_problem
from events.ids import event_id_problem
from events.streams import CALLBACKS, CJ_GROUP, REQUESTS, STREAMS
from events.text import as_str
from events.types import ComparisonCompleted, ComparisonFailed, ComparisonRequested, Event
from projections.store import CallbackApplier
from streams import dlq
from streams.keys import Keys

# What each consumed stream's consumers accept (streams/consumer.py `accepts`).
CONSUMED_TYPES: dict[str, tuple[type[Event], ...]] = {
    CALLBACKS: (ComparisonCompleted, ComparisonFailed),
    REQUESTS: (ComparisonRequested,),
}
IN_PLACE = "max_deliveries"


def acceptable(stream_name: str, fields: Mapping[Any, Any], entry_id: str) -> tuple[Any, str]:
    """(the event, "") when `stream_name`'s consumers would accept `fields` now, else
    (None, why not)."""
    types = CONSUMED_TYPES.get(stream_name)
    if types is None:
        return None, f"no consumer group reads {stream_name}"
    try:
        event = codec.decode(fields, entry_id)
    except codec.DecodeError as exc:
        return None, f"still {exc.reason}: {exc.detail[:120]}"
    if not isinstance(event, types):
        return None, f"still unexpected_type: {type(event).__name__} on {stream_name}"
    problem = event_id_problem(event) or time_problem(event.occurred_at, entry_id)
    if problem:
        return None, f"still invalid: {problem[:160]}"
    return event, ""


async def redrive(
    r: Any,
    keys: Keys,
    *,
    stream: str | None = None,
    reason: str | None = None,
    letter_ids: set[str] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Redrive the dead letters selected by `stream`, `reason` and `letter_ids` (all when
    None); see the module's docstring. Returns what was applied, re-appended and skipped."""
    out: dict[str, Any] = {
        "dry_run": dry_run,
        "applied": [],
        "reappended": [],
        "skipped": [],
        "advanced": [],
    }
    for name in [stream] if stream else list(STREAMS):
        letters = [
            (letter_id, fields)
            for letter_id, fields in await dlq.all_letters(r, keys, name)
            if (letter_ids is None or letter_id in letter_ids)
            and (reason is None or fields.get("reason") == reason)
        ]
        if name == CALLBACKS:
            letters = await _in_place(r, keys, letters, out, dry_run, reason, letter_ids)
        for letter_id, fields in letters:
            await _reappend(r, keys, name, letter_id, fields, out, dry_run)
    return out


async def _in_place(
    r: Any,
    keys: Keys,
    letters: list[tuple[str, dict[str, str]]],
    out: dict[str, Any],
    dry_run: bool,
    reason: str | None,
    letter_ids: set[str] | None,
) -> list[tuple[str, dict[str, str]]]:
    """Apply parked callbacks (and `max_deliveries` letters of valid callbacks) in place;
    returns the letters left for a re-append."""
    parked = await dlq.parked(r, keys, CALLBACKS)
    by_letter = {letter: entry for entry, letter in parked.items()}
    wanted: dict[str, str] = {}  # entry id -> letter id, to apply in place
    rest = []
    for letter_id, fields in letters:
        entry_id = fields.get("source_id", "")
        if letter_id in by_letter:
            wanted[by_letter[letter_id]] = letter_id
        elif fields.get("reason") == IN_PLACE and entry_id:
            wanted[entry_id] = letter_id  # written before parking existed: adopted below
        else:
            rest.append((letter_id, fields))
    if letter_ids is None and reason in (None, IN_PLACE):
        # Parked entries whose letter has been trimmed by retention are still owed.
        for entry_id, letter_id in parked.items():
            wanted.setdefault(entry_id, letter_id)
    applier = CallbackApplier(r, keys, CJ_GROUP)
    ready: list[tuple[str, Event]] = []
    for entry_id, letter_id in sorted(wanted.items()):
        fields = await dlq.source_fields(r, keys, CALLBACKS, entry_id)
        if fields is None:
            out["skipped"].append(_skip(CALLBACKS, letter_id, entry_id, "source entry is gone"))
            continue
        event, why = acceptable(CALLBACKS, fields, entry_id)
        if event is None:
            out["skipped"].append(_skip(CALLBACKS, letter_id, entry_id, why))
            continue
        if dry_run:
            out["applied"].append(_applied(entry_id, letter_id, event, "would apply"))
            continue
        if entry_id not in parked and not await dlq.adopt(r, keys, CALLBACKS, letter_id, entry_id):
            continue  # another redrive took this letter first
        ready.append((entry_id, event))
    if not ready:
        return rest
    async with r.pipeline(transaction=False) as pipe:
        for entry_id, event in ready:
            assert isinstance(event, ComparisonCompleted | ComparisonFailed)
            await applier.queue(pipe, event, entry_id, parked=True)
        results = await pipe.execute()
    to_advance = set()
    for (entry_id, event), (outcome, left) in zip(ready, results, strict=True):
        outcome = as_str(outcome)
        out["applied"].append(_applied(entry_id, wanted[entry_id], event, outcome))
        if outcome == "accepted" and int(left) <= 0:
            to_advance.add(getattr(event, "batch_id", ""))
    for batch_id in sorted(to_advance):
        if await advance(r, keys, batch_id) is not None:
            out["advanced"].append(batch_id)
    return rest


async def _reappend(
    r: Any,
    keys: Keys,
    name: str,
    letter_id: str,
    fields: dict[str, str],
    out: dict[str, Any],
    dry_run: bool,
) -> None:
    source_id = fields.get("source_id", "")
    if not source_id:
        out["skipped"].append(_skip(name, letter_id, source_id, "letter names no source entry"))
        return
    original = await dlq.source_fields(r, keys, name, source_id)
    if original is None:
        if fields.get("truncated") == "1" or "fields" not in fields:
            out["skipped"].append(_skip(name, letter_id, source_id, "source gone, copy cut"))
            return
        try:
            original = json.loads(fields["fields"])
        except json.JSONDecodeError:
            out["skipped"].append(_skip(name, letter_id, source_id, "copy is not JSON"))
            return
    event, why = acceptable(name, original, source_id)
    if event is None:
        out["skipped"].append(_skip(name, letter_id, source_id, why))
        return
    new_id = None if dry_run else await dlq.reappend(r, keys, name, letter_id, original)
    if new_id is None and not dry_run:
        return  # another redrive took this letter first
    out["reappended"].append(
        {
            "stream": name,
            "letter_id": letter_id,
            "source_id": source_id,
            "new_id": new_id,
            "event_type": type(event).__name__,
            "batch_id": getattr(event, "batch_id", None),
            "correlation_id": getattr(event, "correlation_id", None),
        }
    )


def _skip(stream: str, letter_id: str, source_id: str, why: str) -> dict[str, Any]:
    return {"stream": stream, "letter_id": letter_id, "source_id": source_id, "why": why}


def _applied(entry_id: str, letter_id: str | None, event: Event, outcome: str) -> dict[str, Any]:
    return {
        "stream": CALLBACKS,
        "source_id": entry_id,
        "letter_id": letter_id,
        "batch_id": getattr(event, "batch_id", None),
        "correlation_id": getattr(event, "correlation_id", None),
        "outcome": outcome,
    }
