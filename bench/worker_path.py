"""CPU per comparison of the worker's own path, without planning or scoring: an LPS worker
judging a wave of requests (mock judge, zero latency) and a CJ consumer applying their
callbacks, each alone, in this process, against a redis-server of its own.

    python bench/worker_path.py [--requests 3000] [--lps-page 12] [--cj-page 30]
                                [--rounds 3] [--json]

One batch of 100 essays is registered and one wave of `--requests` pairs written as CJ writes
one (requests on `lps:requests`, the projection's pending correlation ids). Then:

1. LPS: a worker built as `cjs worker` builds it (app/wiring.py, the shared limiter, cooldown
   and breaker) reads `--lps-page` requests a read (the pages of the zero-latency run of
   bench/latency.py, where 4 processes share the stream, are that small) until every
   callback is on `cj:callbacks`.
2. CJ: a consumer reads `--cj-page` callbacks a read and applies them (callback.lua); its
   batch is never advanced (that is the decision's cost, not the apply's).

3. The floor: the same traffic with nothing but the streams' commands, on the same entries,
   pages and client. LPS: a page of the requests read, the callbacks LPS wrote for them
   appended again and the page acknowledged, in one pipeline; CJ: a page of those read, and
   acknowledged and counted by one script call. No decoding, judging, checking, metrics or
   logs: what a comparison costs this client and Redis before any of the pipeline's work.

Per round, CPU time of this process (getrusage: user + system) and of Redis (INFO cpu),
µs per comparison; the best of `--rounds` rounds (a fresh batch each). The figures are
what the end-to-end run's "worker" share is made of besides the decisions (bench/latency.py),
free of its noise: compare revisions with bench/compare_commits.py. The floor says how much
of it the pipeline's own work is (issue 11's 0.5 ms: see docs/operations.md's figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tools  # noqa: F401  (first: one BLAS thread per process)
from app import loop as event_loop
from app.heap import freeze_startup
from app.logs import configure
from app.settings import Settings
from app.wiring import cj_consumer, lps_worker
from bench.latency import process_cpu_s, redis_cpu_s
from cj.continuation import Decision, content_key, queue_decision
from cj.registration import append_registration
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import ComparisonRequested, PairRequest, WaveSubmitted, essay_reference
from lps.providers.mock import profile_from_env
from lps.providers.registry import make_provider
from projections.store import load_state
from streams.client import connect
from streams.keys import Keys
from tests.helpers import registration
from tests.redis_server import RedisServer


async def _wave(r: Any, keys: Keys, batch_id: str, n: int) -> None:
    """A registered batch with one wave of n requests written as CJ writes one."""
    reg = registration(100, batch_id=batch_id, budget=n, target_reliability=1.0)
    await append_registration(r, keys, reg)
    state = await load_state(r, keys, batch_id)
    assert state is not None
    ids = [e.essay_id for e in state.essays]
    all_pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :]]
    planned = all_pairs[:n]
    cfg = state.config
    key = content_key(state)
    essays = {e.essay_id: essay_reference(e) for e in state.essays}
    pairs = [PairRequest(str(k), a, b) for k, (a, b) in enumerate(planned)]
    requests = [
        ComparisonRequested(
            batch_id=batch_id,
            correlation_id=p.correlation_id,
            wave=1,
            essay_a=essays[p.essay_a],
            essay_b=essays[p.essay_b],
            mode=cfg.mode,
            provider=cfg.provider,
            model=cfg.model,
            preferred_bundle_size=1,
            seed=cfg.seed,
            prompt_version=cfg.prompt_version,
            content_key=key,
        )
        for p in pairs
    ]
    decision = Decision(
        events=[WaveSubmitted(batch_id=batch_id, wave=1, pairs=pairs)], requests=requests
    )
    async with r.pipeline(transaction=True) as pipe:
        queue_decision(pipe, keys, state, decision)
        await pipe.execute()


async def _round(url: str, n: int, lps_page: int, cj_page: int) -> dict[str, float]:
    r, _ = connect(url)  # the client `cjs worker` makes
    keys = Keys(f"wp{uuid.uuid4().hex[:6]}:")
    settings = Settings(block_ms=100, reaper_interval_s=30, read_count=lps_page)
    # As bench/latency.py's zero-latency run: the judge answers at once.
    os.environ.update({"CJS_MOCK_PROFILE": "cj_generic_batch", "CJS_MOCK_LATENCY_MS": "0"})
    profile = profile_from_env()
    worker = lps_worker(
        r,
        keys,
        settings,
        "lps-bench",
        lambda name: make_provider(name, mock_profile=profile),
        concurrency=16,
    )
    cj = cj_consumer(r, keys, settings, "cj-bench")
    cj.reader.count = cj_page

    async def no_advance(batch_id: str) -> bool:
        return False

    cj.advance_batch = no_advance  # type: ignore[method-assign]
    await cj.start()
    batch_id = "wp"
    await _wave(r, keys, batch_id, n)

    freeze_startup()  # as `cjs worker` does once started
    stop = asyncio.Event()
    cpu0, rcpu0 = process_cpu_s(), await redis_cpu_s(r)
    task = asyncio.create_task(worker.run(stop, maintenance_every_s=30))
    while await r.xlen(keys.callbacks) < n:
        await asyncio.sleep(0.005)
    cpu1, rcpu1 = process_cpu_s(), await redis_cpu_s(r)
    stop.set()
    await task
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0

    handled = 0
    cpu2, rcpu2 = process_cpu_s(), await redis_cpu_s(r)
    while handled < n:
        handled += await cj.step()
    cpu3, rcpu3 = process_cpu_s(), await redis_cpu_s(r)
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.accepted == n, state and state.accepted
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    floor = await _floor(r, keys, n, lps_page, cj_page)
    await r.aclose()
    return {
        **_per_comparison(
            n,
            lps_us=cpu1 - cpu0,
            lps_redis_us=rcpu1 - rcpu0,
            cj_us=cpu3 - cpu2,
            cj_redis_us=rcpu3 - rcpu2,
        ),
        **floor,
    }


def _per_comparison(n: int, **seconds: float) -> dict[str, float]:
    """CPU seconds spent on `n` comparisons, as µs a comparison."""
    return {name: spent * 1e6 / n for name, spent in seconds.items()}


_COUNT_LUA = """
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('HINCRBY', KEYS[2], 'accepted', #ARGV - 1)
"""


async def _floor(r: Any, keys: Keys, n: int, lps_page: int, cj_page: int) -> dict[str, float]:
    """The floor (3. above): the round's requests and callbacks again, through new groups."""
    callbacks = [fields for _, fields in await r.xrange(keys.callbacks)]
    floor_callbacks, counter = keys.key("floor:callbacks"), keys.key("floor:count")
    await r.xgroup_create(keys.requests, "floor", id="0")
    await r.xgroup_create(floor_callbacks, "floor", id="0", mkstream=True)
    count = r.register_script(_COUNT_LUA)

    cpu0, rcpu0 = process_cpu_s(), await redis_cpu_s(r)
    done = 0
    while done < n:
        reply = await r.xreadgroup("floor", "f", {keys.requests: ">"}, count=lps_page)
        ids = [entry_id for entry_id, _ in reply[0][1]]
        pipe = r.pipeline(transaction=False)
        for k in range(len(ids)):
            pipe.xadd(floor_callbacks, callbacks[done + k])
        pipe.xack(keys.requests, "floor", *ids)
        await pipe.execute()
        done += len(ids)
    cpu1, rcpu1 = process_cpu_s(), await redis_cpu_s(r)
    done = 0
    while done < n:
        reply = await r.xreadgroup("floor", "f", {floor_callbacks: ">"}, count=cj_page)
        ids = [entry_id for entry_id, _ in reply[0][1]]
        await count(keys=[floor_callbacks, counter], args=["floor", *ids])
        done += len(ids)
    cpu2, rcpu2 = process_cpu_s(), await redis_cpu_s(r)
    assert int(await r.hget(counter, "accepted")) == n
    return _per_comparison(
        n,
        lps_floor_us=cpu1 - cpu0,
        lps_floor_redis_us=rcpu1 - rcpu0,
        cj_floor_us=cpu2 - cpu1,
        cj_floor_redis_us=rcpu2 - rcpu1,
    )


def main() -> None:
    configure(json_logs=True, level="ERROR")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--lps-page", type=int, default=12)
    ap.add_argument("--cj-page", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=False)
    try:
        rounds = [
            # On the loop `cjs worker` runs on (CJS_EVENT_LOOP).
            event_loop.run(
                _round(server.url, args.requests, args.lps_page, args.cj_page),
                Settings().event_loop,
            )
            for _ in range(args.rounds)
        ]
    finally:
        server.stop()
    best = {k: round(min(x[k] for x in rounds), 1) for k in rounds[0]}
    report = {
        "requests": args.requests,
        "lps_page": args.lps_page,
        "cj_page": args.cj_page,
        "best_us_per_comparison": best,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{args.requests} requests, LPS pages of {args.lps_page}, CJ pages of {args.cj_page}; "
        f"µs per comparison (best of {args.rounds}):"
    )
    for k, v in best.items():
        print(f"  {k:<14} {v:8.1f}")


if __name__ == "__main__":
    main()
