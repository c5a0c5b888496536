"""What a batch's scores say, shaped for people and machines (pure): the reliabilities with
their caveats, each essay's grade with its band and confidence, the submit plan, and the
grade agreement two runs show beside the one their probabilities predict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cj.stopping import ASSUMED_JUDGE_SD, StopRule, expected_comparisons, per_essay
from events.types import BatchRegistered, BatchScored, EssayScore

NOTES = {
    "posterior": (
        "posterior reliability var θ̂ / (var θ̂ + mean SE²) of the reported scores: "
        "an estimate of the squared correlation between the scores and the true quality"
    ),
    "ssr": "classical SSR on a near-ML fit; adaptive pairing inflates it",
    "split_half": (
        "mean over random splits of the correlation between two halves' scores, with its "
        "Spearman–Brown value; adaptive pairing deflates it"
    ),
}


def reliabilities(scores: BatchScored | None) -> dict[str, Any]:
    """The three reliabilities, each with its value (or null and the reason) and caveat."""
    rel = scores.reliability if scores else None
    if rel is None:
        why = "no scores yet" if scores is None else "scored before reliabilities were reported"
        return {
            "posterior": {"value": None, "n_a": why, "note": NOTES["posterior"]},
            "ssr": {"value": None, "n_a": why, "note": NOTES["ssr"]},
            "split_half": {
                "r": None,
                "spearman_brown": None,
                "splits": 0,
                "unit": None,
                "n_a": why,
                "note": NOTES["split_half"],
            },
        }
    return {
        "posterior": {
            "value": rel.posterior,
            "n_a": rel.posterior_na or None,
            "note": NOTES["posterior"],
        },
        "ssr": {"value": rel.ssr, "n_a": rel.ssr_na or None, "note": NOTES["ssr"]},
        "split_half": {
            "r": rel.split_half_r,
            "spearman_brown": rel.split_half,
            "splits": rel.split_half_splits,
            "unit": rel.split_half_unit or None,
            "n_a": rel.split_half_na or None,
            "note": NOTES["split_half"],
        },
    }


def headline(scores: BatchScored | None) -> float | None:
    """The posterior reliability R: the figure to quote."""
    return scores.reliability.posterior if scores and scores.reliability else None


def grade_fields(score: EssayScore | None) -> dict[str, Any]:
    """An essay's grade, its band (lowest first), P(grade) and the label."""
    if score is None:
        return {"grade": None, "grade_band": [], "grade_confidence": None, "confidence": None}
    return {
        "grade": score.grade,
        "grade_band": list(score.grade_band),
        "grade_confidence": score.grade_confidence,
        "confidence": score.confidence,
    }


def grade_decisions(scores: BatchScored | None) -> dict[str, Any]:
    """Whether the comparisons support single grades (half the students or more with a
    one-grade band), and the batch's own sentence when they do not."""
    from cj.grades import BAND_MASS  # numpy: loaded only when a batch is reported

    share = scores.single_grade_share if scores else None
    return {
        "band_mass": BAND_MASS,
        "single_grade_share": share,
        "single_grades_supported": None if share is None else share >= 0.5,
        "note": (scores.grade_support or None) if scores else None,
    }


def band_text(band: Sequence[str]) -> str:
    if not band:
        return "-"
    return band[0] if len(band) == 1 else f"{band[0]}–{band[-1]}"


def submit_plan(event: BatchRegistered, scale_name: str) -> dict[str, Any]:
    """What `cjs submit --dry-run` shows: the batch, its cap and the comparisons the
    stopping rule is expected to use."""
    n = len(event.essays)
    cfg = event.config
    per_grade: dict[str, int] = dict.fromkeys(cfg.grade_scale, 0)
    for e in event.essays:
        if e.anchor_grade:
            per_grade[e.anchor_grade] += 1
    rule = StopRule(cfg.target_reliability, cfg.rank_stability, cfg.min_comparisons_per_essay)
    expected = expected_comparisons(n, rule, event.denominator)
    waves = 1 + max(0, math.ceil((event.denominator - 2 * n) / max(1, cfg.wave_size)))
    return {
        "dry_run": True,
        "essays": n,
        "students": n - sum(per_grade.values()),
        "anchors_per_grade": per_grade,
        "grade_scale": scale_name,
        "total_budget": cfg.total_budget,
        "denominator": event.denominator,
        "all_pairs": n * (n - 1) // 2,
        "comparison_cap": event.denominator,
        "cap_per_essay": round(per_essay(event.denominator, n), 2),
        "target_reliability": cfg.target_reliability,
        "min_comparisons_per_essay": cfg.min_comparisons_per_essay,
        "expected_comparisons": expected,
        "expected_per_essay": round(per_essay(expected, n), 2),
        "expected_assumes": (
            f"a judge separating the essays with a logit SD of {ASSUMED_JUDGE_SD:g}; "
            "sharper judges stop sooner, the cap bounds the rest"
        ),
        "wave_size": cfg.wave_size,
        "max_waves_estimate": min(cfg.max_waves, waves),
        "estimated_provider_calls": expected,
        "max_provider_calls": event.denominator,
        "mode": cfg.mode,
        "provider": cfg.provider,
        "model": cfg.model,
    }


def grade_agreement(
    a: Mapping[str, Mapping[str, Any]],
    b: Mapping[str, Mapping[str, Any]],
    ids: Sequence[str],
    scale: Sequence[str],
) -> dict[str, Any]:
    """Exact and within-one agreement of two runs' grades over ``ids`` (rows with "grade"
    and "grade_probabilities"), next to the exact agreement their grade probabilities
    predict: the mean of Σ_g p₁(g)·p₂(g) over the essays graded in both."""
    from cj.grades import expected_agreement  # numpy: validate only

    rank = {g: k for k, g in enumerate(scale)}
    graded = [i for i in ids if i in a and i in b and a[i]["grade"] and b[i]["grade"]]
    exact = sum(a[i]["grade"] == b[i]["grade"] for i in graded)
    near = sum(
        a[i]["grade"] in rank
        and b[i]["grade"] in rank
        and abs(rank[a[i]["grade"]] - rank[b[i]["grade"]]) <= 1
        for i in graded
    )
    predicted = [
        expected_agreement(a[i]["grade_probabilities"], b[i]["grade_probabilities"])
        for i in graded
        if a[i].get("grade_probabilities") and b[i].get("grade_probabilities")
    ]
    n = len(graded)
    return {
        "n": n,
        "exact": round(exact / n, 4) if n else None,
        "within_one": round(near / n, 4) if n else None,
        "predicted_exact": round(sum(predicted) / len(predicted), 4) if predicted else None,
    }
