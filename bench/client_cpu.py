"""Client CPU of CJ's Redis work through the clients `streams.client.connect` makes, against
redis-py 8's own defaults, on a redis-server and on a Redis Cluster of their own, in this
process, alternated.

    python bench/client_cpu.py [--pairs 1500] [--reads 200] [--advances 30] [--rounds 4]
                               [--json]

Per client and server, CPU of this process (getrusage) of:
* `read`: a decision's atomic read of a batch (`projections.store.read_raw(atomic=True)`, one
  MULTI/EXEC of HGETALLs) of `--pairs` pairs (pairs and correlation hashes that many fields
  each, as a 100-essay batch has after ≈ 15 comparisons per essay), per read;
* `advance`: `cj.continuation.advance` of a registered 20-essay batch (read, decide its first
  wave of 40 pairs, write it under WATCH), per batch, the median of `--advances`;
best of `--rounds` rounds. What separates the clients (streams/client.py): RESP2's flat
replies (redis-py 8 asks for RESP3, whose maps hiredis builds several times slower), commands
packed by hiredis, and on a cluster a transaction's commands handled on the caller's thread
(redis-py runs each in a thread with an event loop of its own, the caller's loop waiting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from app.logs import configure
from bench.latency import process_cpu_s
from cj.continuation import advance
from cj.registration import append_registration
from projections import keys as pkeys
from projections.store import read_raw
from streams.client import connect
from streams.keys import Keys
from tests.helpers import registration
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


async def _cpu(step: Callable[[], Awaitable[Any]]) -> float:
    start = process_cpu_s()
    await step()
    return process_cpu_s() - start


async def _reads(r: Any, keys: Keys, reads: int) -> float:
    async def all_reads() -> None:
        for _ in range(reads):
            await read_raw(r, keys, BATCH, atomic=True)

    return await _cpu(all_reads) / reads


async def _advances(r: Any, key_of: Callable[[str], Keys], advances: int) -> float:
    spent = []
    for _ in range(advances):
        keys = key_of(uuid.uuid4().hex[:8])
        await append_registration(r, keys, registration(20, batch_id=BATCH, budget=40))

        async def step(keys: Keys = keys) -> None:
            assert await advance(r, keys, BATCH) is not None

        spent.append(await _cpu(step))
    return statistics.median(spent)


async def _compare(
    clients: dict[str, Any], key_of: Callable[[str], Keys], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    keys = key_of("read")
    await _fill(clients["ours"], keys, args.pairs)
    first = [await read_raw(r, keys, BATCH, atomic=True) for r in clients.values()]
    assert all(x == first[0] for x in first), "the clients read different things"
    best = {name: {"read": float("inf"), "advance": float("inf")} for name in clients}
    for k in range(args.rounds):
        order = list(clients.items()) if k % 2 == 0 else list(clients.items())[::-1]
        for name, r in order:
            read = await _reads(r, keys, args.reads)
            step = await _advances(r, key_of, args.advances)
            best[name]["read"] = min(best[name]["read"], read)
            best[name]["advance"] = min(best[name]["advance"], step)
    for r in clients.values():
        await r.aclose()
    return {name: {k: round(v * 1e3, 3) for k, v in f.items()} for name, f in best.items()}


async def _server(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=False)
    try:
        ours, _ = connect(server.url)
        default = aioredis.from_url(server.url, decode_responses=False)
        return await _compare(
            {"ours": ours, "redis-py": default}, lambda tag: Keys(f"{tag}:"), args
        )
    finally:
        server.stop()


async def _cluster(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    cluster = RedisClusterServer(Path(tempfile.mkdtemp()))
    cluster.start()
    try:
        cluster.wait_ok()
        ours, _ = connect(cluster.url, cluster=True)
        default = RedisCluster.from_url(cluster.url, decode_responses=False)
        for r in (ours, default):
            await r.initialize()
        return await _compare(
            {"ours": ours, "redis-py": default}, lambda tag: Keys(f"{{{tag}}}:"), args
        )
    finally:
        cluster.stop()


def main() -> None:
    configure(json_logs=True, level="ERROR")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1500)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--advances", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = {
        "pairs": args.pairs,
        "ms_cpu": {
            "redis-server": asyncio.run(_server(args)),
            "cluster": asyncio.run(_cluster(args)),
        },
    }
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"client CPU, ms (best of {args.rounds} rounds): a decision's atomic read of a batch of "
        f"{args.pairs} pairs; advance of a 20-essay batch's first wave (median)"
    )
    for where, f in report["ms_cpu"].items():
        ours, theirs = f["ours"], f["redis-py"]
        print(
            f"  {where:13} read: ours {ours['read']:.3f}, redis-py's defaults "
            f"{theirs['read']:.3f} (ratio {ours['read'] / theirs['read']:.2f});  advance: ours "
            f"{ours['advance']:.3f}, redis-py's {theirs['advance']:.3f} "
            f"(ratio {ours['advance'] / theirs['advance']:.2f})"
        )


if __name__ == "__main__":
    main()
