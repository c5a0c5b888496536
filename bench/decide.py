"""CPU of CJ's decide step (score, stopping rule, plan) over every decision of simulated
batches, beside another revision's on the same states.

    python bench/decide.py [--batches 5] [--essays 100] [--against main] [--alternations 6]
                           [--json]

The batches: essays of quality N(0, 1) (12 of them anchors), judged by the mock's formula
σ(q_a − q_b + 0.3), seeded; the first ⌊batches/2⌋ + 1 answered a wave at a time (overlap 1.0),
the others one callback at a time with overlap 0.8 (the early waves), until the stopping
rule or the budget ends each. The state before every decision is captured once, by this
tree, and `decide` replayed on those states by this tree and by REV (`git archive REV` in a
temporary directory), each in a process of its own, the two alternated; a process's figure
is the best of two replays (time.process_time). Printed: each side's figures, the median of
the per-alternation ratios, and whether the two sides decided the same (every event and
request, their ids and times left out). REV's `BatchState` must unpickle from this tree's.
One BLAS thread (OPENBLAS_NUM_THREADS=1 unless set), as in the workers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import copy
import hashlib
import json
import math
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def simulated_batch(seed: int, essays: int) -> tuple[Any, dict[str, float], Any]:
    """A registered batch of `essays` essays of quality N(0, 1), 12 of them anchors (two per
    grade), seeded; its true qualities by essay id, and the generator the judge's draws go
    on from."""
    import numpy as np

    from cj.registration import BatchIn, build_registration, scale_of
    from projections.batch import register

    grades = ["F", "E", "D", "C", "B", "A"]
    rng = np.random.default_rng(seed)
    quality = rng.normal(0.0, 1.0, essays)
    rows = [
        {"essay_id": f"e{i}", "text": f"essay {i}", "mock_quality": float(quality[i])}
        | ({"anchor_grade": grades[i % 6]} if i < 12 else {})
        for i in range(essays)
    ]
    batch = BatchIn.model_validate({"essays": rows})
    name, scale = scale_of(batch)
    state = register(build_registration(batch, name, scale, seed=seed, batch_id=f"b{seed}"))
    return state, {f"e{i}": float(v) for i, v in enumerate(quality)}, rng


def judge(state: Any, pair: Any, q: dict[str, float], rng: Any, entry: int) -> None:
    """`pair` answered by the simulated judge, σ(q_a − q_b + 0.3) (one draw of `rng`), and
    its callback applied to `state` as entry `entry`."""
    from events.types import ComparisonCompleted
    from projections.batch import apply_callback

    p_a = 1.0 / (1.0 + math.exp(-(q[pair.essay_a] - q[pair.essay_b] + 0.3)))
    callback = ComparisonCompleted(
        batch_id=state.batch_id,
        correlation_id=pair.correlation_id,
        essay_a_id=pair.essay_a,
        essay_b_id=pair.essay_b,
        winner="essay_a" if rng.random() < p_a else "essay_b",
        confidence=3.0,
    )
    apply_callback(state, callback, f"{entry}-0")


def simulate(batches: int, essays: int) -> list[tuple[Any, float]]:
    """(state, overlap) before every decision of `batches` simulated batches."""

    from cj.continuation import decide
    from events.types import WaveSubmitted
    from projections.batch import apply_batch_event

    captured = []
    for seed in range(batches):
        overlap = 1.0 if seed <= batches // 2 else 0.8
        state, q, rng = simulated_batch(seed, essays)
        pending: list[Any] = []
        entry = 0
        while True:
            before = copy.deepcopy(state)
            decision = decide(state, overlap)
            if decision is not None:
                captured.append((before, overlap))
                for event in decision.events:
                    state = apply_batch_event(state, event)
                    if isinstance(event, WaveSubmitted):
                        pending.extend(event.pairs)
                if decision.terminal is not None:
                    break
            if not pending:
                break
            take = 1 if overlap < 1.0 else len(pending)
            for pair in pending[:take]:
                entry += 1
                judge(state, pair, q, rng, entry)
            del pending[:take]
    return captured


def replay(path: str) -> dict[str, Any]:
    """Best CPU of two replays of `decide` on the pickled states, and a digest of the decisions."""
    import msgspec

    from cj.continuation import decide

    with open(path, "rb") as f:
        states = pickle.load(f)
    best = math.inf
    digest = ""
    for _ in range(2):
        work = [(copy.deepcopy(s), overlap) for s, overlap in states]
        t0 = time.process_time()
        decisions = [decide(s, overlap) for s, overlap in work]
        best = min(best, time.process_time() - t0)
        h = hashlib.sha256()
        for d in decisions:
            for e in [*(d.events if d else []), *(d.requests if d else [])]:
                blank = {"event_id": ""} if hasattr(e, "event_id") else {}
                h.update(msgspec.json.encode(msgspec.structs.replace(e, occurred_at="", **blank)))
        digest = h.hexdigest()[:16]
    return {"decisions": len(states), "cpu_s": round(best, 4), "digest": digest}


def _run(tree: Path, states: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "decide.py"), "--replay", states],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--essays", type=int, default=100)
    ap.add_argument("--against", default="main", help="git revision of the reference")
    ap.add_argument("--alternations", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--replay", help=argparse.SUPPRESS)  # the child process's part
    args = ap.parse_args()
    if args.replay:
        print(json.dumps(replay(args.replay)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.revisions import tree_at

    with tempfile.TemporaryDirectory() as tmp:
        states = str(Path(tmp) / "states.pkl")
        with open(states, "wb") as f:
            pickle.dump(simulate(args.batches, args.essays), f)
        ref = Path(tmp) / "ref"
        ref.mkdir()
        tree_at(args.against, ref)
        sides = {"current": ROOT, args.against: ref}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        for k in range(args.alternations):
            order = list(sides.items()) if k % 2 == 0 else list(sides.items())[::-1]
            for name, tree in order:
                runs[name].append(_run(tree, states))
    cpu = {name: [r["cpu_s"] for r in rs] for name, rs in runs.items()}
    ratios = [c / r for c, r in zip(cpu["current"], cpu[args.against], strict=True)]
    out = {
        "batches": args.batches,
        "essays": args.essays,
        "decisions": runs["current"][0]["decisions"],
        "cpu_s": cpu,
        "ratio_median": round(statistics.median(ratios), 3),
        "same_decisions": len({r["digest"] for rs in runs.values() for r in rs}) == 1,
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(
        f"decide over {out['decisions']} decisions of {args.batches} batches of {args.essays} "
        f"essays: CPU s, best of 2 per process, {args.alternations} alternations"
    )
    for name, values in cpu.items():
        print(f"  {name:>12}: median {statistics.median(values):.3f}  {values}")
    print(f"  ratio current / {args.against}: {out['ratio_median']} (median)")
    print(f"  same decisions: {out['same_decisions']}")


if __name__ == "__main__":
    main()
