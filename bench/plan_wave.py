"""Time `cj.pairs.plan_wave` at n = 1,000 with a 20k history (issue 11's goal: ≤ 0.3 s),
beside the planner of another git revision loaded in the same process, interleaved, on the
same inputs; both must choose the same pairs.

    python bench/plan_wave.py [--essays 1000] [--history 20000] [--size 500]
                              [--repeats 7] [--against d6c982e] [--json]

Times are CPU seconds of this process (time.process_time: on a loaded machine wall time
measures the neighbours too); the minimum and the median are shown, and their ratios to the
reference's (the figure that carries across machines and loads).
One BLAS thread (OPENBLAS_NUM_THREADS=1 unless set), as in the workers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from revisions import module_at, plan_wave_inputs  # noqa: E402

from cj import pairs as current  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--essays", type=int, default=1000)
    ap.add_argument("--history", type=int, default=20000)
    ap.add_argument("--size", type=int, default=500, help="wave size (a matching: ≤ n/2)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--against", default="d6c982e", help="git revision of the reference")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    ref = module_at(args.against, "cj/pairs.py")
    runs = {"current": current, f"reference {args.against}": ref}
    kwargs = {name: plan_wave_inputs(m, args.essays, args.history) for name, m in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    chosen: dict[str, list[tuple[str, str]]] = {}
    for _ in range(args.repeats):
        for name, module in runs.items():
            t0 = time.process_time()
            chosen[name] = module.plan_wave(size=args.size, **kwargs[name])
            times[name].append(time.process_time() - t0)
    same = len({repr(p) for p in chosen.values()}) == 1
    out = {
        "essays": args.essays,
        "history": args.history,
        "wave_size": args.size,
        "pairs": len(chosen["current"]),
        "same_pairs": same,
        "cpu_s": {
            name: {"min": round(min(t), 4), "median": round(statistics.median(t), 4)}
            for name, t in times.items()
        },
        "goal_s": 0.3,
    }
    ref_name = f"reference {args.against}"
    out["ratio"] = {
        k: round(statistics.median(times["current"]) / statistics.median(times[ref_name]), 3)
        if k == "median"
        else round(min(times["current"]) / min(times[ref_name]), 3)
        for k in ("min", "median")
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(
        f"plan_wave, n = {args.essays}, history {args.history}, wave of {args.size} "
        f"({out['pairs']} pairs); same pairs as {args.against}: {same}"
    )
    for name, t in out["cpu_s"].items():
        print(f"  {name:<22} CPU min {t['min']:.3f} s, median {t['median']:.3f} s (goal ≤ 0.3 s)")
    r = out["ratio"]
    print(f"  current / reference: min {r['min']:.2f}, median {r['median']:.2f} (same process)")
    if not same:
        raise SystemExit("the planners chose different pairs")


if __name__ == "__main__":
    main()
