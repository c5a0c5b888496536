"""Bradley–Terry scoring with a position term, standard errors and reliabilities.

Model: P(essay_a wins) = σ(θ_a − θ_b + η), where η is the judge's bias towards
the essay shown first (in logits). The fit is a MAP estimate with Gaussian
priors, computed by damped Newton steps on the (concave) log posterior: a dense
Cholesky solve for up to 400 parameters, preconditioned sparse CG above.

Priors: η ~ N(0, 1/prior). For θ, ``prior_mode="fixed"`` uses N(0, 1/prior)
(a small L2 prior: essentially maximum likelihood), and ``prior_mode="empirical"``
(the default) uses N(0, τ²) with τ estimated from the data: the evidence
(type-II ML, Laplace) fixed point of MacKay, with a weak Gamma hyperprior
against collapse, then weakened because the Laplace evidence underestimates τ
for binary data, the more so the less information each essay has
(``_prior_deflation``; calibrated so that E[θ | θ̂] ≈ θ̂ and ±1.96 SE covers
~95 % in simulation). Why not plain ML: with adaptive pairing (close θ) or few
comparisons per essay, ML estimates of θ spread several times wider than the
truth, η is inflated, and ±1.96 SE covers well under half of the true θ
(bench/quality.py); the empirical prior fixes all three.

Standard errors come from the inverse of the negative Hessian of the log
posterior at the optimum (Fisher information plus the prior), for the centred
scores (mean θ = 0), so they do not include the arbitrary location of the
scale. Essays without comparisons, or that always win or always lose, get
finite scores (held by the prior) and large standard errors.

Reliabilities (formulas and sources in docs/statistics.md):
* ``posterior_reliability``: R = var θ̂ / (var θ̂ + mean SE²) of the reported fit —
  the EAP/posterior reliability, an estimate of the squared correlation between
  θ̂ and the true θ. The headline figure.
* ``classical_ssr``: (var θ̂ − mean SE²) / var θ̂ on a near-ML fit (non-extreme
  essays), as in the CJ literature; adaptive pairing inflates it.
* ``split_half``: mean over random splits (of comparisons, or of judges) of the
  correlation between the two halves' fits, with its Spearman–Brown value;
  adaptive pairing deflates it.
Each returns no number, but a reason, when the batch cannot support one.

All functions are pure: no I/O.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.linalg.lapack
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats
from scipy.sparse.csgraph import connected_components

FloatArray = npt.NDArray[np.float64]
_MIN_PRIOR_SD = 0.1  # empirical τ never below this (pure noise would drive it to 0)
_DEFLATION_K = 3.2  # see _prior_deflation
_TAU_SHAPE = 2.0  # Gamma hyperprior on the θ prior precision (empirical mode)
_TAU_RATE = 0.5
_MAX_EXACT_ROUNDS = 20  # exact-variance corrections of the τ fixed point (1–2 typical)
_DENSE_MAX = 400  # above this many parameters, Newton steps use sparse CG
IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class Comparison:
    essay_a: str
    essay_b: str
    winner_is_a: bool
    judge: str = ""  # provider/model, for split-half by judge


@dataclass(frozen=True)
class FitResult:
    theta: dict[str, float]  # centred (mean 0 over essays)
    se: dict[str, float]
    eta: float | None  # position bias (logits) when fitted
    eta_se: float | None
    connected: bool
    components: int
    converged: bool
    iterations: int
    n_comparisons: int = 0
    log_posterior: float = 0.0
    prior_sd: float | None = None  # τ of the θ prior N(0, τ²) when estimated (empirical mode)


def _index_comparisons(
    ids: Sequence[str], comparisons: Sequence[Comparison]
) -> tuple[IntArray, IntArray, FloatArray]:
    index = {e: i for i, e in enumerate(ids)}
    m = len(comparisons)
    a = np.empty(m, dtype=np.intp)
    b = np.empty(m, dtype=np.intp)
    y = np.empty(m, dtype=np.float64)
    for k, c in enumerate(comparisons):
        try:
            a[k] = index[c.essay_a]
            b[k] = index[c.essay_b]
        except KeyError as exc:
            raise ValueError(f"comparison refers to an unknown essay: {exc.args[0]!r}") from None
        if a[k] == b[k]:
            raise ValueError(f"comparison of essay {c.essay_a!r} with itself")
        y[k] = 1.0 if c.winner_is_a else 0.0
    return a, b, y


def _unique_ids(essay_ids: Sequence[str]) -> list[str]:
    ids = list(essay_ids)
    if len(set(ids)) != len(ids):
        dups = sorted(e for e, k in Counter(ids).items() if k > 1)
        raise ValueError(f"duplicate essay ids: {', '.join(dups[:5])}")
    return ids


def count_components(n: int, a: IntArray, b: IntArray) -> int:
    """Connected components of the undirected comparison graph on n essays."""
    if n == 0:
        return 0
    graph = scipy.sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)).tocsr()
    k, _ = connected_components(graph, directed=False)
    return int(k)


class _Posterior:
    """The log posterior of the model, its gradient and its negative Hessian.

    Parameters x = (θ_1 … θ_n[, η]); comparison k has winner indicator y_k and
    linear predictor z_k = θ_a − θ_b (+ η), i.e. z = X x with one +1 and one −1
    per row of X (and a 1 in the η column). With p = σ(z) and precisions λ:

        log posterior  ℓ(x) = Σ_k [y_k z_k − log(1 + e^{z_k})] − ½ Σ_j λ_j x_j²
        gradient       g    = Xᵀ (y − p) − λ ∘ x
        −Hessian       H    = Xᵀ W X + diag(λ),  W = diag(p (1 − p))

    H is assembled by scattering each comparison's four (nine with η) entries
    into flat indices computed once: dense for up to ``_DENSE_MAX`` parameters,
    a CSR matrix with a fixed sparsity pattern above.
    """

    def __init__(self, n: int, a: IntArray, b: IntArray, y: FloatArray, fit_position: bool):
        self.n, self.a, self.b, self.y = n, a, b, y
        self.fit_position = fit_position
        self.p = p = n + 1 if fit_position else n
        m = len(y)
        parts = [a * p + a, b * p + b, a * p + b, b * p + a]
        if fit_position:
            ee = np.full(m, n * p + n, dtype=np.intp)
            parts += [a * p + n, n * p + a, b * p + n, n * p + b, ee]
        self.flat = np.concatenate(parts)
        self.diag_idx = np.arange(p) * (p + 1)
        self.sparse = p > _DENSE_MAX
        if self.sparse:
            # CSR pattern of the Hessian (row-major order of the flat indices), computed once.
            uniq, inverse = np.unique(
                np.concatenate([self.flat, self.diag_idx]), return_inverse=True
            )
            self.uniq = uniq
            self.inverse = inverse[: len(self.flat)]
            self.csr_indices = (uniq % p).astype(np.int32)
            self.csr_indptr = np.concatenate([[0], np.cumsum(np.bincount(uniq // p, minlength=p))])
            self.diag_pos = np.searchsorted(uniq, self.diag_idx)

    def linear(self, x: FloatArray) -> FloatArray:
        z = x[self.a] - x[self.b]
        if self.fit_position:
            z = z + x[self.n]
        return z

    def value(self, x: FloatArray, z: FloatArray, lam: FloatArray) -> float:
        ll = float(np.sum(self.y * z - np.logaddexp(0.0, z)))
        return ll - 0.5 * float(lam @ (x * x))

    def gradient_hessian(
        self, x: FloatArray, z: FloatArray, lam: FloatArray
    ) -> tuple[FloatArray, _Hessian]:
        a, b, n, p = self.a, self.b, self.n, self.p
        pr = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), overflow-free
        r = self.y - pr
        w = pr * (1.0 - pr)
        g: FloatArray = np.asarray(np.bincount(a, weights=r, minlength=p), dtype=np.float64)
        g -= np.bincount(b, weights=r, minlength=p)
        if self.fit_position:
            g[n] += float(r.sum())
            weights = np.concatenate([w, w, -w, -w, w, w, -w, -w, w])
        else:
            weights = np.concatenate([w, w, -w, -w])
        g -= lam * x
        if self.sparse:
            data: FloatArray = np.asarray(
                np.bincount(self.inverse, weights=weights, minlength=len(self.uniq)),
                dtype=np.float64,
            )
            data[self.diag_pos] += lam
            hs = scipy.sparse.csr_matrix((data, self.csr_indices, self.csr_indptr), shape=(p, p))
            return g, _Hessian(None, hs, data[self.diag_pos])
        h: FloatArray = np.asarray(
            np.bincount(self.flat, weights=weights, minlength=p * p), dtype=np.float64
        )
        h[self.diag_idx] += lam
        return g, _Hessian(h.reshape(p, p), None, h[self.diag_idx])

    def hessian(self, x: FloatArray, lam: FloatArray) -> _Hessian:
        return self.gradient_hessian(x, self.linear(x), lam)[1]


@dataclass
class _Optimum:
    x: FloatArray
    value: float
    iterations: int
    converged: bool


def _newton(
    post: _Posterior, x: FloatArray, lam: FloatArray, max_iter: int, tol: float
) -> _Optimum:
    """Maximise the (concave) log posterior by Newton steps with backtracking."""
    z = post.linear(x)
    obj = post.value(x, z, lam)
    for it in range(1, max_iter + 1):
        g, h = post.gradient_hessian(x, z, lam)
        step = h.solve(g)
        if float(g @ step) < 2 * tol:
            return _Optimum(x, obj, it, True)
        t = 1.0
        while True:
            cand = x + t * step
            zc = post.linear(cand)
            oc = post.value(cand, zc, lam)
            if oc >= obj - 1e-12 * abs(obj) or t < 1e-8:
                break
            t *= 0.5
        x, z, obj = cand, zc, oc
        if float(np.max(np.abs(t * step))) < 1e-10:
            return _Optimum(x, obj, it, True)
    return _Optimum(x, obj, max_iter, False)


def _evidence_log_precision(
    post: _Posterior, lam: FloatArray, prior: float, max_iter: int, tol: float
) -> tuple[float, _Optimum]:
    """log λ of the θ prior at MacKay's evidence (type-II ML, Laplace) fixed point.

    λ = γ / Σθ², γ = Σ(1 − λ·var_i), solved for log λ by a safeguarded secant method;
    each evaluation refits θ (warm start) and uses the cheap var_i ≈ ratio_i / H_ii,
    and an exact inverse of H then corrects the ratio until both agree. Returns the
    last optimum too (its iterations summed, converged only if the fixed point settled).
    """
    n = post.n
    x_lo, x_hi = math.log(prior), math.log(1.0 / _MIN_PRIOR_SD**2)
    ratio = np.ones(n)
    state = _Optimum(np.zeros(post.p), 0.0, 0, True)
    h_last = post.hessian(state.x, lam)

    def target(xlog: float) -> float:
        nonlocal state, h_last
        lam[:n] = math.exp(xlog)
        opt = _newton(post, state.x, lam, max_iter, tol)
        state = _Optimum(
            opt.x, opt.value, state.iterations + opt.iterations, state.converged and opt.converged
        )
        h_last = post.hessian(state.x, lam)
        var = ratio / h_last.diag[:n]
        return math.log(_evidence_precision(lam[0], var, state.x[:n])) - xlog

    xlog = 0.0
    settled = False
    for _ in range(_MAX_EXACT_ROUNDS):
        xlog, found = _solve_log_precision(target, xlog, x_lo, x_hi)
        if not found:
            break
        # The same fixed point with the exact variances: done when it agrees.
        exact = _covariance(h_last.dense(), n).diag[:n]
        fixed_point = math.log(_evidence_precision(lam[0], exact, state.x[:n]))
        at_bound = xlog <= x_lo + 1e-9 or xlog >= x_hi - 1e-9
        if at_bound or abs(fixed_point - xlog) < 0.01:
            settled = True
            break
        ratio = exact * h_last.diag[:n]
    state.converged = state.converged and settled
    return xlog, state


def _random_pair_information(per_essay: float, tau2: float) -> float:
    """Fisher information per essay from ``per_essay`` comparisons with random opponents
    when θ ~ N(0, τ²): c·E[σ'(d)], d ~ N(0, 2τ²), with σ' taken as the Gaussian of the
    same peak and mass. Counted this way, not at the fitted θ, so that a design that
    pairs close essays gets no stronger a prior for the same number of comparisons."""
    s2 = 16.0 / (2.0 * math.pi)
    return per_essay * 0.25 * math.sqrt(s2 / (s2 + 2.0 * tau2))


def _prior_deflation(mean_information: float, evidence_var: float) -> float:
    """Factor (0, 1) on the evidence optimum of the θ prior precision: I / (I + k·τ²·(1 + 1/I)).

    The Laplace (PQL-like) evidence underestimates τ² for binary data, the more so the
    larger τ² and the less information I each essay has (Breslow & Lin 1995); this
    weakens the prior accordingly. k was calibrated by simulation (bench/quality.py:
    quality SD 0.6–1.6, 6–36 comparisons per essay, random and adaptive pairs) so that
    E[θ | θ̂] ≈ θ̂, ±1.96 SE covers ~95 % and R tracks the true r²."""
    info = max(mean_information, 1e-12)
    return info / (info + _DEFLATION_K * evidence_var * (1.0 + 1.0 / info))


def fit_bt(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    fit_position: bool = True,
    prior: float = 0.01,
    prior_mode: Literal["empirical", "fixed"] = "empirical",
    max_iter: int = 100,
    tol: float = 1e-10,
) -> FitResult:
    """MAP Bradley–Terry fit with optional position bias η; see the module docstring.

    ``prior`` is the precision of the L2 prior on η and, with ``prior_mode="fixed"``,
    on every θ. With ``prior_mode="empirical"`` (the default) the θ prior is
    N(0, τ²) with τ estimated from the data (MacKay's evidence fixed point), never
    weaker than ``prior``: without it sparse or adaptive designs inflate the scale
    of θ (and η) several-fold and the SEs lose their coverage.

    Raises ValueError for duplicate essay ids, unknown essays or self-comparisons,
    and for a non-positive prior (the prior keeps every score finite).
    """
    if not prior > 0:
        raise ValueError("prior must be > 0")
    if prior_mode not in ("empirical", "fixed"):
        raise ValueError(f"unknown prior_mode {prior_mode!r}")
    ids = _unique_ids(essay_ids)
    n = len(ids)
    a, b, y = _index_comparisons(ids, comparisons)
    m = len(y)
    components = count_components(n, a, b)
    if n == 0:
        return FitResult({}, {}, None, None, False, 0, True, 0, m)
    post = _Posterior(n, a, b, y, fit_position)
    lam = np.full(post.p, prior)
    tau: float | None = None
    if prior_mode == "empirical":
        xlog, found = _evidence_log_precision(post, lam, prior, max_iter, tol)
        # The Laplace evidence underestimates τ for binary data: use a weaker prior than
        # its optimum, by how much depending on the data per essay.
        tau2 = math.exp(-xlog)
        deflation = _prior_deflation(_random_pair_information(2.0 * m / n, tau2), tau2)
        xlog = max(xlog + math.log(max(deflation, 1e-300)), math.log(prior))
        lam[:n] = math.exp(xlog)
        opt = _newton(post, found.x, lam, max_iter, tol)
        opt.iterations += found.iterations
        opt.converged = opt.converged and found.converged
        tau = math.exp(-0.5 * xlog)
    else:
        opt = _newton(post, np.zeros(post.p), lam, max_iter, tol)
    cov = _covariance(post.hessian(opt.x, lam).dense(), n)
    se_arr = np.sqrt(np.maximum(cov.centred_theta_var, 0.0))
    theta_arr = opt.x[:n] - opt.x[:n].mean()
    return FitResult(
        theta={e: float(theta_arr[i]) for i, e in enumerate(ids)},
        se={e: float(se_arr[i]) for i, e in enumerate(ids)},
        eta=float(opt.x[n]) if fit_position else None,
        eta_se=float(math.sqrt(max(cov.diag[n], 0.0))) if fit_position else None,
        connected=components == 1,
        components=components,
        converged=opt.converged,
        iterations=opt.iterations,
        n_comparisons=m,
        log_posterior=opt.value,
        prior_sd=tau,
    )


def _evidence_precision(lam: float, var: FloatArray, theta: FloatArray) -> float:
    """MacKay's update of the θ prior precision, with a Gamma(a, b) hyperprior on it:
    λ = (γ + 2(a − 1)) / (Σθ² + 2b), γ = Σ(1 − λ·var_i). The weak hyperprior (mode
    λ = 2, τ ≈ 0.7) keeps sparse data from collapsing τ towards 0."""
    gamma = float(np.sum(1.0 - lam * var))
    ss = float(theta @ theta)
    return max(gamma + 2.0 * (_TAU_SHAPE - 1.0), 1e-12) / (ss + 2.0 * _TAU_RATE)


def _solve_log_precision(
    target: Callable[[float], float], x0: float, lo_bound: float, hi_bound: float
) -> tuple[float, bool]:
    """Root of target(x) (decreasing through 0) in [lo_bound, hi_bound]; a bound is the
    answer when the root lies beyond it. Secant steps, kept inside the known bracket."""
    lo, hi = lo_bound, hi_bound
    have_lo = have_hi = False
    x_prev: float | None = None
    g_prev = 0.0
    x = min(max(x0, lo_bound), hi_bound)
    for _ in range(60):
        g = target(x)
        if abs(g) < 1e-3:
            return x, True
        if g > 0:
            lo, have_lo = x, True
            if x >= hi_bound:
                return x, True
        else:
            hi, have_hi = x, True
            if x <= lo_bound:
                return x, True
        if x_prev is not None and g != g_prev:  # noqa: SIM108
            nxt = x - g * (x - x_prev) / (g - g_prev)  # secant
        else:
            nxt = x + g  # plain fixed-point step
        # The root lies above x when g > 0, below when g < 0: never step the wrong way.
        if g > 0 and not nxt > x:
            nxt = x + min(max(g, 0.5), 3.0)
        elif g < 0 and not nxt < x:
            nxt = x + max(min(g, -0.5), -3.0)
        nxt = min(max(nxt, x - 3.0), x + 3.0)
        if have_lo and have_hi:
            if not lo < nxt < hi:
                nxt = 0.5 * (lo + hi)
        else:
            nxt = min(max(nxt, lo_bound), hi_bound)
        x_prev, g_prev = x, g
        x = nxt
    return x, False


@dataclass
class _Hessian:
    """Negative Hessian of the log posterior: dense (small problems) or sparse CSR."""

    full: FloatArray | None
    sparse: scipy.sparse.csr_matrix | None
    diag: FloatArray

    def solve(self, g: FloatArray) -> FloatArray:
        if self.full is not None:
            return np.asarray(
                scipy.linalg.cho_solve(scipy.linalg.cho_factor(self.full, lower=True), g),
                dtype=np.float64,
            )
        assert self.sparse is not None
        precond = scipy.sparse.diags(1.0 / self.diag)
        step, _ = scipy.sparse.linalg.cg(
            self.sparse, g, M=precond, rtol=1e-12, atol=0.0, maxiter=10 * len(g)
        )
        return np.asarray(step, dtype=np.float64)

    def dense(self) -> FloatArray:
        if self.full is not None:
            return self.full
        assert self.sparse is not None
        return np.asarray(self.sparse.toarray(), dtype=np.float64)


@dataclass
class _Covariance:
    diag: FloatArray  # posterior variances of every parameter
    centred_theta_var: FloatArray  # variances of θ_i − mean(θ)


def _covariance(h: FloatArray, n: int) -> _Covariance:
    """What the SEs need of H⁻¹ (H symmetric positive definite), from its Cholesky factor."""
    c, info = scipy.linalg.lapack.dpotrf(h, lower=1, clean=1)
    if info != 0:  # pragma: no cover - the prior keeps h positive definite
        raise np.linalg.LinAlgError("Hessian not positive definite")
    inv, info = scipy.linalg.lapack.dpotri(c, lower=1)  # lower triangle of H⁻¹, zeros above
    if info != 0:  # pragma: no cover
        raise np.linalg.LinAlgError("Hessian not invertible")
    diag = np.asarray(np.diag(inv), dtype=np.float64).copy()
    block = inv[:n, :n]
    row_sum = block.sum(axis=1) + block.sum(axis=0) - diag[:n]
    row_mean = row_sum / n
    centred = diag[:n] - 2.0 * row_mean + row_mean.mean()
    return _Covariance(diag, np.asarray(centred, dtype=np.float64))


@dataclass(frozen=True)
class Reliability:
    """A reliability coefficient, or None and the reason there is none."""

    value: float | None
    reason: str = ""


@dataclass(frozen=True)
class SplitHalf:
    """Split-half reliability: the mean correlation r of the halves' θ over ``splits``
    splits, and its Spearman–Brown value 2r / (1 + r); or None and the reason."""

    r: float | None
    spearman_brown: float | None
    splits: int
    unit: Literal["comparison", "judge"]
    reason: str = ""


MIN_RELIABILITY_ESSAYS = 3
# A correlation between two halves' scores over fewer essays than this is noise.
MIN_SPLIT_ESSAYS = 5


def _not_enough_essays(n: int) -> str:
    return f"{n} essays: a reliability needs at least {MIN_RELIABILITY_ESSAYS}"


def posterior_reliability(fit: FitResult) -> Reliability:
    """R = var θ̂ / (var θ̂ + mean SE²) over the essays of the fit (population variance).

    For posterior means θ̂ and posterior SDs, var θ = var θ̂ + E[SE²], so R estimates
    corr(θ̂, θ)². n/a for fewer than 3 essays, no comparisons or a disconnected graph.
    """
    n = len(fit.theta)
    if n < MIN_RELIABILITY_ESSAYS:
        return Reliability(None, _not_enough_essays(n))
    if fit.n_comparisons == 0:
        return Reliability(None, "no comparisons yet")
    if not fit.connected:
        return Reliability(None, f"comparison graph not connected ({fit.components} components)")
    t = np.array(list(fit.theta.values()), dtype=np.float64)
    s = np.array([fit.se[e] for e in fit.theta], dtype=np.float64)
    var = float(np.var(t))
    error = float(np.mean(s * s))
    if not math.isfinite(var) or not math.isfinite(error) or var + error <= 0:
        return Reliability(None, "no finite scores")
    return Reliability(var / (var + error))


def ssr(theta: Mapping[str, float], se: Mapping[str, float]) -> float | None:
    """Scale separation reliability (var θ − mean SE²) / var θ over essays in both maps.

    Uses the sample variance (ddof=1). May be negative when the scores are mostly
    noise. None for fewer than two essays or zero variance. Meant for ML estimates
    (``classical_ssr``): on shrunk MAP scores it equals 2 − 1/R and runs low.
    """
    common = [e for e in theta if e in se]
    if len(common) < 2:
        return None
    t = np.array([theta[e] for e in common], dtype=np.float64)
    s = np.array([se[e] for e in common], dtype=np.float64)
    var = float(np.var(t, ddof=1))
    if not var > 0 or not math.isfinite(var):
        return None
    return (var - float(np.mean(s * s))) / var


def _extreme_essays(ids: Sequence[str], comparisons: Sequence[Comparison]) -> set[str]:
    """Essays that won every comparison or lost every one (infinite ML scores)."""
    wins: Counter[str] = Counter()
    games: Counter[str] = Counter()
    for c in comparisons:
        games[c.essay_a] += 1
        games[c.essay_b] += 1
        wins[c.essay_a if c.winner_is_a else c.essay_b] += 1
    return {e for e in ids if games[e] and wins[e] in (0, games[e])}


def classical_ssr(
    essay_ids: Sequence[str], comparisons: Sequence[Comparison], *, fit_position: bool = True
) -> Reliability:
    """The classical SSR on a near-ML fit (fixed prior of precision 0.01), over the essays
    with at least one win and one loss (Rasch practice: extreme scores have no finite ML
    estimate). Adaptive pairing inflates it (Bramley & Vitello 2019)."""
    ids = _unique_ids(essay_ids)
    compared = {e for c in comparisons for e in (c.essay_a, c.essay_b)}
    extreme = _extreme_essays(ids, comparisons)
    usable = [e for e in ids if e in compared and e not in extreme]
    if len(usable) < MIN_RELIABILITY_ESSAYS:
        return Reliability(
            None,
            f"{len(usable)} essays with both a win and a loss: "
            f"a reliability needs at least {MIN_RELIABILITY_ESSAYS}",
        )
    fit = fit_bt(ids, comparisons, fit_position=fit_position, prior_mode="fixed")
    if not fit.connected:
        return Reliability(None, f"comparison graph not connected ({fit.components} components)")
    value = ssr({e: fit.theta[e] for e in usable}, {e: fit.se[e] for e in usable})
    if value is None:
        return Reliability(None, "the scores do not vary")
    if value < 0:
        return Reliability(None, "error variance exceeds the observed variance (SSR < 0)")
    return Reliability(value)


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """Reliability of a test ``factor`` times as long as one with reliability r."""
    return factor * r / (1.0 + (factor - 1.0) * r)


def _pearson(x: FloatArray, y: FloatArray) -> float | None:
    if len(x) < 3:
        return None
    xc = x - x.mean()
    yc = y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if den == 0:
        return None
    return float(xc @ yc) / den


def _judge_splits(judges: list[str], splits: int, rng: np.random.Generator) -> list[set[str]]:
    """Distinct balanced splits of the judges, each as the half holding the first judge:
    all of them when there are at most ``splits``, else ``splits`` random ones."""
    size = len(judges) // 2
    # A half with the first judge in it names each split once (both halves when odd).
    sizes = [size] if 2 * size == len(judges) else [size, size + 1]

    def canonical(half: frozenset[str]) -> bool:
        return judges[0] in half and len(half) in sizes

    total = sum(math.comb(len(judges) - 1, k - 1) for k in sizes)
    if total <= splits:
        return [
            set(h)
            for k in sizes
            for h in itertools.combinations(judges, k)
            if canonical(frozenset(h))
        ]
    seen: set[frozenset[str]] = set()
    while len(seen) < splits:
        order = [str(j) for j in rng.permutation(judges)]
        half = frozenset(order[:size])
        seen.add(half if judges[0] in half else frozenset(judges) - half)
    return [set(h) for h in sorted(seen, key=sorted)]


def _half_correlation(
    ids: list[str],
    halves: tuple[list[Comparison], list[Comparison]],
    fit_position: bool,
) -> float | None:
    seen = [{e for c in h for e in (c.essay_a, c.essay_b)} for h in halves]
    both = [e for e in ids if e in seen[0] and e in seen[1]]
    if len(both) < MIN_SPLIT_ESSAYS:
        return None
    fits = [fit_bt(ids, h, fit_position=fit_position) for h in halves]
    x = np.array([fits[0].theta[e] for e in both], dtype=np.float64)
    y = np.array([fits[1].theta[e] for e in both], dtype=np.float64)
    return _pearson(x, y)


def split_half(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    splits: int = 20,
    seed: int = 0,
    fit_position: bool = True,
) -> SplitHalf:
    """Split-half reliability: fit each half (empirical prior, as reported) and correlate
    θ over the essays compared in both; r is the mean over the splits, Spearman–Brown
    its full-length value. Halves are random halves of the comparisons, or of the
    judges (``Comparison.judge``) when there are two or more — then every distinct
    split when there are at most ``splits``. Seeded; n/a with a reason when fewer than
    half of the splits give a correlation (too few essays compared in both halves)."""
    ids = _unique_ids(essay_ids)
    rng = np.random.default_rng(seed)
    judges = sorted({c.judge for c in comparisons})
    unit: Literal["comparison", "judge"] = "judge" if len(judges) >= 2 else "comparison"
    if len(ids) < MIN_SPLIT_ESSAYS or len(comparisons) < 2 * MIN_SPLIT_ESSAYS:
        return SplitHalf(
            None,
            None,
            0,
            unit,
            f"{len(ids)} essays, {len(comparisons)} comparisons: too few to split "
            f"(at least {MIN_SPLIT_ESSAYS} essays compared in both halves are needed)",
        )
    if unit == "judge":
        groups = _judge_splits(judges, splits, rng)
        halves = [
            (
                [c for c in comparisons if c.judge in g],
                [c for c in comparisons if c.judge not in g],
            )
            for g in groups
        ]
    else:
        m = len(comparisons)
        halves = []
        for _ in range(splits):
            order = rng.permutation(m)
            halves.append(
                (
                    [comparisons[int(k)] for k in order[: m // 2]],
                    [comparisons[int(k)] for k in order[m // 2 :]],
                )
            )
    rs = [r for h in halves if (r := _half_correlation(ids, h, fit_position)) is not None]
    if not rs or 2 * len(rs) < len(halves):
        return SplitHalf(
            None,
            None,
            len(halves),
            unit,
            f"fewer than {MIN_SPLIT_ESSAYS} essays compared in both halves of most splits",
        )
    r = float(np.mean(rs))
    sb = spearman_brown(r) if r > -1.0 else None
    return SplitHalf(r, sb, len(rs), unit)


def rank_agreement(previous: Mapping[str, float], current: Mapping[str, float]) -> float | None:
    """Spearman's ρ between two sets of scores over the ids in both; None for fewer than 3
    or a constant side. The stopping rule's test that the ranking has stopped moving."""
    common = sorted(e for e in current if e in previous)
    if len(common) < MIN_RELIABILITY_ESSAYS:
        return None
    x = scipy.stats.rankdata([previous[e] for e in common])
    y = scipy.stats.rankdata([current[e] for e in common])
    return _pearson(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))


def max_abs_delta(previous: Mapping[str, float], current: Mapping[str, float]) -> float:
    """max |current − previous| over the ids in both; inf when there are none in common."""
    common = [e for e in current if e in previous]
    if not previous or not common:
        return math.inf
    return max(abs(current[e] - previous[e]) for e in common)
