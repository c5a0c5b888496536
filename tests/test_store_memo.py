"""decode_state's documents decoded once (issue 11) change nothing: every decode equals a
decode from scratch, in content and in order, whatever was decoded before."""

from __future__ import annotations

import json
from typing import Any

import pytest

from events.text import as_str
from events.types import BatchScored, EssayScore
from projections import keys as pkeys
from projections import store
from projections.batch import BatchState
from projections.store import decode_state, encode_state
from streams.keys import Keys
from tests.helpers import registration

KEYS = Keys("m:")
B = "bm"


def _raw(state: BatchState) -> dict[str, dict[Any, Any]]:
    """The state as Redis returns it (bytes), each hash in reverse order (as a big hash may be)."""
    return {
        k: {f.encode(): v.encode() for f, v in reversed(h.items())}
        for k, h in encode_state(state, KEYS).items()
    }


def _scratch(raw: dict[str, dict[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """corr and pairs decoded one value at a time, without any memo: (items, items)."""
    corr = raw.get(pkeys.batch_corr(KEYS, B), {})
    pairs = raw.get(pkeys.batch_pairs(KEYS, B), {})
    return (
        [(as_str(k), as_str(v)) for k, v in corr.items()],
        [(as_str(k), tuple(json.loads(v))) for k, v in pairs.items()],
    )


def _state(n: int) -> BatchState:
    reg = registration(6, batch_id=B)
    state = BatchState(
        batch_id=B,
        essays=list(reg.essays),
        config=reg.config,
        denominator=reg.denominator,
        registered_at=reg.occurred_at,
    )
    ids = [e.essay_id for e in reg.essays]
    for i in range(n):
        state.pairs[f"c{i}"] = (1 + i // 3, ids[i % 6], ids[(i + 1) % 6])
        state.corr[f"c{i}"] = "pending"
    return state


def _check(raw: dict[str, dict[Any, Any]]) -> BatchState:
    decoded = decode_state(raw, KEYS, B)
    assert decoded is not None
    corr, pairs = _scratch(raw)
    assert list(decoded.corr.items()) == corr
    assert list(decoded.pairs.items()) == pairs
    docs = raw[pkeys.batch_docs(KEYS, B)]
    assert decoded.essays == store._essays.decode(docs[b"essays"])
    assert decoded.scores == (store._scores.decode(docs[b"scores"]) if b"scores" in docs else None)
    return decoded


def test_decodes_equal_a_decode_from_scratch_as_the_state_moves_on() -> None:
    state = _state(9)
    first = _check(_raw(state))
    state.corr["c0"] = "c 1700000000000-0 essay_a"
    state.corr["c1"] = "abandoned"
    state.pairs["c9"] = (4, "e0", "e5")
    state.corr["c9"] = "pending"
    second = _check(_raw(state))
    assert second.corr["c0"] != first.corr["c0"] and "c9" in second.pairs
    second.essays.append(second.essays[0])  # the essays decoded are the state's own
    assert len(_check(_raw(state)).essays) == len(state.essays)


def test_text_that_is_not_utf8_decodes_as_as_str_does() -> None:
    raw = _raw(_state(3))
    corr = raw[pkeys.batch_corr(KEYS, B)]
    corr[b"c\xff"] = b"f 1-0 \xfe"
    decoded = _check(raw)
    assert decoded.corr["c\ufffd"] == "f 1-0 \ufffd"


def test_a_full_memo_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "DOC_MEMO_ENTRIES", 1)
    for n in (4, 3, 5, 2):
        state = _state(n)
        state.essays = state.essays[:n]  # other essays: decoded again
        assert _check(_raw(state)).essays == state.essays
        assert len(store._doc_memo) == 1


def test_new_scores_are_decoded_again() -> None:
    state = _state(2)
    _check(_raw(state))
    for wave in (1, 2, 2):
        state.scores = BatchScored(
            batch_id=B, wave=wave, scores=[EssayScore("e0", 0.5 * wave, 0.1)], comparisons=wave
        )
        assert _check(_raw(state)).scores == state.scores


def test_changed_essays_are_decoded_again() -> None:
    state = _state(2)
    raw = _raw(state)
    assert _check(raw).essays == state.essays
    docs = raw[pkeys.batch_docs(KEYS, B)]
    fewer = state.essays[:3]
    docs[b"essays"] = json.dumps([json.loads(store._stored(e)) for e in fewer]).encode()
    assert _check(raw).essays == fewer
