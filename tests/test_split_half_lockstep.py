"""The split-half's halves solved together (`cj.scoring._Halves`, issue 11) give what one
`_newton` per half from the full fit's θ̂ gave (the code until then), deterministically."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from cj import scoring
from cj.scoring import Comparison, fit_bt, split_half
from tests.test_scoring import simulate


def _halves(m: int, splits: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(splits):
        order = rng.permutation(m)
        out += [order[: m // 2], order[m // 2 :]]
    return out


def _one_by_one(
    around: scoring._FullFit,
    ids: list[str],
    indexed: tuple[np.ndarray, np.ndarray, np.ndarray],
    halves: list[np.ndarray],
    fit_position: bool,
) -> np.ndarray:
    """The reference: each half's MAP by its own `_newton` from the full fit's θ̂."""
    n = len(ids)
    a, b, y = indexed
    rows = []
    for h in halves:
        post = scoring._Posterior(n, a[h], b[h], y[h], fit_position)
        lam = np.full(post.p, around.prior)
        lam[:n] = around.lam
        x0 = np.zeros(post.p)
        x0[:n] = around.start(ids)
        rows.append(scoring._newton(post, x0, lam, scoring._MAX_ITER, scoring._TOL).x[:n])
    return np.array(rows)


def _case(
    n: int, m: int, spread: float, seed: int, fit_position: bool = True
) -> tuple[list[str], list[Comparison], dict[str, tuple[float, float]]]:
    ids, _, comps = simulate(n, m, spread=spread, seed=seed)
    fit = fit_bt(ids, comps, fit_position=fit_position)
    return ids, comps, {e: (fit.theta[e], fit.se[e]) for e in ids}


@pytest.mark.parametrize(
    ("n", "m", "spread", "seed", "fit_position", "splits"),
    [
        (100, 1200, 1.0, 0, True, 20),
        (40, 240, 1.5, 2, True, 20),
        (30, 120, 0.5, 3, False, 20),
        (80, 1600, 0.0, 4, True, 20),
        (60, 3000, 2.0, 5, False, 20),
        (420, 2600, 1.0, 6, True, 2),  # above _DENSE_MAX: sparse Hessians, no shared steps
    ],
)
def test_halves_together_equal_one_newton_each(
    n: int, m: int, spread: float, seed: int, fit_position: bool, splits: int
) -> None:
    ids, comps, full = _case(n, m, spread, seed, fit_position)
    around = scoring._FullFit.of(full)
    indexed = scoring._index_comparisons(ids, comps)
    halves = _halves(len(comps), splits, seed)
    together = around.half_maps(ids, indexed, halves, fit_position)
    one_by_one = _one_by_one(around, ids, indexed, halves, fit_position)
    # Both are the same optimum to Newton's tolerance (measured: within 2e-5).
    assert np.max(np.abs(together - one_by_one)) < 1e-4
    assert np.array_equal(around.half_maps(ids, indexed, halves, fit_position), together)


def test_split_half_from_the_full_fit_is_deterministic_and_as_before() -> None:
    """The split-half's r and its Spearman–Brown value as the one-by-one halves give them
    (measured: within 1e-7), the same on every call, by comparisons and by judges."""
    ids, comps, full = _case(100, 1200, 1.0, 7)
    judged = [msgspec.structs.replace(c, judge=f"j{k % 5}") for k, c in enumerate(comps)]
    for batch in (comps, judged):
        out = split_half(ids, batch, seed=3, full=full)
        assert out == split_half(ids, batch, seed=3, full=full)
        around = scoring._FullFit.of(full)
        indexed = scoring._index_comparisons(ids, batch)
        if out.unit == "judge":
            judges = sorted({c.judge for c in batch})
            rng = np.random.default_rng(3)
            halves = []
            for g in scoring._judge_splits(judges, 20, rng):
                inside = np.array([c.judge in g for c in batch], dtype=bool)
                halves += [np.flatnonzero(inside), np.flatnonzero(~inside)]
        else:
            halves = _halves(len(batch), 20, 3)
        thetas = _one_by_one(around, ids, indexed, halves, True)
        rs = []
        for k in range(0, len(halves), 2):
            pair = (halves[k], halves[k + 1])
            both = scoring._compared_in_both(len(ids), indexed[0], indexed[1], pair)
            assert both is not None
            rs.append(float(np.corrcoef(thetas[k][both], thetas[k + 1][both])[0, 1]))
        assert out.r is not None and abs(out.r - float(np.mean(rs))) < 1e-6
        assert out.splits == len(rs)
