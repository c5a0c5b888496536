"""The variational fit's pieces against hand-computed cases: Σ kept as its lower triangle,
the linear response in log λ, the delta-method mixture, and that the fast search lands
where the slow one would (the mode's equation, the three-point integral)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cj import scoring
from cj.scoring import Comparison

# Σ of (θ_0, θ_1, θ_2, η), symmetric positive definite.
SIGMA = np.array(
    [
        [2.0, 0.5, 0.1, 0.2],
        [0.5, 1.0, 0.3, 0.1],
        [0.1, 0.3, 3.0, 0.4],
        [0.2, 0.1, 0.4, 0.5],
    ]
)


def test_pair_variances_and_products_read_the_lower_triangle() -> None:
    # Comparisons (0 vs 1) and (2 vs 0), with η: x_k = e_a − e_b + e_η.
    a = np.array([0, 2], dtype=np.intp)
    b = np.array([1, 0], dtype=np.intp)
    post = scoring._Posterior(3, a, b, np.array([1.0, 0.0]), fit_position=True)
    lower = np.tril(SIGMA)
    # (0, 1): Σ00 + Σ11 + Σηη − 2Σ01 + 2Σ0η − 2Σ1η = 2 + 1 + .5 − 1 + .4 − .2 = 2.7
    # (2, 0): Σ22 + Σ00 + Σηη − 2Σ20 + 2Σ2η − 2Σ0η = 3 + 2 + .5 − .2 + .8 − .4 = 5.7
    assert post.pair_variances(lower) == pytest.approx([2.7, 5.7])
    g = np.array([1.0, -2.0, 0.5, 3.0])
    assert scoring._symmetric_matvec(lower, g) == pytest.approx(SIGMA @ g)


def test_centred_variances_hand_computed() -> None:
    # θ_0 − mean = (θ_0 − θ_1)/2 for two essays: (.5 + .5 − 2·.1)/4 = .2 each.
    two = np.tril(np.array([[0.5, 0.1], [0.1, 0.5]]))
    assert scoring._centred_variances(two, 2) == pytest.approx([0.2, 0.2])
    # Independent θ with variances 1, 2, 3: θ_0 − mean = (2θ_0 − θ_1 − θ_2)/3 → (4 + 2 + 3)/9.
    three = np.diag([1.0, 2.0, 3.0])
    assert scoring._centred_variances(three, 3) == pytest.approx([9 / 9, 12 / 9, 15 / 9])


def _hand_mode() -> tuple[scoring._Variational, scoring._Response]:
    # Two essays and η; λ = 1 (u = 0).
    x = np.array([1.0, -1.0, 0.3])
    sigma = np.array([[0.5, 0.1, 0.0], [0.1, 0.5, 0.0], [0.0, 0.0, 0.04]])
    lower = np.tril(sigma)
    mode = scoring._Variational(x, lower, np.zeros(0), 0.0, 1, True)
    return mode, scoring._Response(x, lower, 2, 1.0)


def test_linear_response_hand_computed() -> None:
    _, response = _hand_mode()
    # dx/du = −Σ λ D x = −Σ (1, −1, 0) = −(.4, −.4, 0)
    assert response.dx == pytest.approx([-0.4, 0.4, 0.0])
    # S = |x_θ|² + tr Σ_θθ = 2 + 1; dS/du = 2 x_θ·dx_θ − λ‖Σ_θθ‖² = −1.6 − .52
    assert response.spread == pytest.approx(3.0)
    assert response.dspread == pytest.approx(-2.12)
    # L'' = −½ λ (S + dS/du) = −.44
    assert response.sd() == pytest.approx(1.0 / math.sqrt(0.44))
    # target = log((n − 1)/S) − u = −log 3; its slope −dS/du / S − 1 = −.29333: the Newton
    # step −3.745 is clamped to the longest step.
    assert response.target(0.0) == pytest.approx(-math.log(3.0))
    assert response.newton(0.0) == pytest.approx(-scoring._MAX_MODE_STEP)
    assert response.target(0.5) == pytest.approx(-math.log(3.0) - 0.5)


def test_delta_mixture_hand_computed() -> None:
    mode, response = _hand_mode()
    sd = 0.1
    mix = scoring._delta_mixture(0.0, mode, response, sd)
    assert mix.theta == pytest.approx([1.0, -1.0])
    # Var = centred Σ (.2) + sd² · (centred dx/du)² = .2 + .01 · .16
    assert mix.theta_var == pytest.approx([0.2016, 0.2016])
    assert mix.eta == pytest.approx(0.3)
    assert mix.eta_var == pytest.approx(0.04)  # dη/du = 0 here
    # E e^{−u} over the nodes 0 (⅔) and ±√3 sd (⅙ each).
    s = math.sqrt(3.0) * sd
    assert mix.tau2 == pytest.approx((4.0 + 2.0 * math.cosh(s)) / 6.0)


def _batch(n: int, per_essay: int, seed: int) -> scoring._Posterior:
    rng = np.random.default_rng(seed)
    ids = [f"e{i}" for i in range(n)]
    theta = rng.normal(0.0, 1.0, n)
    m = n * per_essay // 2
    a = rng.integers(0, n, m)
    b = (a + rng.integers(1, n, m)) % n
    y = rng.random(m) < 1.0 / (1.0 + np.exp(-(theta[a] - theta[b] + 0.4)))
    comps = [Comparison(ids[i], ids[j], bool(w)) for i, j, w in zip(a, b, y, strict=True)]
    ia, ib, yy = scoring._index_comparisons(ids, comps)
    return scoring._Posterior(n, ia, ib, yy, True)


@pytest.mark.parametrize(("n", "per_essay"), [(60, 8), (120, 30)])
def test_joint_search_lands_on_the_mode(n: int, per_essay: int) -> None:
    post = _batch(n, per_essay, seed=3)
    bounds = (math.log(0.01), math.log(1.0 / scoring._MIN_PRIOR_SD**2))
    solver = scoring._Solver(post, np.full(post.p, 0.01), 100, scoring._VARIATIONAL_TOL)
    u, settled = scoring._joint_mode(post, solver.lam, bounds, solver)
    assert settled
    q = solver.evaluate(u)
    response = scoring._Response(q.x, q.cov, n, math.exp(u))
    # At the mode λ E_q Σθ² = n − 1. The search stops when its next step is under a tenth
    # of u's posterior SD, and the target's slope lies in (−1, 0): |target| ≤ that step
    # (give or take what the final solve at u still moved).
    assert abs(response.target(u)) < 0.12 * response.sd()


def test_delta_method_matches_three_point_integration_where_narrow() -> None:
    post = _batch(250, 30, seed=5)
    bounds = (math.log(0.01), math.log(1.0 / scoring._MIN_PRIOR_SD**2))
    solver = scoring._Solver(post, np.full(post.p, 0.01), 100, scoring._VARIATIONAL_TOL)
    u, _ = scoring._joint_mode(post, solver.lam, bounds, solver)
    mode = solver.evaluate(u)
    response = scoring._Response(mode.x, mode.cov, post.n, math.exp(u))
    sd = response.sd()
    assert sd < scoring._NARROW_SD
    delta = scoring._delta_mixture(u, mode, response, sd)
    # The same integral with q solved at the Gauss–Hermite nodes.
    nodes = [(u, mode)]
    for k in (1.0, -1.0):
        node = u + k * math.sqrt(3.0) * sd
        solver.start(mode.x, mode.v)
        nodes.append((node, solver.evaluate(node)))
    full = scoring._mixture(nodes, np.array([4.0, 1.0, 1.0]), post.n)
    assert np.max(np.abs(delta.theta - full.theta)) < 0.01 * float(np.sqrt(full.theta_var).min())
    assert np.max(np.abs(delta.theta_var / full.theta_var - 1.0)) < 0.01
