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
   where ½[n − λ E_q Σθ_i²] − ½ = 0: found by rounds that move x, v and u together
   (``_joint_mode``), u by Newton/secant steps using the linear response of the
   optimum to u (``_Response``).
3. τ integrated out (Rue, Martino & Chopin 2009, the grid strategy of INLA): q_u on a
   grid of u around the mode, weighted by exp(ELBO(u) − u/2), mixed:
   θ̂ = Σ w_k x_k, Var θ = Σ w_k Σ_k + Σ w_k (x_k − θ̂)² (the second term is the
   uncertainty of τ, Kass & Steffey 1989); where u's posterior is narrow, three
   Gauss–Hermite points by the delta method. With few comparisons per essay τ is poorly
   determined (its estimate scatters by ±25 % at 6 per essay), and a plug-in τ̂ that
   falls short over-shrinks the batch; integrating keeps the coverage.

In simulation (bench/quality.py, docs/statistics.md) this gives E[θ | θ̂] ≈ θ̂ and
±1.96 SE coverage 0.95 ± 0.01 from 6 to 36 comparisons per essay, for adaptive and
random pairs alike, with no tuned constant; with τ fixed at its true value the same
approximation covers 0.95 too, so what remains is τ's own uncertainty.
(Until then the fit was the Laplace/MAP one with the evidence-optimal τ weakened by a
calibrated factor.) Cost: one dense n×n inverse per variational round, about 20 rounds
at 100 essays and 3 at 1,000 (1.4–1.6× the Laplace fit's CPU time; bench/scoring.py).

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

import msgspec
import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack
import scipy.sparse
import scipy.special

from cj import graph

FloatArray = npt.NDArray[np.float64]
_MIN_PRIOR_SD = 0.1  # empirical τ never below this (pure noise would drive it to 0)
# σ(x) ≈ Σ w_i Φ(s_i x): least squares on a fine grid of x, max error 7e-7 (see
# _gaussian_expectations); the weights are normalised so that the limits stay 0 and 1.
_PROBIT_S = np.array([0.29086063, 0.40939423, 0.57333067, 0.79967239, 1.11757401])
_PROBIT_W = np.array([0.02271639, 0.20362993, 0.42740756, 0.29985571, 0.04639041])
_PROBIT_W = _PROBIT_W / _PROBIT_W.sum()
_PROBIT_S2 = _PROBIT_S * _PROBIT_S
_PROBIT_WS = _PROBIT_W * _PROBIT_S
_PROBIT_W_S = _PROBIT_W / _PROBIT_S
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_VARIATIONAL_TOL = 1e-4  # on the mean's last step (logits)
# Grid points off the mode are solved more loosely: the bound is stationary in q, so its
# error is second order in theirs, and they only set weights and a mixture's spread.
_GRID_TOL = 1e-3
_GRID_ROUNDS = 2
_FROZEN_ROUNDS = 3
_POLISH_STEPS = 6  # steps of log λ on full solves, where the delta method needs the mode
_UNDAMPED = 3  # variational rounds before a round that does not contract is checked
_MIN_DAMPING = 1e-4
_UNCHECKED = 25  # rounds after which every round must raise the bound
_FLAT_BOUND = 1e-8  # a monitored round raising the bound by less (relative) ends the solve
# Damped rounds converge slowly, and only where there is next to no data (a weak prior on
# a pair or two): tiny problems, so a generous cap (times ``max_iter``) costs nothing.
_VARIATIONAL_ROUNDS = 5
_SAFE_STEP = 0.5  # a Newton step on the mean longer than this (logits) is line-searched
_JOINT_ROUNDS = 40  # rounds moving x, v and log λ together before the safeguarded search
_MAX_MODE_STEP = 1.5  # the longest step of log λ in one round
_CHEAP_ROUNDS = 6  # inverse-free rounds that start the search of the mode in large batches
_NARROW_SD = 0.15  # posterior SD of log λ under which three Gauss–Hermite points integrate
# The grid over log λ (empirical mode): step ≈ one posterior SD, bounded; outwards until the
# log posterior is this far below its mode (INLA's defaults are 1 SD and 2.5). The SD from
# the analytic L'' (``_Response.sd``) runs 15–25 % short, so one SD is 1.2 of those.
_GRID_STEP_SD = 1.2
_GRID_MIN_STEP = 0.05
_GRID_MAX_STEP = 0.6
_GRID_DROP = 2.5
_GRID_MAX_POINTS = 8  # per side
_DENSE_MAX = 400  # above this many parameters, Newton steps use sparse CG
# `fit_bt`'s defaults, also what the fits of indexed comparisons use (`_fit_indexed`).
_PRIOR = 0.01  # precision of the prior on η (and on every θ when the prior is fixed)
_MAX_ITER = 100
_TOL = 1e-10
# A Newton step of a split-half's fit with a smaller decrement ends it (`_Halves.newton`).
_SETTLED_DECREMENT = 1e-4
_SHARED_STEPS = 2  # steps shared by every half before their own (`_Halves.shared_steps`)
IntArray = npt.NDArray[np.intp]


class Comparison(msgspec.Struct, frozen=True):
    """One judgement of a pair. A Struct, not a frozen dataclass: a wave's scoring makes one
    per comparison of the batch, and a frozen dataclass took six times as long to make
    (speed, issue 11)."""

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


@dataclass(frozen=True)
class WarmStart:
    """Where an empirical fit may start: an earlier fit of the same essays, θ and SE per
    essay and η (a batch's last recorded scores, `cj.continuation.score`). Only where the
    solver starts, never the model: the same fit within its tolerances (the mode of log λ
    is found to a tenth of its posterior SD, which moves θ̂ by up to ~1e-2 either way).
    Issue 11: cold (x = 0, v = 0, log λ = 0) the search of that mode took 6.2 rounds at
    100 essays, warm 2.7, each an n×n inverse."""

    theta: Mapping[str, float]
    se: Mapping[str, float]
    eta: float | None = None
    eta_se: float | None = None


@dataclass
class _Start:
    """`WarmStart` as the solver's arrays: x, v and u = log λ."""

    x: FloatArray
    v: FloatArray
    u: float


def _index_comparisons(
    ids: Sequence[str], comparisons: Sequence[Comparison]
) -> tuple[IntArray, IntArray, FloatArray]:
    # Comprehensions, not a loop setting array items: a fifth of the time (issue 11).
    index = {e: i for i, e in enumerate(ids)}
    try:
        a = np.array([index[c.essay_a] for c in comparisons], dtype=np.intp)
        b = np.array([index[c.essay_b] for c in comparisons], dtype=np.intp)
    except KeyError as exc:
        raise ValueError(f"comparison refers to an unknown essay: {exc.args[0]!r}") from None
    same = np.flatnonzero(a == b)
    if len(same):
        raise ValueError(f"comparison of essay {comparisons[int(same[0])].essay_a!r} with itself")
    y = np.array([c.winner_is_a for c in comparisons], dtype=np.float64)
    return a, b, y


def _unique_ids(essay_ids: Sequence[str]) -> list[str]:
    ids = list(essay_ids)
    if len(set(ids)) != len(ids):
        dups = sorted(e for e, k in Counter(ids).items() if k > 1)
        raise ValueError(f"duplicate essay ids: {', '.join(dups[:5])}")
    return ids


# The signs of the blocks of `_Posterior.flat` (a, a), (b, b), (a, b), (b, a), then with η.
_HESSIAN_SIGNS = np.array([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0])


def _hessian_flat(a: IntArray, b: IntArray, n: int, p: int) -> IntArray:
    """Where each comparison's entries go in the flat p × p Hessian (`_Posterior.flat`): the
    blocks (a, a), (b, b), (a, b), (b, a), then with η at index n when p > n: (a, η), (η, a),
    (b, η), (η, b), (η, η); their signs are `_HESSIAN_SIGNS`."""
    ap, bp = a * p, b * p
    parts = [ap + a, bp + b, ap + b, bp + a]
    if p > n:
        parts += [ap + n, n * p + a, bp + n, n * p + b, np.full_like(a, n * p + n)]
    return np.concatenate(parts)


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
        self.hi, self.lo = np.maximum(a, b), np.minimum(a, b)
        self.fit_position = fit_position
        self.p = p = n + 1 if fit_position else n
        self._flat: dict[bool, tuple[IntArray, IntArray, IntArray]] = {}
        m = len(y)
        self.flat = _hessian_flat(a, b, n, p)
        self.signs = _HESSIAN_SIGNS[: 9 if fit_position else 4]
        self._signed = np.empty((len(self.signs), m))  # `weighted`'s, reused: one per round
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
            z += x[self.n]
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
        # w, w, −w, −w (, w, w, −w, −w, w): the signs of each block of `flat`, in one
        # broadcast product instead of a concatenation of negated copies.
        weights = np.multiply(self.signs[:, None], w[None, :], out=self._signed).reshape(-1)
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

    def pair_variances(self, lower: FloatArray) -> FloatArray:
        """Var(z_k) = x_kᵀ Σ x_k for every comparison, from the lower triangle of Σ."""
        a, b, n = self.a, self.b, self.n
        d = lower.diagonal()
        # By flat index into the array's own memory order (dpotri's is Fortran's): `take`
        # instead of two-dimensional indexing, a third of the time (speed, issue 11).
        c_order = bool(lower.flags.c_contiguous)
        flat = lower.reshape(-1) if c_order else lower.T.reshape(-1)
        cross, with_a, with_b = self._flat_pairs(c_order)
        # The same operations, left to right, into one array (the temporaries cost a third).
        v = d[a]
        v += d[b]
        v -= 2.0 * flat.take(cross)
        if self.fit_position:  # η is the last parameter: row n is below every θ
            v += d[n]
            v += 2.0 * flat.take(with_a)
            v -= 2.0 * flat.take(with_b)
        return np.asarray(np.maximum(v, 0.0, out=v), dtype=np.float64)

    def _flat_pairs(self, c_order: bool) -> tuple[IntArray, IntArray, IntArray]:
        """Flat indices of (hi, lo), (n, a), (n, b) in a p × p array of that order."""
        if c_order not in self._flat:
            row, col = (self.p, 1) if c_order else (1, self.p)
            self._flat[c_order] = (
                self.hi * row + self.lo * col,
                self.n * row + self.a * col,
                self.n * row + self.b * col,
            )
        return self._flat[c_order]

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


def _gaussian_expectations(z: FloatArray, v: FloatArray) -> tuple[FloatArray, FloatArray]:
    """E[σ(t)] and E[σ'(t)] for t ~ N(z, v), elementwise (E[log(1 + e^t)]: `_expected_softplus`).

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
    r, _, cdf, pdf = _probit_terms(z, v)
    ep = np.asarray(_PROBIT_W @ cdf, dtype=np.float64)
    pdf /= r
    ew = np.asarray(_PROBIT_WS @ pdf, dtype=np.float64)
    return ep, ew


def _expected_softplus(z: FloatArray, v: FloatArray) -> FloatArray:
    """E[log(1 + e^t)] for t ~ N(z, v), elementwise (`_gaussian_expectations`). Apart: the
    bound's value needs only this, and the other two cost a tenth of the call (speed)."""
    r, arg, cdf, pdf = _probit_terms(z, v)
    tail = arg * cdf
    tail += pdf
    tail *= r
    return np.asarray(_PROBIT_W_S @ tail, dtype=np.float64)


def _probit_terms(
    z: FloatArray, v: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """r_i, a_i, Φ(a_i) and φ(a_i) of `_gaussian_expectations`, one row per probit."""
    # One row per probit (5 × m): the elementwise loops run along the comparisons (speed,
    # issue 11: with 5 in the inner loop they cost twice as much). In place where the order
    # of the operations allows: each temporary of 5 × m cost about as much as its arithmetic.
    r = _PROBIT_S2[:, None] * v[None, :]
    r += 1.0
    np.sqrt(r, out=r)
    arg = _PROBIT_S[:, None] * z[None, :]
    arg /= r
    cdf = scipy.special.ndtr(arg)
    pdf = arg * arg
    pdf *= -0.5
    np.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI
    return r, arg, cdf, pdf


def _symmetric_matvec(lower: FloatArray, g: FloatArray) -> FloatArray:
    """Σ g from the lower triangle of a symmetric Σ (zeros above): one BLAS dsymv."""
    # dsymv reads the lower triangle of the Fortran array: a C array's transpose has it
    # in the upper.
    if lower.flags.f_contiguous:
        out = scipy.linalg.blas.dsymv(1.0, lower, g, lower=1)
    else:
        out = scipy.linalg.blas.dsymv(1.0, lower.T, g, lower=0)
    return np.asarray(out, dtype=np.float64)


def _cholesky(h: FloatArray, *, clean: int = 0, overwrite: bool = False) -> FloatArray:
    """The lower Cholesky factor of a symmetric positive definite ``h`` by LAPACK's dpotrf
    directly (what scipy.linalg.cholesky calls, without its checks: speed, issue 11);
    ``clean`` zeroes the triangle above, ``overwrite`` lets it factor ``h`` in place (when
    ``h`` is in Fortran order: the transpose of a C-ordered symmetric matrix)."""
    c, info = scipy.linalg.lapack.dpotrf(h, lower=1, clean=clean, overwrite_a=int(overwrite))
    if info != 0:  # pragma: no cover - the prior keeps h positive definite
        raise np.linalg.LinAlgError("Hessian not positive definite")
    return np.asarray(c, dtype=np.float64)


def _cholesky_solve(h: FloatArray, g: FloatArray, *, overwrite: bool = False) -> FloatArray:
    """h⁻¹g for a symmetric positive definite h (C order) by LAPACK directly: what
    cho_factor / cho_solve call, without their checks (speed, issue 11: they cost more than
    the solve at 100 essays). ``overwrite``: h is factored in place through its transpose,
    the same matrix in Fortran order, which spares dpotrf's copy."""
    c = _cholesky(h.T, overwrite=True) if overwrite else _cholesky(h)
    step, _ = scipy.linalg.lapack.dpotrs(c, g, lower=1)
    return np.asarray(step, dtype=np.float64)


def _inverse(h: FloatArray) -> tuple[FloatArray, float]:
    """The lower triangle of H⁻¹ (zeros above) and log det H, from the Cholesky factor;
    H (C order) is overwritten.

    Only the lower triangle: symmetrising a 1,000 × 1,000 inverse cost a fifth of a
    variational round, and every consumer reads one triangle."""
    # H is symmetric: its transpose is the Fortran array LAPACK factors in place (speed,
    # issue 11: f2py's copies of H and of the factor cost a fifth of the inverse at n = 100).
    # H is overwritten.
    c = _cholesky(h.T, clean=1, overwrite=True)
    logdet = 2.0 * float(np.log(c.diagonal()).sum())
    inv, info = scipy.linalg.lapack.dpotri(c, lower=1, overwrite_c=1)
    if info != 0:  # pragma: no cover
        raise np.linalg.LinAlgError("Hessian not invertible")
    return np.asarray(inv, dtype=np.float64), logdet


def _centred_variances(lower: FloatArray, n: int) -> FloatArray:
    """Var(θ_i − mean θ) from the lower triangle of the covariance (θ first, n of them)."""
    block = lower[:n, :n]
    diag = block.diagonal()
    row_mean = (block.sum(axis=1) + block.sum(axis=0) - diag) / n
    return np.asarray(diag - 2.0 * row_mean + row_mean.mean(), dtype=np.float64)


class _Bound:
    """The evidence lower bound at fixed prior precisions λ, for q = N(x, Σ).

    With t_k = θ_a − θ_b (+ η) ~ N(z_k, v_k) under q, z = X x, v_k = x_kᵀ Σ x_k:

        ELBO(x, Σ) = Σ_k [y_k z_k − E log(1 + e^{t_k})] − KL(q ‖ N(0, diag(1/λ))),
        KL = ½ [Σ_j λ_j Σ_jj + Σ_j λ_j x_j² − p − Σ_j log λ_j + log det Σ⁻¹].

    At fixed v the expected log posterior is concave in x with gradient and curvature

        g = Xᵀ (y − E σ(t)) − λ ∘ x,      Xᵀ diag(E σ'(t)) X + diag(λ),

    and the curvature is the Σ⁻¹ that makes the bound stationary in Σ (Opper &
    Archambeau 2009): a round is a Newton step on x and that Σ, i.e. ELBO ≤ log p(y | λ)
    is maximised by a fixed-point iteration. ``rho`` < 1 moves the weights E σ'(t) only
    part of the way from ``omega`` (the last round's), which damps a cycling iteration.
    """

    def __init__(self, post: _Posterior, lam: FloatArray):
        self.post, self.lam = post, lam
        self.log_lam = float(np.log(lam).sum())

    def expected(self, x: FloatArray, v: FloatArray) -> float:
        """E_q log posterior at fixed v (the Newton step's objective, up to a constant)."""
        z = self.post.linear(x)
        es = _expected_softplus(z, v)
        return float(self.post.y @ z - es.sum()) - 0.5 * float(self.lam @ (x * x))

    def value(
        self, x: FloatArray, lower: FloatArray, logdet_h: float, v: FloatArray | None = None
    ) -> tuple[float, FloatArray]:
        """The ELBO at q = N(x, Σ) (Σ from its lower triangle), and the v_k it implies
        (``v``: those, when the caller has just computed them from the same Σ)."""
        post, lam = self.post, self.lam
        v = post.pair_variances(lower) if v is None else v
        z = post.linear(x)
        es = _expected_softplus(z, v)
        trace = float(lam @ lower.diagonal()) + float(lam @ (x * x))
        kl = 0.5 * (trace - post.p - self.log_lam + logdet_h)
        return float(post.y @ z - es.sum()) - kl, v

    def round(
        self, x: FloatArray, v: FloatArray, omega: FloatArray | None, rho: float
    ) -> tuple[FloatArray, FloatArray, float, FloatArray]:
        """One fixed-point round: the Newton step on x, Σ (lower triangle), log det Σ⁻¹ and
        the curvature weights used."""
        ep, ew = _gaussian_expectations(self.post.linear(x), v)
        if omega is not None and rho < 1.0:
            ew = rho * ew + (1.0 - rho) * omega
        g, h = self.post.weighted(self.post.y - ep, ew, self.lam, x)
        lower, logdet = _inverse(h.dense())
        return _symmetric_matvec(lower, g), lower, logdet, ew

    def settle(self, x: FloatArray, v: FloatArray, max_iter: int) -> tuple[FloatArray, _Hessian]:
        """x at the optimum of the expected log posterior at fixed v (to ``_GRID_TOL``), by
        Newton steps with the Hessian's own solver: no n×n inverse. Also the last
        curvature (one short step behind x)."""
        for _ in range(max_iter):
            ep, ew = _gaussian_expectations(self.post.linear(x), v)
            g, h = self.post.weighted(self.post.y - ep, ew, self.lam, x)
            # A loose solve: x only has to come near (the dense round after it finishes).
            step = h.solve(g, rtol=1e-6)
            t, size = self.backtrack(x, v, step, 1.0)
            x = x + t * step
            if t * size < _GRID_TOL:
                break
        return x, h

    def backtrack(
        self, x: FloatArray, v: FloatArray, step: FloatArray, t: float
    ) -> tuple[float, float]:
        """The step length from t, halved until the concave objective does not fall; and
        the step's largest entry (its size, which the callers' tests want too)."""
        moved = float(np.abs(step).max()) if len(step) else 0.0
        if moved <= _SAFE_STEP:
            return t, moved
        # Far from the optimum (a cold start): backtrack.
        obj = self.expected(x, v)
        while self.expected(x + t * step, v) < obj - 1e-12 * abs(obj) and t > 1e-8:
            t *= 0.5
        return t, moved


@dataclass
class _Variational:
    """q(x) = N(x, Σ), the Gaussian closest to the posterior at a fixed θ-prior precision."""

    x: FloatArray
    cov: FloatArray  # lower triangle of Σ, zeros above
    v: FloatArray  # Var_q(z_k) of every comparison's linear predictor
    elbo: float
    iterations: int
    converged: bool


def _variational(
    post: _Posterior,
    lam: FloatArray,
    x: FloatArray,
    v: FloatArray,
    max_iter: int,
    tol: float,
    v_tol: float = 1e-4,
) -> _Variational:
    """Maximise the bound (``_Bound``) at fixed λ from (x, v), to ``tol`` on x's step and
    ``v_tol`` on v. The plain fixed-point iteration contracts fast where there are data;
    where there are next to none (a weak prior on a pair or two) it can cycle or crawl,
    so after ``_UNDAMPED`` rounds that do not contract (or ``_UNCHECKED`` rounds) every
    round must raise the bound, shortened (ρ halved) until it does."""
    bound = _Bound(post, lam)
    converged = False
    it = 0
    omega: FloatArray | None = None  # the curvature weights behind the current Σ
    rho = 1.0  # how far a round moves towards the new weights and mean
    monitored = False
    current = -math.inf  # the bound at the current q, once monitored
    last_v_moved = math.inf
    cov: FloatArray | None = None  # (zeros when no round runs)
    logdet = 0.0
    for it in range(1, max_iter + 1):
        step, cov_new, logdet_new, ew = bound.round(x, v, omega, rho)
        t, size = bound.backtrack(x, v, step, rho)
        x_new = x + t * step
        if monitored:
            value, v_new = bound.value(x_new, cov_new, logdet_new)
            if value < current - 1e-12 * abs(current):
                # The bound went down: a shorter move (towards the same fixed point).
                rho *= 0.5
                if rho < _MIN_DAMPING:
                    # No move raises it: the optimum to rounding (met with next to no
                    # data, where the bound is flat).
                    converged = True
                    break
                continue
            gain, current = value - current, value
            rho = min(1.0, 2.0 * rho)
            x, v, cov, logdet, omega = x_new, v_new, cov_new, logdet_new, ew
            if gain < _FLAT_BOUND * (1.0 + abs(value)):
                # The bound has stopped rising: what still moves is a direction it is flat
                # in (an essay that won or lost everything, drifting by less than its SE).
                converged = True
                break
            continue
        v_new = post.pair_variances(cov_new)
        v_moved = float(np.abs(v_new - v).max()) if len(v) else 0.0
        moved = t * size
        x, v, cov, logdet, omega = x_new, v_new, cov_new, logdet_new, ew
        if moved < tol and v_moved < v_tol:
            # Σ is from the weights one round back: within the tolerances of the last.
            elbo, _ = bound.value(x, cov, logdet, v)
            return _Variational(x, cov, v, elbo, it, True)
        if it > _UNDAMPED and (v_moved > last_v_moved or it > _UNCHECKED):
            monitored = True
            current, _ = bound.value(x, cov, logdet, v)
            rho = 0.5
        last_v_moved = v_moved
    # The last accepted round's Σ (its weights one round behind x and v: within the
    # tolerances when converged; a grid point's few rounds need no better). v is already
    # that Σ's (every accepted round set it from the Σ it accepted, the first always
    # accepted) unless no round ran.
    if cov is None:
        cov = np.zeros((post.p, post.p))
    elbo, v = bound.value(x, cov, logdet, v if it else None)
    return _Variational(x, cov, v, elbo, it, converged)


class _Response:
    """How the variational optimum at u = log λ moves with u (linear response), and the
    log posterior of u around there.

    Stationarity Xᵀ(y − E σ(t)) = λ D x (D selects θ) at fixed v, differentiated in u:

        dx/du = −Σ λ D x,     dΣ/du ≈ −λ Σ D Σ     (the change of E σ'(t) neglected).

    With S = E_q Σθ_i² = |x_θ|² + tr Σ_θθ, the log posterior of u (uniform prior on τ)
    L(u) = ELBO(u) − u/2 has L'(u) = ½(n − λS) − ½ (envelope theorem) and

        dS/du = 2 x_θ · dx_θ/du − λ ‖Σ_θθ‖²_F,      L''(u) = −½ λ (S + dS/du).

    The mode solves log((n − 1)/S) = u; Newton steps on that use dS/du.
    """

    def __init__(self, x: FloatArray, lower: FloatArray, n: int, lam: float):
        block = lower[:n, :n]
        diag = block.diagonal()
        self.spread = float(x[:n] @ x[:n]) + float(diag.sum())
        shrink = np.zeros(len(x))
        shrink[:n] = lam * x[:n]
        self.dx = -_symmetric_matvec(lower, shrink)
        frobenius = 2.0 * float((block * block).sum()) - float(diag @ diag)
        self.dspread = 2.0 * float(x[:n] @ self.dx[:n]) - lam * frobenius
        self.n, self.lam = n, lam

    def target(self, u: float) -> float:
        """log of the fixed point (n − 1)/S of λ, minus u: decreasing through 0 at the mode."""
        return math.log(max(self.n - 1.0, 0.5) / max(self.spread, 1e-300)) - u

    def newton(self, u: float) -> float:
        """The Newton step on ``target`` (clamped to ±``_MAX_MODE_STEP``)."""
        target = self.target(u)
        slope = -self.dspread / max(self.spread, 1e-300) - 1.0
        step = -target / slope if slope < -1e-3 else math.copysign(_MAX_MODE_STEP, target)
        return min(max(step, -_MAX_MODE_STEP), _MAX_MODE_STEP)

    def step(self, u: float, previous: tuple[float, float] | None) -> float:
        """The next step of u: secant through ``previous`` (u, target) where it slopes
        down, else Newton. (dS/du leaves out how E σ'(t) moves with u, which makes the
        target look 30–60 % steeper than it is: the secant, once there, is closer.)"""
        target = self.target(u)
        if previous is not None and previous[0] != u:
            secant = (target - previous[1]) / (u - previous[0])
            if secant < -1e-3:
                return min(max(-target / secant, -_MAX_MODE_STEP), _MAX_MODE_STEP)
        return self.newton(u)

    def sd(self) -> float:
        """Posterior SD of u from L'' (a wide default where L is not concave)."""
        curv = -0.5 * self.lam * (self.spread + self.dspread)
        return 1.0 / math.sqrt(-curv) if curv < 0 else _GRID_MAX_STEP / _GRID_STEP_SD


def _joint_mode(
    post: _Posterior,
    lam: FloatArray,
    bounds: tuple[float, float],
    solver: _Solver,
    u_start: float | None = None,
) -> tuple[float, bool]:
    """The mode of log λ by rounds that move x, v and u = log λ together: each round is
    one variational round (``_Bound.round``) at the current u, then a step of u on
    ``_Response.target`` (secant once two rounds are in, Newton with the linear response
    before). One n×n inverse a round, and no inner solve to convergence at every trial
    u; above ``_DENSE_MAX`` parameters ``_cheap_start`` first moves x, v and u without
    any inverse. When the last round also met the solver's tolerances its q is the fit
    at the returned u (cached in ``solver``); settled when u, x and v all stopped.
    ``u_start``: where u starts (a warm start, `_warm`; x and v are then in ``solver``), else 0."""
    n = post.n
    u = min(max(0.0 if u_start is None else u_start, bounds[0]), bounds[1])
    if post.p > _DENSE_MAX:
        u = _cheap_start(post, lam, bounds, solver, u)
    x, v = solver.state["x"], solver.state["v"]
    settled = False
    frozen = 0
    previous: tuple[float, float] | None = None
    for it in range(1, _JOINT_ROUNDS + 1):
        lam[:n] = math.exp(u)
        bound = _Bound(post, lam)
        if post.p > _DENSE_MAX:
            x, _ = bound.settle(x, v, solver.max_iter)
        step, lower, logdet, _ = bound.round(x, v, None, 1.0)
        t, size = bound.backtrack(x, v, step, 1.0)
        moved = t * size
        x = x + t * step
        v_new = post.pair_variances(lower)
        v_moved = float(np.abs(v_new - v).max()) if len(v) else 0.0
        v = v_new
        response = _Response(x, lower, n, math.exp(u))
        du = response.step(u, previous)
        previous = (u, response.target(u))
        u_new = min(max(u + du, bounds[0]), bounds[1])
        settled = settled or abs(u_new - u) < 0.1 * min(response.sd(), 1.0)
        if not settled:
            u = u_new
            continue
        # The mode to a tenth of its SD: u stays (moving it by less only kept x and v
        # from settling) and q is finished there: here in large batches, where x settles
        # without an inverse (at most ``_FROZEN_ROUNDS``), else by the solver.
        if moved < solver.tol and v_moved < _GRID_TOL:
            elbo, _ = bound.value(x, lower, logdet, v)
            solver.cache[u] = _Variational(x, lower, v, elbo, it, True)
            break
        frozen += 1
        if post.p <= _DENSE_MAX or frozen > _FROZEN_ROUNDS:
            break
    solver.start(x, v)
    return u, settled


def _cheap_start(
    post: _Posterior, lam: FloatArray, bounds: tuple[float, float], solver: _Solver, u: float
) -> float:
    """A start for ``_joint_mode`` without an n×n inverse (large batches, where each
    costs most): x at its optimum by sparse Newton steps, Var θ_i ≈ 1/H_ii (H's diagonal,
    the other entries neglected), v_k ≈ 1/H_aa + 1/H_bb, and u at the fixed point
    log((n − 1)/S) with S = |x_θ|² + Σ 1/H_ii; a few rounds from u. Leaves x, v in
    ``solver``."""
    n = post.n
    x, v = solver.state["x"], solver.state["v"]
    for _ in range(_CHEAP_ROUNDS):
        lam[:n] = math.exp(u)
        bound = _Bound(post, lam)
        x, h = bound.settle(x, v, solver.max_iter)
        var = 1.0 / h.diag
        v = var[post.a] + var[post.b]
        spread = float(x[:n] @ x[:n]) + float(var[:n].sum())
        u_new = min(max(math.log(max(n - 1.0, 0.5) / max(spread, 1e-300)), bounds[0]), bounds[1])
        done = abs(u_new - u) < 0.02
        u = u_new
        if done:
            break
    solver.start(x, v)
    return u


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


def _mixture(points: Sequence[tuple[float, _Variational]], weights: FloatArray, n: int) -> _Mixture:
    """θ̂ = Σ_k w_k m_k, Var θ = Σ_k w_k Σ_k + Σ_k w_k (m_k − θ̂)² (the second term is the
    uncertainty of τ: Kass & Steffey 1989); the same for η when fitted."""
    w = weights / weights.sum()
    means = np.array([q.x[:n] - q.x[:n].mean() for _, q in points])
    theta = w @ means
    within = np.array([_centred_variances(q.cov, n) for _, q in points])
    theta_var = w @ within + w @ (means - theta) ** 2
    eta, eta_var = 0.0, 0.0
    if len(points[0][1].x) > n:
        etas = np.array([q.x[n] for _, q in points])
        eta = float(w @ etas)
        eta_var = float(w @ np.array([q.cov[n, n] for _, q in points]) + w @ (etas - eta) ** 2)
    tau2 = float(w @ np.exp(-np.array([u for u, _ in points])))
    return _Mixture(theta, theta_var, eta, eta_var, tau2, 0.0, 0, True)


def _delta_mixture(u: float, mode: _Variational, response: _Response, sd: float) -> _Mixture:
    """The mixture over a narrow posterior of u (SD ``sd``) by the delta method: three
    Gauss–Hermite nodes u ± √3 sd (weights ⅙) and the mode (⅔) with the means moved
    along dx/du, Σ held at the mode's (its change is second order in sd):
    Var θ_i = Σ_ii + sd² (dx_i/du)², centred."""
    n = response.n
    x, dx = mode.x, response.dx
    theta = x[:n] - x[:n].mean()
    slope = dx[:n] - dx[:n].mean()
    theta_var = _centred_variances(mode.cov, n) + sd * sd * slope * slope
    eta = float(x[n]) if len(x) > n else 0.0
    eta_var = float(mode.cov[n, n] + sd * sd * dx[n] ** 2) if len(x) > n else 0.0
    spread = math.sqrt(3.0) * sd
    tau2 = math.exp(-u) * (4.0 + math.exp(spread) + math.exp(-spread)) / 6.0
    return _Mixture(theta, theta_var, eta, eta_var, tau2, 0.0, 0, True)


class _Solver:
    """Variational fits at trial values of u = log λ, each warm-started where the last
    ended (or where ``start`` says), cached by u."""

    def __init__(self, post: _Posterior, lam: FloatArray, max_iter: int, tol: float):
        self.post, self.lam, self.max_iter, self.tol = post, lam, max_iter, tol
        self.state = {"x": np.zeros(post.p), "v": np.zeros(len(post.y))}
        self.cache: dict[float, _Variational] = {}
        self.iterations = 0
        self.converged = True

    def start(self, x: FloatArray, v: FloatArray) -> None:
        self.state["x"], self.state["v"] = x, v

    def evaluate(self, u: float, loose: bool = False) -> _Variational:
        """q at u; ``loose``: to ``_GRID_TOL`` (grid points off the mode: the bound is
        stationary in q, so its error is second order in theirs)."""
        if u in self.cache:
            return self.cache[u]
        self.lam[: self.post.n] = math.exp(u)
        t = max(self.tol, _GRID_TOL) if loose else self.tol
        rounds = _GRID_ROUNDS if loose else _VARIATIONAL_ROUNDS * self.max_iter
        # v to _GRID_TOL: E σ'(t) moves by a fraction of that, the SEs by less than 1e-3.
        v_tol = max(t, _GRID_TOL)
        q = _variational(self.post, self.lam, self.state["x"], self.state["v"], rounds, t, v_tol)
        self.iterations += q.iterations
        self.converged = self.converged and (q.converged or loose)
        self.start(q.x, q.v)
        self.cache[u] = q
        return q

    def target(self, u: float) -> float:
        """``_Response.target`` with q solved at u (the safeguarded root finder's function)."""
        q = self.evaluate(u)
        return _Response(q.x, q.cov, self.post.n, math.exp(u)).target(u)


def _grid(
    solver: _Solver,
    mode: tuple[float, _Variational],
    response: _Response,
    sd: float,
    bounds: tuple[float, float],
) -> list[tuple[float, _Variational]]:
    """Grid points of u on both sides of the mode, a step of about one posterior SD apart
    (bounded), outwards until the log posterior drops ``_GRID_DROP`` below the mode's or
    the bounds of u (INLA's grid strategy, Rue, Martino & Chopin 2009). Each side's first
    point starts from the linear response, later ones where the last two points lead."""
    u_mode, q_mode = mode
    l_mode = q_mode.elbo + _log_tau_prior(u_mode)
    step = min(max(_GRID_STEP_SD * sd, _GRID_MIN_STEP), _GRID_MAX_STEP)
    points = [mode]
    for direction in (1.0, -1.0):
        previous = q_mode
        solver.start(q_mode.x + direction * step * response.dx, q_mode.v)
        for k in range(1, _GRID_MAX_POINTS + 1):
            u = u_mode + direction * k * step
            if not bounds[0] - 1e-9 <= u <= bounds[1] + 1e-9:
                break
            here = solver.evaluate(u, loose=True)
            points.append((u, here))
            if here.elbo + _log_tau_prior(u) < l_mode - _GRID_DROP:
                break
            solver.start(2.0 * here.x - previous.x, np.maximum(2.0 * here.v - previous.v, 0.0))
            previous = here
    return points


def _polish(
    solver: _Solver, mode: tuple[float, _Variational], bounds: tuple[float, float]
) -> tuple[float, _Variational, bool]:
    """Steps of u on full solves (``_Response.step``) from the joint search's mode until
    the next is under a tenth of u's posterior SD. The joint search judges that while x
    and v still move, and can stop a quarter of an SD away; the grid does not mind (its
    weights are exact wherever it is centred) but the delta method is centred there."""
    u, q = mode
    previous: tuple[float, float] | None = None
    for _ in range(_POLISH_STEPS):
        response = _Response(q.x, q.cov, solver.post.n, math.exp(u))
        du = response.step(u, previous)
        if abs(du) < 0.1 * min(response.sd(), 1.0):
            return u, q, True
        previous = (u, response.target(u))
        solver.start(q.x + du * response.dx, q.v)
        u = min(max(u + du, bounds[0]), bounds[1])
        q = solver.evaluate(u)
    return u, q, False


def _log_precision_bounds(prior: float) -> tuple[float, float]:
    """The range of u = log λ = −2 log τ: τ from 1/√prior down to ``_MIN_PRIOR_SD``."""
    return math.log(prior), math.log(1.0 / _MIN_PRIOR_SD**2)


def _warm(
    ids: Sequence[str], warm: WarmStart | None, post: _Posterior, bounds: tuple[float, float]
) -> _Start | None:
    """The solver's start from an earlier fit of the same essays (None: another essay set,
    or a number that is not finite): x = (θ, η); v_k from the SEs, their covariances
    neglected (the first round replaces v); u at the fixed point log((n − 1)/S) of
    `_Response.target`, S = Σ θ_i² + Σ SE_i² (the earlier fit's τ, without a field for it)."""
    if warm is None or len(warm.theta) != len(ids) or any(e not in warm.theta for e in ids):
        return None
    if any(e not in warm.se for e in ids):
        return None
    n = post.n
    x = np.zeros(post.p)
    x[:n] = [warm.theta[e] for e in ids]
    var = np.array([warm.se[e] for e in ids], dtype=np.float64) ** 2
    v = var[post.a] + var[post.b]
    if post.fit_position:
        x[n] = warm.eta or 0.0
        v += (warm.eta_se or 0.0) ** 2
    spread = float(x[:n] @ x[:n]) + float(var.sum())
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(v)) and math.isfinite(spread)):
        return None
    u = math.log(max(n - 1.0, 0.5) / max(spread, 1e-300))
    return _Start(x, v, min(max(u, bounds[0]), bounds[1]))


def _integrated_fit(
    post: _Posterior,
    prior: float,
    max_iter: int,
    tol: float,
    integrate: bool = True,
    start: _Start | None = None,
) -> _Mixture:
    """θ and η with the θ prior's scale τ integrated out (empirical mode).

    For each λ = 1/τ² the Gaussian variational posterior q_λ gives a lower bound
    ELBO(λ) on log p(y | λ). The posterior of u = log λ is taken as
    exp(ELBO(u))·p(u), p uniform on τ; its mode solves (envelope theorem)

        dL/du = ½ [n − λ E_q Σ θ_i²] − ½ = 0,

    found by joint rounds of x, v and u (``_joint_mode``; the safeguarded secant method
    on full solves when those do not settle). Then τ is integrated out
    (Rue, Martino & Chopin 2009): where u's posterior is narrow (SD < ``_NARROW_SD``)
    by three Gauss–Hermite points taken by the delta method (``_delta_mixture``), else
    over a grid (``_grid``) weighted by exp(L), and

        θ̂ = Σ_k w_k m_k,   Var θ = Σ_k w_k Σ_k + Σ_k w_k (m_k − θ̂)².

    Plugging in one τ̂ instead loses coverage where τ is poorly determined (few
    comparisons per essay): batches whose τ̂ falls short are over-shrunk. With
    ``integrate`` false only the mode is used (split-half refits: only the ranking counts).
    ``start``: where the solver starts (`_warm`), else cold.
    """
    n = post.n
    bounds = _log_precision_bounds(prior)
    solver = _Solver(post, np.full(post.p, prior), max_iter, tol)
    if start is not None:
        solver.start(start.x, start.v)
    u_mode, settled = _joint_mode(
        post, solver.lam, bounds, solver, None if start is None else start.u
    )
    if not settled:
        u_mode, settled = _solve_log_precision(solver.target, u_mode, *bounds)
    mode = solver.evaluate(u_mode)
    response = _Response(mode.x, mode.cov, n, math.exp(u_mode))
    sd = response.sd()
    if integrate and sd < _NARROW_SD:
        u_mode, mode, polished = _polish(solver, (u_mode, mode), bounds)
        settled = settled and polished
        response = _Response(mode.x, mode.cov, n, math.exp(u_mode))
        sd = response.sd()
    inside = bounds[0] <= u_mode - 2.0 * sd and u_mode + 2.0 * sd <= bounds[1]
    if not integrate:
        mix = _mixture([(u_mode, mode)], np.ones(1), n)
    elif sd < _NARROW_SD and inside:
        mix = _delta_mixture(u_mode, mode, response, sd)
    else:
        points = _grid(solver, (u_mode, mode), response, sd, bounds)
        lps = np.array([q.elbo + _log_tau_prior(u) for u, q in points])
        mix = _mixture(points, np.exp(lps - lps.max()), n)
    mix.log_posterior = mode.elbo + _log_tau_prior(u_mode)
    mix.iterations = solver.iterations
    mix.converged = solver.converged and settled
    return mix


def fit_bt(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    fit_position: bool = True,
    prior: float = _PRIOR,
    prior_mode: Literal["empirical", "fixed"] = "empirical",
    max_iter: int = _MAX_ITER,
    tol: float = _TOL,
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
    indexed: tuple[IntArray, IntArray, FloatArray] | None = None,
    components: int | None = None,
    warm: WarmStart | None = None,
) -> FitResult:
    """``indexed``: `_index_comparisons(essay_ids, comparisons)` when the caller has it, and
    ``components`` the comparison graph's count (`cj.graph.components`); ``warm``: where the
    empirical fit may start (`WarmStart`)."""
    if not prior > 0:
        raise ValueError("prior must be > 0")
    if prior_mode not in ("empirical", "fixed"):
        raise ValueError(f"unknown prior_mode {prior_mode!r}")
    ids = _unique_ids(essay_ids)
    n = len(ids)
    a, b, y = indexed if indexed is not None else _index_comparisons(ids, comparisons)
    m = len(y)
    if components is None:
        components = graph.components(n, a, b)[0]
    if n == 0:
        return FitResult({}, {}, None, None, False, 0, True, 0, m)
    post = _Posterior(n, a, b, y, fit_position)
    if prior_mode == "empirical":
        mix = _integrated_fit(
            post,
            prior,
            max_iter,
            max(tol, _VARIATIONAL_TOL),
            integrate,
            _warm(ids, warm, post, _log_precision_bounds(prior)),
        )
        return _result(
            ids,
            mix.theta,
            mix.theta_var,
            (mix.eta, mix.eta_var) if fit_position else None,
            components,
            converged=mix.converged,
            iterations=mix.iterations,
            n_comparisons=m,
            log_posterior=mix.log_posterior,
            prior_sd=math.sqrt(mix.tau2),
        )
    lam = np.full(post.p, prior)
    opt = _newton(post, np.zeros(post.p), lam, max_iter, tol)
    cov = _covariance(post.hessian(opt.x, lam).dense(), n)
    return _result(
        ids,
        opt.x[:n] - opt.x[:n].mean(),
        cov.centred_theta_var,
        (float(opt.x[n]), float(cov.diag[n])) if fit_position else None,
        components,
        converged=opt.converged,
        iterations=opt.iterations,
        n_comparisons=m,
        log_posterior=opt.value,
        prior_sd=None,
    )


def _result(
    ids: Sequence[str],
    theta: FloatArray,
    theta_var: FloatArray,
    eta: tuple[float, float] | None,
    components: int,
    *,
    converged: bool,
    iterations: int,
    n_comparisons: int,
    log_posterior: float,
    prior_sd: float | None,
) -> FitResult:
    """A fit's result from its arrays: θ and SE per essay, η and its SE from (mean, variance)."""
    se = np.sqrt(np.maximum(theta_var, 0.0))
    return FitResult(
        theta={e: float(theta[i]) for i, e in enumerate(ids)},
        se={e: float(se[i]) for i, e in enumerate(ids)},
        eta=float(eta[0]) if eta is not None else None,
        eta_se=math.sqrt(max(float(eta[1]), 0.0)) if eta is not None else None,
        connected=components == 1,
        components=components,
        converged=converged,
        iterations=iterations,
        n_comparisons=n_comparisons,
        log_posterior=log_posterior,
        prior_sd=prior_sd,
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

    def solve(self, g: FloatArray, rtol: float = 1e-12) -> FloatArray:
        if self.full is not None:
            return _cholesky_solve(self.full, g)
        assert self.sparse is not None
        return _jacobi_cg(self.sparse, 1.0 / self.diag, g, rtol)

    def dense(self) -> FloatArray:
        if self.full is not None:
            return self.full
        assert self.sparse is not None
        return np.asarray(self.sparse.toarray(), dtype=np.float64)


def _jacobi_cg(
    a: scipy.sparse.csr_matrix, inv_diag: FloatArray, b: FloatArray, rtol: float
) -> FloatArray:
    """x with a·x ≈ b (a symmetric positive definite) by conjugate gradients preconditioned
    by ``inv_diag`` = 1/diag(a), until ‖b − a·x‖ < rtol·‖b‖ or 10·len(b) steps: what
    ``scipy.sparse.linalg.cg(a, b, M=diags(inv_diag), rtol=rtol, atol=0)`` computes, step
    for step and to the bit (tests/test_scoring_cg.py). Speed (issue 11): without its
    LinearOperator layers around each product and preconditioner step (a 1,000-essay
    batch's split-half makes 6,420 products; its end went 1.57 → 1.40 s of CPU)."""
    bnrm2 = float(np.linalg.norm(b))
    x = np.zeros_like(b)
    if bnrm2 == 0:
        return x
    atol = rtol * bnrm2
    r = b.copy()
    p = np.empty_like(b)
    rho_prev = 0.0
    for iteration in range(10 * len(b)):
        if np.linalg.norm(r) < atol:
            break
        z = inv_diag * r
        rho_cur = float(np.dot(r, z))
        if iteration > 0:
            p *= rho_cur / rho_prev
            p += z
        else:
            p[:] = z
        q = a @ p
        alpha = rho_cur / float(np.dot(p, q))
        x += alpha * p
        r -= alpha * q
        rho_prev = rho_cur
    return x


@dataclass
class _Covariance:
    diag: FloatArray  # posterior variances of every parameter
    centred_theta_var: FloatArray  # variances of θ_i − mean(θ)


def _covariance(h: FloatArray, n: int) -> _Covariance:
    """What the SEs need of H⁻¹ (H symmetric positive definite), from its Cholesky factor."""
    c = _cholesky(h, clean=1)
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


def _usable_essays(ids: Sequence[str], indexed: tuple[IntArray, IntArray, FloatArray]) -> list[str]:
    """Essays compared that neither won every comparison nor lost every one (those have
    infinite ML scores); ``indexed``: `_index_comparisons` of the comparisons."""
    a, b, y = indexed
    n = len(ids)
    games = np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
    wins = np.bincount(a, weights=y, minlength=n) + np.bincount(b, weights=1.0 - y, minlength=n)
    return [e for e, g, w in zip(ids, games, wins, strict=True) if g and 0 < w < g]


def classical_ssr(
    essay_ids: Sequence[str], comparisons: Sequence[Comparison], *, fit_position: bool = True
) -> Reliability:
    """The classical SSR on a near-ML fit (fixed prior of precision 0.01), over the essays
    with at least one win and one loss (Rasch practice: extreme scores have no finite ML
    estimate). Adaptive pairing inflates it (Bramley & Vitello 2019)."""
    ids = _unique_ids(essay_ids)
    return _classical_ssr(ids, _index_comparisons(ids, comparisons), fit_position)


def _classical_ssr(
    ids: list[str],
    indexed: tuple[IntArray, IntArray, FloatArray],
    fit_position: bool,
    components: int | None = None,
) -> Reliability:
    """`classical_ssr` of indexed comparisons (``components``: their graph's, when known)."""
    usable = _usable_essays(ids, indexed)
    if len(usable) < MIN_RELIABILITY_ESSAYS:
        return Reliability(
            None,
            f"{len(usable)} essays with both a win and a loss: "
            f"a reliability needs at least {MIN_RELIABILITY_ESSAYS}",
        )
    fit = _fit_indexed(ids, indexed, components, "fixed", fit_position)
    if not fit.connected:
        return Reliability(None, f"comparison graph not connected ({fit.components} components)")
    value = ssr({e: fit.theta[e] for e in usable}, {e: fit.se[e] for e in usable})
    if value is None:
        return Reliability(None, "the scores do not vary")
    if value < 0:
        return Reliability(None, "error variance exceeds the observed variance (SSR < 0)")
    return Reliability(value)


def _fit_indexed(
    ids: list[str],
    indexed: tuple[IntArray, IntArray, FloatArray],
    components: int | None,
    prior_mode: Literal["empirical", "fixed"],
    fit_position: bool,
    *,
    integrate: bool = True,
    warm: WarmStart | None = None,
) -> FitResult:
    """`fit_bt` at its defaults but ``prior_mode`` and ``fit_position``, on comparisons
    indexed (`_index_comparisons`) and their graph's ``components`` when known;
    ``integrate=False``: at the mode of τ, not integrated over it; ``warm``: `_fit`'s."""
    return _fit(
        ids,
        (),
        fit_position=fit_position,
        prior=_PRIOR,
        prior_mode=prior_mode,
        max_iter=_MAX_ITER,
        tol=_TOL,
        integrate=integrate,
        indexed=indexed,
        components=components,
        warm=warm,
    )


@dataclass(frozen=True)
class WaveScores:
    """What a wave's scoring gives: the fit, its posterior reliability, the classical SSR
    (None when not asked for)."""

    fit: FitResult
    posterior: Reliability
    classical: Reliability | None


def score_wave(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    classical: bool = True,
    indexed: tuple[IntArray, IntArray, FloatArray] | None = None,
    warm: WarmStart | None = None,
) -> WaveScores:
    """`fit_bt` (its defaults), `posterior_reliability` of it and (``classical``)
    `classical_ssr`: the same numbers as the three calls, the comparisons indexed and their
    graph's components counted once for both fits (speed, issue 11). ``indexed``:
    `_index_comparisons(essay_ids, comparisons)` when the caller has it (``comparisons`` are
    then not read). ``warm``: where the fit may start (`WarmStart`: an earlier fit of the same
    essays), the same optimum to the solver's tolerances."""
    ids = _unique_ids(essay_ids)
    if indexed is None:
        indexed = _index_comparisons(ids, comparisons)
    components = graph.components(len(ids), indexed[0], indexed[1])[0]
    fit = _fit_indexed(ids, indexed, components, "empirical", True, warm=warm)
    ssr = _classical_ssr(ids, indexed, True, components) if classical else None
    return WaveScores(fit, posterior_reliability(fit), ssr)


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


def _compared_in_both(
    n: int, a: IntArray, b: IntArray, halves: tuple[IntArray, IntArray]
) -> npt.NDArray[np.bool_] | None:
    """The essays compared in both halves (a mask), None when fewer than `MIN_SPLIT_ESSAYS`;
    ``a``, ``b``: all the comparisons' essays, ``halves`` the positions of each half's."""
    seen = [np.bincount(a[h], minlength=n) + np.bincount(b[h], minlength=n) > 0 for h in halves]
    both = seen[0] & seen[1]
    return both if int(both.sum()) >= MIN_SPLIT_ESSAYS else None


def _variational_half(
    ids: list[str],
    indexed: tuple[IntArray, IntArray, FloatArray],
    half: IntArray,
    fit_position: bool,
) -> FloatArray:
    """θ of a half (positions ``half`` among the indexed comparisons) fitted as reported, at
    the mode of τ: only the ranking of θ matters here (τ integrated changes the SEs)."""
    a, b, y = indexed
    part = (a[half], b[half], y[half])
    theta = _fit_indexed(ids, part, None, "empirical", fit_position, integrate=False).theta
    return np.array([theta[e] for e in ids], dtype=np.float64)


@dataclass(frozen=True)
class _FullFit:
    """What the halves' MAP fits take from the full fit: the θ prior's precision λ and the
    start of Newton's steps (its θ, η 0)."""

    lam: float
    theta: Mapping[str, float]
    prior: float = _PRIOR

    @staticmethod
    def of(scores: Mapping[str, tuple[float, float]], prior: float = _PRIOR) -> _FullFit:
        """λ from the full fit's θ̂ and SE: the empirical mode's condition λ = (n − 1)/S,
        S = Σ (θ̂_i² + SE_i²) (``_Response.target``), within the bounds τ has there."""
        n = len(scores)
        spread = sum(t * t + s * s for t, s in scores.values())
        lam = max(n - 1.0, 0.5) / max(spread, 1e-300)
        lam = min(max(lam, prior), 1.0 / _MIN_PRIOR_SD**2)
        return _FullFit(lam, {e: t for e, (t, _) in scores.items()}, prior)

    def start(self, ids: list[str]) -> FloatArray:
        """The full fit's θ of ``ids`` (0 where it has none)."""
        return np.array([self.theta.get(e, 0.0) for e in ids], dtype=np.float64)

    def half_maps(
        self,
        ids: list[str],
        indexed: tuple[IntArray, IntArray, FloatArray],
        halves: Sequence[IntArray],
        fit_position: bool,
    ) -> FloatArray:
        """θ of each half's MAP at λ (a row per half; ``halves``: positions among the indexed
        comparisons), by Newton from the full fit's θ̂ (`start`), every half at once
        (`_Halves`; the first steps shared by all, `_Halves.shared_steps`): no n×n inverse."""
        n = len(ids)
        if not halves:
            return np.zeros((0, n))
        halves_ = _Halves(n, indexed, halves, fit_position)
        lam = np.full(halves_.p, self.prior)
        lam[:n] = self.lam
        x0 = np.zeros((len(halves), halves_.p))
        x0[:, :n] = self.start(ids)
        if not halves_.sparse:
            x0 = halves_.shared_steps(x0, lam, _Posterior(n, *indexed, fit_position))
        return halves_.newton(x0, lam, _MAX_ITER, _TOL)[:, :n]


class _Halves:
    """The log posteriors (`_Posterior`) of many subsets of the comparisons ("halves"),
    maximised by `_newton`'s steps taken in lockstep: their comparisons laid end to end and
    their parameters as the rows of one array, so that the linear predictors, gradients,
    values and line searches of all of them take one pass of numpy each, and only the
    Hessians and their factorisations one per half. Issue 11: a batch's split-half fits 40
    halves, and one `_newton` each spent more in numpy's per-call overhead than in the
    factorisations. Above ``_DENSE_MAX`` parameters each half's Hessian is its
    `_Posterior`'s sparse one."""

    def __init__(
        self,
        n: int,
        indexed: tuple[IntArray, IntArray, FloatArray],
        halves: Sequence[IntArray],
        fit_position: bool,
    ):
        a, b, y = indexed
        self.n, self.k, self.fit_position = n, len(halves), fit_position
        self.p = p = n + 1 if fit_position else n
        sizes = np.array([len(h) for h in halves], dtype=np.intp)
        self.ends = np.cumsum(sizes)
        self.owner = np.repeat(np.arange(self.k), sizes)
        every = np.concatenate(halves) if self.k else np.zeros(0, dtype=np.intp)
        ea, eb = a[every], b[every]
        row = self.owner * p  # each half's parameters are a row of a (halves × p) array
        self.at_a, self.at_b, self.at_eta = row + ea, row + eb, row + n
        self.y = y[every]
        self.sparse = p > _DENSE_MAX
        # Above `_DENSE_MAX`: each half's `_Posterior`, for its sparse Hessian.
        self.posts = (
            [_Posterior(n, a[h], b[h], y[h], fit_position) for h in halves] if self.sparse else []
        )
        # `_Posterior.flat` and `.signs` of every half: its own p × p Hessian assembles in
        # cache, faster than one (halves × p × p) array's part.
        self.signs = _HESSIAN_SIGNS[: 9 if fit_position else 4, None]
        self.flats = [] if self.sparse else [_hessian_flat(a[h], b[h], n, p) for h in halves]

    def linear(self, x: FloatArray) -> FloatArray:
        """Every half's z = θ_a − θ_b (+ η) of its comparisons, end to end."""
        flat = x.reshape(-1)
        z = flat[self.at_a] - flat[self.at_b]
        if self.fit_position:
            z += flat[self.at_eta]
        return np.asarray(z, dtype=np.float64)

    def values(self, x: FloatArray, z: FloatArray, lam: FloatArray) -> FloatArray:
        """Every half's log posterior (`_Posterior.value`; log(1 + e^z) as
        max(z, 0) + log1p(e^−|z|), to rounding what `np.logaddexp` gives in half its time)."""
        terms = self.y * z - (np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z))))
        ll = np.bincount(self.owner, weights=terms, minlength=self.k)
        return np.asarray(ll - 0.5 * ((x * x) @ lam), dtype=np.float64)

    def gradients(
        self, x: FloatArray, z: FloatArray, lam: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Every half's gradient (a row each) and the weights σ'(z) of its comparisons, end
        to end: `_Posterior.weighted`'s gradient."""
        k, p = self.k, self.p
        pr = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), as `_Posterior.gradient_hessian`
        r = self.y - pr
        g: FloatArray = np.asarray(np.bincount(self.at_a, weights=r, minlength=k * p), np.float64)
        g -= np.bincount(self.at_b, weights=r, minlength=k * p)
        g = g.reshape(k, p)
        if self.fit_position:
            g[:, self.n] += np.bincount(self.owner, weights=r, minlength=k)
        g -= lam * x
        return g, pr * (1.0 - pr)

    def shared_steps(self, x: FloatArray, lam: FloatArray, post: _Posterior) -> FloatArray:
        """``x`` (every half at the same start) moved by ``_SHARED_STEPS`` steps x += M⁻¹g(x),
        M = ½ XᵀW₀X + diag(λ) the Hessian of half the comparisons (``post``: all of them) at
        the start: one factorisation for every half. Issue 11: from the full fit's θ̂ a half's
        first Newton step is long (decrement ~50, up to 1.2 logits); two shared steps spare a
        Newton step of each (3.1 factorisations a half to 2.0). Only where Newton starts: it
        converges from anywhere (the log posterior is concave), to the same optimum."""
        z0 = post.linear(x[0])
        pr = 0.5 * (1.0 + np.tanh(0.5 * z0))
        m = post.weighted(np.zeros_like(z0), 0.5 * pr * (1.0 - pr), lam, x[0])[1].dense()
        c = _cholesky(m)
        for _ in range(_SHARED_STEPS):
            g = self.gradients(x, self.linear(x), lam)[0]
            x = x + scipy.linalg.lapack.dpotrs(c, g.T, lower=1)[0].T
        return x

    def steps(
        self, x: FloatArray, z: FloatArray, lam: FloatArray, active: npt.NDArray[np.bool_]
    ) -> tuple[FloatArray, FloatArray]:
        """The Newton step of every active half (0 for the others) and its decrement g·step:
        `_Posterior.weighted`'s gradient and Hessian, `_Hessian.solve`'s step."""
        p = self.p
        g, w = self.gradients(x, z, lam)
        step = np.zeros_like(x)
        for j in np.flatnonzero(active):
            wj = w[self.ends[j - 1] if j else 0 : self.ends[j]]
            if self.sparse:  # (its gradient, from zero residuals, unused)
                step[j] = self.posts[j].weighted(np.zeros_like(wj), wj, lam, x[j])[1].solve(g[j])
                continue
            weights = (self.signs * wj).reshape(-1)
            h: FloatArray = np.asarray(
                np.bincount(self.flats[j], weights=weights, minlength=p * p), np.float64
            )
            h[:: p + 1] += lam
            step[j] = _cholesky_solve(h.reshape(p, p), g[j], overwrite=True)
        return step, np.einsum("ij,ij->i", g, step)

    def newton(self, x: FloatArray, lam: FloatArray, max_iter: int, tol: float) -> FloatArray:
        """`_newton` of every half from its row of ``x``: the same steps, line searches and
        stops, each half frozen once it stops; and one stop more: a full step whose decrement
        was under ``_SETTLED_DECREMENT`` ends its half (Newton's convergence is quadratic:
        the next decrement would be ~1e-3 of its square, far under ``tol``), which spares
        the last factorisation of each half, whose only use was to find that out."""
        z = self.linear(x)
        obj = self.values(x, z, lam)
        active = np.ones(len(x), dtype=bool)
        for _ in range(max_iter):
            step, decrement = self.steps(x, z, lam, active)
            active &= decrement >= 2 * tol
            if not active.any():
                break
            step[~active] = 0.0
            t = np.ones(len(x))
            while True:
                cand = x + t[:, None] * step
                zc = self.linear(cand)
                oc = self.values(cand, zc, lam)
                short = active & (oc < obj - 1e-12 * np.abs(obj)) & (t >= 1e-8)
                if not short.any():
                    break
                t[short] *= 0.5
            x, z, obj = cand, zc, np.where(active, oc, obj)
            moved = np.max(np.abs(t[:, None] * step), axis=1)
            settled = (t == 1.0) & (decrement < _SETTLED_DECREMENT)
            active &= (moved >= 1e-10) & ~settled
            if not active.any():
                break
        return x


def _half_correlations(
    ids: list[str],
    indexed: tuple[IntArray, IntArray, FloatArray],
    halves: list[tuple[IntArray, IntArray]],
    fit_position: bool,
    around: _FullFit | None,
) -> list[float]:
    """The correlation of each split's two halves' θ over the essays compared in both (the
    splits with enough of those that give one); ``indexed``: all the comparisons, ``halves``
    the positions of each half's among them. With ``around`` every half is its MAP at the
    full fit's λ (`_FullFit.half_maps`, all at once), else fitted as reported."""
    a, b, _ = indexed
    kept = [(h, both) for h in halves if (both := _compared_in_both(len(ids), a, b, h)) is not None]
    if around is not None:
        thetas = around.half_maps(ids, indexed, [part for h, _ in kept for part in h], fit_position)
        pairs = [(thetas[2 * k], thetas[2 * k + 1]) for k in range(len(kept))]
    else:
        pairs = [
            (
                _variational_half(ids, indexed, h[0], fit_position),
                _variational_half(ids, indexed, h[1], fit_position),
            )
            for h, _ in kept
        ]
    return [
        r
        for (first, second), (_, both) in zip(pairs, kept, strict=True)
        if (r := _pearson(first[both], second[both])) is not None
    ]


def split_half(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    splits: int = 20,
    seed: int = 0,
    fit_position: bool = True,
    full: Mapping[str, tuple[float, float]] | None = None,
) -> SplitHalf:
    """Split-half reliability: fit each half (empirical prior, as reported) and correlate
    θ over the essays compared in both; r is the mean over the splits, Spearman–Brown
    its full-length value. Halves are random halves of the comparisons, or of the
    judges (``Comparison.judge``) when there are two or more — then every distinct
    split when there are at most ``splits``. Seeded; n/a with a reason when fewer than
    half of the splits give a correlation (too few essays compared in both halves).

    ``full``: the full fit's (θ̂, SE) of every essay. Then each half is instead the MAP at
    the θ prior N(0, 1/λ) the full fit implies (``_FullFit``), by Newton steps from its θ̂,
    every half at once (`_FullFit.half_maps`): about a tenth of the CPU (the batch's last
    scores, issue 11), r within 0.01 of the variational halves (tests/test_scoring.py)."""
    ids = _unique_ids(essay_ids)
    around = _FullFit.of(full) if full is not None else None
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
    # Halves as positions among the comparisons, indexed once (speed, issue 11).
    halves: list[tuple[IntArray, IntArray]] = []
    if unit == "judge":
        for g in _judge_splits(judges, splits, rng):
            inside = np.array([c.judge in g for c in comparisons], dtype=bool)
            halves.append((np.flatnonzero(inside), np.flatnonzero(~inside)))
    else:
        m = len(comparisons)
        for _ in range(splits):
            order = rng.permutation(m)
            halves.append((order[: m // 2], order[m // 2 :]))
    indexed = _index_comparisons(ids, comparisons)
    rs = _half_correlations(ids, indexed, halves, fit_position, around)
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
    x = _average_ranks(np.array([previous[e] for e in common], dtype=np.float64))
    y = _average_ranks(np.array([current[e] for e in common], dtype=np.float64))
    return _pearson(x, y)


def _average_ranks(values: FloatArray) -> FloatArray:
    """Ranks 1…n, ties given the mean of their ranks: `scipy.stats.rankdata`'s default, without
    its argument handling, which cost ten times the ranking at 100 essays (issue 11)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    ends = np.append(starts[1:], len(values))
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def max_abs_delta(previous: Mapping[str, float], current: Mapping[str, float]) -> float:
    """max |current − previous| over the ids in both; inf when there are none in common."""
    common = [e for e in current if e in previous]
    if not previous or not common:
        return math.inf
    return max(abs(current[e] - previous[e]) for e in common)
