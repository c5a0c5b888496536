"""Position diagnostics: who sat in `essay_a` and `essay_b`, and how often slot A won (pure)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from scipy.stats import binomtest

from cj.pairs import slot_counts
from projections.batch import BatchState


@dataclass
class SlotCounts:
    as_a: int = 0
    as_b: int = 0
    wins_as_a: int = 0
    wins_as_b: int = 0

    @property
    def balance(self) -> int:
        return self.as_a - self.as_b

    def add(self, other: SlotCounts) -> None:
        self.as_a += other.as_a
        self.as_b += other.as_b
        self.wins_as_a += other.wins_as_a
        self.wins_as_b += other.wins_as_b


def _share(wins: int, total: int) -> float | None:
    return None if total == 0 else round(wins / total, 4)


def position_report(state: BatchState) -> dict[str, Any]:
    """Counts over every requested pair (balance) and every completed one (wins)."""
    anchors = {e.essay_id for e in state.essays if e.is_anchor}
    slots = slot_counts((a, b) for _, a, b in state.pairs.values())
    per: dict[str, SlotCounts] = {}
    for e in state.essays:
        c = slots.get(e.essay_id)
        per[e.essay_id] = SlotCounts(c.as_a, c.as_b) if c else SlotCounts()
    a_wins = decided = 0
    for cid, (_, a, b) in state.pairs.items():
        value = state.corr.get(cid, "")
        if not value.startswith("c "):
            continue
        decided += 1
        if value.endswith("essay_a"):
            a_wins += 1
            per[a].wins_as_a += 1
        else:
            per[b].wins_as_b += 1
    groups = {"anchors": SlotCounts(), "students": SlotCounts()}
    for e in state.essays:
        groups["anchors" if e.essay_id in anchors else "students"].add(per[e.essay_id])
    p_value = binomtest(a_wins, decided, 0.5).pvalue if decided else None
    scores = state.scores
    essays = [
        {
            "essay_id": e.essay_id,
            "is_anchor": e.is_anchor,
            **asdict(per[e.essay_id]),
            "balance": per[e.essay_id].balance,
        }
        for e in state.essays
    ]
    return {
        "batch_id": state.batch_id,
        "comparisons": decided,
        "requested": len(state.pairs),
        "slot_a_wins": a_wins,
        "slot_a_win_share": _share(a_wins, decided),
        "binomial_p_value": None if p_value is None else float(f"{p_value:.6g}"),
        "position_bias": (
            {"estimate": scores.position_bias, "se": scores.position_bias_se}
            if scores and scores.position_bias is not None
            else None
        ),
        "max_abs_balance": max((abs(e["balance"]) for e in essays), default=0),
        "groups": {
            name: {
                **asdict(c),
                "balance": c.balance,
                "slot_a_win_share": _share(c.wins_as_a, c.wins_as_a + c.wins_as_b),
            }
            for name, c in groups.items()
        },
        "essays": essays,
    }
