"""The empirical fit warm-started from the batch's last scores (`cj.scoring.WarmStart`)
beside the same fit cold, on the states before every decision of bench/decide.py's
simulated batches: the largest differences of θ, SE and the posterior reliability, and
the n×n inverses per fit by phase (joint search of the mode, solves at the mode, grid).

    python bench/fit_warm.py [--batches 5] [--essays 100] [--states FILE.pkl]
    python bench/fit_warm.py --scoring [--seeds 3]
    python bench/fit_warm.py --cpu [--states FILE.pkl] [--repeats 5]

``--states``: a pickle of `bench/decide.py`'s `simulate` (made and kept when missing).
``--scoring``: bench/scoring.py's batches instead (100 essays × 10 and 24 per essay, random
and distinct pairs; 1,000 × 20,000 random), warm-started from the fit of all but their last
wave's worth (n/2) of comparisons. ``--cpu``: the CPU of those fits (`score_wave`) warm and
cold, alternated fit by fit in this process, each fit's best of ``--repeats``, summed
(time.process_time; the cold fit is main's, bit for bit).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import pickle
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cj import scoring  # noqa: E402
from cj.continuation import BatchPairs, warm_start  # noqa: E402

COUNTS: Counter[str] = Counter()
_PHASE = ["mode"]


def _counting() -> None:
    """Count `_inverse` calls by the phase they are made in."""
    inverse = scoring._inverse

    def counted(h: Any) -> Any:
        COUNTS[_PHASE[-1]] += 1
        return inverse(h)

    scoring._inverse = counted
    for name in ("_joint_mode", "_grid", "_polish"):
        fn = getattr(scoring, name)

        def wrapped(*args: Any, _fn: Any = fn, _name: str = name, **kw: Any) -> Any:
            _PHASE.append(_name.strip("_"))
            try:
                return _fn(*args, **kw)
            finally:
                _PHASE.pop()

        setattr(scoring, name, wrapped)


def _states(path: str | None, batches: int, essays: int) -> list[Any]:
    if path and Path(path).exists():
        with open(path, "rb") as f:
            return list(pickle.load(f))
    from bench.decide import simulate

    states = simulate(batches, essays)
    if path:
        with open(path, "wb") as f:
            pickle.dump(states, f)
    return states


def _widest(so_far: tuple[float, float, float], cold: Any, warm: Any) -> tuple[float, ...]:
    """The largest |Δθ|, |ΔSE| and |ΔR| between a cold and a warm `score_wave` so far."""
    c, w = cold.fit, warm.fit
    rc, rw = cold.posterior.value, warm.posterior.value
    return (
        max(so_far[0], max(abs(c.theta[e] - w.theta[e]) for e in c.theta)),
        max(so_far[1], max(abs(c.se[e] - w.se[e]) for e in c.se)),
        max(so_far[2], abs(rc - rw)) if rc is not None and rw is not None else so_far[2],
    )


def _scoring_cases(seeds: int) -> None:
    from bench.scoring import make_data

    cases = [(100, 500, False), (100, 500, True), (100, 1200, False), (100, 1200, True)]
    cases.append((1000, 20000, False))
    for n, m, distinct in cases:
        dtheta = dse = drel = 0.0
        counts: dict[str, list[int]] = {"cold": [], "warm": []}
        for seed in range(seeds):
            ids, _, comps = make_data(n, m, seed, distinct=distinct)
            earlier = scoring.score_wave(ids, comps[: m - n // 2], classical=False).fit
            warm = scoring.WarmStart(
                theta={e: round(t, 6) for e, t in earlier.theta.items()},
                se={e: round(t, 6) for e, t in earlier.se.items()},
                eta=None if earlier.eta is None else round(earlier.eta, 6),
                eta_se=None if earlier.eta_se is None else round(earlier.eta_se, 6),
            )
            out = {}
            for name, w in (("cold", None), ("warm", warm)):
                COUNTS.clear()
                out[name] = scoring.score_wave(ids, comps, classical=False, warm=w)
                counts[name].append(sum(COUNTS.values()))
            dtheta, dse, drel = _widest((dtheta, dse, drel), out["cold"], out["warm"])
        kind = "distinct" if distinct else "random"
        print(
            f"{n:>5} x {m:>5} {kind:>8}: max |dtheta| {dtheta:.1e} |dSE| {dse:.1e} "
            f"|dR| {drel:.1e}; inverses cold {statistics.mean(counts['cold']):.1f} "
            f"warm {statistics.mean(counts['warm']):.1f}"
        )


def _cpu(states: list[Any], repeats: int) -> None:
    import time

    total = {"cold": 0.0, "warm": 0.0}
    for state, _ in states:
        if state.waves <= state.scored_wave or state.completed == 0:
            continue
        warm = warm_start(state)
        if warm is None:
            continue
        pairs = BatchPairs(state)
        best = {"cold": math.inf, "warm": math.inf}
        for k in range(repeats):
            for name in ("cold", "warm") if k % 2 == 0 else ("warm", "cold"):
                t0 = time.process_time()
                scoring.score_wave(
                    pairs.ids,
                    (),
                    classical=False,
                    indexed=pairs.indexed,
                    warm=warm if name == "warm" else None,
                )
                best[name] = min(best[name], time.process_time() - t0)
        for name in total:
            total[name] += best[name]
    ratio = total["warm"] / total["cold"]
    print(f"fits' CPU s: cold {total['cold']:.3f}  warm {total['warm']:.3f}  ratio {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--essays", type=int, default=100)
    ap.add_argument("--states")
    ap.add_argument("--scoring", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.cpu:
        _cpu(_states(args.states, args.batches, args.essays), args.repeats)
        return
    _counting()
    if args.scoring:
        _scoring_cases(args.seeds)
        return
    per: dict[str, list[Counter[str]]] = {"cold": [], "warm": []}
    dtheta = dse = drel = 0.0
    fits = 0
    for state, _ in _states(args.states, args.batches, args.essays):
        if state.waves <= state.scored_wave or state.completed == 0:
            continue
        warm = warm_start(state)
        if warm is None:
            continue
        pairs = BatchPairs(state)
        comps = pairs.comparisons if pairs.indexed is None else ()
        out = {}
        for name, w in (("cold", None), ("warm", warm)):
            COUNTS.clear()
            out[name] = scoring.score_wave(
                pairs.ids, comps, classical=False, indexed=pairs.indexed, warm=w
            )
            per[name].append(Counter(COUNTS))
        fits += 1
        dtheta, dse, drel = _widest((dtheta, dse, drel), out["cold"], out["warm"])
    print(f"{fits} fits with a previous fit of the same essays")
    print(f"max |dtheta| {dtheta:.2e}  max |dSE| {dse:.2e}  max |d reliability| {drel:.2e}")
    for name, counts in per.items():
        phases = sorted({k for c in counts for k in c})
        means = {k: round(statistics.mean(c[k] for c in counts), 2) for k in phases}
        total = statistics.mean(sum(c.values()) for c in counts)
        print(f"  {name}: inverses per fit {total:.2f}  by phase {means}")


if __name__ == "__main__":
    main()
