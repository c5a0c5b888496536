"""Redis Cluster figures: comparisons/s and Redis CPU per comparison (INFO commandstats, per
master), 1 master vs 3, and how the partitions spread over the masters (keys and commands
per master against the mean) across concurrent batches.

    python bench/cluster.py [--batches 30] [--essays 12] [--budget 40] [--partitions 16]
                            [--placement load|hash]

Starts its own clusters (redis-server + redis-cli on PATH) in a temp dir; the mock provider
(profile `ideal`) answers at once, so the figures are the pipeline's and Redis's own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.settings import Settings, keys_for
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import append_registration, register_once
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from projections.store import load_state
from streams.client import connect
from tests.helpers import registration
from tests.redis_cluster import RedisClusterServer


def commandstats(node: Any) -> tuple[int, float]:
    """(calls, CPU µs) of every command so far on a node."""
    calls, usec = 0, 0.0
    for line in node.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            calls += int(fields["calls"])
            usec += float(fields["usec"])
    return calls, usec


async def run(masters: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = RedisClusterServer(Path(tmp), masters=masters, replicas=0)
        cluster.start()
        try:
            return await _measure(cluster, args)
        finally:
            cluster.stop()


async def _measure(cluster: RedisClusterServer, args: argparse.Namespace) -> dict[str, Any]:
    s = Settings(
        # pydantic's typed __init__ names the field (redis_url), not its validation alias:
        # only REDIS_URL= sets it (extra="forbid" refuses redis_url=).
        REDIS_URL=cluster.url,  # type: ignore[call-arg]
        prefix=f"b{uuid.uuid4().hex[:4]}:",
        partitions=args.partitions,
        redis_cluster=True,
        block_ms=50,
    )
    r, _ = connect(cluster.url, cluster=True)
    await r.initialize()
    keys = keys_for(s)
    masters = cluster.master_nodes()
    before = {m.port: commandstats(m) for m in masters}
    ids = []
    for k in range(args.batches):
        if args.placement == "load":  # as `cjs submit` registers: the least loaded partition
            event = registration(args.essays, budget=args.budget, seed=k)
            ids.append((await register_once(r, keys, event))[0])
        else:  # ids of the caller's choosing: the partition is the hash of the id
            b = f"bench-{k}-{uuid.uuid4().hex[:4]}"
            await append_registration(
                r, keys, registration(args.essays, batch_id=b, budget=args.budget)
            )
            ids.append(b)
    partitions_on: dict[int, int] = {m.port: 0 for m in masters}
    batches_on: dict[int, int] = {m.port: 0 for m in masters}
    for part in keys.all_partitions():
        partitions_on[r.get_node_from_key(part.batches).port] += 1
    for b in ids:
        batches_on[r.get_node_from_key(keys.for_batch(b).batches).port] += 1
    runner = InProcess(
        r,
        keys,
        s,
        lambda name: make_provider(name, mock_profile=PROFILES["ideal"]),
        concurrency=8,
    )
    started = time.perf_counter()
    runner.start()
    for b in ids:
        await advance(r, keys, b)
    done: dict[str, Any] = {}
    while len(done) < len(ids):
        runner.check()
        for b in ids:
            if b not in done:
                state = await load_state(r, keys, b)
                if state is not None and state.terminal:
                    done[b] = state
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    await runner.close()
    comparisons = sum(st.accepted for st in done.values())
    per_master = {}
    for m in masters:
        calls, usec = commandstats(m)
        c0, u0 = before[m.port]
        keys_n = int(m.cli("DBSIZE").strip() or 0)
        per_master[m.port] = {
            "partitions": partitions_on[m.port],
            "batches": batches_on[m.port],
            "keys": keys_n,
            "commands": calls - c0,
            "cpu_us": usec - u0,
        }
    await r.aclose()

    def spread(field: str) -> float:
        values = [v[field] for v in per_master.values()]
        mean = statistics.fmean(values)
        return max(abs(v - mean) / mean for v in values) * 100 if mean else 0.0

    cpu = sum(v["cpu_us"] for v in per_master.values())
    return {
        "masters": len(masters),
        "placement": args.placement,
        "comparisons": comparisons,
        "seconds": round(elapsed, 2),
        "comparisons_per_s": round(comparisons / elapsed, 1),
        "redis_cpu_us_per_comparison": round(cpu / comparisons, 1) if comparisons else None,
        "per_master": per_master,
        "keys_max_dev_pct": round(spread("keys"), 1),
        "commands_max_dev_pct": round(spread("commands"), 1),
        "batches_max_dev_pct": round(spread("batches"), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--essays", type=int, default=12)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--masters", type=int, nargs="*", default=[1, 3])
    parser.add_argument(
        "--placement",
        choices=["load", "hash"],
        default="load",
        help="load: batches submitted as `cjs submit` does (the least loaded partition); "
        "hash: ids of the bench's choosing, each in the partition its hash names",
    )
    args = parser.parse_args()
    for masters in args.masters:
        print(asyncio.run(run(masters, args)))


if __name__ == "__main__":
    main()
