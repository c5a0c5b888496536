"""What `status` and `results` show, built from the batch projection (pure)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from cj import reporting
from cj.stopping import per_essay
from events.ids import id_order
from events.types import BatchScored
from projections.batch import BatchState, completion_pct

# Graded scores by (batch id, event id of the scores): a page polling a running batch grades
# its latest scores once, not at every poll (grading is a Gibbs sampler: ~0.1 s).
_GRADED: OrderedDict[tuple[str, str], BatchScored] = OrderedDict()
_GRADED_KEPT = 32


def _usd(value: float) -> float:
    return round(value, 6)


def cost_view(state: BatchState) -> dict[str, Any]:
    """Cost so far (every callback's attempts, duplicates included) and per completed
    comparison."""
    return {
        "cost_usd": _usd(state.cost_usd),
        "cost_per_comparison_usd": _usd(state.cost_usd / state.completed)
        if state.completed
        else None,
        "max_cost_usd": state.config.max_cost_usd,
    }


def failure_reason(state: BatchState) -> str | None:
    """The `reason` of the batch's BatchFailed (the projection keeps "reason: message")."""
    if state.status != "failed" or not state.failure_message:
        return None
    return state.failure_message.split(": ", 1)[0]


def status_view(
    state: BatchState, breakers: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`breakers`: the open provider breakers that concern the batch (views of
    `lps.breaker.BreakerState`), when the caller looked them up."""
    return {
        "batch_id": state.batch_id,
        "status": state.status,
        "mode": state.config.mode,
        "provider": state.config.provider,
        "model": state.config.model,
        "essays": len(state.essays),
        "anchors": sum(e.is_anchor for e in state.essays),
        "total_budget": state.config.total_budget,
        "denominator": state.denominator,
        "submitted": state.submitted,
        "completed": state.completed,
        "failed": state.failed,
        "in_flight": state.in_flight,
        "callbacks_received": state.callbacks_received,
        "callbacks_accepted": state.accepted,
        "completion_pct": completion_pct(state),
        "duplicates": state.duplicates,
        "orphans": state.orphans,
        "orphan_correlation_ids": sorted(state.orphan_ids, key=id_order),
        "late_callbacks": state.late_callbacks,
        "waves": state.waves,
        "finalize_reason": state.finalize_reason or None,
        "failure_reason": failure_reason(state),
        "failure_message": state.failure_message or None,
        **cost_view(state),
        "breakers": list(breakers or []),
        "registered_at": state.registered_at,
        "last_event_at": state.last_event_at,
        "completed_at": state.completed_at or None,
    }


def shown_scores(state: BatchState) -> BatchScored | None:
    """The batch's latest scores, graded. The scores of a wave before a batch's last are
    stored with θ and SE alone; grading them is the function CJ grades the last ones with."""
    scores = state.scores
    if scores is None or scores.graded:
        return scores
    key = (state.batch_id, scores.event_id)
    graded = _GRADED.get(key)
    if graded is None:
        from cj.grades import graded_scores  # numpy, scipy: only for a running batch's scores

        graded = graded_scores(scores, state.essays, state.config.grade_scale, final=False)
        _GRADED[key] = graded
        while len(_GRADED) > _GRADED_KEPT:
            _GRADED.popitem(last=False)
    return graded


def results_view(state: BatchState) -> dict[str, Any]:
    scores = shown_scores(state)
    by_id = {s.essay_id: s for s in scores.scores} if scores else {}
    essays = []
    for essay in state.essays:
        s = by_id.get(essay.essay_id)
        essays.append(
            {
                "essay_id": essay.essay_id,
                "is_anchor": essay.is_anchor,
                "anchor_grade": essay.anchor_grade,
                "theta": s.theta if s else None,
                "se": s.se if s else None,
                "rank": s.rank if s else None,
                **reporting.grade_fields(s),
                "grade_probabilities": s.grade_probabilities if s else {},
            }
        )
    essays.sort(key=lambda e: (e["rank"] is None, e["rank"] or 0, e["essay_id"]))
    comparisons = scores.comparisons if scores else 0
    return {
        "batch_id": state.batch_id,
        "status": state.status,
        "finalize_reason": state.finalize_reason or None,
        "wave": scores.wave if scores else None,
        "comparisons": comparisons,
        "comparisons_per_essay": round(per_essay(comparisons, len(state.essays)), 2),
        "reliability": reporting.headline(scores),
        "reliabilities": reporting.reliabilities(scores),
        "ssr": scores.ssr if scores else None,
        "split_half": scores.split_half if scores else None,
        "rank_stability": scores.rank_stability if scores else None,
        "position_bias": (
            {"estimate": scores.position_bias, "se": scores.position_bias_se}
            if scores and scores.position_bias is not None
            else None
        ),
        "reliability_note": (
            "quote `reliability` (posterior R); `ssr` is inflated and `split_half` deflated "
            "by adaptive pairing (see `reliabilities`)"
        ),
        "connected": scores.connected if scores else None,
        "cost_usd": _usd(state.cost_usd),
        "cost_per_comparison_usd": cost_view(state)["cost_per_comparison_usd"],
        "grade_scale": state.config.grade_scale,
        "grade_boundaries": scores.grade_boundaries if scores else {},
        "grade_decisions": reporting.grade_decisions(scores),
        "warnings": scores.warnings if scores else [],
        "essays": essays,
    }
