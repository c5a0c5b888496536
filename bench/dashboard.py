"""Dashboard pages with 10,000 pending entries, beside the Redis calls a page cannot avoid.

    python bench/dashboard.py [--pending 10000] [--batches 20] [--rounds 30] [--json]

Starts its own redis-server (random port, temp dir, no persistence) and `cjs dashboard` as a
process, then writes `--pending` `ComparisonRequested` entries to `lps:requests`, read by five
consumers of the `lps` group and never acknowledged (all pending), and `--batches` registered
batches. Measured, each `--rounds` times over HTTP (urllib, a new connection per request),
median and 95th percentile:

* reference: the plain Redis calls behind a page, from this process: XPENDING (the summary) and
  XPENDING ... 50 (one page of rows);
* `/` (the overview: every stream and group, consumers and their verdicts, stalled batches,
  dead letters, open batches, providers), `/api/overview` (its JSON);
* `/stuck` (one page of 50 entries, each read with XRANGE to say what it is about), and the same
  with `?idle=` and a batch filter (the rows are scanned on the server, never all listed).

Goal (issue 14): overview and stuck pages render in 300 ms or less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from cj.registration import append_registration
from events import codec
from events.streams import LPS_GROUP
from events.types import ComparisonRequested, Essay
from streams.keys import Keys
from streams.reader import ensure_group
from tests.helpers import registration
from tests.redis_server import RedisServer

PREFIX = "bench:"
GOAL_MS = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fill(url: str, pending: int, batches: int) -> str:
    """The pending entries and the batches; returns one batch id."""
    keys = Keys(PREFIX)
    r = aioredis.Redis.from_url(url)
    try:
        await ensure_group(r, keys.requests, LPS_GROUP)
        batch_ids = []
        for k in range(batches):
            reg = registration(12, seed=k)
            await append_registration(r, keys, reg)
            batch_ids.append(reg.batch_id)
        a, b = Essay("e1", "text of essay one " * 40), Essay("e2", "text of essay two " * 40)
        async with r.pipeline(transaction=False) as pipe:
            for i in range(pending):
                event = ComparisonRequested(
                    batch_id=batch_ids[i % len(batch_ids)],
                    correlation_id=f"c{i:06d}",
                    wave=1,
                    essay_a=a,
                    essay_b=b,
                )
                # redis-py asks for a dict of its own field types (dict is invariant): these
                # str names and bytes values are among them.
                fields = cast(dict[FieldT, EncodableT], codec.encode(event))
                pipe.xadd(keys.requests, fields)
            await pipe.execute()
        share = pending // 5 + 1
        for c in range(5):
            await r.xreadgroup(LPS_GROUP, f"lps-dead-{c}", {keys.requests: ">"}, count=share)
        return batch_ids[0]
    finally:
        await r.aclose()


async def reference(url: str, rounds: int) -> list[float]:
    keys = Keys(PREFIX)
    r = aioredis.Redis.from_url(url)
    try:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            await r.xpending(keys.requests, LPS_GROUP)
            await r.xpending_range(keys.requests, LPS_GROUP, min="-", max="+", count=50)
            times.append(1000 * (time.perf_counter() - started))
        return times
    finally:
        await r.aclose()


def timed_get(url: str, rounds: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as reply:
            body = reply.read()
            assert reply.status == 200, reply.status
        times.append(1000 * (time.perf_counter() - started))
        size = len(body)
    return times, size


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[max(0, int(0.95 * len(ordered)) - 1)], 1),
        "max_ms": round(ordered[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start(aof=False)
        port = _free_port()
        dashboard = None
        try:
            batch_id = asyncio.run(fill(server.url, args.pending, args.batches))
            env = {**os.environ, "REDIS_URL": server.url, "CJS_PREFIX": PREFIX}
            dashboard = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from tools.cli import main; main()",
                    "dashboard",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    timed_get(base + "/api/overview", 1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            out: dict[str, Any] = {
                "pending": args.pending,
                "batches": args.batches,
                "rounds": args.rounds,
                "goal_ms": GOAL_MS,
                "reference_xpending_summary_and_page": summary(
                    asyncio.run(reference(server.url, args.rounds))
                ),
            }
            pages = {
                "overview /": "/",
                "overview JSON /api/overview": "/api/overview",
                "stuck /stuck (50 per page)": "/stuck?stream=lps:requests",
                "stuck, idle >= 0.5 s, page 2": "/stuck?stream=lps:requests&idle=0.5&after=0-1",
                "stuck, one batch's entries": f"/stuck?stream=lps:requests&batch={batch_id}",
            }
            for name, path in pages.items():
                timed_get(base + path, 2)  # warm: templates compiled, modules loaded
                times, size = timed_get(base + path, args.rounds)
                out[name] = {**summary(times), "bytes": size}
        finally:
            if dashboard is not None:
                dashboard.terminate()
                dashboard.wait(timeout=10)
            server.stop(kill=True)
    pages_ok = all(
        v["p95_ms"] <= GOAL_MS for k, v in out.items() if isinstance(v, dict) and "bytes" in v
    )
    out["goal_met_p95"] = pages_ok
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.pending} pending entries, {args.batches} batches, {args.rounds} rounds each")
    for name, value in out.items():
        if isinstance(value, dict):
            print(
                f"  {name:<42} median {value['median_ms']:>7.1f} ms   p95 {value['p95_ms']:>7.1f}"
                f" ms   max {value['max_ms']:>7.1f} ms"
                + (f"   {value['bytes']:>7} bytes" if "bytes" in value else "")
            )
    print(
        f"goal: pages <= {GOAL_MS:.0f} ms at the 95th percentile: "
        + ("met" if pages_ok else "NOT met")
    )


if __name__ == "__main__":
    main()
