"""Bradley–Terry scoring with a position term, standard errors and reliabilities.

Model: P(essay_a wins) = σ(θ_a − θ_b + η), where η is the judge's bias towards
the essay shown first (in logits). The fit is a MAP estimate with an L2 prior
of precision ``prior`` on every θ and on η, computed by damped Newton steps on
the (concave) log posterior with a dense Hessian built from sparse counts.

Standard errors come from the inverse of the negative Hessian of the log
posterior at the optimum (Fisher information plus the prior), for the centred
scores (mean θ = 0), so they do not include the arbitrary location of the
scale. Essays without comparisons, or that always win or always lose, get
finite scores (held by the prior) and large standard errors.

All functions are pure: no I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse
from scipy.sparse.csgraph import connected_components

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class Comparison:
    essay_a: str
    essay_b: str
    winner_is_a: bool


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


def _log_posterior(z: FloatArray, y: FloatArray, params: FloatArray, prior: float) -> float:
    # y*z - log(1+e^z), summed; minus the prior.
    ll = float(np.sum(y * z - np.logaddexp(0.0, z)))
    return ll - 0.5 * prior * float(params @ params)


def fit_bt(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    fit_position: bool = True,
    prior: float = 0.01,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> FitResult:
    """MAP Bradley–Terry fit with optional position bias η; see the module docstring.

    Raises ValueError for duplicate essay ids, unknown essays or self-comparisons,
    and for a non-positive prior (the prior keeps every score finite).
    """
    if not prior > 0:
        raise ValueError("prior must be > 0")
    ids = _unique_ids(essay_ids)
    n = len(ids)
    a, b, y = _index_comparisons(ids, comparisons)
    m = len(y)
    components = count_components(n, a, b)
    connected = components == 1
    if n == 0:
        return FitResult({}, {}, None, None, False, 0, True, 0, m)

    p = n + 1 if fit_position else n
    params = np.zeros(p)

    # Flat indices into the p×p Hessian for the contributions of each comparison.
    aa = a * p + a
    bb = b * p + b
    ab = a * p + b
    ba = b * p + a
    if fit_position:
        ae = a * p + n
        ea = n * p + a
        be = b * p + n
        eb = n * p + b
        ee = np.full(m, n * p + n, dtype=np.intp)
        flat = np.concatenate([aa, bb, ab, ba, ae, ea, be, eb, ee])
    else:
        flat = np.concatenate([aa, bb, ab, ba])
    diag_prior = np.arange(p) * (p + 1)

    def linear(x: FloatArray) -> FloatArray:
        z = x[a] - x[b]
        if fit_position:
            z = z + x[n]
        return z

    def grad_hess(x: FloatArray, z: FloatArray) -> tuple[FloatArray, FloatArray]:
        pr = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), overflow-free
        r = y - pr
        w = pr * (1.0 - pr)
        g: FloatArray = np.asarray(np.bincount(a, weights=r, minlength=p), dtype=np.float64)
        g -= np.bincount(b, weights=r, minlength=p)
        if fit_position:
            g[n] += float(r.sum())
            weights = np.concatenate([w, w, -w, -w, w, w, -w, -w, w])
        else:
            weights = np.concatenate([w, w, -w, -w])
        g -= prior * x
        h: FloatArray = np.asarray(
            np.bincount(flat, weights=weights, minlength=p * p), dtype=np.float64
        )
        h[diag_prior] += prior
        return g, h.reshape(p, p)

    z = linear(params)
    obj = _log_posterior(z, y, params, prior)
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007
        g, h = grad_hess(params, z)
        step = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h, lower=True), g)
        decrement = float(g @ step)
        if decrement < 2 * tol:
            converged = True
            break
        t = 1.0
        while True:
            cand = params + t * step
            zc = linear(cand)
            oc = _log_posterior(zc, y, cand, prior)
            if oc >= obj - 1e-12 * abs(obj) or t < 1e-8:
                break
            t *= 0.5
        params, z, obj = cand, zc, oc
        if float(np.max(np.abs(t * step))) < 1e-10:
            converged = True
            break

    _, h = grad_hess(params, z)
    cov = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h, lower=True), np.eye(p))
    cov_t = cov[:n, :n]
    row_mean = cov_t.mean(axis=1)
    var_c = np.diag(cov_t) - 2.0 * row_mean + row_mean.mean()
    se_arr = np.sqrt(np.maximum(var_c, 0.0))
    theta_arr = params[:n] - params[:n].mean()

    eta = float(params[n]) if fit_position else None
    eta_se = float(math.sqrt(max(cov[n, n], 0.0))) if fit_position else None
    return FitResult(
        theta={e: float(theta_arr[i]) for i, e in enumerate(ids)},
        se={e: float(se_arr[i]) for i, e in enumerate(ids)},
        eta=eta,
        eta_se=eta_se,
        connected=connected,
        components=components,
        converged=converged,
        iterations=iterations,
        n_comparisons=m,
        log_posterior=obj,
    )


def ssr(theta: Mapping[str, float], se: Mapping[str, float]) -> float | None:
    """Scale separation reliability (var θ − mean SE²) / var θ over essays in both maps.

    Uses the sample variance (ddof=1). May be negative when the scores are mostly
    noise. None for fewer than two essays or zero variance. Adaptive pairing
    inflates SSR (the SEs shrink faster than the true error); report split-half too.
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


def _pearson(x: FloatArray, y: FloatArray) -> float | None:
    if len(x) < 3:
        return None
    xc = x - x.mean()
    yc = y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if den == 0:
        return None
    return float(xc @ yc) / den


def split_half(
    essay_ids: Sequence[str],
    comparisons: Sequence[Comparison],
    *,
    seed: int = 0,
    fit_position: bool = True,
    prior: float = 0.01,
) -> float | None:
    """Split-half reliability of θ: Spearman–Brown-corrected Pearson r between fits of two
    random halves of the comparisons (seeded). Only essays compared in both halves count.

    None when fewer than 3 essays are compared in both halves or r is undefined;
    may be negative for noise.
    """
    ids = _unique_ids(essay_ids)
    m = len(comparisons)
    if m < 4:
        return None
    rng = np.random.default_rng(seed)
    order = rng.permutation(m)
    halves = [
        [comparisons[int(k)] for k in order[: m // 2]],
        [comparisons[int(k)] for k in order[m // 2 :]],
    ]
    seen: list[set[str]] = []
    thetas: list[dict[str, float]] = []
    for half in halves:
        fit = fit_bt(ids, half, fit_position=fit_position, prior=prior)
        thetas.append(fit.theta)
        s: set[str] = set()
        for c in half:
            s.add(c.essay_a)
            s.add(c.essay_b)
        seen.append(s)
    both = [e for e in ids if e in seen[0] and e in seen[1]]
    x = np.array([thetas[0][e] for e in both], dtype=np.float64)
    yv = np.array([thetas[1][e] for e in both], dtype=np.float64)
    r = _pearson(x, yv)
    if r is None or r <= -1.0:
        return None
    return 2.0 * r / (1.0 + r)


def max_abs_delta(previous: Mapping[str, float], current: Mapping[str, float]) -> float:
    """max |current − previous| over the ids in both; inf when there are none in common."""
    common = [e for e in current if e in previous]
    if not previous or not common:
        return math.inf
    return max(abs(current[e] - previous[e]) for e in common)
