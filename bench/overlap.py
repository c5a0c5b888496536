"""Quality with overlapping waves: Spearman and reliability at equal comparisons, overlap
on (CJS_WAVE_OVERLAP 0.8) against off (1.0), on bench/quality.py's batches and judge.

    python bench/overlap.py [--seeds 10] [--n 100] [--overlap 0.8] [--json]

Simulation: the calls of a wave are made at the limit (one per 60/rpm s) and each comes
back after a lognormal latency (median 1.5 s, p99 12 s), so which comparisons are back
when the next wave is planned is what a real run gives. With overlap the next wave is
planned once that share of the current one is back: fitted (`fit_bt`) on the comparisons
back so far and planned (`plan_wave`) with the ones in flight in the history (asked, not
answered), as `cj.continuation.early_wave` does; without, once all are back. Measured at
c comparisons per essay back (the first c·n/2 in the order they came back): Spearman of θ̂
with the true quality, and the posterior reliability R. The goal (issue 11): within 0.01
of overlap off. Waves and judge draws are seeded; the latencies too.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import SCALE, Batch, make_batch
from cj.pairs import PairHistory, plan_wave
from cj.scoring import Comparison, fit_bt, posterior_reliability

CS = (10, 16, 24)
SIGMA = math.log(12.0 / 1.5) / 2.3263478740408408


def simulate(batch: Batch, overlap: float, cap: int, rpm: float, seed: int) -> list[Comparison]:
    """The comparisons of one batch in the order they came back, up to `cap` per essay."""
    n = len(batch.ids)
    rng = np.random.default_rng(50_000 + seed)
    total = cap * n // 2
    history: dict[int, PairHistory] = {}  # request number -> its history entry
    back: list[Comparison] = []
    in_flight: list[tuple[float, int, str, str]] = []  # (time back, request, a, b)
    wave_of: dict[int, int] = {}
    out_per_wave: dict[int, int] = {}
    scores: dict[str, tuple[float, float]] | None = None
    now = 0.0
    next_slot = 0.0
    asked = 0
    wave = 0
    while True:
        if asked < total:
            wave += 1
            size = min(2 * n if wave == 1 else n // 2, total - asked)
            pairs = plan_wave(
                key=f"bench-{batch.seed}",
                wave=wave,
                seed=batch.seed,
                essay_ids=batch.ids,
                anchors=batch.anchors,
                grade_scale=SCALE,
                history=list(history.values()),
                size=size,
                scores=scores,
            )
            for a, b in pairs:
                next_slot = max(next_slot, now) + 60.0 / rpm
                latency = 1.5 * math.exp(SIGMA * rng.standard_normal())
                heapq.heappush(in_flight, (next_slot + latency, asked, a, b))
                history[asked] = PairHistory(a, b, "pending")
                wave_of[asked] = wave
                asked += 1
            out_per_wave[wave] = len(pairs)
            if not pairs:
                asked = total
        # Callbacks come back until the current wave's share is (or all are) back.
        threshold = int((1.0 - overlap) * out_per_wave.get(wave, 0) + 1e-9)
        while in_flight and (
            asked >= total or out_per_wave[wave] > (threshold if overlap < 1.0 else 0)
        ):
            now, k, a, b = heapq.heappop(in_flight)
            a_wins = batch.judge(a, b)
            back.append(Comparison(a, b, a_wins))
            history[k] = PairHistory(a, b, "completed", "essay_a" if a_wins else "essay_b")
            out_per_wave[wave_of[k]] -= 1
        if not in_flight and asked >= total:
            return back
        fit = fit_bt(batch.ids, back)
        scores = {e: (fit.theta[e], fit.se[e]) for e in batch.ids}


def measure(batch: Batch, back: list[Comparison]) -> dict[int, tuple[float, float | None]]:
    n = len(batch.ids)
    q = [batch.q[e] for e in batch.ids]
    out = {}
    for c in CS:
        part = back[: c * n // 2]
        fit = fit_bt(batch.ids, part)
        rho = float(spearmanr([fit.theta[e] for e in batch.ids], q).statistic)
        out[c] = (rho, posterior_reliability(fit).value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--overlap", type=float, default=0.8)
    ap.add_argument("--rpm", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows: dict[float, dict[int, list[tuple[float, float | None]]]] = {}
    for overlap in (args.overlap, 1.0):
        rows[overlap] = {c: [] for c in CS}
        for seed in range(args.seeds):
            batch = make_batch(args.n, seed, 1.0, 0.4, 0.5)
            back = simulate(batch, overlap, max(CS), args.rpm, seed)
            for c, value in measure(batch, back).items():
                rows[overlap][c].append(value)
    report: dict[str, Any] = {"seeds": args.seeds, "n": args.n, "by_c": {}}
    for c in CS:
        entry: dict[str, dict[str, float | None] | float] = {}
        for overlap in (args.overlap, 1.0):
            rhos = [r for r, _ in rows[overlap][c]]
            rels = [x for _, x in rows[overlap][c] if x is not None]
            entry[str(overlap)] = {
                "spearman": round(statistics.mean(rhos), 4),
                "reliability": round(statistics.mean(rels), 4) if rels else None,
            }
        # Paired by batch (the same essays and judge), with the standard error of the mean.
        pairs = list(zip(rows[args.overlap][c], rows[1.0][c], strict=True))
        for name, index in (("spearman", 0), ("reliability", 1)):
            values = [(a[index], b[index]) for a, b in pairs]
            diffs = [x - y for x, y in values if x is not None and y]
            if len(diffs) > 1:
                entry[f"{name}_diff"] = round(statistics.mean(diffs), 4)
                se = statistics.stdev(diffs) / math.sqrt(len(diffs))
                entry[f"{name}_diff_se"] = round(se, 4)
        report["by_c"][c] = entry
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"{args.seeds} batches of {args.n} essays (quality SD 1, the mock judge's draws); "
        f"overlap {args.overlap} against 1.0 (off), at equal comparisons back"
    )
    print(
        f"{'c/essay':>7} {'Spearman on':>12} {'off':>7} {'diff ± se':>15} "
        f"{'R on':>7} {'off':>7} {'diff ± se':>15}"
    )
    for c in CS:
        e = report["by_c"][c]
        on, off = e[str(args.overlap)], e["1.0"]
        print(
            f"{c:>7} {on['spearman']:>12.4f} {off['spearman']:>7.4f} {e['spearman_diff']:>+7.4f} "
            f"±{e['spearman_diff_se']:.4f} {on['reliability']:>7.4f} {off['reliability']:>7.4f} "
            f"{e.get('reliability_diff', math.nan):>+7.4f} "
            f"±{e.get('reliability_diff_se', 0):.4f}"
        )
    print("diff: mean of the per-batch differences, ± its standard error; goal: within 0.01")


if __name__ == "__main__":
    main()
