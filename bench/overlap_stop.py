"""What overlapping waves cost where the batch stops: batches of 100 essays run to their end
through CJ's own `decide` (warm starts, the stopping rule, the early waves), overlap on
(CJS_WAVE_OVERLAP 0.8) against off (1.0), paired by seed.

    python bench/overlap_stop.py [--seeds 40] [--first-seed 0] [--overlap 0.8] [--jobs 2]
                                 [--json]

bench/overlap.py measures the designs at equal comparisons with its own loop (fit_bt and
plan_wave); this one runs the decisions the pipeline makes, so it also sees the stopping
rule, which with overlap is judged on the accepted share of a wave (80 %) and, when it does
not hold yet, lets another wave go out. Simulation: essays of quality N(0, 1), 12 of them
anchors, judged by σ(q_a − q_b + 0.3) (bench/decide.py's batches); the requests of a wave go
out at 10 a second and each comes back after a lognormal latency (median 1.5 s, p99 12 s),
in the order they come back; callbacks are applied one at a time (overlap) or a wave at a
time (off). Seeded: the same seed gives the same batch, draws and latencies on both sides.

Printed, on minus off, mean ± its standard error over the seeds: comparisons used to stop,
the final Spearman of θ̂ with the true quality, the time until the last callback (the
simulated clock: what the batch makes its user wait), and the posterior R of the scorings at
8, 12, 16 and 20 comparisons per essay (interpolated between a batch's scorings).
One BLAS thread (OPENBLAS_NUM_THREADS=1 unless set), as in the workers.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import heapq
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ESSAYS = 100
RATE_PER_S = 10.0
LATENCY_MEDIAN_S = 1.5  # and p99 12 s: bench/overlap.py's SIGMA
PER_ESSAY = (8, 12, 16, 20)


def run(seed: int, overlap: float) -> dict[str, Any]:
    """One batch to its end: comparisons, waves, reason, final Spearman and the scorings'
    (comparisons, R) along the way."""
    from bench.decide import judge, simulated_batch
    from bench.overlap import SIGMA
    from cj.continuation import decide
    from events.types import BatchFinalized, BatchScored, WaveSubmitted
    from projections.batch import apply_batch_event

    state, q, rng = simulated_batch(seed, ESSAYS)
    timing = np.random.default_rng(1000 + seed)
    flight: list[tuple[float, str, Any]] = []  # (back at, correlation id, pair)
    issued = now = 0.0
    scorings: list[tuple[int, float]] = []
    last: BatchScored | None = None
    reason = None
    entry = 0
    while True:
        decision = decide(state, overlap)
        if decision is not None:
            for event in decision.events:
                state = apply_batch_event(state, event)
                if isinstance(event, WaveSubmitted):
                    for pair in event.pairs:
                        issued = max(issued, now) + 1.0 / RATE_PER_S
                        back = issued + LATENCY_MEDIAN_S * math.exp(SIGMA * timing.normal())
                        heapq.heappush(flight, (back, pair.correlation_id, pair))
                elif isinstance(event, BatchScored):
                    last = event
                    if event.reliability is not None and event.reliability.posterior is not None:
                        scorings.append((event.comparisons, event.reliability.posterior))
                elif isinstance(event, BatchFinalized):
                    reason = event.reason
            if decision.terminal is not None:
                break
        if not flight:
            break
        for _ in range(1 if overlap < 1.0 else len(flight)):
            now, _, pair = heapq.heappop(flight)
            entry += 1
            judge(state, pair, q, rng, entry)
    assert last is not None, "every batch is scored at its end"
    theta = {s.essay_id: s.theta for s in last.scores}
    ids = sorted(theta)
    rho = float(spearmanr([theta[e] for e in ids], [q[e] for e in ids]).statistic)
    return {
        "seed": seed,
        "overlap": overlap,
        "comparisons": state.completed,
        "waves": state.waves,
        "reason": reason,
        "spearman": rho,
        "seconds": now,
        "scorings": scorings,
    }


def _r_at(scorings: list[tuple[int, float]], comparisons: float) -> float | None:
    cs = [c for c, _ in scorings]
    if not cs or not cs[0] <= comparisons <= cs[-1]:
        return None
    return float(np.interp(comparisons, cs, [r for _, r in scorings]))


def _mean_se(xs: list[float]) -> dict[str, float]:
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return {"mean": round(statistics.mean(xs), 4), "se": round(se, 4), "n": len(xs)}


def compare(on: list[dict[str, Any]], off: list[dict[str, Any]]) -> dict[str, Any]:
    """On minus off, paired by seed."""
    pairs = list(zip(on, off, strict=True))
    out: dict[str, Any] = {
        "comparisons_off": round(statistics.mean(b["comparisons"] for b in off), 1),
        "comparisons": _mean_se([a["comparisons"] - b["comparisons"] for a, b in pairs]),
        "spearman": _mean_se([a["spearman"] - b["spearman"] for a, b in pairs]),
        "seconds_off": round(statistics.mean(b["seconds"] for b in off), 1),
        "seconds": _mean_se([a["seconds"] - b["seconds"] for a, b in pairs]),
        "budget_ends": {
            "on": sum(a["reason"] == "budget" for a in on),
            "off": sum(b["reason"] == "budget" for b in off),
        },
        "reliability": {},
    }
    for c in PER_ESSAY:
        at = c * ESSAYS / 2
        diffs = []
        for a, b in pairs:
            ra, rb = _r_at(a["scorings"], at), _r_at(b["scorings"], at)
            if ra is not None and rb is not None:
                diffs.append(ra - rb)
        if len(diffs) > 1:
            out["reliability"][str(c)] = _mean_se(diffs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--overlap", type=float, default=0.8)
    ap.add_argument("--jobs", type=int, default=2, help="processes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        on = list(pool.map(run, seeds, [args.overlap] * len(seeds)))
        off = list(pool.map(run, seeds, [1.0] * len(seeds)))
    report = {"seeds": args.seeds, "overlap": args.overlap, **compare(on, off)}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"{args.seeds} batches of {ESSAYS} essays to their end, overlap {args.overlap} minus off "
        f"(mean ± SE, paired by seed):"
    )
    c, s = report["comparisons"], report["spearman"]
    print(
        f"  comparisons to stop: {c['mean']:+.1f} ± {c['se']:.1f} "
        f"(off: {report['comparisons_off']:.0f} a batch)"
    )
    print(f"  final Spearman with the truth: {s['mean']:+.4f} ± {s['se']:.4f}")
    t = report["seconds"]
    print(
        f"  time to the last callback: {t['mean']:+.1f} ± {t['se']:.1f} s "
        f"(off: {report['seconds_off']:.0f} s)"
    )
    print(
        f"  ended by the budget: {report['budget_ends']['on']} on, "
        f"{report['budget_ends']['off']} off"
    )
    for per_essay, r in report["reliability"].items():
        print(
            f"  posterior R at {per_essay} per essay: {r['mean']:+.4f} ± {r['se']:.4f} "
            f"({r['n']} batches)"
        )


if __name__ == "__main__":
    main()
