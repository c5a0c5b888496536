"""CPU of a decision's planning step, the part of `decide` after the fit: `BatchPairs` (one
pass over the batch's pairs) and `next_wave` (the planner and the requests), beside another
revision's, in the same process, interleaved state by state, on every state before a
decision of bench/decide.py's `simulate(B, N)`; both must plan the same waves.

    python bench/plan_step.py [--batches 5] [--essays 100] [--repeats 7] [--against main]

The reference is REV's cj/continuation.py and cj/pairs.py (`git show`), the rest of the
project this tree's. `next_wave` plans on the state's last recorded scores (what `decide`
plans on when it has not just scored). Times are CPU seconds (time.process_time) summed over
the states; the minimum and the median over the repeats, and their ratios. One BLAS thread
(OPENBLAS_NUM_THREADS=1 unless set), as in the workers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cj.continuation as current  # noqa: E402
from bench.decide import simulate  # noqa: E402
from bench.revisions import module_at  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--essays", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--against", default="main", help="git revision of the reference")
    args = ap.parse_args()
    ref = module_at(args.against, "cj/continuation.py")
    ref_pairs = module_at(args.against, "cj/pairs.py")
    # REV's planner, and the history records it reads, for REV's decision step.
    vars(ref).update(plan_wave=ref_pairs.plan_wave, PairHistory=ref_pairs.PairHistory)
    states = [s for s, _ in simulate(args.batches, args.essays) if not s.terminal]
    mods = {"current": current, args.against: ref}
    times: dict[str, list[float]] = {name: [] for name in mods}
    same = True
    for r in range(args.repeats):
        spent = dict.fromkeys(mods, 0.0)
        for k, state in enumerate(states):
            planned: dict[str, Any] = {}
            for name in list(mods)[:: 1 if (k + r) % 2 else -1]:
                m = mods[name]
                t0 = time.process_time()
                out = m.next_wave(state, None, m.BatchPairs(state))
                spent[name] += time.process_time() - t0
                planned[name] = None if out is None else (out[0].pairs, out[1])
            same &= planned["current"] == planned[args.against]
        for name in mods:
            times[name].append(spent[name])
    print(
        f"BatchPairs + next_wave over {len(states)} states of simulate({args.batches}, "
        f"{args.essays}), CPU s summed, {args.repeats} repeats; same waves as "
        f"{args.against}: {same}"
    )
    for name, t in times.items():
        print(f"  {name:<12} min {min(t):.4f}, median {statistics.median(t):.4f}")
    cur, ref_t = times["current"], times[args.against]
    print(
        f"  current / {args.against}: min {min(cur) / min(ref_t):.3f}, "
        f"median {statistics.median(cur) / statistics.median(ref_t):.3f} (same process)"
    )
    if not same:
        raise SystemExit("the two planned different waves")


if __name__ == "__main__":
    main()
