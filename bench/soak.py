"""Soak: batches back to back with the archiver running, and what Redis holds as they go.

    python bench/soak.py [--batches 200] [--essays 50] [--text-bytes 2000] [--every 20]
                         [--server-defaults] [--json]

Starts its own redis-server (random port, temp dir, no persistence; with the listpack settings
compose.yaml gives Redis, unless --server-defaults) and runs, in this process,
a CJ consumer, an LPS worker (mock judge, no latency) and the reaper's archiver (retention 0, a
pass every --archive-interval seconds, into a temp directory). Batches of --essays essays with
texts of about --text-bytes bytes run one after another, each to its end.

Printed:
* after every --every batches: Redis `used_memory` as it is (the archiver running beside), and
  settled (after one more pass has archived and trimmed what is due);
* live bytes per comparison: the growth of `used_memory` over one batch (the archiver paused,
  everything before it archived), less the batch's essay texts (stored twice: in
  `BatchRegistered` and in the batch projection), per comparison; the same with the texts;
  and the growth of the keys alone (MEMORY USAGE, no client buffers), per key family;
* retained bytes per comparison: settled `used_memory` growth since before the first batch,
  per comparison;
* archive size per comparison (compressed, texts included);
* the archive replay check: every archived batch, read back and replayed, gives the projection
  sha256 recorded when it was archived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis
import yaml

from app.archive import ArchiveStore, archived_manifests, archived_state, canonical_sha256
from app.retention import run_pass
from app.runs import mock_settings, registration_for, wait_terminal
from app.settings import Settings
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import append_registration
from events.streams import STREAMS
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from projections.rebuild import expected_of
from streams.keys import Keys
from streams.resilience import sleep_unless
from tests.redis_server import RedisServer

# A small vocabulary: the texts' size matters here, not their quality.
WORDS = [
    "the", "a", "school", "summer", "friend", "because", "however", "journey", "ocean",
    "remarkable", "nevertheless", "perspective", "learned", "family", "city", "morning",
    "vivid", "subtle", "reflection", "important", "decided", "together", "although",
]  # fmt: skip


ROOT = Path(__file__).resolve().parents[1]
MEMORY_SETTINGS = ("hash-max-listpack-entries", "stream-node-max-bytes", "stream-node-max-entries")


def deployed_settings() -> dict[str, str]:
    """The memory settings compose.yaml gives redis-server: a bench measures what a deployment
    holds."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    command = [str(arg) for arg in compose["services"]["redis"]["command"]]
    return {
        name: command[command.index(f"--{name}") + 1]
        for name in MEMORY_SETTINGS
        if f"--{name}" in command
    }


async def configure_server(r: Any, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        await r.config_set(name, value)


def essays(n: int, text_bytes: int, rng: random.Random) -> dict[str, Any]:
    rows = []
    for i in range(n):
        words: list[str] = []
        size = 0
        while size < text_bytes:
            word = rng.choice(WORDS)
            words.append(word)
            size += len(word) + 1
        row: dict[str, Any] = {
            "essay_id": f"S{i:03d}",
            "text": " ".join(words)[:text_bytes],
            "mock_quality": round(rng.gauss(0, 1), 3),
        }
        if i < 12:
            row["anchor_grade"] = "FEDCBA"[i % 6]
        rows.append(row)
    return {"essays": rows}


async def used_memory(r: Any) -> int:
    return int((await r.info("memory"))["used_memory"])


def _family(key: str) -> str:
    parts = key.split(":")
    if parts[0] == "proj" and len(parts) > 2 and parts[1] == "batch":
        return "proj:batch" if len(parts) == 3 else f"proj:batch:*:{parts[3]}"
    return ":".join(parts[:2])


async def key_bytes(r: Any) -> dict[str, int]:
    """MEMORY USAGE summed per key family (a stream, lps:answered, proj:batch:*:corr, ...)."""
    out: dict[str, int] = {}
    async for key in r.scan_iter(count=1000):
        family = _family(key.decode())
        out[family] = out.get(family, 0) + int(await r.memory_usage(key, samples=0) or 0)
    return out


async def memory_parts(r: Any) -> dict[str, int]:
    """Where used_memory goes: the keys themselves (MEMORY USAGE of each), client buffers,
    Lua scripts, and Redis' own overhead."""
    info = await r.info("memory")
    keys = 0
    async for key in r.scan_iter(count=1000):
        keys += int(await r.memory_usage(key, samples=0) or 0)
    return {
        "keys": keys,
        "clients": int(info.get("mem_clients_normal", 0)),
        "scripts": int(info.get("used_memory_scripts", 0)),
        "overhead": int(info.get("used_memory_overhead", 0)),
    }


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=False)
    archive_dir = tempfile.mkdtemp(prefix="cjs-soak-archive-")
    r = aioredis.from_url(server.url)
    await configure_server(r, {} if args.server_defaults else deployed_settings())
    keys = Keys("")
    settings = mock_settings(Settings())
    store = ArchiveStore(archive_dir)
    profile = replace(PROFILES["cj_generic_batch"], latency_ms=0.0)
    runner = InProcess(
        r, keys, settings, lambda name: make_provider(name, mock_profile=profile), concurrency=8
    )
    rng = random.Random(args.seed)
    stop = asyncio.Event()
    paused = asyncio.Event()
    passes = 0

    async def archiver() -> None:
        nonlocal passes
        while not await sleep_unless(stop, args.archive_interval):
            if not paused.is_set():
                await run_pass(r, keys, store, older_than_s=0, dlq_retention_s=86400)
                passes += 1

    async def settle() -> int:
        paused.set()
        await asyncio.sleep(0)  # let a pass in progress see it after it ends
        await run_pass(r, keys, store, older_than_s=0, dlq_retention_s=86400)
        return await used_memory(r)

    rows: list[dict[str, Any]] = []
    live: list[dict[str, Any]] = []
    comparisons = 0
    started = time.perf_counter()
    try:
        runner.start()
        baseline = await settle()
        archiving = asyncio.create_task(archiver())
        paused.clear()
        for k in range(1, args.batches + 1):
            measure = k % args.every == 0 or k == 1
            reg = registration_for(
                essays(args.essays, args.text_bytes, rng), "per_request", budget=None, seed=k
            )
            if measure:  # the archiver paused: this batch's growth alone
                before = await settle()
                keys_before = await key_bytes(r)
            await append_registration(r, keys, reg)
            await advance(r, keys, reg.batch_id)
            state = await wait_terminal(r, keys, reg.batch_id, runner, timeout=600)
            comparisons += state.submitted
            if measure:
                grown = await used_memory(r) - before
                keys_after = await key_bytes(r)
                families = {
                    f: keys_after.get(f, 0) - keys_before.get(f, 0)
                    for f in sorted(set(keys_after) | set(keys_before))
                }
                in_keys = sum(families.values())
                text = 2 * sum(len(e.text.encode()) for e in reg.essays)
                n = state.submitted
                live.append(
                    {
                        "batch": k,
                        "comparisons": n,
                        "bytes_per_comparison": round(grown / n),
                        "bytes_per_comparison_excluding_text": round((grown - text) / n),
                        # The keys alone (no client buffers): steadier than used_memory.
                        "key_bytes_per_comparison_excluding_text": round((in_keys - text) / n),
                        "key_bytes_per_comparison_by_family": {
                            f: round(v / n) for f, v in families.items() if v
                        },
                    }
                )
                paused.clear()
            if k % args.every == 0:
                as_is = await used_memory(r)
                settled = await settle()
                paused.clear()
                manifests = await archived_manifests(r, keys)
                archive_bytes = sum(m.stored_bytes for m in manifests.values())
                parts = await memory_parts(r)
                row = {
                    "batch": k,
                    "comparisons": comparisons,
                    "used_memory": as_is,
                    "used_memory_settled": settled,
                    "retained_bytes_per_comparison": round((settled - baseline) / comparisons, 1),
                    "settled_parts": parts,
                    "archived": len(manifests),
                    "archive_bytes_per_comparison": round(archive_bytes / comparisons),
                    "stream_entries": sum([await r.xlen(keys.stream(n)) for n in STREAMS]),
                    "seconds": round(time.perf_counter() - started, 1),
                }
                rows.append(row)
                if not args.json:
                    print(
                        f"batch {k:4d}: {comparisons:7d} comparisons, used_memory "
                        f"{as_is / 1e6:7.2f} MB (settled {settled / 1e6:6.2f} MB, retained "
                        f"{row['retained_bytes_per_comparison']:6.1f} B/comparison), "
                        f"{row['archived']} archived, archive "
                        f"{row['archive_bytes_per_comparison']} B/comparison, "
                        f"{row['stream_entries']} stream entries, keys {parts['keys']} B, "
                        f"client buffers {parts['clients']} B, {row['seconds']} s",
                        flush=True,
                    )
        stop.set()
        await archiving
        await settle()
        manifests = await archived_manifests(r, keys)
        replays_equal = 0
        for manifest in manifests.values():
            state, _ = await archived_state(manifest)
            replays_equal += canonical_sha256(expected_of(state, Keys())) == (
                manifest.projection_sha256
            )
    finally:
        stop.set()
        await runner.close()
        await r.aclose()
        server.stop(kill=True)
    first = next((row for row in rows if row["batch"] == args.every), rows[0] if rows else None)
    last = rows[-1] if rows else None
    return {
        "redis_settings": {} if args.server_defaults else deployed_settings(),
        "batches": args.batches,
        "essays": args.essays,
        "text_bytes": args.text_bytes,
        "comparisons": comparisons,
        "baseline_used_memory": baseline,
        "checkpoints": rows,
        "live": live,
        "used_memory_ratio_last_to_first_checkpoint": (
            round(last["used_memory"] / first["used_memory"], 3) if first and last else None
        ),
        "settled_ratio_last_to_first_checkpoint": (
            round(last["used_memory_settled"] / first["used_memory_settled"], 3)
            if first and last
            else None
        ),
        "archived": len(manifests),
        "archive_replays_equal": replays_equal,
        "archiver_passes": passes,
        "archive_dir": archive_dir,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--essays", type=int, default=50)
    parser.add_argument("--text-bytes", type=int, default=2000)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--archive-interval", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-defaults", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from app.logs import configure

    configure(json_logs=True, level="WARNING")
    out = asyncio.run(soak(args))
    if args.json:
        print(json.dumps(out))
        return
    for row in out["live"]:
        print(
            f"live, batch {row['batch']}: {row['bytes_per_comparison_excluding_text']} B per "
            f"comparison excluding the texts ({row['bytes_per_comparison']} B with them; "
            f"keys alone {row['key_bytes_per_comparison_excluding_text']} B), "
            f"{row['comparisons']} comparisons"
        )
    if out["live"]:
        families = out["live"][-1]["key_bytes_per_comparison_by_family"]
        print("live key bytes per comparison by family (texts included):", families)
    print(
        f"used_memory last/first checkpoint: {out['used_memory_ratio_last_to_first_checkpoint']} "
        f"(settled {out['settled_ratio_last_to_first_checkpoint']}); "
        f"{out['archive_replays_equal']}/{out['archived']} archives replay to their recorded "
        f"projection; {out['comparisons']} comparisons in {out['seconds']} s"
    )


if __name__ == "__main__":
    main()
