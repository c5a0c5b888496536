"""Where the stopping rule stops batches, and whether a calmer R would stop them better: each
batch run to its budget through CJ's `decide` with the rule off, then every rule applied to
the same path of scorings.

    python bench/stop_rule.py [--seeds 60] [--first-seed 0] [--jobs 2] [--json]

The rule only says when to stop: up to that point the waves are the same whatever the rule,
so one run to the budget (30 comparisons per essay) shows where each rule would have
stopped, and how good the scores were there. Batches: bench/decide.py's (100 essays of
quality N(0, 1), 12 anchors, judged by σ(q_a − q_b + 0.3)), a wave at a time (overlap off).
At every scoring: comparisons, the posterior R, the rank stability, and the truth — r², the
squared correlation of θ̂ with the true qualities, which R estimates, and Spearman's ρ.

Rules, each at targets 0.80 and 0.82 (R ≥ target, c = 2·comparisons / n ≥ 10):
- `rule`: CJ's rule (`cj.stopping.is_reliable`: R and ρ between waves ≥ 0.99);
- `R only`: without the rank stability;
- `smoothed m`: R from the last m scorings' log-odds trend, R = c / (c + a), a the geometric
  mean of c·(1 − R)/R over them (R's growth as the dry-run estimate models it), with the
  rank stability;
- `oracle`: the first scoring whose true r² reaches the target (what no rule can know).
Printed for each: comparisons to stop (mean, SD, 10th–90th percentile), true r² at the stop
(mean, SD, share under the target and under target − 0.02), Spearman with the truth.
One BLAS thread (OPENBLAS_NUM_THREADS=1 unless set), as in the workers.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ESSAYS = 100
TARGETS = (0.80, 0.82)
Scoring = dict[str, Any]


def run(seed: int) -> list[Scoring]:
    """The scorings of one batch run to its budget, the stopping rule off."""
    import msgspec

    from bench.decide import judge, simulated_batch
    from cj.continuation import decide
    from events.types import BatchScored, WaveSubmitted
    from projections.batch import apply_batch_event

    state, q, rng = simulated_batch(seed, ESSAYS)
    # Unreachable: the batch runs to its budget (the rule is applied afterwards, here).
    state.config = msgspec.structs.replace(state.config, target_reliability=0.9999)
    ids = sorted(q)
    truth = np.array([q[e] for e in ids])
    scorings: list[Scoring] = []
    pending: list[Any] = []
    entry = 0
    while True:
        decision = decide(state, 1.0)
        if decision is not None:
            for event in decision.events:
                state = apply_batch_event(state, event)
                if isinstance(event, WaveSubmitted):
                    pending.extend(event.pairs)
                elif isinstance(event, BatchScored) and event.reliability is not None:
                    theta = {s.essay_id: s.theta for s in event.scores}
                    est = np.array([theta[e] for e in ids])
                    scorings.append(
                        {
                            "c": event.comparisons,
                            "R": event.reliability.posterior,
                            "stability": event.rank_stability,
                            "r2": float(np.corrcoef(est, truth)[0, 1] ** 2),
                            "rho": float(spearmanr(est, truth).statistic),
                        }
                    )
            if decision.terminal is not None:
                break
        if not pending:
            break
        for pair in pending:
            entry += 1
            judge(state, pair, q, rng, entry)
        pending = []
    return scorings


Rule = Callable[[list[Scoring], int, float], bool]


def _enough(s: Scoring) -> bool:
    from cj.stopping import DEFAULT_MIN_COMPARISONS_PER_ESSAY, per_essay

    return per_essay(s["c"], ESSAYS) >= DEFAULT_MIN_COMPARISONS_PER_ESSAY


def _rule_with(s: Scoring, reliability: float | None, target: float) -> bool:
    """CJ's rule (`cj.stopping.is_reliable`) at scoring `s`, with `reliability` for its R."""
    from cj.stopping import StopRule, is_reliable, per_essay

    rule = StopRule(target_reliability=target)
    return is_reliable(rule, reliability, s["stability"], per_essay(s["c"], ESSAYS))


def rule(path: list[Scoring], k: int, target: float) -> bool:
    return _rule_with(path[k], path[k]["R"], target)


def r_only(path: list[Scoring], k: int, target: float) -> bool:
    s = path[k]
    return _enough(s) and s["R"] is not None and s["R"] >= target


def smoothed(m: int) -> Rule:
    def stops(path: list[Scoring], k: int, target: float) -> bool:
        s = path[k]
        last = [x for x in path[max(0, k - m + 1) : k + 1] if x["R"] and 0.0 < x["R"] < 1.0]
        if not last:
            return False
        a = math.exp(sum(math.log(x["c"] * (1.0 - x["R"]) / x["R"]) for x in last) / len(last))
        return _rule_with(s, s["c"] / (s["c"] + a), target)

    return stops


def oracle(path: list[Scoring], k: int, target: float) -> bool:
    return _enough(path[k]) and path[k]["r2"] >= target


RULES: dict[str, Rule] = {
    "rule": rule,
    "R only": r_only,
    "smoothed 3": smoothed(3),
    "smoothed 8": smoothed(8),
    "oracle": oracle,
}


def stop(path: list[Scoring], stops: Rule, target: float) -> Scoring:
    """The scoring the batch ends at: the first where `stops` holds, else the budget's."""
    return next((s for k, s in enumerate(path) if stops(path, k, target)), path[-1])


def summary(paths: list[list[Scoring]], stops: Rule, target: float) -> dict[str, float]:
    at = [stop(p, stops, target) for p in paths]
    c = np.array([s["c"] for s in at], dtype=float)
    r2 = np.array([s["r2"] for s in at])
    return {
        "comparisons": round(float(c.mean()), 1),
        "comparisons_sd": round(float(c.std(ddof=1)), 1),
        "comparisons_p10": float(np.percentile(c, 10)),
        "comparisons_p90": float(np.percentile(c, 90)),
        "true_r2": round(float(r2.mean()), 4),
        "true_r2_sd": round(float(r2.std(ddof=1)), 4),
        "under_target": round(float(np.mean(r2 < target)), 3),
        "under_target_minus_0.02": round(float(np.mean(r2 < target - 0.02)), 3),
        "spearman": round(float(np.mean([s["rho"] for s in at])), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=60)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="processes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        paths = list(pool.map(run, seeds))
    steps = [b["R"] - a["R"] for p in paths for a, b in pairwise(p) if a["R"]]
    report: dict[str, Any] = {
        "seeds": args.seeds,
        "essays": ESSAYS,
        "R_step": {
            "mean": round(float(np.mean(steps)), 4),
            "sd": round(float(np.std(steps, ddof=1)), 4),
            "falls": round(float(np.mean(np.array(steps) < 0)), 3),
        },
        "rules": {
            f"{name} {target:.2f}": summary(paths, stops, target)
            for target in TARGETS
            for name, stops in RULES.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    s = report["R_step"]
    print(
        f"{args.seeds} batches of {ESSAYS} essays to the budget, the rule applied afterwards. "
        f"R from one scoring to the next: {s['mean']:+.4f} ± SD {s['sd']:.4f}, "
        f"falls {100 * s['falls']:.0f} % of the time."
    )
    print(
        f"  {'rule and target':<18} {'comparisons':>11} {'SD':>5} {'p10–p90':>11} "
        f"{'true r²':>8} {'SD':>6} {'< target':>8} {'< −0.02':>8} {'Spearman':>8}"
    )
    for name, r in report["rules"].items():
        spread = f"{r['comparisons_p10']:.0f}–{r['comparisons_p90']:.0f}"
        print(
            f"  {name:<18} {r['comparisons']:>11.0f} {r['comparisons_sd']:>5.0f} {spread:>11} "
            f"{r['true_r2']:>8.4f} {r['true_r2_sd']:>6.4f} {r['under_target']:>8.2f} "
            f"{r['under_target_minus_0.02']:>8.2f} {r['spearman']:>8.4f}"
        )


if __name__ == "__main__":
    main()
