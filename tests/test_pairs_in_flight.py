"""Overlapping waves (issue 11): a wave planned while the last is still coming back counts
the pairs in flight as answered at their expected information (a comparison's Fisher
information does not depend on its outcome), on top of Σ rescaled to the fit's variances,
which saw only the comparisons back. Checked against the formula written out with numpy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from cj.pairs import IndexedHistory, PairHistory, _history_arrays, _Planner, plan_wave, wave_rng

N = 12
IDS = [f"e{i:02d}" for i in range(N)]


def _history(seed: int, pending: int) -> list[PairHistory]:
    """A connected history of completed comparisons (a cycle and random chords), then
    `pending` more pairs asked and not answered."""
    rng = np.random.default_rng(seed)
    pairs = [(i, (i + 1) % N) for i in range(N)]
    iu, ju = np.triu_indices(N, 2)
    extra = rng.choice(len(iu), size=14 + pending, replace=False)
    pairs += [(int(iu[k]), int(ju[k])) for k in extra if (int(iu[k]), int(ju[k])) != (0, N - 1)]
    done, asked = pairs[: len(pairs) - pending], pairs[len(pairs) - pending :]
    return [
        PairHistory(IDS[a], IDS[b], "completed", "essay_a" if rng.random() < 0.5 else "essay_b")
        for a, b in done
    ] + [PairHistory(IDS[a], IDS[b], "pending") for a, b in asked]


def _fit(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return rng.normal(0.0, 1.0, N), rng.uniform(0.05, 0.4, N)


def _planner(history: list[PairHistory]) -> _Planner:
    return _Planner(IDS, {}, "FEDCBA", history, 2, N // 2, wave_rng("k", 3, 1), 1)


def _precision(theta: np.ndarray, prior: float, edges: list[tuple[int, int]]) -> np.ndarray:
    """H written out: σ'(θ_a − θ_b) per comparison on the Laplacian, plus the prior."""
    h = prior * np.eye(N)
    for a, b in edges:
        w = 0.25 / math.cosh(0.5 * (theta[a] - theta[b])) ** 2
        h[a, a] += w
        h[b, b] += w
        h[a, b] -= w
        h[b, a] -= w
    return h


def _expected_information(mu: float, d: float) -> float:
    s2 = 16.0 / (2.0 * math.pi)
    return 0.25 * math.sqrt(s2 / (s2 + d)) * math.exp(-(mu**2) / (2.0 * (s2 + d)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pending", [0, 1, 5])
@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [(np.float64, 1e-9), (np.float32, 1e-4)],  # the planner's two precisions (`_precision`)
)
def test_sigma_is_the_rescaled_fit_plus_the_pairs_in_flight(
    seed: int, pending: int, dtype: type[np.floating[Any]], rtol: float
) -> None:
    history = _history(seed, pending)
    theta, var = _fit(seed)
    at = {e: i for i, e in enumerate(IDS)}
    done = [(at[h.essay_a], at[h.essay_b]) for h in history if h.outcome == "completed"]
    asked = [(at[h.essay_a], at[h.essay_b]) for h in history if h.outcome == "pending"]
    prior = 1.0 / max(float(np.var(theta)) + float(np.mean(var)), 1e-2)
    sigma = np.linalg.inv(_precision(theta, prior, done))
    scale = np.sqrt(var / np.diag(sigma))
    sigma = sigma * np.outer(scale, scale)
    assert np.allclose(np.diag(sigma), var)  # the fit's variances
    precision = np.linalg.inv(sigma)
    for a, b in asked:
        d = sigma[a, a] + sigma[b, b] - 2.0 * sigma[a, b]
        info = _expected_information(theta[a] - theta[b], d)
        precision[[a, b], [a, b]] += info
        precision[a, b] -= info
        precision[b, a] -= info
    expected = np.linalg.inv(precision)
    ours = _planner(history)._sigma(theta, var, dtype).matrix()
    assert ours.dtype == dtype
    assert np.allclose(ours, expected, rtol=rtol, atol=rtol * 1e-3)
    if pending:  # each essay in flight is less uncertain than the fit says (it will be)
        busy = sorted({e for pair in asked for e in pair})
        assert np.all(np.diag(ours)[busy] < var[busy] - 1e-6)


def test_the_plan_sees_the_pairs_in_flight_by_either_history() -> None:
    """The same plan from the `PairHistory` list and from the arrays a decision passes."""
    history = _history(1, 5)
    theta, var = _fit(1)
    scores = {e: (float(theta[i]), math.sqrt(var[i])) for i, e in enumerate(IDS)}
    at = {e: i for i, e in enumerate(IDS)}
    a, b, live, pending, permanent = _history_arrays(at, history)
    indexed = IndexedHistory(IDS, a, b, live, pending, permanent, lambda: list(history))
    plans = [
        plan_wave(
            key="k",
            wave=3,
            seed=1,
            essay_ids=IDS,
            anchors={},
            grade_scale="FEDCBA",
            history=h,
            size=N // 2,
            scores=scores,
        )
        for h in (history, indexed)
    ]
    assert plans[0] == plans[1] and len(plans[0]) >= 3
