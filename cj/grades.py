"""Grades from anchors: where the grade boundaries lie on θ, and each essay's grade
probabilities, grade band and confidence label (pure, no I/O).

Model (an ordinal probit with known measurement error; Albert & Chib 1993). Grade g
holds the essays whose true θ lies between cuts c_g and c_{g+1} (c_0 = −∞, c_k = +∞).
The Bradley–Terry fit gives every essay a posterior θ ~ N(θ̂, SE²); an anchor's grade
says its θ lies between its grade's cuts. The cuts' posterior given the anchors is
sampled by Gibbs (``_sample_cuts``), alternating

* each anchor's θ given the cuts: N(θ̂_a, SE_a²) truncated to its grade's interval;
* each cut given the anchors and its neighbours: a weak normal prior centred on the
  anchors' trend line (θ̂ ≈ α + β·grade index, ``_PRIOR_STEPS`` grade steps wide),
  truncated above the highest anchor of a lower grade, below the lowest anchor of a
  higher grade, and between its neighbouring cuts.

An essay's probability of grade g averages Φ((c_{g+1} − θ̂)/SE) − Φ((c_g − θ̂)/SE)
over the draws (Rao–Blackwellised, so few draws suffice). The sampler's seed is fixed:
the same scores give the same probabilities. The correlation between an essay's θ and
the anchors' (they were compared with each other) is ignored.

The grade shown is the most probable one; the band is the smallest run of adjacent
grades holding at least ``BAND_MASS`` of the probability; the label is "high" when
the top probability reaches ``BAND_MASS`` (a one-grade band), "mid" from 0.5, else
"low". The probabilities are calibrated in simulation (bench/quality.py: expected
calibration error and band coverage), see docs/statistics.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt
from scipy.special import ndtr

from events.types import BatchScored, Essay, EssayScore

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
Confidence = Literal["high", "mid", "low"]

BAND_MASS = 0.8  # a band holds at least this probability; a single grade this sure is "high"
MID_CONFIDENCE = 0.5
# Prior SD of a cut around the anchors' trend line, in grade steps: a guard for grades
# without anchors, weak enough that anchors on both sides decide (calibrated in
# simulation: tighter priors pulled the outer cuts inwards when anchors are uncertain).
_PRIOR_STEPS = 3.0
_PRIOR_STEPS_ONE_GRADE = 1.0  # with anchors of one grade the trend is all there is
_GRID = 240  # points of θ where the cuts' posteriors are evaluated


@dataclass(frozen=True)
class GradeAssignment:
    essay_id: str
    grade: str | None
    probabilities: dict[str, float]  # every grade of the scale
    confidence: Confidence
    band: tuple[str, ...] = ()  # smallest run of adjacent grades with >= BAND_MASS, lowest first
    top_probability: float = 0.0  # probability of `grade`


@dataclass(frozen=True)
class GradeProjection:
    assignments: dict[str, GradeAssignment]  # students AND anchors
    boundaries: dict[str, float]  # posterior mean of each grade's lower cut (not the lowest)
    warnings: list[str]


def grade_band(
    probabilities: Sequence[float] | FloatArray, mass: float = BAND_MASS
) -> tuple[int, int]:
    """(lowest, highest) index of the shortest run of adjacent grades holding at least
    ``mass``; among runs as short, the one holding most (then the lowest)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if len(p) == 0:
        raise ValueError("no grades")
    lo, hi = _grade_bands(p[None, :], mass)
    return int(lo[0]), int(hi[0])


def _grade_bands(p: FloatArray, mass: float = BAND_MASS) -> tuple[IntArray, IntArray]:
    """`grade_band` of every row of ``p`` at once: a batch's essays in one pass of numpy per
    width instead of one call each (speed, issue 11)."""
    n, k = p.shape
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(p, axis=1)], axis=1)
    target = np.where(cum[:, -1] < mass, cum[:, -1], mass) - 1e-12  # min(mass, total)
    lo, hi = np.zeros(n, dtype=np.intp), np.full(n, k - 1, dtype=np.intp)
    searching = np.ones(n, dtype=bool)
    for width in range(1, k + 1):
        sums = cum[:, width:] - cum[:, :-width]
        found = searching & (sums.max(axis=1) >= target)
        first = np.argmax(sums, axis=1)  # first of the largest
        lo[found], hi[found] = first[found], first[found] + width - 1
        searching &= ~found
        if not searching.any():
            break
    return lo, hi


def confidence_label(top_probability: float) -> Confidence:
    if top_probability >= BAND_MASS:
        return "high"
    if top_probability >= MID_CONFIDENCE:
        return "mid"
    return "low"


def expected_agreement(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Σ_g p(g)·q(g): how often two grades drawn from these distributions agree — what
    two runs' grade probabilities predict for their exact agreement on one essay."""
    return float(sum(p[g] * q.get(g, 0.0) for g in p))


def _usable_anchors(
    theta: Mapping[str, float], anchors: Mapping[str, str], gidx: Mapping[str, int]
) -> tuple[dict[str, int], list[str]]:
    usable: dict[str, int] = {}
    warnings: list[str] = []
    for e, g in sorted(anchors.items()):
        if g not in gidx:
            warnings.append(f"anchor {e} has grade {g!r}, which is not on the scale; ignored")
        elif e not in theta:
            warnings.append(f"anchor {e} has no score; ignored")
        else:
            usable[e] = gidx[g]
    return usable, warnings


def _order_warnings(
    usable: Mapping[str, int], theta: Mapping[str, float], grades: Sequence[str]
) -> list[str]:
    """Any anchor of a lower grade scored above one of a higher grade; grades without anchors."""
    by_grade: list[list[str]] = [[] for _ in grades]
    for e, gi in usable.items():
        by_grade[gi].append(e)
    warnings = []
    for lo in range(len(grades)):
        for hi in range(lo + 1, len(grades)):
            if not by_grade[lo] or not by_grade[hi]:
                continue
            top_lo = max(by_grade[lo], key=lambda e: theta[e])
            bottom_hi = min(by_grade[hi], key=lambda e: theta[e])
            if theta[top_lo] > theta[bottom_hi]:
                warnings.append(
                    f"anchors out of order: {grades[lo]} anchor {top_lo} "
                    f"(θ={theta[top_lo]:.2f}) scored above {grades[hi]} anchor {bottom_hi} "
                    f"(θ={theta[bottom_hi]:.2f})"
                )
    for gi, g in enumerate(grades):
        if not by_grade[gi]:
            warnings.append(f"grade {g} has no anchor; its position is interpolated")
    return warnings


def _trend(
    usable: Mapping[str, int], theta: Mapping[str, float], k: int
) -> tuple[float, float, list[str]]:
    """Least-squares line θ ≈ α + β·(grade index) through the anchors; β falls back to a
    default step (the θ spread over the scale) for anchors of one grade or a slope ≤ 0."""
    spread = float(np.std(list(theta.values()))) if len(theta) > 1 else 0.0
    default_step = max(4.0 * spread / k, 0.25) if spread > 0 else 1.0
    xs = np.array(list(usable.values()), dtype=np.float64)
    ys = np.array([theta[e] for e in usable], dtype=np.float64)
    slope = default_step
    warnings = []
    if len(set(usable.values())) >= 2:
        sxx = float(((xs - xs.mean()) ** 2).sum())
        fitted = float(((xs - xs.mean()) * (ys - ys.mean())).sum()) / sxx
        if fitted > 0:
            slope = fitted
        else:
            warnings.append(
                "anchors do not increase with grade overall; using a default grade step "
                f"of {default_step:.2f}"
            )
    else:
        warnings.append(
            f"anchors of only one grade: using a default grade step of {default_step:.2f}"
        )
    return float(ys.mean() - slope * xs.mean()), slope, warnings


@dataclass(frozen=True)
class _Triangle:
    """The cells x < y of a G × G grid of two cuts' positions (cut g − 1 at x, cut g at y):
    a link's only cells that can hold anything. Kept as a vector in the order of y, x
    ascending within (each y's cells together: the forward pass sums over x), with the
    permutation to the order of x (the backward pass sums over y)."""

    x: IntArray
    y: IntArray
    y_starts: IntArray  # where each y ≥ 1 begins (y = 0 has no cell)
    y_run: IntArray  # y − 1: each cell's run among those
    by_x: IntArray  # the cells in the order of x, y ascending within: positions among the above
    by_x_x: IntArray  # their x
    by_x_y: IntArray  # their y
    x_starts: IntArray  # where each x ≤ G − 2 begins among them (x = G − 1 has no cell)

    @staticmethod
    def of(size: int) -> _Triangle:
        y, x = np.tril_indices(size, -1)
        position = np.zeros((size, size), dtype=np.intp)
        position[x, y] = np.arange(len(x))
        above_x, above_y = np.triu_indices(size, 1)
        rows = np.arange(1, size)
        widths = size - 1 - np.arange(size - 1)
        return _Triangle(
            x=x,
            y=y,
            y_starts=rows * (rows - 1) // 2,
            y_run=y - 1,
            by_x=position[above_x, above_y],
            by_x_x=above_x,
            by_x_y=above_y,
            x_starts=np.concatenate([[0], np.cumsum(widths[:-1])]),
        )

    def forward(self, alpha: FloatArray, link: FloatArray) -> FloatArray:
        """log Σ_x exp(alpha[x] + link[x, y]) for every y: `_logsumexp` over axis 0 of the
        grid × grid array, −inf where x ≥ y."""
        out = np.full(len(alpha), -np.inf)
        out[1:] = _grouped_logsumexp(alpha[self.x] + link, self.y_starts, self.y_run)
        return out

    def backward(self, link: FloatArray, after: FloatArray) -> FloatArray:
        """log Σ_y exp(link[x, y] + after[y]) for every x: `_logsumexp` over axis 1."""
        out = np.full(len(after), -np.inf)
        terms = link[self.by_x] + after[self.by_x_y]
        out[:-1] = _grouped_logsumexp(terms, self.x_starts, self.by_x_x)
        return out


def _grouped_logsumexp(values: FloatArray, starts: IntArray, group: IntArray) -> FloatArray:
    """`_logsumexp` of each run of ``values`` (``starts``: where each begins, none empty;
    ``group``: each value's run)."""
    top = np.maximum.reduceat(values, starts)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.add.reduceat(np.exp(values - shift[group]), starts)) + shift
    return np.asarray(out, dtype=np.float64)


_TRIANGLE = _Triangle.of(_GRID)


def _cut_marginals(
    grid: FloatArray,
    anchor_theta: FloatArray,
    anchor_sd: FloatArray,
    anchor_grade: IntArray,
    prior_mean: FloatArray,
    prior_sd: float,
) -> FloatArray:
    """Posterior marginal of each cut on ``grid`` ((k − 1) × G, rows sum to 1).

    The cuts form a chain: grade g's anchors tie c_{g−1} and c_g through
    Π_a [Φ((c_g − θ̂_a)/SE_a) − Φ((c_{g−1} − θ̂_a)/SE_a)] (zero unless c_{g−1} < c_g),
    the lowest and highest grades' anchors weigh on one cut each, and every cut has
    its normal prior. Forward–backward on the grid gives the exact marginals."""
    k = len(prior_mean) + 1
    below = ndtr((grid[None, :] - anchor_theta[:, None]) / anchor_sd[:, None])  # P(θ_a < x)
    # Log space throughout, with probabilities floored: conflicting anchors with tiny SEs
    # make every configuration improbable, not impossible.
    node = -0.5 * ((grid[None, :] - prior_mean[:, None]) / prior_sd) ** 2  # log ψ_j(x)
    node[0] += _log(below[anchor_grade == 0]).sum(axis=0)
    node[-1] += _log(1.0 - below[anchor_grade == k - 1]).sum(axis=0)
    # Only the cells x < y of a link can hold anything (0 elsewhere: −inf in log space): the
    # links and the passes over them take those alone (`_Triangle`), half the grid × grid
    # arrays; a third of the time of grading a batch (speed, issue 11).
    tri = _TRIANGLE if len(grid) == _GRID else _Triangle.of(len(grid))
    links = []  # links[g − 1]: log factor of grade g between cut g − 1 = x and cut g = y > x
    for g in range(1, k - 1):
        log_m = np.zeros(len(tri.x))
        for b in below[anchor_grade == g]:
            log_m += _log(b[tri.y] - b[tri.x])
        links.append(log_m)
    alpha = [node[0] - _logsumexp(node[0])]
    for j in range(1, k - 1):
        a = node[j] + tri.forward(alpha[-1], links[j - 1])
        alpha.append(a - _logsumexp(a))
    beta = [np.zeros(len(grid))]
    for j in range(k - 2, 0, -1):
        b = tri.backward(links[j - 1], node[j] + beta[0])
        beta.insert(0, b - _logsumexp(b))
    log_marg = np.array([a + b for a, b in zip(alpha, beta, strict=True)])
    return np.asarray(
        np.exp(log_marg - _logsumexp(log_marg, axis=1, keepdims=True)), dtype=np.float64
    )


def _logsumexp(a: FloatArray, axis: int = -1, keepdims: bool = False) -> FloatArray:
    """log Σ exp(a) along ``axis``, −inf where every term is: what `scipy.special.logsumexp`
    gives (to rounding), without its array-API handling, which cost more than the sums at
    the grid's size (two thirds of grading a batch; speed, issue 11)."""
    top = np.max(a, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - shift), axis=axis, keepdims=True)) + shift
    return np.asarray(out if keepdims else np.squeeze(out, axis=axis), dtype=np.float64)


def _log(p: FloatArray) -> FloatArray:
    return np.asarray(np.log(np.maximum(p, 1e-300)), dtype=np.float64)


def _grid(
    values: FloatArray, sds: FloatArray, intercept: float, slope: float, k: int
) -> FloatArray:
    """Where cuts may lie: every essay's θ̂ ± 4 SE (capped) and the scale's trend ± a step."""
    reach = 4.0 * np.minimum(sds, 2.0 * slope * k)
    lo = min(float((values - reach).min()), intercept - slope)
    hi = max(float((values + reach).max()), intercept + slope * k)
    return np.linspace(lo, hi, _GRID)


def _probabilities(
    grid: FloatArray, marginals: FloatArray, theta: FloatArray, se: FloatArray
) -> FloatArray:
    """P(grade) for each essay (rows): E[Φ((c_g − θ̂)/SE)] under each cut's marginal gives
    P(θ < c_g), and the grades' probabilities are the steps between."""
    n = len(theta)
    below = np.empty((n, marginals.shape[0]))
    for start in range(0, n, 256):  # bounded memory for large batches
        t = theta[start : start + 256, None]
        s = se[start : start + 256, None]
        below[start : start + 256] = ndtr((grid[None, :] - t) / s) @ marginals.T
    cumulative = np.concatenate([np.zeros((n, 1)), below, np.ones((n, 1))], axis=1)
    return np.asarray(np.maximum(np.diff(cumulative, axis=1), 0.0), dtype=np.float64)


def _assign(
    essays: Sequence[str], probabilities: FloatArray, grades: Sequence[str]
) -> list[GradeAssignment]:
    """Each essay's assignment from its row of grade probabilities (normalised here)."""
    p = probabilities / probabilities.sum(axis=1, keepdims=True)
    best = np.argmax(p, axis=1)
    lo, hi = _grade_bands(p)
    out = []
    for e, row, b, first, last in zip(essays, p.tolist(), best, lo, hi, strict=True):
        top = row[b]
        out.append(
            GradeAssignment(
                essay_id=e,
                grade=grades[b],
                probabilities=dict(zip(grades, row, strict=True)),
                confidence=confidence_label(top),
                band=tuple(grades[first : last + 1]),
                top_probability=top,
            )
        )
    return out


def project_grades(
    theta: Mapping[str, float],
    se: Mapping[str, float],
    anchors: Mapping[str, str],
    grade_scale: Sequence[str],
    *,
    confidence_threshold: float = MID_CONFIDENCE,
) -> GradeProjection:
    """Project every essay in ``theta`` onto ``grade_scale`` (lowest first) using anchors."""
    grades = list(grade_scale)
    k = len(grades)
    if k == 0:
        raise ValueError("grade scale is empty")
    usable, warnings = _usable_anchors(theta, anchors, {g: i for i, g in enumerate(grades)})
    if not usable:
        warnings.append("no anchors with scores: grades cannot be projected")
        uniform = {g: 1.0 / k for g in grades}
        return GradeProjection(
            assignments={
                e: GradeAssignment(e, None, dict(uniform), "low", tuple(grades), 1.0 / k)
                for e in theta
            },
            boundaries={},
            warnings=warnings,
        )
    warnings += _order_warnings(usable, theta, grades)
    intercept, slope, trend_warnings = _trend(usable, theta, k)
    warnings += trend_warnings

    def se_of(e: str) -> float:
        s = se.get(e)
        return min(float(s), 1e3) if s is not None and math.isfinite(s) else 1e3

    steps = _PRIOR_STEPS if len(set(usable.values())) >= 2 else _PRIOR_STEPS_ONE_GRADE
    essays = list(theta)
    values = np.array([theta[e] for e in essays], dtype=np.float64)
    sds = np.array([max(se_of(e), 1e-6) for e in essays], dtype=np.float64)
    grid = _grid(values, sds, intercept, slope, k)
    marginals = (
        _cut_marginals(
            grid,
            np.array([theta[e] for e in usable], dtype=np.float64),
            np.array([max(se_of(e), 1e-6) for e in usable], dtype=np.float64),
            np.array(list(usable.values()), dtype=np.intp),
            np.asarray(intercept + slope * (np.arange(1, k) - 0.5), dtype=np.float64),
            steps * slope,
        )
        if k > 1
        else np.empty((0, len(grid)))
    )
    probs = _probabilities(grid, marginals, values, sds)
    assignments: dict[str, GradeAssignment] = {}
    for e, assignment in zip(essays, _assign(essays, probs, grades), strict=True):
        assignments[e] = assignment
        top = assignment.top_probability
        if e not in anchors and top < confidence_threshold:
            ranked = sorted(assignments[e].probabilities.items(), key=lambda kv: -kv[1])[:2]
            detail = ", ".join(f"{g} {pr:.2f}" for g, pr in ranked)
            warnings.append(
                f"low confidence: {e} top grade probability {top:.2f} "
                f"< {confidence_threshold:.2f} ({detail})"
            )
    boundaries = {grades[j + 1]: float(marginals[j] @ grid) for j in range(k - 1)}
    return GradeProjection(assignments, boundaries, warnings)


def single_grade_support(
    assignments: Mapping[str, GradeAssignment], students: Sequence[str]
) -> tuple[float | None, str | None]:
    """The share of students with a one-grade band, and — when that is under half — a
    sentence saying the batch's comparisons support grade bands, not single grades."""
    graded = [assignments[e] for e in students if e in assignments and assignments[e].grade]
    if not graded:
        return None, None
    single = sum(1 for a in graded if len(a.band) == 1)
    share = single / len(graded)
    if 2 * single >= len(graded):
        return share, None
    widths = sorted(len(a.band) for a in graded)
    median = widths[len(widths) // 2]
    return share, (
        f"these comparisons support grade bands, not single grades: {single} of "
        f"{len(graded)} students have one grade with probability >= {BAND_MASS:.0%} "
        f"(median band {median} grades); report the bands, or add comparisons or anchors"
    )


def graded_scores(
    scored: BatchScored, essays: Sequence[Essay], grade_scale: Sequence[str], *, final: bool
) -> BatchScored:
    """`scored` with what its θ and SE say about grades: every essay's rank, grade, grade
    probabilities, band and confidence, the grade boundaries, the warnings and the share of
    single grades (`graded` True). ``final``: the batch's last scores, whose warnings also say
    when the comparisons cannot support single grades.

    CJ grades a batch's last scores before writing them; the scores of earlier waves are
    written with θ and SE alone (a wave later they are superseded) and graded here by whoever
    shows them: the same function of the same values, so the same grades."""
    by_id = {s.essay_id: s for s in scored.scores}
    ids = [e.essay_id for e in essays if e.essay_id in by_id]
    theta = {i: by_id[i].theta for i in ids}
    se = {i: by_id[i].se for i in ids}
    anchors = {e.essay_id: e.anchor_grade for e in essays if e.is_anchor and e.anchor_grade}
    grades = project_grades(theta, se, anchors, grade_scale)
    warnings = list(grades.warnings)
    if not scored.connected:
        warnings.append(
            f"comparison graph is not connected ({scored.components} components): "
            "scores of different components are not comparable"
        )
    students = [e.essay_id for e in essays if not e.is_anchor]
    single_share, support = single_grade_support(grades.assignments, students)
    if final and support:
        warnings.append(support)
    scores = []
    for rank, i in enumerate(sorted(ids, key=lambda i: (-theta[i], i)), start=1):
        a = grades.assignments.get(i)
        scores.append(
            EssayScore(
                essay_id=i,
                theta=theta[i],
                se=se[i],
                rank=rank,
                grade=a.grade if a else None,
                grade_probabilities=(
                    {g: round(p, 4) for g, p in a.probabilities.items()} if a else {}
                ),
                confidence=a.confidence if a else None,
                grade_band=list(a.band) if a and a.grade else [],
                grade_confidence=round(a.top_probability, 4) if a and a.grade else None,
            )
        )
    return msgspec.structs.replace(
        scored,
        scores=scores,
        grade_boundaries={g: round(b, 6) for g, b in grades.boundaries.items()},
        warnings=warnings,
        single_grade_share=None if single_share is None else round(single_share, 4),
        grade_support=support or "",
        graded=True,
    )
