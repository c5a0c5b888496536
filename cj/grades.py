"""Grades from anchors: calibrate the grade scale on θ and project every essay onto it.

Calibration (pure, no I/O):

1. Trend: a weighted least-squares line θ ≈ α + β·(grade index) through the
   anchors. With anchors of fewer than two grades, or a non-positive slope,
   β falls back to a default step (the θ spread of all essays divided over
   the scale) and a warning says so.
2. Per-grade means: the anchors' mean θ of a grade, shrunk toward the trend
   with the weight of ``shrinkage`` pseudo-anchors (so a grade with one or two
   anchors moves part of the way to the trend, and a grade with none sits on it,
   i.e. interpolated or extrapolated).
3. Monotone: isotonic regression (pool-adjacent-violators, weights = anchors +
   pseudo-anchors) with a minimum step between adjacent grades, so the means
   strictly increase in grade order.
4. Boundaries: the lower boundary of each grade (but the lowest) is the
   midpoint between its mean and the mean below.
5. Probabilities: grade g has spread σ_w (pooled within-grade SD of the anchors,
   less their own SE, shrunk toward half a grade step); an essay with score θ
   and standard error se gets P(g) ∝ N(θ; μ_g, σ_w² + se² + var(μ)) — the same
   variance for every grade, so the most likely grade is the one whose
   boundaries contain θ.
6. Confidence: "high" when the top probability is at least ``high_threshold``,
   the normalised entropy is at most 0.5 and se is below half a grade step;
   "low" when the top probability is below ``confidence_threshold`` or se is
   above a grade step; "mid" otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Confidence = Literal["high", "mid", "low"]


@dataclass(frozen=True)
class GradeAssignment:
    essay_id: str
    grade: str | None
    probabilities: dict[str, float]  # every grade of the scale
    confidence: Confidence


@dataclass(frozen=True)
class GradeProjection:
    assignments: dict[str, GradeAssignment]  # students AND anchors
    boundaries: dict[str, float]  # lower boundary of each grade except the lowest, on θ
    grade_means: dict[str, float]
    warnings: list[str]
    grade_sd: float | None = None  # within-grade spread σ_w used for the probabilities


def isotonic_increasing(
    values: Sequence[float], weights: Sequence[float], min_step: float = 0.0
) -> list[float]:
    """Weighted least-squares fit of values by a sequence increasing by at least min_step."""
    shifted = [v - k * min_step for k, v in enumerate(values)]
    # Pool adjacent violators on the shifted values (non-decreasing), then shift back.
    blocks: list[list[float]] = []  # [mean, weight, length]
    for v, w in zip(shifted, weights, strict=True):
        blocks.append([v, max(w, 1e-12), 1.0])
        while len(blocks) >= 2 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for m, _, length in blocks:
        out.extend([m] * int(length))
    return [v + k * min_step for k, v in enumerate(out)]


def _entropy(p: FloatArray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def project_grades(
    theta: Mapping[str, float],
    se: Mapping[str, float],
    anchors: Mapping[str, str],
    grade_scale: Sequence[str],
    *,
    confidence_threshold: float = 0.5,
    high_threshold: float = 0.75,
    shrinkage: float = 1.0,
) -> GradeProjection:
    """Project every essay in ``theta`` onto ``grade_scale`` (lowest first) using anchors."""
    grades = list(grade_scale)
    k = len(grades)
    if k == 0:
        raise ValueError("grade scale is empty")
    gidx = {g: i for i, g in enumerate(grades)}
    warnings: list[str] = []
    essays = list(theta)

    def se_of(e: str) -> float:
        s = se.get(e)
        return float(s) if s is not None and math.isfinite(s) else math.inf

    usable: dict[str, int] = {}
    for e, g in sorted(anchors.items()):
        if g not in gidx:
            warnings.append(f"anchor {e} has grade {g!r}, which is not on the scale; ignored")
        elif e not in theta:
            warnings.append(f"anchor {e} has no score; ignored")
        else:
            usable[e] = gidx[g]

    if not usable:
        warnings.append("no anchors with scores: grades cannot be projected")
        uniform = {g: 1.0 / k for g in grades}
        return GradeProjection(
            assignments={e: GradeAssignment(e, None, dict(uniform), "low") for e in essays},
            boundaries={},
            grade_means={},
            warnings=warnings,
        )

    all_theta = np.array([theta[e] for e in essays], dtype=np.float64)
    spread = float(np.std(all_theta)) if len(all_theta) > 1 else 0.0
    default_step = max(4.0 * spread / k, 0.25) if spread > 0 else 1.0

    # Anchors by grade.
    by_grade: list[list[str]] = [[] for _ in grades]
    for e, gi in usable.items():
        by_grade[gi].append(e)
    counts = np.array([len(x) for x in by_grade], dtype=np.float64)
    raw = np.array(
        [np.mean([theta[e] for e in x]) if x else np.nan for x in by_grade], dtype=np.float64
    )

    # Out-of-order anchors: any anchor of a lower grade scored above one of a higher grade.
    for lo in range(k):
        for hi in range(lo + 1, k):
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

    # Trend line through the anchors.
    xs = np.array([usable[e] for e in usable], dtype=np.float64)
    ys = np.array([theta[e] for e in usable], dtype=np.float64)
    distinct = len(set(usable.values()))
    slope = default_step
    if distinct >= 2:
        xm, ym = xs.mean(), ys.mean()
        sxx = float(((xs - xm) ** 2).sum())
        fitted = float(((xs - xm) * (ys - ym)).sum()) / sxx
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
    intercept = float(ys.mean() - slope * xs.mean())
    trend = intercept + slope * np.arange(k)

    # Within-grade spread: pooled SD of anchors around their grade means,
    # less their own estimation error, shrunk toward half a grade step.
    resid = [theta[e] - raw[usable[e]] for e in usable]
    df = len(usable) - distinct
    anchor_err = float(np.mean([min(se_of(e), 10.0) ** 2 for e in usable]))
    prior_var = (0.5 * slope) ** 2
    prior_df = 4.0
    pooled = float(np.sum(np.square(resid))) / df - anchor_err if df > 0 else 0.0
    within_var = (max(pooled, 0.0) * df + prior_var * prior_df) / (max(df, 0) + prior_df)
    sigma_w = math.sqrt(within_var)

    shrunk = np.where(
        counts > 0,
        (counts * np.nan_to_num(raw) + shrinkage * trend) / (counts + shrinkage),
        trend,
    )
    means = np.array(
        isotonic_increasing(
            [float(x) for x in shrunk],
            [float(c) + shrinkage for c in counts],
            min_step=0.1 * slope,
        )
    )
    mean_var = (within_var + anchor_err) / (counts + shrinkage)
    boundaries = {grades[i]: float(0.5 * (means[i - 1] + means[i])) for i in range(1, k)}

    # Probabilities: common variance for all grades, so argmax matches the boundaries.
    common_var = within_var + float(np.mean(mean_var))
    assignments: dict[str, GradeAssignment] = {}
    low: list[str] = []
    max_entropy = math.log(k) if k > 1 else 1.0
    for e in essays:
        t = float(theta[e])
        s = min(se_of(e), 1e3)
        var = common_var + s * s
        logp = -0.5 * (t - means) ** 2 / var
        logp -= logp.max()
        p = np.exp(logp)
        p /= p.sum()
        best = int(np.argmax(p))
        top = float(p[best])
        h = _entropy(p) / max_entropy
        conf: Confidence
        if top < confidence_threshold or s > slope:
            conf = "low"
        elif top >= high_threshold and h <= 0.5 and s < 0.5 * slope:
            conf = "high"
        else:
            conf = "mid"
        assignments[e] = GradeAssignment(
            essay_id=e,
            grade=grades[best],
            probabilities={g: float(p[i]) for i, g in enumerate(grades)},
            confidence=conf,
        )
        if e not in usable and e not in anchors and top < confidence_threshold:
            low.append(e)
    for e in low:
        a = assignments[e]
        ranked = sorted(a.probabilities.items(), key=lambda kv: -kv[1])[:2]
        detail = ", ".join(f"{g} {pr:.2f}" for g, pr in ranked)
        warnings.append(
            f"low confidence: {e} top grade probability {ranked[0][1]:.2f} "
            f"< {confidence_threshold:.2f} ({detail})"
        )

    return GradeProjection(
        assignments=assignments,
        boundaries=boundaries,
        grade_means={g: float(means[i]) for i, g in enumerate(grades)},
        warnings=warnings,
        grade_sd=sigma_w,
    )
