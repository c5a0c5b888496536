"""`events.ids.event_id_problem` reads per event type only the names that type has (issue 11):
the same answer, first problem included, as asking every name of every event."""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from events.ids import _event_id_problem, event_id_problem
from tests.test_events_codec import _one_of_each

BAD = {
    "batch_id": "bad id!",
    "correlation_id": "x" * 200,
    "essay_a_id": " a",
    "essay_b_id": "b\x07",
}


def _variants(event: Any) -> list[Any]:
    """`event` with one or two of its identifiers made invalid (the order of checks shows when
    two are)."""
    changes: list[dict[str, Any]] = [
        {name: bad} for name, bad in BAD.items() if name in event.__struct_fields__
    ]
    for name, bad in (("essay_a", " e"), ("essay_b", "")):
        essay = getattr(event, name, None)
        if essay is not None:
            changes.append({name: msgspec.structs.replace(essay, essay_id=bad)})
    out = [event]
    for k in (1, 2):
        for combo in itertools.combinations(changes, k):
            out.append(
                msgspec.structs.replace(event, **{n: v for c in combo for n, v in c.items()})
            )
    return out


def test_the_same_problem_as_asking_every_name() -> None:
    checked = 0
    for event in _one_of_each():
        for variant in _variants(event):
            assert event_id_problem(variant) == _event_id_problem(variant)
            checked += 1
    assert checked > 40


def test_an_object_that_is_no_struct_is_asked_every_name() -> None:
    class Loose:
        def __init__(self) -> None:
            self.batch_id = "ok"
            self.correlation_id = "bad id!"

    assert event_id_problem(Loose()) == _event_id_problem(Loose()) is not None
