"""Bradley–Terry fit: recovery of θ and η, SE coverage, edge cases, SSR and split-half."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cj.scoring import Comparison, fit_bt, max_abs_delta, split_half, ssr


def simulate(
    n: int,
    m: int,
    *,
    spread: float = 1.5,
    eta: float = 0.3,
    seed: int = 0,
    balanced: bool = True,
) -> tuple[list[str], np.ndarray, list[Comparison]]:
    rng = np.random.default_rng(seed)
    ids = [f"e{i}" for i in range(n)]
    theta = rng.normal(0, spread, n)
    a = rng.integers(0, n, m)
    b = (a + rng.integers(1, n, m)) % n
    if balanced:
        # Random pairs, but half of them shown in the other order: A/B roughly balanced.
        flip = rng.random(m) < 0.5
        a, b = np.where(flip, b, a), np.where(flip, a, b)
    p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b] + eta)))
    y = rng.random(m) < p
    comps = [Comparison(ids[i], ids[j], bool(w)) for i, j, w in zip(a, b, y, strict=True)]
    return ids, theta - theta.mean(), comps


def test_recovers_known_theta_and_eta() -> None:
    ids, theta, comps = simulate(60, 6000, eta=0.3, seed=1)
    fit = fit_bt(ids, comps)
    est = np.array([fit.theta[e] for e in ids])
    assert fit.converged and fit.connected and fit.components == 1
    assert abs(est.mean()) < 1e-9
    assert np.corrcoef(est, theta)[0, 1] > 0.97
    assert float(np.max(np.abs(est - theta))) < 0.8
    assert fit.eta is not None and fit.eta_se is not None
    assert abs(fit.eta - 0.3) < 3 * fit.eta_se + 0.02
    assert 0.01 < fit.eta_se < 0.1


def test_negative_eta_and_no_position_term() -> None:
    ids, _, comps = simulate(40, 4000, eta=-0.5, seed=2)
    fit = fit_bt(ids, comps)
    assert fit.eta is not None and fit.eta < -0.3
    plain = fit_bt(ids, comps, fit_position=False)
    assert plain.eta is None and plain.eta_se is None
    # Without η the fit still ranks essays alike.
    a = np.array([fit.theta[e] for e in ids])
    b = np.array([plain.theta[e] for e in ids])
    assert np.corrcoef(a, b)[0, 1] > 0.99


@pytest.mark.parametrize(
    ("mode", "m"), [("fixed", 400), ("fixed", 200), ("empirical", 400), ("empirical", 200)]
)
def test_se_coverage_about_95_percent(mode: str, m: int) -> None:
    """Over many simulated batches, ~95 % of true (centred) θ lie within ±1.96 SE.

    2,000 intervals: sampling SD of the rate ≈ 0.5 %, so the band [0.925, 0.97]
    fails for SEs off by ±20 % (coverage ≈ 0.89 / 0.99)."""
    inside = 0
    total = 0
    for seed in range(50):
        ids, theta, comps = simulate(40, m, spread=1.5, seed=100 + seed)
        fit = fit_bt(ids, comps, prior_mode=mode)  # type: ignore[arg-type]
        est = np.array([fit.theta[e] for e in ids])
        se = np.array([fit.se[e] for e in ids])
        inside += int(np.sum(np.abs(est - theta) <= 1.96 * se))
        total += len(ids)
    rate = inside / total
    assert 0.925 <= rate <= 0.97, rate


def test_eta_se_coverage() -> None:
    inside = 0
    runs = 40
    for seed in range(runs):
        ids, _, comps = simulate(40, 800, eta=0.3, seed=500 + seed)
        fit = fit_bt(ids, comps)
        assert fit.eta is not None and fit.eta_se is not None
        inside += abs(fit.eta - 0.3) <= 1.96 * fit.eta_se
    assert inside >= 33  # ~95 % of 40; a wrong SE would drop well below


def test_all_wins_all_losses_and_uncompared_get_finite_scores_large_se() -> None:
    """With the small fixed prior of the spec (prior_mode="fixed")."""
    mids = [f"m{i}" for i in range(6)]
    ids = ["top", *mids, "bottom"]
    comps = []
    for rep in range(4):
        for i, x in enumerate(mids):
            for y in mids[i + 1 :]:
                comps.append(Comparison(x, y, (rep + i) % 2 == 0))
    for x in mids:
        comps.append(Comparison("top", x, True))
        comps.append(Comparison(x, "bottom", True))
    fit = fit_bt(ids, comps, prior_mode="fixed")
    for e in ids:
        assert math.isfinite(fit.theta[e]) and math.isfinite(fit.se[e])
    assert fit.theta["top"] > max(fit.theta[m] for m in mids) + 2
    assert fit.theta["bottom"] < min(fit.theta[m] for m in mids) - 2
    assert fit.theta["top"] < 20 and fit.theta["bottom"] > -20
    assert fit.se["top"] > 3 * fit.se["m0"]
    assert fit.se["bottom"] > 3 * fit.se["m0"]
    assert fit.connected and fit.converged
    # An essay without comparisons: finite, prior-sized SE, its own component.
    with_alone = fit_bt([*ids, "alone"], comps, prior_mode="fixed")
    assert with_alone.theta["alone"] == pytest.approx(0.0, abs=1e-6)
    assert with_alone.se["alone"] > 5 and math.isfinite(with_alone.se["alone"])
    assert not with_alone.connected and with_alone.components == 2


def test_empirical_prior_extremes_and_uncompared() -> None:
    """Default (empirical) prior: τ is estimated near the true spread; an essay that wins
    everything is on top with a larger SE than typical; an uncompared essay gets θ≈0 and
    an SE about τ, larger than any compared essay's."""
    ids, theta, comps = simulate(60, 1200, spread=1.5, seed=11)
    top = ids[int(np.argmax(theta))]
    extra = [Comparison("champion", e, True) for e in ids[:8]]
    fit = fit_bt([*ids, "champion", "alone"], comps + extra)
    assert fit.prior_sd is not None and 1.0 < fit.prior_sd < 2.2
    assert fit.theta["champion"] > float(np.quantile([fit.theta[e] for e in ids], 0.85))
    typical = float(np.median([fit.se[e] for e in ids]))
    assert fit.se["champion"] > 1.3 * typical
    assert abs(fit.theta["alone"]) < 0.1
    assert fit.se["alone"] > max(fit.se[e] for e in ids)
    assert fit.se["alone"] == pytest.approx(fit.prior_sd, rel=0.1)
    assert fit.theta[top] > 1.0
    assert fit.converged and fit.components == 2


def test_empirical_prior_on_pure_noise_finds_no_reliability() -> None:
    ids, _, comps = simulate(40, 800, spread=0.0, eta=0.0, seed=12)
    fit = fit_bt(ids, comps)
    assert fit.prior_sd is not None and fit.prior_sd < 1.2
    r = ssr(fit.theta, fit.se)
    assert r is not None and r < 0.3


def test_disconnected_components_reported() -> None:
    ids = ["a", "b", "c", "d"]
    comps = [Comparison("a", "b", True), Comparison("c", "d", False)] * 3
    fit = fit_bt(ids, comps)
    assert fit.components == 2 and not fit.connected


def test_bad_input_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        fit_bt(["a"], [Comparison("a", "b", True)])
    with pytest.raises(ValueError, match="itself"):
        fit_bt(["a", "b"], [Comparison("a", "a", True)])
    with pytest.raises(ValueError, match="duplicate"):
        fit_bt(["a", "a"], [])
    with pytest.raises(ValueError, match="prior"):
        fit_bt(["a", "b"], [], prior=0)


def test_empty_and_trivial() -> None:
    empty = fit_bt([], [])
    assert empty.theta == {} and not empty.connected
    one = fit_bt(["x"], [])
    assert one.theta == {"x": 0.0} and one.connected
    none = fit_bt(["x", "y"], [])
    assert none.theta == {"x": 0.0, "y": 0.0} and not none.connected


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 12),
    outcomes=st.lists(
        st.tuples(st.integers(0, 11), st.integers(0, 11), st.booleans()), max_size=60
    ),
    fit_position=st.booleans(),
)
def test_property_fit_is_finite_centred_and_order_free(
    n: int, outcomes: list[tuple[int, int, bool]], fit_position: bool
) -> None:
    ids = [f"e{i}" for i in range(n)]
    comps = [Comparison(ids[a % n], ids[b % n], w) for a, b, w in outcomes if a % n != b % n]
    fit = fit_bt(ids, comps, fit_position=fit_position)
    assert fit.converged
    assert all(math.isfinite(v) for v in fit.theta.values())
    assert all(math.isfinite(v) and v > 0 for v in fit.se.values())
    assert abs(sum(fit.theta.values())) < 1e-6
    again = fit_bt(list(reversed(ids)), list(reversed(comps)), fit_position=fit_position)
    for e in ids:
        assert abs(again.theta[e] - fit.theta[e]) < 1e-6
    # A winner beats a loser given the same opponents: swapping every outcome mirrors θ.
    mirrored = [Comparison(c.essay_a, c.essay_b, not c.winner_is_a) for c in comps]
    mir = fit_bt(ids, mirrored, fit_position=fit_position)
    for e in ids:
        assert abs(mir.theta[e] + fit.theta[e]) < 1e-5


def test_ssr_and_split_half() -> None:
    ids, _, comps = simulate(80, 4000, spread=1.5, seed=3)
    fit = fit_bt(ids, comps)
    r = ssr(fit.theta, fit.se)
    assert r is not None and 0.85 < r < 1.0
    sh = split_half(ids, comps, seed=1)
    assert sh is not None and 0.85 < sh < 1.0
    assert split_half(ids, comps, seed=1) == sh
    # Pure noise: no reliability.
    ids0, _, noise = simulate(80, 1600, spread=0.0, eta=0.0, seed=4)
    fit0 = fit_bt(ids0, noise)
    r0 = ssr(fit0.theta, fit0.se)
    assert r0 is not None and r0 < 0.45  # sampling SD of SSR here is ~0.15
    sh0 = split_half(ids0, noise, seed=1)
    assert sh0 is not None and sh0 < 0.5


def test_ssr_hand_computed_and_degenerate() -> None:
    theta = {"a": -1.0, "b": 0.0, "c": 1.0}
    se = {"a": 0.5, "b": 0.5, "c": 0.5}
    assert ssr(theta, se) == pytest.approx((1.0 - 0.25) / 1.0)
    assert ssr({"a": 0.0}, {"a": 1.0}) is None
    assert ssr({"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 1.0}) is None
    assert split_half(["a", "b"], [Comparison("a", "b", True)]) is None


def test_max_abs_delta() -> None:
    assert max_abs_delta({}, {"a": 1.0}) == math.inf
    assert max_abs_delta({"x": 1.0}, {"a": 1.0}) == math.inf
    assert max_abs_delta({"a": 1.0, "b": 0.0}, {"a": 1.5, "b": -0.7, "c": 9}) == pytest.approx(0.7)
