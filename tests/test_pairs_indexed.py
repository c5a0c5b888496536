"""`IndexedHistory` (issue 11: a decision hands the planner its pairs as arrays, without a
`PairHistory` each): the arrays are what the planner makes of the history itself, and a
plan on them is the plan on the history."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cj.continuation import BatchPairs
from cj.pairs import IndexedHistory, _history_arrays, _ties_in_index_order, plan_wave
from projections.batch import PENDING
from tests.test_continuation_pairs import VALUES, _state, reference_history


def _plan(state: Any, history: Any, wave: int, scored: bool) -> list[tuple[str, str]]:
    ids = [e.essay_id for e in state.essays]
    scores = {e: (0.1 * k - 0.5, 0.3 + 0.01 * k) for k, e in enumerate(ids)} if scored else None
    anchors = {e.essay_id: e.anchor_grade for e in state.essays if e.anchor_grade}
    return plan_wave(
        key="k",
        wave=wave,
        seed=3,
        essay_ids=ids,
        anchors=anchors,
        grade_scale="FEDCBA",
        history=history,
        size=len(ids),
        scores=scores,
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pairs", [0, 5, 40, 120])
def test_the_arrays_are_the_history_read_by_the_planner(seed: int, pairs: int) -> None:
    state = _state(n=14, pairs=pairs, seed=seed, values=[*VALUES, PENDING, "c 1-0 essay_a"])
    view = BatchPairs(state)
    indexed = view.history_arrays
    assert isinstance(indexed, IndexedHistory)
    history = reference_history(state)
    assert len(indexed) == len(history) and list(indexed) == history == view.history
    assert indexed[1:3] == history[1:3]
    index = {e: i for i, e in enumerate(indexed.ids)}
    for ours, theirs in zip(
        (indexed.a, indexed.b, indexed.live, indexed.pending, indexed.permanent),
        _history_arrays(index, history),
        strict=True,
    ):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    for wave, scored in ((1, False), (4, True)):
        assert _plan(state, indexed, wave, scored) == _plan(state, history, wave, scored)


def test_a_pair_of_an_essay_with_itself_is_refused_as_before() -> None:
    state = _state()
    state.pairs["x"], state.corr["x"] = (3, "e1", "e1"), PENDING
    view = BatchPairs(state)
    assert view.history_arrays.ids == sorted(e.essay_id for e in state.essays)  # the fast path
    with pytest.raises(ValueError, match="with itself") as ours:
        _plan(state, view.history_arrays, 4, True)
    with pytest.raises(ValueError, match="with itself") as theirs:
        _plan(state, reference_history(state), 4, True)
    assert str(ours.value) == str(theirs.value)


@given(st.lists(st.integers(0, 6), min_size=8, max_size=300))
def test_tied_runs_put_in_index_order_give_the_stable_argsort(keys: list[int]) -> None:
    """The shortlist's order of tied gains (`_ties_in_index_order`): that of a stable sort."""
    x = np.array(keys, dtype=np.float32)
    order = np.argsort(x)
    ties = x[order][1:] == x[order][:-1]
    assert ties.any()  # eight draws of seven values
    assert np.array_equal(_ties_in_index_order(order, ties), np.argsort(x, kind="stable"))
