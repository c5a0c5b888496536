"""Event-loop CPU of one `advance` (cj/continuation.py) on a realistic batch: its atomic read,
decoding, the server's time and the WATCH/MULTI write of a wave, without the decision itself.

    python bench/advance.py [--essays 100] [--pairs 1000] [--in-flight 50] [--runs 200] [--json]

A batch of `--essays` essays is run through real waves (decide, callbacks applied by
callback.lua) until about `--pairs` pairs were asked, all answered but `--in-flight`. Its
projection is the template: each run copies it (COPY) under a fresh prefix and advances that
copy with a fixed decider (the early wave `decide` would take there, computed once), so every
run reads, decodes and writes the same thing. Figure: CPU time of the main thread (the event
loop; the decider runs in a worker thread, as in `advance`), µs per advance, median and mean
over `--runs`. Deterministic: with CJS_BENCH_CALLGRIND=1 under
`valgrind --tool=callgrind --instr-atstart=no`, the instructions of the measured advances.
Compare revisions with bench/compare_commits.py (issue 11).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tools  # noqa: F401  (first: one BLAS thread per process)
from app.logs import configure
from cj.continuation import Decision, advance, decide, early_wave
from cj.registration import append_registration
from events import codec
from events.streams import CJ_GROUP
from events.types import ComparisonRequested
from projections import keys as pkeys
from projections.store import CallbackApplier, load_state
from streams.client import connect
from streams.keys import Keys
from tests.helpers import completed, events_of, registration
from tests.redis_server import RedisServer

BATCH = "adv"


async def _answer(r: Any, keys: Keys, applier: CallbackApplier, todo: list[Any]) -> None:
    """Callbacks for `todo` (requests) on the stream, delivered, applied by callback.lua."""
    rng = random.Random(len(todo))
    ids = []
    for q in todo:
        winner = rng.choice(["essay_a", "essay_b"])
        cb = completed(BATCH, q.correlation_id, winner, q.essay_a.essay_id, q.essay_b.essay_id)
        ids.append((cb, await r.xadd(keys.callbacks, codec.encode(cb))))
    await r.xreadgroup(CJ_GROUP, "bench", {keys.callbacks: ">"}, count=len(todo) + 1)
    await applier.apply_page([(cb, i.decode()) for cb, i in ids])


async def _template(r: Any, keys: Keys, essays: int, pairs: int, in_flight: int) -> Decision:
    """The batch in `keys`, about `pairs` asked and `in_flight` out; the decision to write."""
    reg = registration(essays, batch_id=BATCH, budget=4 * pairs, target_reliability=1.0)
    await append_registration(r, keys, reg)
    await r.xgroup_create(keys.callbacks, CJ_GROUP, id="0", mkstream=True)
    applier = CallbackApplier(r, keys, CJ_GROUP)
    seen = 0
    while True:
        assert await advance(r, keys, BATCH) is not None
        requests = [e for _, e in await events_of(r, keys.requests)]
        new = [q for q in requests[seen:] if isinstance(q, ComparisonRequested)]
        seen = len(requests)
        if seen + len(new) >= pairs:
            await _answer(r, keys, applier, new[: max(0, len(new) - in_flight)])
            break
        await _answer(r, keys, applier, new)
    state = await load_state(r, keys, BATCH)
    assert state is not None and state.in_flight > 0
    decision = early_wave(state) or decide(state)
    assert decision is not None
    return decision


async def _copy(r: Any, src: Keys, dst: Keys) -> None:
    names = [*pkeys.batch_keys(src, BATCH), pkeys.batch_range(src, BATCH)]
    for name in names:
        await r.copy(name, dst.prefix + name[len(src.prefix) :])
    await r.hset(pkeys.batch_index(dst), BATCH, "x")


def _callgrind(state: str, measured: bool) -> None:
    """Under `valgrind --tool=callgrind --instr-atstart=no` with CJS_BENCH_CALLGRIND=1:
    instructions counted during the measured advances only (a deterministic figure)."""
    if measured and os.environ.get("CJS_BENCH_CALLGRIND"):
        subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True)


async def _bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    r, _ = connect(url)
    template = Keys("tpl:")
    decision = await _template(r, template, args.essays, args.pairs, args.in_flight)
    state = await load_state(r, template, BATCH)
    assert state is not None
    samples = []
    for i in range(args.runs + 5):
        keys = Keys(f"r{i}:")
        await _copy(r, template, keys)
        _callgrind("on", i >= 5)
        t0 = time.thread_time()
        assert await advance(r, keys, BATCH, decider=lambda _s: decision) is not None
        if i >= 5:  # warm-up first
            samples.append((time.thread_time() - t0) * 1e6)
        _callgrind("off", i >= 5)
        for name in await r.keys(f"r{i}:*"):
            await r.delete(name)
    await r.aclose()
    return {
        "essays": args.essays,
        "pairs": len(state.pairs),
        "in_flight": state.in_flight,
        "wave": sum(1 for q in decision.requests),
        "advance_median_us": round(statistics.median(samples), 1),
        "advance_mean_us": round(statistics.fmean(samples), 1),
    }


def main() -> None:
    configure(json_logs=True, level="ERROR")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--essays", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=50)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=False)
    try:
        report = asyncio.run(_bench(server.url, args))
    finally:
        server.stop()
    print(json.dumps(report) if args.json else report)


if __name__ == "__main__":
    main()
