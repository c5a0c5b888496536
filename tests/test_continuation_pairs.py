"""`BatchPairs` (one pass over a batch's pairs per decision, issue 11) against what the
plain functions before it gave (copied here as the reference): the comparisons (and
`_index_comparisons` of them), the history, the `pair_key` counts, `account_failure`, on
usual states and unusual ones, errors included."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from cj.continuation import (
    PERMANENT_FAILURES,
    BatchPairs,
    _kind,
    account_failure,
    comparisons_of,
    history_of,
    score,
)
from cj.pairs import PairHistory, pair_key
from cj.scoring import Comparison, _index_comparisons
from projections.batch import ABANDONED, PENDING, register
from tests.helpers import registration


def reference_comparisons(state: Any) -> list[Comparison]:
    pairs = state.pairs
    rows = sorted(
        (pairs[cid][1], pairs[cid][2], value.endswith("essay_a"))
        for cid, value in state.corr.items()
        if value.startswith("c ")
    )
    return [Comparison(a, b, winner_is_a) for a, b, winner_is_a in rows]


def reference_history(state: Any) -> list[PairHistory]:
    out = []
    rows = sorted((*pair, state.corr.get(cid, PENDING)) for cid, pair in state.pairs.items())
    for _, a, b, value in rows:
        if value == PENDING:
            out.append(PairHistory(a, b, "pending"))
        elif value.startswith("c "):
            winner = "essay_a" if value.endswith("essay_a") else "essay_b"
            out.append(PairHistory(a, b, "completed", winner))  # type: ignore[arg-type]
        else:
            permanent = value.startswith("f ") and _kind(value) in PERMANENT_FAILURES
            out.append(PairHistory(a, b, "failed", permanent=permanent))
    return out


VALUES = [
    PENDING,
    ABANDONED,
    "c 5-0 essay_a",
    "c 6-0 essay_b",
    "f 7-0 server_error",
    "f 8-0 refusal",
    "f 9-0 invalid_request",
]


def _state(n: int = 12, pairs: int = 60, seed: int = 1, values: list[str] = VALUES) -> Any:
    """A batch of `n` essays ("e0".."e11": their id order is not their registration order)
    with `pairs` pairs over three waves, their values drawn from `values`."""
    state = register(registration(n, batch_id="b"))
    ids = [e.essay_id for e in state.essays]
    rng = random.Random(seed)
    for k in range(pairs):
        cid = str(rng.randrange(10**6)) if k % 2 else str(k + 1)
        a, b = rng.sample(ids, 2)
        state.pairs[cid] = (1 + k * 3 // pairs, a, b)
        state.corr[cid] = rng.choice(values)
    state.waves = 3
    return state


def _same(state: Any) -> BatchPairs:
    view = BatchPairs(state)
    ids = [e.essay_id for e in state.essays]
    comparisons = reference_comparisons(state)
    assert view.ids == ids
    assert view.history == history_of(state) == reference_history(state)
    assert view.count == len(comparisons)
    assert view.comparisons == comparisons_of(state) == comparisons
    if view.indexed is not None:
        for ours, theirs in zip(view.indexed, _index_comparisons(ids, comparisons), strict=True):
            assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    counts = Counter(pair_key(a, b) for _, a, b in state.pairs.values())
    asked = [(a, b) for a in ids for b in ids if a != b]
    assert view.asked(asked) == [counts[pair_key(a, b)] for a, b in asked]
    assert account_failure(state, view) == account_failure(state)
    return view


@pytest.mark.parametrize("seed", range(5))
def test_the_one_pass_gives_what_the_plain_functions_give(seed: int) -> None:
    view = _same(_state(seed=seed))
    assert view.indexed is not None  # the fast path


def test_an_account_failure_of_the_last_wave_is_found() -> None:
    state = _state(values=["c 1-0 essay_a", "f 2-0 authentication", "f 3-0 billing"])
    assert _same(state).account and account_failure(state) is not None
    state = _state(values=["c 1-0 essay_a", "f 2-0 server_error"])
    assert not _same(state).account and account_failure(state) is None


def test_one_pair_twice_in_a_wave_is_ordered_by_its_values() -> None:
    state = _state()
    wave, a, b = next(iter(state.pairs.values()))
    state.pairs["x1"], state.corr["x1"] = (wave, a, b), "f 1-0 server_error"
    state.pairs["x2"], state.corr["x2"] = (wave, a, b), "c 2-0 essay_b"
    _same(state)


def test_pairs_and_values_that_do_not_match() -> None:
    state = _state()
    state.pairs["lost"] = (3, "e1", "e2")  # a pair without a projection value
    state.corr["other"] = PENDING  # and a value without a pair: as many
    _same(state)
    state.corr["gone"] = "c 9-0 essay_a"  # an accepted value without a pair
    with pytest.raises(KeyError, match="gone"):
        reference_comparisons(state)
    view = BatchPairs(state)
    assert view.history == reference_history(state) and view.indexed is None
    with pytest.raises(KeyError, match="gone"):
        score(state, pairs=view)
    state = _state(values=["c 1-0 essay_a"])
    state.waves = 0  # `account_failure` reads a failure without a pair as of wave 0
    state.corr["f"] = "f 9-0 billing"
    assert account_failure(state, _same(state)) is not None


def _error(call: Any) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    return str(caught.value)


@pytest.mark.parametrize("value", [PENDING, "c 2-0 essay_a"])
@pytest.mark.parametrize("pair", [("e1", "nobody"), ("aaa", "e1"), ("e1", "e1")])
def test_essays_not_of_the_batch_or_with_themselves(pair: tuple[str, str], value: str) -> None:
    state = _state(values=["c 1-0 essay_a", "f 2-0 server_error"])
    state.pairs["x"], state.corr["x"] = (3, *pair), value
    view = _same(state)
    if value == PENDING:
        assert score(state, pairs=view).comparisons == view.count  # not scored, as before
    else:
        ids = [e.essay_id for e in state.essays]
        expected = _error(lambda: _index_comparisons(ids, reference_comparisons(state)))
        assert _error(lambda: score(state, pairs=view)) == expected


def test_a_batch_without_pairs() -> None:
    state = register(registration(6, batch_id="b"))
    view = _same(state)
    assert view.count == 0 and view.history == []
