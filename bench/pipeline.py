"""End-to-end throughput: request → mock judge (zero latency) → callback → projection.

Starts its own redis-server (AOF off, like a throughput-tuned deployment; pass
--aof to measure with appendfsync everysec), then for 1 and 4 worker processes
(each running one CJ consumer and one LPS worker) submits several batches at
once and measures accepted comparisons per second until all are finalized. It
also measures the projector alone (CJ consumer applying pre-appended callbacks)
and counts Redis round trips per comparison from the client side.

    python bench/pipeline.py [--comparisons 20000] [--workers 1,4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.typing import EncodableT, FieldT

import tools  # noqa: F401  (first: one BLAS thread per process)
from app.logs import configure
from app.settings import Settings
from app.wiring import InProcess
from cj.consumer import CJConsumer
from cj.continuation import Decision, advance, queue_decision
from cj.registration import append_registration
from events import codec
from events.streams import CJ_GROUP
from lps.providers.mock import MockProfile
from lps.providers.registry import make_provider
from projections.batch import BatchState
from projections.store import load_state
from streams.keys import Keys
from tests.helpers import completed, registration, wave
from tests.redis_server import RedisServer

ZERO = MockProfile("bench", position_bias=0.3, noise=0.5, latency_ms=0.0)


def _count_round_trips() -> list[int]:
    """Count client round trips: one packed send per command or per pipeline."""
    counter = [0]
    original = Connection.send_packed_command

    async def counting(self: Any, command: Any, check_health: bool = True) -> None:
        counter[0] += 1
        await original(self, command, check_health)

    Connection.send_packed_command = counting  # type: ignore[method-assign]
    return counter


def _worker(url: str, prefix: str, stop_file: str, out_file: str) -> None:
    counter = _count_round_trips()
    configure(json_logs=True, level="WARNING")

    async def main() -> None:
        r = aioredis.from_url(url)
        settings = Settings(block_ms=100, reaper_interval_s=30)
        runner = InProcess(
            r,
            Keys(prefix),
            settings,
            lambda n: make_provider(n, mock_profile=ZERO),
            cj_consumers=1,
            lps_workers=1,
            concurrency=16,
        )
        runner.start()
        while not os.path.exists(stop_file):
            await asyncio.sleep(0.05)
        await runner.close()
        await r.aclose()

    asyncio.run(main())
    Path(out_file).write_text(str(counter[0]))


async def _submit(url: str, keys: Keys, batches: int, essays: int, budget: int) -> list[str]:
    r = aioredis.from_url(url)
    ids = []
    for i in range(batches):
        # Target reliability 1: no early stop, every batch runs to its budget.
        reg = registration(essays, batch_id=f"bench-{i}", budget=budget, target_reliability=1.0)
        await append_registration(r, keys, reg)
        ids.append(reg.batch_id)
    for batch_id in ids:
        await advance(r, keys, batch_id)
    await r.aclose()
    return ids


async def _state(r: Any, keys: Keys, batch_id: str) -> BatchState:
    """`load_state` of a batch registered before (its projection written with it)."""
    state = await load_state(r, keys, batch_id)
    assert state is not None
    return state


async def _wait(url: str, keys: Keys, ids: list[str]) -> int:
    r = aioredis.from_url(url)
    while True:
        states = [await _state(r, keys, b) for b in ids]
        if all(s.terminal for s in states):
            await r.aclose()
            return sum(s.accepted for s in states)
        await asyncio.sleep(0.05)


def end_to_end(url: str, workers: int, comparisons: int) -> dict[str, Any]:
    keys = Keys(f"bench{uuid.uuid4().hex[:6]}:")
    essays, batches = 100, 8
    budget = comparisons // batches
    tmp = tempfile.mkdtemp()
    stop_file = os.path.join(tmp, "stop")
    ctx = mp.get_context("spawn")
    outs = [os.path.join(tmp, f"rt{i}") for i in range(workers)]
    procs = [
        ctx.Process(target=_worker, args=(url, keys.prefix, stop_file, outs[i]))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    started = time.perf_counter()
    ids = asyncio.run(_submit(url, keys, batches, essays, budget))
    accepted = asyncio.run(_wait(url, keys, ids))
    wall = time.perf_counter() - started
    Path(stop_file).touch()
    for p in procs:
        p.join(30)
    trips = sum(int(Path(o).read_text()) for o in outs if os.path.exists(o))
    return {
        "workers": workers,
        "comparisons": accepted,
        "wall_s": round(wall, 3),
        "comparisons_per_s": round(accepted / wall, 1),
        "round_trips_per_comparison": round(trips / max(1, accepted), 3),
        "note": "includes idle polling of blocked reads and the wave barriers of 8 batches",
    }


async def projector(url: str, n: int) -> dict[str, Any]:
    r = aioredis.from_url(url)
    keys = Keys(f"proj{uuid.uuid4().hex[:6]}:")
    reg = registration(200, batch_id="p", budget=n)
    await append_registration(r, keys, reg)
    ids = [e.essay_id for e in reg.essays]
    pairs = [(ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids))][:n]
    state = await _state(r, keys, "p")
    async with r.pipeline(transaction=True) as pipe:
        queue_decision(
            pipe,
            keys,
            state,
            Decision(events=[wave("p", 1, [(f"c{k}", a, b) for k, (a, b) in enumerate(pairs)])]),
        )
        await pipe.execute()
    consumer = CJConsumer(r, keys, "bench", count=100, block_ms=10)
    await consumer.start()
    for i in range(0, n, 1000):
        async with r.pipeline(transaction=False) as pipe:
            for k in range(i, min(n, i + 1000)):
                # redis-py asks for a dict of its own field types (dict is invariant): these
                # str names and bytes values are among them.
                fields = codec.encode(completed("p", f"c{k}", "essay_a", *pairs[k]))
                pipe.xadd(keys.callbacks, cast(dict[FieldT, EncodableT], fields))
            await pipe.execute()
    counter = _count_round_trips()
    before = counter[0]
    started = time.perf_counter()
    handled = 0
    while handled < n:
        handled += await consumer.step()
    elapsed = time.perf_counter() - started
    trips = counter[0] - before
    state = await _state(r, keys, "p")
    assert state.accepted == n and (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    await r.aclose()
    return {
        "callbacks": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed, 1),
        "round_trips_per_event": round(trips / n, 4),
        "note": "includes the wave-completing BT fit and finalization of 200 essays",
    }


def main() -> None:
    configure(json_logs=False, level="WARNING")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=16000)
    parser.add_argument("--workers", default="1,4")
    parser.add_argument("--projector-events", type=int, default=19900)
    parser.add_argument("--aof", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=args.aof, fsync="everysec")
    try:
        report: dict[str, Any] = {
            "redis": "redis-server (local, "
            + ("AOF everysec" if args.aof else "no persistence")
            + ")",
            "end_to_end": [
                end_to_end(server.url, int(w), args.comparisons) for w in args.workers.split(",")
            ],
            "projector": asyncio.run(projector(server.url, args.projector_events)),
        }
    finally:
        server.stop()
    if args.json:
        print(json.dumps(report))
        return
    print(report["redis"])
    for row in report["end_to_end"]:
        rate = f"{row['comparisons_per_s']:,.0f}"
        trips = row["round_trips_per_comparison"]
        print(
            f"end to end, {row['workers']} worker process(es): {rate} comparisons/s "
            f"({row['comparisons']} in {row['wall_s']} s), {trips} round trips per comparison"
        )
    p = report["projector"]
    rate = f"{p['events_per_s']:,.0f}"
    print(
        f"projector alone: {rate} callbacks/s ({p['callbacks']} in {p['seconds']} s), "
        f"{p['round_trips_per_event']} round trips per callback"
    )


if __name__ == "__main__":
    main()
