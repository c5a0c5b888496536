"""Time `cj.pairs.plan_wave` at n = 1,000 with a 20k history (issue 11's goal: ≤ 0.3 s),
beside the planner of another git revision loaded in the same process, interleaved, on the
same inputs; both must choose the same pairs. The current planner is also timed on the history
as CJ's decisions pass it (`IndexedHistory`, arrays read from the batch's pairs), "current,
indexed".

    python bench/plan_wave.py [--essays 1000] [--history 20000] [--size 500]
                              [--repeats 7] [--against d6c982e] [--json]
    python bench/plan_wave.py --agree 200 [--against main]
    python bench/plan_wave.py --simulated 5 100 [--repeats 5] [--against main]

Times are CPU seconds of this process (time.process_time: on a loaded machine wall time
measures the neighbours too); the minimum and the median are shown, and their ratios to the
reference's (the figure that carries across machines and loads).
One BLAS thread (OPENBLAS_NUM_THREADS=1 unless set), as in the workers.

--agree N times nothing: it plans N random instances (2 to 1,000 essays, first waves and
scored ones, pending, failed and permanently failed history, anchors, caps, both selectors)
with both planners and lists those whose pairs (with their order and positions) differ.

--simulated B N times the calls the pipeline makes most (issue 11): the plan_wave calls of
CJ's decide over every decision of bench/decide.py's `simulate(B, N)` (five batches of 100
essays: 102 calls, waves of 50 pairs, histories up to ≈ 1,500 pairs), captured by this tree,
each call planned by both planners in turn; the figures are the sums over the calls.
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
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from bench.revisions import module_at, plan_wave_inputs  # noqa: E402
from cj import pairs as current  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--essays", type=int, default=1000)
    ap.add_argument("--history", type=int, default=20000)
    ap.add_argument("--size", type=int, default=500, help="wave size (a matching: ≤ n/2)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--against", default="d6c982e", help="git revision of the reference")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--agree", type=int, default=0, metavar="N", help="compare N instances")
    ap.add_argument("--simulated", type=int, nargs=2, metavar=("B", "N"), help="decide's calls")
    args = ap.parse_args()

    ref = module_at(args.against, "cj/pairs.py")
    if args.agree:
        agree(ref, args.agree, args.against)
        return
    if args.simulated:
        batches, essays = args.simulated
        simulated(ref, batches, essays, args.repeats, args.against)
        return
    runs = {"current": current, f"reference {args.against}": ref}
    kwargs = {name: plan_wave_inputs(m, args.essays, args.history) for name, m in runs.items()}
    # CJ's decisions hand the planner the history as arrays (IndexedHistory, read from the
    # batch's pairs in BatchPairs): timed too, as "current, indexed".
    runs[INDEXED] = current
    kwargs[INDEXED] = dict(kwargs["current"], history=indexed(kwargs["current"]))
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
    out["indexed_over_list"] = {
        "min": round(min(times[INDEXED]) / min(times["current"]), 3),
        "median": round(statistics.median(times[INDEXED]) / statistics.median(times["current"]), 3),
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
    r = out["indexed_over_list"]
    print(f"  indexed / list history: min {r['min']:.2f}, median {r['median']:.2f}")
    if not same:
        raise SystemExit("the planners chose different pairs")


INDEXED = "current, indexed"


def indexed(inputs: dict[str, Any]) -> Any:
    """The inputs' history as CJ's decisions pass it: positions in the sorted essay ids."""
    ids, history = sorted(inputs["essay_ids"]), inputs["history"]
    at = {e: i for i, e in enumerate(ids)}
    a = np.array([at[h.essay_a] for h in history], dtype=np.intp)
    b = np.array([at[h.essay_b] for h in history], dtype=np.intp)
    live = np.array([h.outcome != "failed" for h in history], dtype=np.bool_)
    pending = np.array([h.outcome == "pending" for h in history], dtype=np.bool_)
    permanent = np.array([h.permanent for h in history], dtype=np.bool_)
    return current.IndexedHistory(ids, a, b, live, pending, permanent, lambda: list(history))


def random_instance(pairs: ModuleType, seed: int) -> dict[str, Any]:
    """plan_wave's keywords for one random instance, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([2, 3, 4, 5, 8, 13, 24, 40, 60, 100, 150, 250, 400, 1000]))
    ids = [f"s{i:04d}" for i in range(n)]
    scale = "FEDCBA"
    step = int(rng.integers(3, 12))
    anchors = {e: scale[k % 6] for k, e in enumerate(ids[::step])} if rng.random() < 0.8 else {}
    first = rng.random() < 0.2
    iu, ju = np.triu_indices(n, 1)
    m = 0 if first else int(rng.integers(0, min(len(iu), 20 * n) + 1))
    history = []
    for t, k in enumerate(rng.choice(len(iu), size=m, replace=False)):
        a, b = ids[int(iu[k])], ids[int(ju[k])]
        if rng.random() < 0.5:
            a, b = b, a
        roll = rng.random()
        if roll < 0.06:
            history.append(pairs.PairHistory(a, b, "pending"))
        elif roll < 0.12:
            history.append(pairs.PairHistory(a, b, "failed", permanent=bool(t % 2)))
        else:
            won = "essay_a" if rng.random() < 0.5 else "essay_b"
            history.append(pairs.PairHistory(a, b, "completed", won))
    scored = not first and rng.random() < 0.9
    scores = (
        {e: (float(rng.normal()), float(0.1 + 0.8 * rng.random())) for e in ids[: n - n // 20]}
        if scored
        else None
    )
    kwargs: dict[str, Any] = {
        "key": f"agree{seed}",
        "wave": 1 if first else int(rng.integers(2, 30)),
        "seed": seed,
        "essay_ids": ids,
        "anchors": anchors,
        "grade_scale": scale,
        "history": history,
        "size": 2 * n if first else int(rng.integers(1, n // 2 + 2)),
        "scores": scores,
    }
    if scored and rng.random() < 0.15:
        kwargs["per_essay_cap"] = int(rng.integers(1, 4))
    if scored and rng.random() < 0.15:
        kwargs["selector"] = "information"
    if rng.random() < 0.2:
        kwargs["anchor_bonus"] = 0.0
    return kwargs


def decide_calls(batches: int, essays: int) -> list[dict[str, Any]]:
    """plan_wave's keywords in every call CJ's decide makes over `simulate(batches, essays)`."""
    import copy
    import importlib

    import cj.continuation

    states = importlib.import_module("decide").simulate(batches, essays)
    calls: list[dict[str, Any]] = []
    space = vars(cj.continuation)
    planner = space["plan_wave"]

    def record(**kwargs: Any) -> list[tuple[str, str]]:
        calls.append(kwargs)
        result: list[tuple[str, str]] = planner(**kwargs)
        return result

    space["plan_wave"] = record  # the planner decide calls, this process only
    try:
        for state, overlap in states:
            cj.continuation.decide(copy.deepcopy(state), overlap)
    finally:
        space["plan_wave"] = planner
    return calls


def simulated(ref: ModuleType, batches: int, essays: int, repeats: int, rev: str) -> None:
    calls = decide_calls(batches, essays)
    mods = {"current": current, rev: ref}
    inputs = {
        name: [
            kw | {"history": [m.PairHistory(*msgspec.structs.astuple(h)) for h in kw["history"]]}
            for kw in calls
        ]
        for name, m in mods.items()
    }
    times: dict[str, list[float]] = {name: [] for name in mods}
    same = True
    for r in range(repeats):
        spent = dict.fromkeys(mods, 0.0)
        for k in range(len(calls)):
            chosen = {}
            for name in list(mods)[:: 1 if (k + r) % 2 else -1]:
                t0 = time.process_time()
                chosen[name] = mods[name].plan_wave(**inputs[name][k])
                spent[name] += time.process_time() - t0
            same &= chosen["current"] == chosen[rev]
        for name in mods:
            times[name].append(spent[name])
    print(
        f"plan_wave over decide's {len(calls)} calls of simulate({batches}, {essays}), "
        f"CPU s summed over the calls, {repeats} repeats; same pairs as {rev}: {same}"
    )
    for name, t in times.items():
        print(f"  {name:<12} min {min(t):.4f}, median {statistics.median(t):.4f}")
    ratio_min = min(times["current"]) / min(times[rev])
    ratio_median = statistics.median(times["current"]) / statistics.median(times[rev])
    print(f"  current / {rev}: min {ratio_min:.3f}, median {ratio_median:.3f} (same process)")
    if not same:
        raise SystemExit("the planners chose different pairs")


def agree(ref: ModuleType, count: int, rev: str) -> None:
    differ = []
    for seed in range(count):
        ours = current.plan_wave(**random_instance(current, seed))
        theirs = ref.plan_wave(**random_instance(ref, seed))
        if ours != theirs:
            differ.append(seed)
    print(f"{count - len(differ)} of {count} random instances plan the same pairs as {rev}")
    if differ:
        raise SystemExit(f"different pairs for seeds {differ}")


if __name__ == "__main__":
    main()
