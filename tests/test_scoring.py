"""Bradley–Terry fit: recovery of θ and η, SE coverage, edge cases, and the reliabilities."""

from __future__ import annotations

import dataclasses
import math

import msgspec
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from cj.scoring import (
    Comparison,
    FitResult,
    classical_ssr,
    fit_bt,
    max_abs_delta,
    posterior_reliability,
    rank_agreement,
    score_wave,
    spearman_brown,
    split_half,
    ssr,
)


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
    r = posterior_reliability(fit).value
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
    # The fit is iterative (variational rounds to 1e-4, grid points to 1e-3): another order
    # of the same data sums in another order and may take another path to the optimum.
    again = fit_bt(list(reversed(ids)), list(reversed(comps)), fit_position=fit_position)
    for e in ids:
        assert abs(again.theta[e] - fit.theta[e]) < 1e-4
    # A winner beats a loser given the same opponents: swapping every outcome mirrors θ.
    mirrored = [Comparison(c.essay_a, c.essay_b, not c.winner_is_a) for c in comps]
    mir = fit_bt(ids, mirrored, fit_position=fit_position)
    for e in ids:
        assert abs(mir.theta[e] + fit.theta[e]) < 1e-4


def test_reliabilities_on_a_well_measured_batch_and_on_noise() -> None:
    ids, _, comps = simulate(80, 4000, spread=1.5, seed=3)
    fit = fit_bt(ids, comps)
    r = posterior_reliability(fit).value
    assert r is not None and 0.85 < r < 1.0
    c = classical_ssr(ids, comps).value
    assert c is not None and 0.85 < c < 1.0
    sh = split_half(ids, comps, seed=1, splits=4)
    assert sh.r is not None and sh.spearman_brown is not None and 0.85 < sh.spearman_brown < 1.0
    assert sh.splits == 4 and sh.unit == "comparison"
    assert split_half(ids, comps, seed=1, splits=4) == sh
    # Pure noise: no reliability.
    ids0, _, noise = simulate(80, 1600, spread=0.0, eta=0.0, seed=4)
    r0 = posterior_reliability(fit_bt(ids0, noise)).value
    assert r0 is not None and r0 < 0.35
    sh0 = split_half(ids0, noise, seed=1, splits=4)
    assert sh0.spearman_brown is not None and sh0.spearman_brown < 0.5


def test_posterior_reliability_tracks_the_true_squared_correlation() -> None:
    """R = var θ̂ / (var θ̂ + mean SE²) estimates corr(θ̂, θ)² for posterior means: over
    30 random batches of 12 comparisons per essay the mean gap stays within ±0.05 (the
    MAP-based SSR, 2 − 1/R, falls ~0.2 below)."""
    gaps, ssr_gaps = [], []
    for seed in range(30):
        ids, theta, comps = simulate(60, 360, spread=1.0, seed=700 + seed)
        fit = fit_bt(ids, comps)
        est = np.array([fit.theta[e] for e in ids])
        r2 = float(np.corrcoef(est, theta)[0, 1] ** 2)
        r = posterior_reliability(fit).value
        assert r is not None
        gaps.append(r - r2)
        ssr_gaps.append((ssr(fit.theta, fit.se) or 0.0) - r2)
    assert abs(float(np.mean(gaps))) < 0.05, np.mean(gaps)
    assert float(np.mean(ssr_gaps)) < -0.1


def test_posterior_reliability_hand_computed_and_not_applicable() -> None:
    fit = FitResult(
        theta={"a": -1.0, "b": 0.0, "c": 1.0},
        se={"a": 0.5, "b": 0.5, "c": 0.5},
        eta=None,
        eta_se=None,
        connected=True,
        components=1,
        converged=True,
        iterations=1,
        n_comparisons=3,
    )
    # var θ̂ = 2/3 (population), mean SE² = 1/4.
    assert posterior_reliability(fit).value == pytest.approx((2 / 3) / (2 / 3 + 0.25))
    two = FitResult({"a": 1.0, "b": -1.0}, {"a": 1.0, "b": 1.0}, None, None, True, 1, True, 1, 1)
    assert posterior_reliability(two).value is None
    assert "at least 3" in posterior_reliability(two).reason
    fresh = dataclasses.replace(fit, n_comparisons=0)
    assert posterior_reliability(fresh).reason == "no comparisons yet"
    split = dataclasses.replace(fit, connected=False, components=2)
    assert "not connected (2 components)" in posterior_reliability(split).reason


def test_classical_ssr_leaves_extreme_essays_out_and_says_why_when_it_cannot() -> None:
    ids = ["top", "a", "b", "c", "d"]
    comps = [Comparison("top", x, True) for x in "abcd"]
    comps += [Comparison("a", "b", True), Comparison("b", "c", True), Comparison("c", "a", True)]
    comps += [Comparison("c", "d", False), Comparison("d", "b", False), Comparison("a", "d", False)]
    got = classical_ssr(ids, comps)
    fixed = fit_bt(ids, comps, prior_mode="fixed")
    inner = ["a", "b", "c", "d"]
    want = ssr({e: fixed.theta[e] for e in inner}, {e: fixed.se[e] for e in inner})
    assert want is not None
    assert got.value == (want if want >= 0 else None)
    if want < 0:
        assert "SSR < 0" in got.reason
    # Only extreme essays (a strict order, two essays each winning or losing all): n/a.
    chain = [Comparison("a", "b", True), Comparison("c", "d", True)]
    none = classical_ssr(["a", "b", "c", "d"], chain)
    assert none.value is None and "both a win and a loss" in none.reason


def test_spearman_brown_and_rank_agreement_hand_computed() -> None:
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    assert spearman_brown(0.6, factor=3) == pytest.approx(1.8 / 2.2)
    assert rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 3, "c": 2}) == pytest.approx(0.5)
    assert rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30, "x": 0}) == 1.0
    assert rank_agreement({"a": 1, "b": 2}, {"a": 1, "b": 2}) is None


def test_a_waves_scoring_is_the_fit_and_its_reliabilities_called_apart() -> None:
    # Indexed once for both fits: not a digit may differ from the three calls.
    for n, m, seed in ((30, 200, 11), (8, 6, 12)):
        ids, _, comps = simulate(n, m, seed=seed)
        wave = score_wave(ids, comps)
        fit = fit_bt(ids, comps)
        assert wave.fit == fit
        assert wave.posterior == posterior_reliability(fit)
        assert wave.classical == classical_ssr(ids, comps)
    disconnected = [Comparison("a", "b", True), Comparison("b", "a", True)]
    wave = score_wave(["a", "b", "c", "d"], disconnected)
    assert wave.fit.components == 3
    assert wave.classical is not None and wave.classical.value is None


def test_rank_agreement_is_spearmans_rho_with_tied_ranks_averaged() -> None:
    rng = np.random.default_rng(3)
    for k in range(50):
        n = int(rng.integers(3, 40))
        # Every other draw from a few values: ties, as essays never compared share θ = 0.
        draw = [rng.integers(0, 4, n).astype(float) if k % 2 else rng.normal(size=n) for _ in "ab"]
        previous = {f"e{i}": float(v) for i, v in enumerate(draw[0])}
        current = {f"e{i}": float(v) for i, v in enumerate(draw[1])}
        rho = scipy.stats.spearmanr(draw[0], draw[1]).statistic
        got = rank_agreement(previous, current)
        if math.isnan(rho):  # a constant side
            assert got is None
        else:
            assert got == pytest.approx(rho, abs=1e-12)


def test_split_half_by_judge_uses_every_distinct_split_of_few_judges() -> None:
    ids, _, comps = simulate(30, 600, spread=1.5, seed=5)

    def with_judges(k: int) -> list[Comparison]:
        return [msgspec.structs.replace(c, judge=f"mock/m{i % k}") for i, c in enumerate(comps)]

    two = split_half(ids, with_judges(2))
    assert (two.unit, two.splits) == ("judge", 1)
    assert two.r is not None and two.spearman_brown == pytest.approx(spearman_brown(two.r))
    assert split_half(ids, with_judges(4)).splits == 3  # {1,2}{3,4} {1,3}{2,4} {1,4}{2,3}
    assert split_half(ids, with_judges(5)).splits == 10  # C(5,2)
    assert split_half(ids, with_judges(10), splits=20).splits == 20
    one = split_half(ids, comps, splits=25)
    assert (one.unit, one.splits) == ("comparison", 25)


def test_split_half_not_applicable_on_tiny_batches() -> None:
    tiny = split_half(["a", "b"], [Comparison("a", "b", True)])
    assert tiny.r is None and tiny.spearman_brown is None and "too few" in tiny.reason
    four = split_half(["a", "b", "c", "d"], [Comparison("a", "b", True)] * 12)
    assert four.r is None and "too few" in four.reason
    # Six essays and ten comparisons, but e4 and e5 meet once: never in both halves.
    ids = [f"e{i}" for i in range(6)]
    sparse = [Comparison("e0", "e1", True), Comparison("e2", "e3", False)] * 4
    sparse += [Comparison("e4", "e5", True), Comparison("e0", "e2", True)]
    out = split_half(ids, sparse)
    assert out.r is None and "both halves of most splits" in out.reason


def test_max_abs_delta() -> None:
    assert max_abs_delta({}, {"a": 1.0}) == math.inf
    assert max_abs_delta({"x": 1.0}, {"a": 1.0}) == math.inf
    assert max_abs_delta({"a": 1.0, "b": 0.0}, {"a": 1.5, "b": -0.7, "c": 9}) == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("n", "m", "spread", "seed"),
    [
        (100, 600, 1.0, 0),
        (40, 240, 1.5, 2),
        (30, 120, 0.5, 3),
        (80, 1600, 0.0, 4),
        (60, 3000, 2.0, 5),
    ],
)
def test_split_half_from_the_full_fit_agrees_with_variational_halves(
    n: int, m: int, spread: float, seed: int
) -> None:
    """The batch's last scores take each half as a MAP at the full fit's τ, started from its
    θ (issue 11: a fifth of the CPU); r stays within 0.01 of fitting each half as reported
    (variational, its own τ), from weak to strong batches and on pure noise (measured: within
    0.004)."""
    ids, _, comps = simulate(n, m, spread=spread, seed=seed)
    fit = fit_bt(ids, comps)
    full = {e: (fit.theta[e], fit.se[e]) for e in ids}
    reference = split_half(ids, comps, seed=seed)
    cheap = split_half(ids, comps, seed=seed, full=full)
    assert reference.r is not None and cheap.r is not None
    assert abs(cheap.r - reference.r) < 0.01
    assert cheap.splits == reference.splits == 20 and cheap.unit == reference.unit


def test_split_half_by_judges_from_the_full_fit_agrees_too() -> None:
    ids, _, comps = simulate(60, 1200, spread=1.0, seed=9)
    comps = [msgspec.structs.replace(c, judge=f"j{k % 5}") for k, c in enumerate(comps)]
    fit = fit_bt(ids, comps)
    full = {e: (fit.theta[e], fit.se[e]) for e in ids}
    reference = split_half(ids, comps, seed=1)
    cheap = split_half(ids, comps, seed=1, full=full)
    assert reference.r is not None and cheap.r is not None
    assert abs(cheap.r - reference.r) < 0.01 and cheap.splits == reference.splits == 10
