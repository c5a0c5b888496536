"""Client CPU of reading a batch's projection (`projections.store.read_raw`): atomic, as a
decision reads it (one script), against the MULTI/EXEC it was until session 16; and not atomic
(a pipeline, as `load_state` reads it for the commands and the dashboard) through the clients
`streams.client.connect` makes (RESP2), against redis-py 8's default protocol (RESP3). On a
redis-server and on a Redis Cluster of their own, in this process, alternated.

    python bench/batch_read.py [--pairs 1500] [--reads 200] [--rounds 4] [--json]

The batch: a projection of `--pairs` pairs (its pairs and correlation hashes that many fields
each, as a 100-essay batch has after ≈ 15 comparisons per essay). Per way of reading, CPU of
this process (getrusage) per read, the best of `--rounds` rounds of `--reads` reads. Why:
redis-py's cluster transactions run each command in a thread with an event loop of its own
(while the caller's loop waits), and hiredis builds RESP3's maps several times slower than
RESP2's flat arrays (streams/client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from bench.latency import process_cpu_s
from projections import keys as pkeys
from projections.store import read_raw
from streams.client import Cluster, connect
from streams.keys import Keys
from tests.redis_cluster import RedisClusterServer
from tests.redis_server import RedisServer

BATCH = "b"


async def _fill(r: Any, keys: Keys, pairs: int) -> None:
    await r.hset(pkeys.batch(keys, BATCH), mapping={"status": "running", "in_flight": 0})
    await r.hset(
        pkeys.batch_pairs(keys, BATCH),
        mapping={str(k): f'[{k // 50},"e{k % 100}","e{(7 * k + 3) % 100}"]' for k in range(pairs)},
    )
    await r.hset(
        pkeys.batch_corr(keys, BATCH),
        mapping={str(k): f"c {1733000000000 + k}-0 essay_a" for k in range(pairs)},
    )


async def _multi(r: Any, keys: Keys, batch_id: str) -> dict[str, Any]:
    """The atomic read as it was until session 16: HGETALLs in one MULTI/EXEC."""
    names = pkeys.batch_keys(keys, batch_id)
    async with r.pipeline(transaction=True) as pipe:
        for name in names:
            pipe.hgetall(name)
        values = await pipe.execute()
    return {name: value for name, value in zip(names, values, strict=True) if value}


Read = Callable[[], Awaitable[Any]]


async def _cpu_per_read(read: Read, reads: int) -> float:
    start = process_cpu_s()
    for _ in range(reads):
        await read()
    return (process_cpu_s() - start) / reads


async def _compare(
    ours: Any, default: Any, keys: Keys, args: argparse.Namespace
) -> dict[str, float]:
    await _fill(ours, keys, args.pairs)
    ways: dict[str, Read] = {
        "atomic_script": lambda: read_raw(ours, keys, BATCH, atomic=True),
        "atomic_multi": lambda: _multi(ours, keys, BATCH),
        "pipeline_resp2": lambda: read_raw(ours, keys, BATCH),
        "pipeline_resp3": lambda: read_raw(default, keys, BATCH),
    }
    first = [await read() for read in ways.values()]
    assert all(x == first[0] for x in first), "the ways read different things"
    best = {name: float("inf") for name in ways}
    for k in range(args.rounds):
        order = list(ways.items()) if k % 2 == 0 else list(ways.items())[::-1]
        for name, read in order:
            best[name] = min(best[name], await _cpu_per_read(read, args.reads))
    for r in (ours, default):
        await r.aclose()
    return {name: round(v * 1e3, 3) for name, v in best.items()}


async def _server(args: argparse.Namespace) -> dict[str, float]:
    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=False)
    try:
        ours, _ = connect(server.url)
        default = aioredis.from_url(server.url, decode_responses=False)
        return await _compare(ours, default, Keys("bench:"), args)
    finally:
        server.stop()


async def _cluster(args: argparse.Namespace) -> dict[str, float]:
    cluster = RedisClusterServer(Path(tempfile.mkdtemp()))
    cluster.start()
    try:
        cluster.wait_ok()
        ours, _ = connect(cluster.url, cluster=True)
        default = Cluster.from_url(cluster.url, decode_responses=False)
        for r in (ours, default):
            await r.initialize()
        return await _compare(ours, default, Keys("{bench}:"), args)
    finally:
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1500)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = {
        "pairs": args.pairs,
        "ms_cpu_per_read": {
            "redis-server": asyncio.run(_server(args)),
            "cluster": asyncio.run(_cluster(args)),
        },
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"client CPU of one read of a batch of {args.pairs} pairs, ms (best of rounds)")
    for where, f in report["ms_cpu_per_read"].items():
        print(
            f"  {where:13} atomic: script {f['atomic_script']:.3f}, MULTI/EXEC "
            f"{f['atomic_multi']:.3f} (ratio {f['atomic_script'] / f['atomic_multi']:.2f});  "
            f"pipeline: RESP2 {f['pipeline_resp2']:.3f}, RESP3 {f['pipeline_resp3']:.3f} "
            f"(ratio {f['pipeline_resp2'] / f['pipeline_resp3']:.2f})"
        )


if __name__ == "__main__":
    main()
