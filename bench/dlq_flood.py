"""What malformed input costs in Redis: 96 MB of it against `used_memory`.

    python bench/dlq_flood.py [--megabytes 96] [--shapes 16777216,1048576,65536] [--json]

For each shape (the size of one malformed entry), starts its own redis-server (random port,
temp dir, no persistence), runs two CJ consumers in this process (so that two of them race
for every entry, as in issue #16), appends `--megabytes` of entries of NUL bytes to
`cj:callbacks` (field `data`, type `ComparisonCompleted`: undecodable) and waits until the
group has read and acknowledged them all. Reports, beside the input size: the dead letters
written (one per entry is the target), the bytes of the dead-letter stream (MEMORY USAGE), the
growth of `used_memory` from before the input to after it was consumed (the input itself is in
it: XACK deletes nothing), Redis's peak, and the wall time.

The goal (#16): the whole costs at most 2x the input in Redis; before, 96 MB of 16 MB entries
made a 6.46 GB dead-letter stream and a 9.87 GB peak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from app.settings import Settings
from app.wiring import InProcess
from events.streams import CALLBACKS, CJ_GROUP
from lps.providers.registry import make_provider
from streams.keys import Keys
from streams.reader import ensure_group
from tests.redis_server import RedisServer


async def flood(url: str, total: int, entry: int) -> dict[str, Any]:
    r = aioredis.from_url(url)
    keys = Keys("flood:")
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    memory = await r.info("memory")
    before = int(memory["used_memory"])
    n = max(1, total // entry)
    runner = InProcess(
        r,
        keys,
        Settings(block_ms=50, reaper_interval_s=1.0),
        make_provider,
        cj_consumers=2,
        lps_workers=0,
    )
    started = time.perf_counter()
    runner.start()
    payload = b"\x00" * entry
    for _ in range(n):
        await r.xadd(keys.callbacks, {"type": "ComparisonCompleted", "data": payload})
    while True:
        groups = {g["name"].decode(): g for g in await r.xinfo_groups(keys.callbacks)}
        g = groups[CJ_GROUP]
        if g["lag"] == 0 and g["pending"] == 0:
            break
        runner.check()
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - started
    await runner.close()
    runner.check()
    letters = int(await r.xlen(keys.dlq(CALLBACKS)))
    dlq_bytes = int(await r.memory_usage(keys.dlq(CALLBACKS)) or 0)
    memory = await r.info("memory")
    after = int(memory["used_memory"])
    peak = int(memory["used_memory_peak"])
    await r.aclose()
    input_bytes = n * entry
    return {
        "entry_bytes": entry,
        "entries": n,
        "input_mb": round(input_bytes / 1e6, 1),
        "dead_letters": letters,
        "dlq_kb": round(dlq_bytes / 1e3, 1),
        "used_memory_growth_mb": round((after - before) / 1e6, 1),
        "growth_over_input": round((after - before) / input_bytes, 2),
        "peak_mb": round(peak / 1e6, 1),
        "peak_over_input": round(peak / input_bytes, 2),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=96.0)
    parser.add_argument("--shapes", default="16777216,1048576,65536")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    total = int(args.megabytes * 1024 * 1024)
    rows = []
    for entry in (int(x) for x in args.shapes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            server = RedisServer(Path(tmp))
            server.start(aof=False)
            try:
                rows.append(asyncio.run(flood(server.url, total, entry)))
            finally:
                server.stop(kill=True)
    if args.json:
        print(json.dumps({"megabytes": args.megabytes, "runs": rows}))
        return
    print(f"{args.megabytes:.0f} MB of malformed entries, two CJ consumers racing:")
    for row in rows:
        print(
            f"  entries of {row['entry_bytes']:>9} B x {row['entries']:>5}: "
            f"{row['dead_letters']} letters ({row['dlq_kb']} kB); Redis grew "
            f"{row['used_memory_growth_mb']} MB = {row['growth_over_input']}x the input; "
            f"peak {row['peak_mb']} MB = {row['peak_over_input']}x; {row['wall_s']} s"
        )


if __name__ == "__main__":
    main()
