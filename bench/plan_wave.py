"""Time `cj.pairs.plan_wave` at n = 1,000 with a 20k history (issue 11's goal: ≤ 0.3 s),
beside the planner of another git revision loaded in the same process, interleaved, on the
same inputs; both must choose the same pairs.

    python bench/plan_wave.py [--essays 1000] [--history 20000] [--size 500]
                              [--repeats 7] [--against d6c982e] [--json]

Times are CPU seconds of this process (time.process_time: on a loaded machine wall time
measures the neighbours too); the minimum is the figure to compare, the median is shown.
One BLAS thread (OPENBLAS_NUM_THREADS=1 unless set), as in the workers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cj import pairs as current  # noqa: E402


def reference(rev: str) -> ModuleType:
    """cj/pairs.py as of `rev`, imported under another name."""
    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:cj/pairs.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "pairs_reference.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("pairs_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def inputs(module: ModuleType, n: int, history_size: int) -> dict[str, Any]:
    """bench/scoring.py's plan_wave input: a random history of completed pairs, balanced."""
    rng = np.random.default_rng(7)
    ids = [f"E{i:04d}" for i in range(n)]
    anchors = {e: "FEDCBA"[k % 6] for k, e in enumerate(ids[::6])}
    iu, ju = np.triu_indices(n, 1)
    picks = rng.choice(len(iu), size=min(history_size, len(iu)), replace=False)
    history = []
    for t, k in enumerate(picks):
        a, b = ids[int(iu[k])], ids[int(ju[k])]
        if t % 2:
            a, b = b, a
        history.append(module.PairHistory(a, b, "completed", "essay_a"))
    scores = {e: (float(rng.normal()), float(0.3 + 0.2 * rng.random())) for e in ids}
    return {
        "key": "bench",
        "wave": 9,
        "seed": 1,
        "essay_ids": ids,
        "anchors": anchors,
        "grade_scale": "FEDCBA",
        "history": history,
        "scores": scores,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--essays", type=int, default=1000)
    ap.add_argument("--history", type=int, default=20000)
    ap.add_argument("--size", type=int, default=500, help="wave size (a matching: ≤ n/2)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--against", default="d6c982e", help="git revision of the reference")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    ref = reference(args.against)
    runs = {"current": current, f"reference {args.against}": ref}
    kwargs = {name: inputs(m, args.essays, args.history) for name, m in runs.items()}
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
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(
        f"plan_wave, n = {args.essays}, history {args.history}, wave of {args.size} "
        f"({out['pairs']} pairs); same pairs as {args.against}: {same}"
    )
    for name, t in out["cpu_s"].items():
        print(f"  {name:<22} CPU min {t['min']:.3f} s, median {t['median']:.3f} s (goal ≤ 0.3 s)")
    if not same:
        raise SystemExit("the planners chose different pairs")


if __name__ == "__main__":
    main()
