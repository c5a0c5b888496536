"""How the decisions of this tree and of REV differ on the same states (bench/decide.py's,
captured once by REV so that both replay the same 107 states): per decision, whether the
scores and the planned pairs are the same, the largest |Δθ| and |ΔSE| of the scores, and
how many of the wave's pairs differ.

    python bench/decide_diff.py [--against main] [--batches 5] [--essays 100]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import copy
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _child(states: str, out: str, capture: bool, batches: int, essays: int) -> None:
    """In the tree of PYTHONPATH: capture the states (``capture``), then the decisions."""
    import msgspec

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cj.continuation import decide

    if capture:
        from decide import simulate

        with open(states, "wb") as f:
            pickle.dump(simulate(batches, essays), f)
    with open(states, "rb") as f:
        captured = pickle.load(f)
    rows = []
    for state, overlap in captured:
        d = decide(copy.deepcopy(state), overlap)
        events = d.events if d else []
        rows.append([{"type": type(e).__name__} | msgspec.to_builtins(e) for e in events])
    with open(out, "w") as f:
        json.dump(rows, f)


def _compare(a: list[Any], b: list[Any]) -> None:
    same = scores_differ = pairs_differ = 0
    dtheta = dse = 0.0
    moved: list[int] = []
    for x, y in zip(a, b, strict=True):
        sx = {e["type"]: e for e in x}
        sy = {e["type"]: e for e in y}
        if sx.keys() != sy.keys():
            print("  different event types:", list(sx), list(sy))
        if "BatchScored" in sx and "BatchScored" in sy:
            tx = {s["essay_id"]: s for s in sx["BatchScored"]["scores"]}
            ty = {s["essay_id"]: s for s in sy["BatchScored"]["scores"]}
            d1 = max(abs(tx[e]["theta"] - ty[e]["theta"]) for e in tx)
            d2 = max(abs(tx[e]["se"] - ty[e]["se"]) for e in tx)
            dtheta, dse = max(dtheta, d1), max(dse, d2)
            scores_differ += d1 > 0 or d2 > 0
        if "WaveSubmitted" in sx and "WaveSubmitted" in sy:
            px = {(p["essay_a"], p["essay_b"]) for p in sx["WaveSubmitted"]["pairs"]}
            py = {(p["essay_a"], p["essay_b"]) for p in sy["WaveSubmitted"]["pairs"]}
            if px != py:
                pairs_differ += 1
                moved.append(len(px - py))
            else:
                same += 1
    print(f"{len(a)} decisions: scores differ in {scores_differ}, pairs in {pairs_differ}")
    print(f"  max |dtheta| {dtheta:.2e}, max |dSE| {dse:.2e} (as recorded, 6 places)")
    if moved:
        print(f"  pairs not in the other's wave, where they differ: {sorted(moved)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="main")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--essays", type=int, default=100)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        states, out, capture = args.child
        _child(states, out, capture == "1", args.batches, args.essays)
        return
    sys.path.insert(0, str(ROOT))
    from bench.revisions import tree_at

    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        ref.mkdir()
        tree_at(args.against, ref)
        states = str(Path(tmp) / "states.pkl")
        outs = {}
        for name, tree, capture in ((args.against, ref, "1"), ("current", ROOT, "0")):
            outs[name] = str(Path(tmp) / f"{name.replace('/', '_')}.json")
            cmd = [sys.executable, str(ROOT / "bench" / "decide_diff.py"), "--child"]
            cmd += [states, outs[name], capture, "--batches", str(args.batches)]
            cmd += ["--essays", str(args.essays)]
            subprocess.run(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), check=True)
        with open(outs["current"]) as f, open(outs[args.against]) as g:
            _compare(json.load(f), json.load(g))


if __name__ == "__main__":
    main()
