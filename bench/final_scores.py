"""CPU of a batch's end in CJ's decide step (`cj.continuation.final_scores`: classical SSR,
split-half, grades) beside another revision's, and how far their numbers differ.

    python bench/final_scores.py [--against main] [--batches 5] [--essays 100]
                                 [--alternations 6] [--repeats 5]
    python bench/final_scores.py --cases [--against main] [--seeds 2]

The states: bench/decide.py's simulated batches, each batch's `final_scores` input (the
state and its last `BatchScored`) captured once by this tree. This tree and REV (`git
archive REV`) each run `final_scores` on them in a process of their own, the two
alternated; a process's figure is the best of ``--repeats`` passes (time.process_time).
Printed (JSON): each side's figures, the median ratio, and the largest differences between the
two sides' outputs (split-half r and Spearman–Brown, the classical SSR, θ, SE, grade
probabilities and boundaries) and whether grades, bands and labels are the same.
``--cases``: `split_half` from the full fit (as `final_scores` calls it) on the batches of
bench/scoring.py's ``--agree`` (20–1,000 essays, random and distinct pairs), this tree's
against REV's cj/scoring.py in this process: the largest |Δ| of r and of its
Spearman–Brown value, and whether the splits counted and the reasons agree.
One BLAS thread (OPENBLAS_NUM_THREADS=1 unless set), as in the workers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import copy
import json
import math
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def capture(batches: int, essays: int) -> list[tuple[Any, Any]]:
    """(state, scored): what `final_scores` was given at the end of each simulated batch."""
    sys.path.insert(0, str(ROOT))
    import cj.continuation as continuation
    from bench.decide import simulate

    caught: list[tuple[Any, Any]] = []
    original = continuation.final_scores

    def spy(state: Any, scored: Any, pairs: Any = None) -> Any:
        caught.append((copy.deepcopy(state), copy.deepcopy(scored)))
        return original(state, scored, pairs)

    continuation.final_scores = spy
    try:
        for state, overlap in simulate(batches, essays):
            continuation.decide(state, overlap)
    finally:
        continuation.final_scores = original
    return caught


def run(path: str, out: str, repeats: int) -> dict[str, Any]:
    """Best CPU of ``repeats`` passes of `final_scores` over the pickled inputs; the
    outputs of the last, as msgspec builtins, written to ``out``."""
    import msgspec

    from cj.continuation import final_scores

    with open(path, "rb") as f:
        inputs = pickle.load(f)
    best = math.inf
    results: list[Any] = []
    for _ in range(repeats):
        work = [(copy.deepcopy(s), copy.deepcopy(sc)) for s, sc in inputs]
        t0 = time.process_time()
        results = [final_scores(s, sc) for s, sc in work]
        best = min(best, time.process_time() - t0)
    with open(out, "w") as f:
        json.dump([msgspec.to_builtins(r) for r in results], f)
    return {"batches": len(inputs), "cpu_s": round(best, 4)}


def differences(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    worst = dict.fromkeys(
        ("split_half_r", "split_half", "ssr", "theta", "se", "probability", "boundary"), 0.0
    )
    same_grades = True
    for a, b in zip(ours, theirs, strict=True):
        for key in ("split_half_r", "split_half", "ssr"):
            x, y = a["reliability"][key], b["reliability"][key]
            if (x is None) != (y is None):
                worst[key] = math.inf
            elif x is not None:
                worst[key] = max(worst[key], abs(x - y))
        for s, t in zip(a["scores"], b["scores"], strict=True):
            worst["theta"] = max(worst["theta"], abs(s["theta"] - t["theta"]))
            worst["se"] = max(worst["se"], abs(s["se"] - t["se"]))
            for g, p in s["grade_probabilities"].items():
                worst["probability"] = max(
                    worst["probability"], abs(p - t["grade_probabilities"][g])
                )
            keys = ("essay_id", "rank", "grade", "grade_band", "confidence")
            same_grades &= all(s[k] == t[k] for k in keys)
        for g, v in a["grade_boundaries"].items():
            worst["boundary"] = max(worst["boundary"], abs(v - b["grade_boundaries"][g]))
        same_grades &= a["warnings"] == b["warnings"]
    return {**worst, "grades_bands_labels_warnings_same": same_grades}


def _child(tree: Path, states: str, out: str, repeats: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    script = ROOT / "bench" / "final_scores.py"
    args = [sys.executable, str(script), "--run", states, "--out", out, "--repeats", str(repeats)]
    stdout = subprocess.run(
        args, cwd=tree, env=env, check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(stdout)
    return result


def _alternated(
    names: list[str], alternations: int, measure: Callable[[str], float]
) -> dict[str, list[float]]:
    """``measure`` of each side, ``alternations`` times, the order reversed every other time."""
    figures: dict[str, list[float]] = {name: [] for name in names}
    for k in range(alternations):
        for name in names[:: 1 if k % 2 == 0 else -1]:
            figures[name].append(measure(name))
    return figures


def split_half_cases(rev: str, seeds: int) -> dict[str, Any]:
    """See ``--cases`` in the module docstring."""
    sys.path.insert(0, str(ROOT))
    from bench.revisions import module_at
    from bench.scoring import agreement_cases
    from cj import scoring

    ref = module_at(rev, "cj/scoring.py")
    worst = {"r": 0.0, "spearman_brown": 0.0}
    same_counts, batches = True, 0
    for seed, ids, comps in agreement_cases(seeds):
        fit = scoring.fit_bt(ids, comps)
        full = {e: (round(fit.theta[e], 6), round(fit.se[e], 6)) for e in ids}
        ours = scoring.split_half(ids, comps, seed=seed, full=full)
        ref_comps = [ref.Comparison(c.essay_a, c.essay_b, c.winner_is_a) for c in comps]
        theirs = ref.split_half(ids, ref_comps, seed=seed, full=full)
        batches += 1
        same_counts &= (ours.splits, ours.reason) == (theirs.splits, theirs.reason)
        for key in worst:
            a, b = getattr(ours, key), getattr(theirs, key)
            if (a is None) != (b is None):
                worst[key] = math.inf
            elif a is not None:
                worst[key] = max(worst[key], abs(a - b))
    return {"batches": batches, **worst, "splits_and_reasons_same": same_counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="main", help="git revision of the reference")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--essays", type=int, default=100)
    ap.add_argument("--alternations", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", action="store_true", help="split_half on bench/scoring.py's")
    ap.add_argument("--seeds", type=int, default=2, help="with --cases: batches per size")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # the child process's part
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cases:
        print(json.dumps(split_half_cases(args.against, args.seeds), indent=1))
        return
    result = run(args.run, args.out, args.repeats) if args.run else compare(args)
    print(json.dumps(result, indent=None if args.run else 1))


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """This tree's `final_scores` beside ``args.against``'s (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    from bench.revisions import tree_at

    with tempfile.TemporaryDirectory() as tmp:
        inputs = str(Path(tmp) / "inputs.pkl")
        with open(inputs, "wb") as f:
            pickle.dump(capture(args.batches, args.essays), f)
        (Path(tmp) / "ref").mkdir()
        tree_at(args.against, Path(tmp) / "ref")
        sides = {"current": ROOT, args.against: Path(tmp) / "ref"}
        outs = {name: str(Path(tmp) / f"out-{k}.json") for k, name in enumerate(sides)}
        cpu = _alternated(
            list(sides),
            args.alternations,
            lambda name: _child(sides[name], inputs, outs[name], args.repeats)["cpu_s"],
        )
        outputs = {}
        for name, path in outs.items():
            with open(path) as f:
                outputs[name] = json.load(f)
    ratios = [c / r for c, r in zip(cpu["current"], cpu[args.against], strict=True)]
    return {
        "batches": args.batches,
        "essays": args.essays,
        "cpu_s": cpu,
        "ratio_median": round(statistics.median(ratios), 3),
        "max_abs_difference": differences(outputs["current"], outputs[args.against]),
    }


if __name__ == "__main__":
    main()
