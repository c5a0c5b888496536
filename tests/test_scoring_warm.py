"""The empirical fit warm-started from an earlier fit of the same essays (`WarmStart`, what
`cj.continuation.score` passes from the batch's last scores): the same optimum within the
solver's tolerances, deterministic, and cold where the earlier scores are not of the same
essays."""

from __future__ import annotations

import copy
import dataclasses
import math

import msgspec
import numpy as np
import pytest

from cj import scoring
from cj.continuation import decide, score, warm_start
from cj.scoring import Comparison, FitResult, WarmStart, score_wave
from events.types import WaveSubmitted
from projections.batch import BatchState, apply_batch_event, apply_callback, register
from tests.helpers import completed, registration


def _comparisons(
    n: int, m: int, seed: int, distinct: bool = False
) -> tuple[list[str], list[Comparison]]:
    rng = np.random.default_rng(seed)
    ids = [f"e{i:03d}" for i in range(n)]
    theta = rng.normal(0.0, 1.0, n)
    if distinct:  # as adaptive pairing gives: no pair twice
        iu, ju = np.triu_indices(n, 1)
        pick = rng.choice(len(iu), size=m, replace=False)
        a, b = iu[pick], ju[pick]
    else:
        a = rng.integers(0, n, m)
        b = (a + rng.integers(1, n, m)) % n
    y = rng.random(m) < 1.0 / (1.0 + np.exp(-(theta[a] - theta[b] + 0.3)))
    return ids, [Comparison(ids[i], ids[j], bool(w)) for i, j, w in zip(a, b, y, strict=True)]


def _recorded(fit: FitResult) -> WarmStart:
    """As `BatchScored` records a fit: rounded to 6 places."""
    return WarmStart(
        theta={e: round(t, 6) for e, t in fit.theta.items()},
        se={e: round(s, 6) for e, s in fit.se.items()},
        eta=None if fit.eta is None else round(fit.eta, 6),
        eta_se=None if fit.eta_se is None else round(fit.eta_se, 6),
    )


def _largest(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[e] - b[e]) for e in a)


# 100 essays at 6 and 12 per essay (the grid over log λ), 150 at 40 (three points by the
# delta method, the mode polished), 500 at 8 (sparse steps and the inverse-free start).
@pytest.mark.parametrize(
    ("n", "per_essay", "distinct"),
    [(100, 6, True), (100, 12, False), (150, 40, False), (500, 8, True)],
)
def test_warm_start_finds_the_cold_fit_within_tolerance(
    n: int, per_essay: int, distinct: bool
) -> None:
    ids, comps = _comparisons(n, n * per_essay // 2, seed=n + per_essay, distinct=distinct)
    earlier = score_wave(ids, comps[: len(comps) * 5 // 6], classical=False).fit
    cold = score_wave(ids, comps, classical=False)
    warm = score_wave(ids, comps, classical=False, warm=_recorded(earlier))
    # The fit's tolerance on u = log λ is a tenth of its posterior SD (the search of the
    # mode stops there, cold or warm), which moves the extreme θ̂ by up to ~2e-2 and their
    # SE by ~1e-2: a tenth of an SE. What the warm start changes is where in that band
    # the search stops.
    assert _largest(cold.fit.theta, warm.fit.theta) < 0.03
    assert _largest(cold.fit.se, warm.fit.se) < 0.012
    assert abs((cold.posterior.value or 0.0) - (warm.posterior.value or 0.0)) < 0.005
    assert warm.fit.converged


def test_warm_start_takes_fewer_inverses(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    inverse = scoring._inverse

    def counted(h: np.ndarray) -> tuple[np.ndarray, float]:
        calls["n"] += 1
        return inverse(h)

    monkeypatch.setattr(scoring, "_inverse", counted)
    ids, comps = _comparisons(100, 600, seed=4, distinct=True)
    earlier = score_wave(ids, comps[:500], classical=False).fit
    calls["n"] = 0
    score_wave(ids, comps, classical=False)
    cold = calls["n"]
    calls["n"] = 0
    score_wave(ids, comps, classical=False, warm=_recorded(earlier))
    assert calls["n"] < cold


def test_warm_start_is_deterministic() -> None:
    ids, comps = _comparisons(60, 300, seed=7)
    start = _recorded(score_wave(ids, comps[:240], classical=False).fit)
    first = score_wave(ids, comps, classical=False, warm=start).fit
    again = score_wave(ids, comps, classical=False, warm=start).fit
    assert first == again


def test_no_warm_start_from_another_essay_set() -> None:
    ids, comps = _comparisons(40, 200, seed=9)
    cold = score_wave(ids, comps, classical=False).fit
    earlier = _recorded(score_wave(ids, comps[:150], classical=False).fit)
    fewer = dataclasses.replace(earlier, theta={e: earlier.theta[e] for e in ids[1:]})
    other = dataclasses.replace(earlier, theta={**earlier.theta, "x": 0.0})
    no_se = dataclasses.replace(earlier, se={e: earlier.se[e] for e in ids[1:]})
    not_finite = dataclasses.replace(earlier, theta={**earlier.theta, ids[0]: math.nan})
    for start in (fewer, other, no_se, not_finite):
        assert score_wave(ids, comps, classical=False, warm=start).fit == cold
    # The same essays in another order are the same set.
    shuffled = dataclasses.replace(earlier, theta=dict(reversed(list(earlier.theta.items()))))
    assert (
        score_wave(ids, comps, classical=False, warm=shuffled).fit
        == score_wave(ids, comps, classical=False, warm=earlier).fit
    )


def _waves(n: int, waves: int) -> list[BatchState]:
    """The states of a batch before each scoring decision, every wave answered (the
    essay with the lower index wins two times in three, by a fixed rule)."""
    state = register(registration(n, batch_id="b"))
    before = []
    entry = 0
    for _ in range(waves):
        decision = decide(state)
        assert decision is not None
        for event in decision.events:
            state = apply_batch_event(state, event)
        (wave,) = [e for e in decision.events if isinstance(e, WaveSubmitted)]
        for pair in wave.pairs:
            ia, ib = int(pair.essay_a[1:]), int(pair.essay_b[1:])
            winner = "essay_a" if (ia < ib) != ((ia + 2 * ib) % 3 == 0) else "essay_b"
            entry += 1
            apply_callback(
                state,
                completed("b", pair.correlation_id, winner, pair.essay_a, pair.essay_b),
                f"{entry}-0",
            )
        before.append(copy.deepcopy(state))
    return before


def test_score_starts_from_the_states_last_scores() -> None:
    first, second, third = _waves(12, 3)
    assert first.scores is None and warm_start(first) is None
    for state in (second, third):
        start = warm_start(state)
        assert start is not None
        assert state.scores is not None
        assert start.theta == {s.essay_id: s.theta for s in state.scores.scores}
        # A function of the state: the same scores twice (but the event's id and time).
        once, twice = (
            msgspec.structs.replace(score(state), event_id="", occurred_at="") for _ in range(2)
        )
        assert once == twice
