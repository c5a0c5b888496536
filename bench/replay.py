"""Replay throughput on a million-event log, beside the raw XRANGE read speed of the same log.

    python bench/replay.py [--events 1000000] [--batches 200] [--page 5000] [--json]

Starts its own redis-server (random port, temp dir, no persistence), writes a log of realistic
events with pipelined XADDs: per batch a `BatchRegistered` (100 essays), waves of
`WaveSubmitted` + `BatchScored`, a `BatchFinalized`, and `ComparisonCompleted` /
`ComparisonFailed` callbacks (about 3 % failed, 0.5 % duplicates, a few orphans) interleaved
across batches as concurrent batches would be. The `cj` group is set to the end of the
callbacks stream, i.e. every callback has been applied, as on a quiet live system.

Measured, each after the log is written:
* raw read: XRANGE COUNT page over `cj:batches` and `cj:callbacks`, entries counted, nothing
  decoded (the limit replay cannot beat): with redis-py's reply parsing (a dict per entry), and
  unparsed (the flat reply replay uses), sequential and with the next page prefetched;
* replay (all batches): `projections.replay.replay_live` (paged reads with prefetch, msgspec
  decode, the pure apply fold);
* rebuild (all batches): `projections.rebuild.rebuild` (the replay, compared with the live keys,
  then every projection written in one MULTI/EXEC under WATCH), first with no projection at all
  (every `proj:*` key lost), then over the live projection; and the comparison alone
  (`cjs replay --all`);
* replay of one batch: the same scan, with the raw-bytes pre-filter skipping other batches.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from events import codec
from events.streams import CJ_GROUP
from events.types import (
    BatchConfig,
    BatchFinalized,
    BatchRegistered,
    BatchScored,
    ComparisonCompleted,
    ComparisonFailed,
    ErrorDetail,
    Essay,
    EssayScore,
    PairRequest,
    TokenUsage,
    WaveSubmitted,
    new_id,
)
from projections.rebuild import check, rebuild
from projections.replay import replay_live
from streams.keys import Keys
from streams.paging import raw_client, read_pages
from tests.redis_server import RedisServer

ESSAYS = 100
WAVES = 10


def essays(rng: random.Random) -> list[Essay]:
    out = []
    for i in range(ESSAYS):
        words = " ".join(
            rng.choice(("the", "remarkable", "journey", "ocean", "friend", "nevertheless"))
            for _ in range(rng.randint(120, 260))
        )
        grade = "FEDCBA"[i % 6] if i < 12 else None
        out.append(
            Essay(
                essay_id=f"E{i:03d}",
                text=words,
                is_anchor=grade is not None,
                anchor_grade=grade,
                mock_quality=round(rng.gauss(0, 1), 3),
            )
        )
    return out


def plan(n_events: int, n_batches: int, seed: int = 1) -> Iterator[tuple[str, Any]]:
    """Every (stream, event) of the log, in append order."""
    rng = random.Random(seed)
    keys = Keys("")
    per_batch = n_events // n_batches
    callbacks_per_batch = per_batch - 2 - 2 * WAVES
    per_wave = callbacks_per_batch // WAVES
    batch_ids = [f"bench-{i:04d}" for i in range(n_batches)]
    ids = [f"E{i:03d}" for i in range(ESSAYS)]
    for b in batch_ids:
        yield (
            keys.batches,
            BatchRegistered(
                batch_id=b,
                essays=essays(rng),
                denominator=ESSAYS * (ESSAYS - 1) // 2,
                config=BatchConfig(
                    total_budget=callbacks_per_batch,
                    wave_size=per_wave,
                    seed=seed,
                    grade_scale=list("FEDCBA"),
                    max_waves=WAVES,
                ),
            ),
        )
    for w in range(1, WAVES + 1):
        n = per_wave if w < WAVES else callbacks_per_batch - per_wave * (WAVES - 1)
        waves = {}
        for b in batch_ids:
            pairs = [PairRequest(new_id(), *rng.sample(ids, 2)) for _ in range(n)]
            waves[b] = pairs
            yield (keys.batches, WaveSubmitted(batch_id=b, wave=w, pairs=pairs))
        pending = [(b, p) for b in batch_ids for p in waves[b]]
        rng.shuffle(pending)  # callbacks of concurrent batches interleave
        for b, p in pending:
            roll = rng.random()
            if roll < 0.03:
                cb: Any = ComparisonFailed(
                    batch_id=b,
                    correlation_id=p.correlation_id,
                    essay_a_id=p.essay_a,
                    essay_b_id=p.essay_b,
                    attempts=4,
                    error=ErrorDetail(
                        error_type="overloaded",
                        retryable=True,
                        status_code=529,
                        message="overloaded",
                        provider="anthropic",
                        model="claude-sonnet-4-5",
                        correlation_id=p.correlation_id,
                    ),
                )
            else:
                cb = ComparisonCompleted(
                    batch_id=b,
                    correlation_id=p.correlation_id if roll < 0.999 else new_id(),
                    essay_a_id=p.essay_a,
                    essay_b_id=p.essay_b,
                    winner="essay_a" if rng.random() < 0.55 else "essay_b",
                    confidence=float(rng.randint(1, 5)),
                    justification="Essay A develops its argument with clearer structure and "
                    "more precise vocabulary; B relies on generalities.",
                    provider="anthropic",
                    model="claude-sonnet-4-5",
                    latency_ms=round(rng.uniform(800, 4000), 3),
                    usage=TokenUsage(
                        input_tokens=rng.randint(1500, 2500),
                        output_tokens=90,
                        cache_read_input_tokens=1200,
                    ),
                    prompt_sha256="ab" * 32,
                )
            yield (keys.callbacks, cb)
            if rng.random() < 0.005:
                yield (keys.callbacks, cb)  # a duplicate delivery
        for b in batch_ids:
            yield (
                keys.batches,
                BatchScored(
                    batch_id=b,
                    wave=w,
                    ssr=0.8,
                    max_delta=0.1,
                    comparisons=w * n,
                    scores=[
                        EssayScore(essay_id=i, theta=round(rng.gauss(0, 1), 6), se=0.4, rank=k + 1)
                        for k, i in enumerate(ids)
                    ],
                ),
            )
    for b in batch_ids:
        yield (keys.batches, BatchFinalized(batch_id=b, reason="budget"))


async def write(r: Any, log: Iterator[tuple[str, Any]], chunk: int = 10_000) -> tuple[int, float]:
    """Encode and append the log in pipelines of `chunk` XADDs; returns (events, seconds)."""
    started = time.perf_counter()
    total = 0
    while True:
        pipe = r.pipeline(transaction=False)
        n = 0
        for stream, event in itertools.islice(log, chunk):
            pipe.xadd(stream, codec.encode(event))
            n += 1
        if not n:
            break
        await pipe.execute()
        total += n
    await r.xgroup_create(Keys("").callbacks, CJ_GROUP, id="$")
    return total, time.perf_counter() - started


async def raw_read(r: Any, keys: Keys, page: int) -> tuple[int, float]:
    """Sequential XRANGE pages, one after the other (no decoding)."""
    started = time.perf_counter()
    n = 0
    for stream in (keys.batches, keys.callbacks):
        start = "-"
        while True:
            entries = await r.xrange(stream, min=start, max="+", count=page)
            n += len(entries)
            if len(entries) < page:
                break
            last = entries[-1][0]
            ms, seq = (last.decode() if isinstance(last, bytes) else last).split("-")
            start = f"{ms}-{int(seq) + 1}"
    return n, time.perf_counter() - started


async def prefetch_read(r: Any, keys: Keys, page: int) -> tuple[int, float]:
    started = time.perf_counter()
    n = 0
    for stream in (keys.batches, keys.callbacks):
        async for entries in read_pages(r, stream, page=page):
            n += len(entries)
    return n, time.perf_counter() - started


def _rebuild_view(done: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 2),
        "events_per_s": round(done["result"].events / seconds),
        "replay_and_compare_s": done["seconds_replay_and_compare"],
        "write_s": done["seconds_write"],
        "attempts": done["attempts"],
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    keys = Keys("")
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start(aof=False)
        r = aioredis.from_url(server.url)
        try:
            total, write_s = await write(r, plan(args.events, args.batches))
            mem = (await r.info("memory"))["used_memory_human"]
            raw_n, raw_s = await raw_read(r, keys, args.page)
            flat_n, flat_s = await raw_read(raw_client(r), keys, args.page)
            pre_n, pre_s = await prefetch_read(raw_client(r), keys, args.page)
            result = await replay_live(r, keys, None, page=args.page)
            t = time.perf_counter()
            fresh = await rebuild(r, keys, None)  # the log has no projection yet: all keys "lost"
            fresh_s = time.perf_counter() - t
            t = time.perf_counter()
            _, rows = await check(r, keys, None)
            check_s = time.perf_counter() - t
            t = time.perf_counter()
            over = await rebuild(r, keys, None)
            over_s = time.perf_counter() - t
            one = await replay_live(r, keys, {"bench-0100"}, page=args.page)
        finally:
            await r.aclose()
            server.stop(kill=True)
    return {
        "events": total,
        "batches": args.batches,
        "page": args.page,
        "redis_used_memory": mem,
        "write_incl_generation": {
            "seconds": round(write_s, 2),
            "events_per_s": round(total / write_s),
        },
        "raw_xrange": {
            "entries": raw_n,
            "seconds": round(raw_s, 2),
            "events_per_s": round(raw_n / raw_s),
        },
        "raw_xrange_unparsed": {
            "entries": flat_n,
            "seconds": round(flat_s, 2),
            "events_per_s": round(flat_n / flat_s),
        },
        "raw_xrange_unparsed_prefetch": {
            "entries": pre_n,
            "seconds": round(pre_s, 2),
            "events_per_s": round(pre_n / pre_s),
        },
        "replay_all": {
            "events": result.events,
            "seconds": round(result.seconds, 2),
            "events_per_s": round(result.events / result.seconds),
            "callbacks_applied": result.callbacks_applied,
            "batches": len(result.states),
        },
        "rebuild_all_from_no_projection": _rebuild_view(fresh, fresh_s),
        "compare_all_with_live": {
            "seconds": round(check_s, 2),
            "events_per_s": round(result.events / check_s),
            "matches_live": all(row["matches_live"] for row in rows),
        },
        "rebuild_all_over_live_projection": _rebuild_view(over, over_s),
        "replay_one_batch": {
            "events_scanned": one.events,
            "seconds": round(one.seconds, 2),
            "events_per_s": round(one.events / one.seconds),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--page", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    out = asyncio.run(main(ns))
    if ns.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>22}: {value}")
