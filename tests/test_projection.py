"""The batch projection's pure apply semantics. The Lua transcription equal to it and replay
equal to live, on every engine: tests/contract/test_projection.py."""

from __future__ import annotations

from typing import Any

from events.types import BatchFinalized
from projections.batch import apply_batch_event, apply_callback, register
from tests.helpers import completed, failed, registration, wave

B = "b1"


def _state(n_pairs: int = 3) -> Any:
    reg = registration(4, batch_id=B)
    state = register(reg)
    return apply_batch_event(state, wave(B, 1, [(f"c{i}", "e0", "e1") for i in range(n_pairs)]))


def test_accepts_once_and_counts_duplicates_orphans_and_late_apart() -> None:
    state = _state(3)
    state, out = apply_callback(state, completed(B, "c0"), "10-0")
    assert out == "accepted" and state.completed == 1 and state.in_flight == 2
    state, out = apply_callback(state, completed(B, "c0", "essay_b"), "11-0")
    assert out == "duplicate" and state.completed == 1 and state.duplicates == 1
    state, out = apply_callback(state, completed(B, "nope"), "12-0")
    assert out == "orphan" and state.orphans == 1 and state.orphan_ids == {"nope": 1}
    state, out = apply_callback(state, failed(B, "c1"), "13-0")
    assert out == "accepted" and state.failed == 1
    state = apply_batch_event(state, BatchFinalized(batch_id=B, reason="stable", abandoned=["c2"]))
    assert state.in_flight == 0 and state.status == "finalized"
    state, out = apply_callback(state, completed(B, "c2"), "14-0")
    assert out == "late" and state.late_callbacks == 1 and state.completed == 1
    assert state.completed + state.failed == 2 <= state.submitted <= state.denominator
    assert state.callbacks_received == 5


def test_earliest_entry_wins_whatever_the_order() -> None:
    first, second = _state(1), _state(1)
    cb_early, cb_late = failed(B, "c0"), completed(B, "c0")
    apply_callback(first, cb_early, "5-0")
    apply_callback(first, cb_late, "9-0")
    apply_callback(second, cb_late, "9-0")
    apply_callback(second, cb_early, "5-0")
    assert first.corr == second.corr == {"c0": "f 5-0 server_error"}
    assert (first.completed, first.failed, first.duplicates) == (0, 1, 1)
    assert (second.completed, second.failed, second.duplicates) == (0, 1, 1)


def test_a_wave_appended_twice_counts_once() -> None:
    """A commit whose reply a failover lost is sent again: the same WaveSubmitted twice in the
    stream, which the live projection (written with it) counted once; so does the fold."""
    once = _state()
    twice = _state()
    again = wave("b1", 1, [(f"c{i}", "e0", "e1") for i in range(3)])
    apply_batch_event(twice, again)
    apply_callback(once, completed("b1", "c0"), "5-0")
    apply_callback(twice, completed("b1", "c0"), "5-0")
    apply_batch_event(twice, again)  # after a callback too: c0 stays answered
    assert (twice.submitted, twice.in_flight, twice.completed) == (3, 2, 1)
    assert twice.corr == once.corr and twice.pairs == once.pairs


def test_a_stored_state_decodes_alike_from_bytes_text_or_both() -> None:
    """decode_state joins the pairs as Redis returns them (bytes); text (a client decoding
    responses), or a mix, gives the same state."""
    from projections.store import decode_state, encode_state
    from streams.keys import Keys

    keys = Keys("t:")
    state = _state(5)
    text = encode_state(state, keys)
    as_bytes = {k: {f.encode(): v.encode() for f, v in h.items()} for k, h in text.items()}
    mixed: dict[str, dict[Any, Any]] = {k: dict(h) for k, h in as_bytes.items()}
    for name, h in mixed.items():
        if name.endswith(":pairs"):
            first = next(iter(h))
            h[first.decode()] = h.pop(first).decode()
    decoded = [decode_state(raw, keys, B) for raw in (text, as_bytes, mixed)]  # type: ignore[arg-type]
    assert decoded[0] is not None and len(decoded[0].pairs) == 5
    assert decoded[0] == decoded[1] == decoded[2]
    assert decoded[0].pairs == state.pairs
