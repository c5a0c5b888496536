"""When a batch has measured enough: the stopping rule and the budget it runs under (pure).

A batch stops as ``reliable`` once, after at least ``min_comparisons_per_essay``
comparisons per essay (2·comparisons / essays), both hold:

* the posterior reliability R of the latest fit reaches ``target_reliability``;
* the ranking has stopped moving: Spearman's ρ between this wave's θ and the
  previous wave's is at least ``rank_stability``.

The budget (total comparisons) is a cap, not a goal: a batch that never gets there
ends as ``budget``. R is relative to the spread of the essays as the judge sees them,
so a batch of similar essays needs more comparisons for the same R than a mixed one;
the rule spends what each batch needs (bench/quality.py compares it with fixed budgets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_TARGET_RELIABILITY = 0.80
DEFAULT_RANK_STABILITY = 0.99
DEFAULT_MIN_COMPARISONS_PER_ESSAY = 10
DEFAULT_CAP_PER_ESSAY = 30  # the default budget: comparisons per essay, at most all pairs
# Logit SD of essay quality as a judge sees it, assumed by the dry-run estimate (the mock
# judge's default batch; LLM judges that separate essays more sharply need fewer).
ASSUMED_JUDGE_SD = 1.0


@dataclass(frozen=True)
class StopRule:
    target_reliability: float = DEFAULT_TARGET_RELIABILITY
    rank_stability: float = DEFAULT_RANK_STABILITY
    min_comparisons_per_essay: float = DEFAULT_MIN_COMPARISONS_PER_ESSAY


def per_essay(comparisons: int, essays: int) -> float:
    """Comparisons per essay: each comparison involves two essays."""
    return 2.0 * comparisons / essays if essays else 0.0


def budget_for(essays: int, comparisons_per_essay: float) -> int:
    """Total comparisons giving each essay about ``comparisons_per_essay``, at most all
    pairs and at least one."""
    all_pairs = essays * (essays - 1) // 2
    return max(1, min(all_pairs, math.ceil(comparisons_per_essay * essays / 2)))


def is_reliable(
    rule: StopRule,
    reliability: float | None,
    rank_stability: float | None,
    comparisons_per_essay: float,
) -> bool:
    """The stopping rule; None (not computable yet) never stops."""
    return (
        comparisons_per_essay >= rule.min_comparisons_per_essay
        and reliability is not None
        and reliability >= rule.target_reliability
        and rank_stability is not None
        and rank_stability >= rule.rank_stability
    )


def expected_comparisons(
    essays: int, rule: StopRule, cap: int, judge_sd: float = ASSUMED_JUDGE_SD
) -> int:
    """A planning estimate of where the rule stops: R(c) = v / (v + 1/(c·I)) for c
    comparisons per essay, v = judge_sd² and I the expected information of a random
    pair, E[σ'(d)] with d ~ N(0, 2v) (adaptive pairs carry a little more); solved for
    R = target, then at least the minimum, at most the cap."""
    v = judge_sd * judge_sd
    # numpy and the planner only here: `cjs status` reads per_essay without loading them.
    import numpy as np

    from cj.pairs import expected_information

    info = float(expected_information(np.zeros(1), np.full(1, 2.0 * v))[0])
    target = min(rule.target_reliability, 0.999)
    c = target / ((1.0 - target) * v * info) if target > 0 else 0.0
    c = max(c, rule.min_comparisons_per_essay)
    return min(cap, budget_for(essays, c))
