"""Bradley–Terry scoring with a position term, standard errors and reliabilities.

Model: P(essay_a wins) = σ(θ_a − θ_b + η), where η is the judge's bias towards
the essay shown first (in logits); η ~ N(0, 1/prior).

``prior_mode="empirical"`` (the default, what the pipeline reports): θ_i ~ N(0, τ²)
with τ unknown, uniform on [0.1, 1/√prior] (Gelman 2006). Three steps:

1. At a fixed λ = 1/τ², the Gaussian variational approximation q = N(x, Σ) of the
   posterior (Opper & Archambeau 2009): with t_k = θ_a − θ_b + η ~ N(z_k, v_k) under q,

       Σ⁻¹ = Xᵀ diag(E_q σ'(t)) X + diag(λ),     Xᵀ (y − E_q σ(t)) = λ ∘ x,

   the expectations exact for σ written as a mixture of probits. Unlike the Laplace approximation it
   averages the curvature over the posterior instead of taking it at the mode: under
   adaptive pairing the chosen pairs are near ties at θ̂, where σ'(0) = ¼ overstates
   what they carry, and the Laplace SEs came out too small (±1.96 SE covering 91 %).
2. τ: the bound ELBO(λ) ≤ log p(y | λ) stands in for the evidence; the posterior of
   u = log λ is exp(ELBO(u) − u/2) (the −u/2 is the uniform prior on τ), its mode is
   where ½[n − λ E_q Σθ_i²] − ½ = 0.
3. τ integrated out (Rue, Martino & Chopin 2009, the grid strategy of INLA): q_u on a
   grid of u around the mode, weighted by exp(ELBO(u) − u/2), mixed:
   θ̂ = Σ w_k x_k, Var θ = Σ w_k Σ_k + Σ w_k (x_k − θ̂)² (the second term is the
   uncertainty of τ, Kass & Steffey 1989). With few comparisons per essay τ is poorly
   determined (its estimate scatters by ±25 % at 6 per essay), and a plug-in τ̂ that
   falls short over-shrinks the batch; integrating keeps the coverage.

In simulation (bench/quality.py, docs/statistics.md) this gives E[θ | θ̂] ≈ θ̂ and
±1.96 SE coverage 0.95 ± 0.01 from 6 to 36 comparisons per essay, for adaptive and
random pairs alike, with no tuned constant; with τ fixed at its true value the same
approximation covers 0.95 too, so what remains is τ's own uncertainty.
(Until then the fit was the Laplace/MAP one with the evidence-optimal τ weakened by a
calibrated factor.) Cost: one dense n×n inverse per variational round, a few dozen
rounds per fit (≈ 0.05 s at 100 essays, a few seconds at 1,000).

``prior_mode="fixed"``: θ ~ N(0, 1/prior) (a small L2 prior: essentially maximum
likelihood), the MAP by damped Newton steps (a dense Cholesky solve up to 400
parameters, preconditioned sparse CG above) with SEs from the inverse negative
Hessian — what the classical SSR is defined on. Why not report ML: with adaptive
pairing (close θ) or few comparisons per essay, ML estimates of θ spread several times
wider than the truth, η is inflated, and ±1.96 SE covers well under half of the true θ.

Standard errors are for the centred scores (mean θ = 0), so they do not include the
arbitrary location of the scale. Essays without comparisons, or that always win or
always lose, get finite scores (held by the prior) and large standard errors.

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
import scipy.special
import scipy.stats
from scipy.sparse.csgraph import connected_components

FloatArray = npt.NDArray[np.float64]
_MIN_PRIOR_SD = 0.1  # empirical τ never below this (pure noise would drive it to 0)
# σ(x) ≈ Σ w_i Φ(s_i x): least squares on a fine grid of x, max error 7e-7 (see
# _gaussian_expectations); the weights are normalised so that the limits stay 0 and 1.
_PROBIT_S = np.array([0.29086063, 0.40939423, 0.57333067, 0.79967239, 1.11757401])
_PROBIT_W = np.array([0.02271639, 0.20362993, 0.42740756, 0.29985571, 0.04639041])
_PROBIT_W = _PROBIT_W / _PROBIT_W.sum()
_PROBIT_S2 = _PROBIT_S * _PROBIT_S
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_VARIATIONAL_TOL = 1e-4  # on the mean's last step (logits)
# Grid points off the mode are solved more loosely: the bound is stationary in q, so its
# error is second order in theirs, and they only set weights and a mixture's spread.
_GRID_TOL = 1e-3
_UNDAMPED = 3  # variational rounds before a round that does not contract is checked
_MIN_DAMPING = 1e-4
_UNCHECKED = 25  # rounds after which every round must raise the bound
_FLAT_BOUND = 1e-8  # a monitored round raising the bound by less (relative) ends the solve
# Damped rounds converge slowly, and only where there is next to no data (a weak prior on
# a pair or two): tiny problems, so a generous cap (times ``max_iter``) costs nothing.
_VARIATIONAL_ROUNDS = 5
_SAFE_STEP = 0.5  # a Newton step on the mean longer than this (logits) is line-searched
_ROUGH_ROUNDS = 12  # EM-like rounds before the secant search of the mode of log λ
_FIRST_STEP = 0.25  # the secant search's first step in log λ
_MAX_MODE_STEP = 1.5  # and its longest
_MODE_STEPS = 8
_NARROW_SD = 0.15  # posterior SD of log λ under which three Gauss–Hermite points integrate
# The grid over log λ (empirical mode): step ≈ one posterior SD, bounded; outwards until the
# log posterior is this far below its mode (INLA's defaults are 1 SD and 2.5).
_GRID_STEP_SD = 1.0
_GRID_MIN_STEP = 0.05
_GRID_MAX_STEP = 0.6
_GRID_DROP = 2.5
_GRID_MAX_POINTS = 8  # per side
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
        pr = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), overflow-free
        return self.weighted(self.y - pr, pr * (1.0 - pr), lam, x)

    def weighted(
        self, r: FloatArray, w: FloatArray, lam: FloatArray, x: FloatArray
    ) -> tuple[FloatArray, _Hessian]:
        """Xᵀr − λ∘x and XᵀWX + diag(λ) for residuals r and weights w per comparison."""
        a, b, n, p = self.a, self.b, self.n, self.p
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

    def pair_variances(self, cov: FloatArray) -> FloatArray:
        """Var(z_k) = x_kᵀ Σ x_k for every comparison, from a full covariance Σ."""
        a, b, n = self.a, self.b, self.n
        d = np.diag(cov)
        v = d[a] + d[b] - 2.0 * cov[a, b]
        if self.fit_position:
            v = v + d[n] + 2.0 * cov[a, n] - 2.0 * cov[b, n]
        return np.asarray(np.maximum(v, 0.0), dtype=np.float64)

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


def _gaussian_expectations(
    z: FloatArray, v: FloatArray, softplus: bool = False
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    """E[σ(t)], E[σ'(t)] (and E[log(1 + e^t)]) for t ~ N(z, v), elementwise.

    σ is replaced by a mixture of probits, σ(x) ≈ Σ_i w_i Φ(s_i x) (max error 7e-7;
    Monahan & Stefanski 1992), whose Gaussian expectations are exact for any v: with
    r_i = √(1 + s_i² v) and a_i = s_i z / r_i,

        E σ(t) = Σ w_i Φ(a_i),   E σ'(t) = Σ w_i s_i φ(a_i) / r_i,
        E log(1 + e^t) = Σ (w_i / s_i) r_i ψ(a_i),   ψ(a) = a Φ(a) + φ(a)

    (the last integrates the first: log(1 + e^x) = ∫σ, and E (X)⁺ = s ψ(μ/s)). The three
    are exact derivatives of one another, so the variational fixed point is exactly the
    optimum of the bound computed from them — which a quadrature rule would not give
    where Var(t) is large (weak priors, next to no data).
    """
    r = np.sqrt(1.0 + _PROBIT_S2[None, :] * v[:, None])
    arg = _PROBIT_S[None, :] * z[:, None] / r
    cdf = scipy.special.ndtr(arg)
    pdf = np.exp(-0.5 * arg * arg) * _INV_SQRT_2PI
    ep = np.asarray(cdf @ _PROBIT_W, dtype=np.float64)
    ew = np.asarray((pdf / r) @ (_PROBIT_W * _PROBIT_S), dtype=np.float64)
    es = (
        np.asarray((r * (arg * cdf + pdf)) @ (_PROBIT_W / _PROBIT_S), dtype=np.float64)
        if softplus
        else None
    )
    return ep, ew, es


@dataclass
class _Variational:
    """q(x) = N(x, cov), the Gaussian closest to the posterior at a fixed θ-prior precision."""

    x: FloatArray
    cov: FloatArray  # full symmetric
    v: FloatArray  # Var_q(z_k) of every comparison's linear predictor
    elbo: float
    iterations: int
    converged: bool

    def spread(self, n: int) -> float:
        """E_q[Σ θ_i²] = Σ x_i² + tr Σ_θθ: what the θ-prior precision's update needs."""
        th = self.x[:n]
        return float(th @ th) + float(np.trace(self.cov[:n, :n]))


def _inverse(h: FloatArray) -> tuple[FloatArray, float]:
    """H⁻¹ (full, symmetric) and log det H, from the Cholesky factor (H positive definite)."""
    c, info = scipy.linalg.lapack.dpotrf(h, lower=1, clean=1)
    if info != 0:  # pragma: no cover - the prior keeps h positive definite
        raise np.linalg.LinAlgError("Hessian not positive definite")
    logdet = 2.0 * float(np.sum(np.log(np.diag(c))))
    inv, info = scipy.linalg.lapack.dpotri(c, lower=1)
    if info != 0:  # pragma: no cover
        raise np.linalg.LinAlgError("Hessian not invertible")
    full = np.asarray(inv + np.tril(inv, -1).T, dtype=np.float64)
    return full, logdet


def _variational(
    post: _Posterior,
    lam: FloatArray,
    x: FloatArray,
    v: FloatArray,
    max_iter: int,
    tol: float,
    v_tol: float = 1e-4,
) -> _Variational:
    """The Gaussian variational approximation at fixed precisions λ (Opper & Archambeau 2009).

    Stationarity of the evidence lower bound in q = N(x, Σ), with t_k ~ N(z_k, v_k),
    z = X x, v_k = x_kᵀ Σ x_k:

        Σ⁻¹ = Xᵀ diag(E σ'(t)) X + diag(λ),      Xᵀ (y − E σ(t)) = λ ∘ x.

    Each round fixes v, takes a Newton step on x for the expected log posterior (concave
    in x; backtracked) — its Hessian is exactly the Σ⁻¹ above — then updates Σ and v. The
    curvature is averaged over q instead of taken at the mode, which is what keeps the
    SEs honest where pairs were chosen to be near ties (σ' at the mode overstates it).
    """
    y = post.y
    n_lam = float(np.sum(np.log(lam)))
    converged = False
    it = 0

    def objective(xx: FloatArray, vv: FloatArray) -> float:
        zz = post.linear(xx)
        _, _, es = _gaussian_expectations(zz, vv, softplus=True)
        assert es is not None
        return float(y @ zz - es.sum()) - 0.5 * float(lam @ (xx * xx))

    def bound(xx: FloatArray, cc: FloatArray, logdet_h: float) -> tuple[float, FloatArray]:
        """ELBO = E_q[log likelihood] − KL(q ‖ prior) at q = N(xx, cc), prior N(0, 1/λ)."""
        vv = post.pair_variances(cc)
        zz = post.linear(xx)
        _, _, es = _gaussian_expectations(zz, vv, softplus=True)
        assert es is not None
        kl = 0.5 * (float(lam @ np.diag(cc)) + float(lam @ (xx * xx)) - post.p - n_lam + logdet_h)
        return float(y @ zz - es.sum()) - kl, vv

    z = post.linear(x)
    omega: FloatArray | None = None  # the curvature weights behind the current Σ
    rho = 1.0  # how far a round moves towards the new weights and mean
    monitored = False
    current = -math.inf  # the bound at the current q, once monitored
    last_v_moved = math.inf
    cov = np.zeros((post.p, post.p))
    for it in range(1, max_iter + 1):
        ep, ew, _ = _gaussian_expectations(z, v)
        if omega is not None and rho < 1.0:
            ew = rho * ew + (1.0 - rho) * omega
        g, h = post.weighted(y - ep, ew, lam, x)
        cov_new, logdet_new = _inverse(h.dense())
        step = cov_new @ g
        moved = float(np.max(np.abs(step))) if len(step) else 0.0
        t = rho
        if moved > _SAFE_STEP:
            # Far from the optimum (a cold start): backtrack on the concave objective.
            obj = objective(x, v)
            while objective(x + t * step, v) < obj - 1e-12 * abs(obj) and t > 1e-8:
                t *= 0.5
        x_new = x + t * step
        if monitored:
            value, v_new = bound(x_new, cov_new, logdet_new)
            if value < current - 1e-12 * abs(current):
                # The bound went down: a shorter move (towards the same fixed point).
                rho *= 0.5
                if rho < _MIN_DAMPING:
                    # No move raises it: the optimum to rounding (met with next to no
                    # data, where the bound is flat).
                    converged = True
                    break
                continue
            gain = value - current
            current = value
            rho = min(1.0, 2.0 * rho)
            if gain < _FLAT_BOUND * (1.0 + abs(value)):
                # The bound has stopped rising: what still moves is a direction it is flat
                # in (an essay that won or lost everything, drifting by less than its SE).
                x, v, cov, omega = x_new, v_new, cov_new, ew
                z = post.linear(x)
                converged = True
                break
        else:
            v_new = post.pair_variances(cov_new)
        v_moved = float(np.max(np.abs(v_new - v))) if len(v) else 0.0
        x, v, cov, omega = x_new, v_new, cov_new, ew
        z = post.linear(x)
        if t * moved < tol and v_moved < v_tol:
            converged = True
            break
        if not monitored and it > _UNDAMPED and (v_moved > last_v_moved or it > _UNCHECKED):
            # Not contracting, or slowly (little data, a weak prior: the plain iteration can
            # cycle or crawl):
            # from here on every round must raise the bound, shortened until it does.
            monitored = True
            current, _ = bound(x, cov, logdet_new)
            rho = 0.5
        last_v_moved = v_moved
    # Σ and the bound at the final x and v.
    ep, ew, _ = _gaussian_expectations(z, v)
    _, h = post.weighted(y - ep, ew, lam, x)
    cov, logdet_h = _inverse(h.dense())
    elbo, v = bound(x, cov, logdet_h)
    return _Variational(x, cov, v, elbo, it, converged)


@dataclass
class _Mixture:
    """Posterior moments with τ integrated out: mixture of q_τ over a grid of log λ."""

    theta: FloatArray  # centred means
    theta_var: FloatArray  # variances of θ_i − mean(θ)
    eta: float
    eta_var: float
    tau2: float  # posterior mean of τ²
    log_posterior: float  # at the mode of log λ
    iterations: int
    converged: bool


def _log_tau_prior(u: float) -> float:
    """log p(u) for u = log λ = −2 log τ under a uniform prior on τ (Gelman 2006): −u/2."""
    return -0.5 * u


def _integrated_fit(
    post: _Posterior, prior: float, max_iter: int, tol: float, integrate: bool = True
) -> _Mixture:
    """θ and η with the θ prior's scale τ integrated out (empirical mode).

    For each λ = 1/τ² the Gaussian variational posterior q_λ gives a lower bound
    ELBO(λ) on log p(y | λ). The posterior of u = log λ is taken as
    exp(ELBO(u))·p(u), p uniform on τ; its mode solves (envelope theorem)

        dL/du = ½ [n − λ E_q Σ θ_i²] − ½ = 0,

    found by safeguarded secant steps. Then a grid of u around the mode (step about one
    posterior SD of u, from the curvature; outwards until L drops by ``_GRID_DROP``)
    is weighted by exp(L) (Rue, Martino & Chopin 2009: the grid strategy of INLA), and

        θ̂ = Σ_k w_k m_k,   Var θ = Σ_k w_k Σ_k + Σ_k w_k (m_k − θ̂)²

    (the second term is the uncertainty of τ: Kass & Steffey 1989). Plugging in one τ̂
    instead loses coverage where τ is poorly determined (few comparisons per essay):
    batches whose τ̂ falls short are over-shrunk. With ``integrate`` false only the mode
    is used (split-half refits, where only the ranking of θ matters).
    """
    n = post.n
    u_lo, u_hi = math.log(prior), math.log(1.0 / _MIN_PRIOR_SD**2)
    lam = np.full(post.p, prior)
    m = len(post.y)
    state = {"x": np.zeros(post.p), "v": np.zeros(m)}
    cache: dict[float, _Variational] = {}
    iterations = 0
    converged = True

    def evaluate(u: float, loose: bool = False) -> _Variational:
        nonlocal iterations, converged
        if u in cache:
            return cache[u]
        lam[:n] = math.exp(u)
        t = max(tol, _GRID_TOL) if loose else tol
        q = _variational(post, lam, state["x"], state["v"], _VARIATIONAL_ROUNDS * max_iter, t, t)
        iterations += q.iterations
        converged = converged and q.converged
        state["x"], state["v"] = q.x, q.v
        cache[u] = q
        return q

    def log_post(u: float) -> float:
        return evaluate(u).elbo + _log_tau_prior(u)

    def slope(u: float) -> float:
        return 0.5 * (n - math.exp(u) * evaluate(u).spread(n)) - 0.5

    def target(u: float) -> float:
        # log of the fixed point λ = (n − 1) / E_q Σθ² minus u: decreasing through 0 at the mode.
        return math.log(max(n - 1.0, 0.5) / max(evaluate(u).spread(n), 1e-300)) - u

    # The mode: secant steps on L'(u) from a rough start, until the next step would move u
    # by less than a tenth of its posterior SD (the grid around it absorbs the rest).
    u_prev = _rough_mode(post, lam, u_lo, u_hi, state)
    s_prev = slope(u_prev)
    # First step: Newton with L'' ≈ −(n − 1)/4 (R ≈ ½), at least a little, at most _FIRST_STEP.
    first = min(max(4.0 * abs(s_prev) / max(n - 1.0, 1.0), 0.02), _FIRST_STEP)
    u_mode = min(max(u_prev + math.copysign(first, s_prev), u_lo), u_hi)
    curv = 0.0
    found = False
    for _ in range(_MODE_STEPS):
        if u_mode == u_prev:
            break
        s_here = slope(u_mode)
        curv = (s_here - s_prev) / (u_mode - u_prev)
        if not curv < 0:
            break
        move = min(max(-s_here / curv, -_MAX_MODE_STEP), _MAX_MODE_STEP)
        nxt = min(max(u_mode + move, u_lo), u_hi)
        if abs(nxt - u_mode) < 0.1 / math.sqrt(-curv):
            found = True
            break
        u_prev, s_prev, u_mode = u_mode, s_here, nxt
    if not found:  # L not concave here, or slow: the safeguarded root finder
        u_mode, found = _solve_log_precision(target, u_mode, u_lo, u_hi)
        curv = 0.0
    converged = converged and found
    mode = evaluate(u_mode)
    l_mode = log_post(u_mode)
    points = [u_mode]
    if integrate:
        if not curv < 0:  # the curvature from a point a little way off the mode
            u_off = u_mode + 0.25 if u_mode + 0.25 <= u_hi else u_mode - 0.25
            curv = (slope(u_off) - slope(u_mode)) / (u_off - u_mode)
        sd = 1.0 / math.sqrt(-curv) if curv < 0 else _GRID_MAX_STEP / _GRID_STEP_SD
        if sd < _NARROW_SD:
            # Narrow (many comparisons): Gauss–Hermite's three points and weights suffice.
            nodes = [u_mode - math.sqrt(3.0) * sd, u_mode + math.sqrt(3.0) * sd]
            for u in nodes:
                if u_lo <= u <= u_hi:
                    evaluate(u, loose=True)
                    points.append(u)
                state["x"], state["v"] = mode.x, mode.v
            fixed = [2.0 / 3.0, 1.0 / 6.0, 1.0 / 6.0][: len(points)]
            weights = np.array(fixed) / sum(fixed)
        else:
            step = min(max(_GRID_STEP_SD * sd, _GRID_MIN_STEP), _GRID_MAX_STEP)
            for direction in (1.0, -1.0):
                previous = mode
                for k in range(1, _GRID_MAX_POINTS + 1):
                    u = u_mode + direction * k * step
                    if not u_lo - 1e-9 <= u <= u_hi + 1e-9:
                        break
                    here = evaluate(u, loose=True)
                    points.append(u)
                    if here.elbo + _log_tau_prior(u) < l_mode - _GRID_DROP:
                        break
                    # Start the next point where the last two points' trend leads.
                    state["x"] = 2.0 * here.x - previous.x
                    state["v"] = np.maximum(2.0 * here.v - previous.v, 0.0)
                    previous = here
                state["x"], state["v"] = mode.x, mode.v  # the other side starts at the mode
            lps = np.array([log_post(u) for u in points])
            weights = np.exp(lps - lps.max())
    else:
        weights = np.ones(1)
    w = weights / weights.sum()
    means = np.array([cache[u].x[:n] - cache[u].x[:n].mean() for u in points])
    theta = w @ means
    within = np.array([_centred_variances(cache[u].cov, n) for u in points])
    theta_var = w @ within + w @ (means - theta) ** 2
    if post.fit_position:
        etas = np.array([cache[u].x[n] for u in points])
        eta = float(w @ etas)
        eta_var = float(w @ np.array([cache[u].cov[n, n] for u in points]) + w @ (etas - eta) ** 2)
    else:
        eta, eta_var = 0.0, 0.0
    tau2 = float(w @ np.exp(-np.array(points)))
    return _Mixture(theta, theta_var, eta, eta_var, tau2, l_mode, iterations, converged)


def _rough_mode(
    post: _Posterior, lam: FloatArray, u_lo: float, u_hi: float, state: dict[str, FloatArray]
) -> float:
    """A starting point for the search of the mode of log λ: variational rounds that also
    move λ to its fixed point (n − 1) / E_q Σθ² every round (EM-like; fast where τ is well
    determined, which is where each round costs most). Leaves x and v in ``state``."""
    n = post.n
    u = 0.0
    x, v = state["x"], state["v"]
    for _ in range(_ROUGH_ROUNDS):
        lam[:n] = math.exp(u)
        z = post.linear(x)
        ep, ew, _ = _gaussian_expectations(z, v)
        g, h = post.weighted(post.y - ep, ew, lam, x)
        cov, _ = _inverse(h.dense())
        step = cov @ g
        x = x + step * min(1.0, _SAFE_STEP / max(float(np.max(np.abs(step))), 1e-300))
        v = post.pair_variances(cov)
        th = x[:n]
        spread = float(th @ th) + float(np.trace(cov[:n, :n]))
        new = math.log(max(n - 1.0, 0.5) / max(spread, 1e-300))
        new = min(max(new, u_lo), u_hi)
        done = abs(new - u) < 0.02 and float(np.max(np.abs(step))) < 0.05
        u = new
        if done:
            break
    state["x"], state["v"] = x, v
    return u


def _centred_variances(cov: FloatArray, n: int) -> FloatArray:
    """Var(θ_i − mean θ) from the covariance of θ (the first n rows and columns)."""
    block = cov[:n, :n]
    row_mean = block.mean(axis=1)
    return np.asarray(np.diag(block) - 2.0 * row_mean + row_mean.mean(), dtype=np.float64)


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
    """Bradley–Terry fit with optional position bias η; see the module docstring.

    ``prior`` is the precision of the prior on η and, with ``prior_mode="fixed"``, on
    every θ: then the fit is the MAP (Newton) with SEs from the Hessian — essentially
    maximum likelihood. With ``prior_mode="empirical"`` (the default) θ ~ N(0, τ²) with
    τ integrated out over its posterior (never above 1/√prior), and θ̂, SE are the
    posterior means and SDs of the Gaussian variational approximation.

    Raises ValueError for duplicate essay ids, unknown essays or self-comparisons,
    and for a non-positive prior (the prior keeps every score finite).
    """
    return _fit(
        essay_ids,
        comparisons,
        fit_position=fit_position,
        prior=prior,
        prior_mode=prior_mode,
        max_iter=max_iter,
        tol=tol,
        integrate=True,
    )


def _fit(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    fit_position: bool,
    prior: float,
    prior_mode: Literal["empirical", "fixed"],
    max_iter: int,
    tol: float,
    integrate: bool,
) -> FitResult:
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
    if prior_mode == "empirical":
        mix = _integrated_fit(post, prior, max_iter, max(tol, _VARIATIONAL_TOL), integrate)
        se_arr = np.sqrt(np.maximum(mix.theta_var, 0.0))
        return FitResult(
            theta={e: float(mix.theta[i]) for i, e in enumerate(ids)},
            se={e: float(se_arr[i]) for i, e in enumerate(ids)},
            eta=mix.eta if fit_position else None,
            eta_se=math.sqrt(max(mix.eta_var, 0.0)) if fit_position else None,
            connected=components == 1,
            components=components,
            converged=mix.converged,
            iterations=mix.iterations,
            n_comparisons=m,
            log_posterior=mix.log_posterior,
            prior_sd=math.sqrt(mix.tau2),
        )
    lam = np.full(post.p, prior)
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
        prior_sd=None,
    )


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
    # Only the ranking of θ matters here: the mode of τ does (τ integrated changes the SEs).
    fits = [
        _fit(
            ids,
            h,
            fit_position=fit_position,
            prior=0.01,
            prior_mode="empirical",
            max_iter=100,
            tol=1e-10,
            integrate=False,
        )
        for h in halves
    ]
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
