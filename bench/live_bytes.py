"""Where a live batch's Redis bytes go: per key family, per event type, per comparison.

    python bench/live_bytes.py [--essays 50] [--text-bytes 50] [--seed 1] [--server-defaults]
                               [--set NAME VALUE ...] [--json]

Starts its own redis-server (random port, temp dir, no persistence) with the memory settings
compose.yaml gives Redis (listpack sizes; Redis' own defaults with `--server-defaults`; `--set`
overrides one, e.g. `--set stream-node-max-bytes 4096`) and runs one batch to its end in this
process (CJ consumer, LPS worker, mock judge
without latency; no archiver: everything the batch wrote is still there). At its end each
consumer group's position is recorded, as every consumer does once per
`CJS_REAPER_INTERVAL_S` (10 s): the group's `handled` set then keeps only the entries handled
since (a window of the last seconds' callbacks, bounded by the rate, not by the batches).
Then:

* per key family (a stream, `lps:done:*`, `proj:batch:*:corr`, ...): MEMORY USAGE (the bytes in
  use) and what deleting the family frees (`used_memory` before less after: what is allocated,
  allocator rounding, hash-table and expiry entries included), per comparison, with the hash
  encodings; their sums less the batch's essay texts (stored twice: in `BatchRegistered` and in
  the projection's essay store) per comparison — the figure issue 13's goal is about;
* the growth of `used_memory` over the batch, less client buffers and script caches, for
  comparison: it also holds what each connection opened meanwhile keeps (about 50 KB each,
  not per comparison, so a short batch reads high);
* per stream and event type: entries, the event's mean bytes (its `data`, or for a flat entry
  the values of its fields but the one that says its type), those per comparison; per stream
  the bytes stored per entry and how much more that is than the event's bytes (ids, the value
  saying the type: a `type`'s name or a flat entry's version, field names where an entry does
  not share its node's, node overhead);
* one entry of each type, as stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis

from app.runs import mock_settings, registration_for, wait_terminal
from app.settings import Settings
from app.wiring import InProcess
from bench.soak import configure_server, deployed_settings, essays
from cj.continuation import advance
from cj.registration import append_registration
from events import codec
from events.streams import CONSUMED, STREAMS
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from streams.keys import Keys
from streams.reader import record_position
from tests.redis_server import RedisServer


async def held(r: Any) -> int:
    """`used_memory` less what comes and goes with connections and scripts."""
    info = await r.info("memory")
    transient = ("mem_clients_normal", "mem_clients_slaves", "used_memory_scripts")
    return int(info["used_memory"]) - sum(int(info.get(name, 0)) for name in transient)


def family(key: str) -> str:
    parts = key.split(":")
    if parts[0] == "proj" and len(parts) > 2 and parts[1] == "batch":
        return "proj:batch:*" + (f":{parts[3]}" if len(parts) > 3 else "")
    if parts[0] == "lps" and len(parts) > 2:
        return f"lps:{parts[1]}:*"
    return key


def kind_of(fields: dict[bytes, bytes]) -> bytes:
    """An entry's type name, in any form (events/codec.py)."""
    found = codec.entry_data(fields)
    return found[0] if found is not None else fields.get(b"type", b"?")


def payload(fields: dict[bytes, bytes], kind: bytes) -> int:
    """An entry's event bytes: its `data`, or the values of a flat entry (events/codec.py) but
    the one saying its type (names are the stream node's, stored once when entries share
    them)."""
    if b"data" in fields:
        return len(fields[b"data"])
    return sum(len(value) for name, value in fields.items() if name not in (b"type", kind))


def shown(fields: dict[bytes, bytes]) -> str:
    if b"data" in fields:
        return fields[b"data"].decode()
    return " ".join(f"{k.decode()}={v.decode()}" for k, v in fields.items())


async def breakdown(r: Any, n: int) -> dict[str, Any]:
    families: dict[str, dict[str, Any]] = defaultdict(lambda: {"keys": 0, "bytes": 0})
    async for raw in r.scan_iter(count=1000):
        key = raw.decode()
        row = families[family(key)]
        row["keys"] += 1
        row["bytes"] += int(await r.memory_usage(raw, samples=0) or 0)
        kind = (await r.type(raw)).decode()
        row["type"] = kind
        if kind == "hash":
            row["encoding"] = (await r.object("encoding", raw)).decode()
    for row in families.values():
        row["per_comparison"] = round(row["bytes"] / n, 1)
    streams: dict[str, Any] = {}
    for name in STREAMS:
        entries = await r.xrange(name)
        if not entries:
            continue
        sizes: dict[str, list[int]] = defaultdict(list)
        sample: dict[str, str] = {}
        for _, fields in entries:
            type_name = kind_of(fields)
            kind = type_name.decode()
            sizes[kind].append(payload(fields, type_name))
            sample.setdefault(kind, shown(fields))
        data = sum(sum(v) for v in sizes.values())
        stored = families[name]["bytes"]
        streams[name] = {
            "entries": len(entries),
            "stored_per_entry": round(stored / len(entries), 1),
            "overhead_per_entry": round((stored - data) / len(entries), 1),
            "types": {
                kind: {
                    "entries": len(v),
                    "mean_data": round(sum(v) / len(v), 1),
                    "data_per_comparison": round(sum(v) / n, 1),
                    "sample": sample[kind],
                }
                for kind, v in sizes.items()
            },
        }
    return {"families": dict(families), "streams": streams}


async def freed(r: Any, n: int) -> dict[str, float]:
    """Delete every key family in turn; what each deletion frees, per comparison."""
    families: dict[str, list[bytes]] = defaultdict(list)
    async for raw in r.scan_iter(count=1000):
        families[family(raw.decode())].append(raw)
    out: dict[str, float] = {}
    for name, names in families.items():
        before = int((await r.info("memory"))["used_memory"])
        for i in range(0, len(names), 500):
            await r.delete(*names[i : i + 500])
        out[name] = round((before - int((await r.info("memory"))["used_memory"])) / n, 1)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=False)
    r = aioredis.from_url(server.url)
    await configure_server(
        r, {**({} if args.server_defaults else deployed_settings()), **dict(args.set or [])}
    )
    keys = Keys("")
    profile = replace(PROFILES["cj_generic_batch"], latency_ms=0.0)
    runner = InProcess(
        r,
        keys,
        mock_settings(Settings()),
        lambda name: make_provider(name, mock_profile=profile),
        concurrency=8,
    )
    try:
        runner.start()
        reg = registration_for(
            essays(args.essays, args.text_bytes, random.Random(args.seed)),
            "per_request",
            budget=None,
            seed=args.seed,
        )
        before = await held(r)
        await append_registration(r, keys, reg)
        await advance(r, keys, reg.batch_id)
        state = await wait_terminal(r, keys, reg.batch_id, runner, timeout=600)
        await runner.close()
        for stream, group in CONSUMED:
            record = keys.group_record(stream, group)
            await record_position(
                r, keys.stream(stream), group, record, keys.group_handled(stream, group)
            )
        grown = await held(r) - before
        n = state.submitted
        text = 2 * sum(len(e.text.encode()) for e in reg.essays)
        parts = await breakdown(r, n)
        in_keys = sum(row["bytes"] for row in parts["families"].values())
        config = {
            name: value
            for pattern in ("stream-node-max-*", "hash-max-listpack-entries")
            for name, value in (await r.config_get(pattern)).items()
        }
        for name, per_comparison in (await freed(r, n)).items():
            parts["families"][name]["freed_per_comparison"] = per_comparison
    finally:
        await r.aclose()
        server.stop(kill=True)
    return {
        "essays": args.essays,
        "text_bytes": args.text_bytes,
        "comparisons": n,
        "waves": state.waves,
        "redis_settings": config,
        "held_per_comparison_excluding_text": round((grown - text) / n),
        "key_bytes_per_comparison_excluding_text": round((in_keys - text) / n),
        "freed_per_comparison_excluding_text": round(
            sum(row["freed_per_comparison"] for row in parts["families"].values()) - text / n
        ),
        **parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--essays", type=int, default=50)
    parser.add_argument("--text-bytes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-defaults", action="store_true")
    parser.add_argument("--set", nargs=2, action="append", metavar=("NAME", "VALUE"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from app.logs import configure

    configure(json_logs=True, level="WARNING")
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"{out['comparisons']} comparisons in {out['waves']} waves, {out['essays']} essays of "
        f"{out['text_bytes']} B, Redis {out['redis_settings']}\n"
        f"bytes per comparison excluding the texts: allocated (freed by DEL) "
        f"{out['freed_per_comparison_excluding_text']} B, MEMORY USAGE "
        f"{out['key_bytes_per_comparison_excluding_text']} B; used_memory growth less client "
        f"buffers {out['held_per_comparison_excluding_text']} B"
    )
    ranked = sorted(out["families"].items(), key=lambda kv: -kv[1]["bytes"])
    for name, row in ranked:
        encoding = f" ({row['encoding']})" if "encoding" in row else ""
        print(
            f"  {name:24s} {row['keys']:5d} keys {row['bytes']:9d} B "
            f"{row['per_comparison']:7.1f} B/comparison (freed {row['freed_per_comparison']:7.1f})"
            f"{encoding}"
        )
    for name, s in out["streams"].items():
        print(
            f"{name}: {s['entries']} entries, {s['stored_per_entry']} B/entry stored, "
            f"{s['overhead_per_entry']} B/entry beyond the event's bytes"
        )
        for kind, t in s["types"].items():
            print(
                f"  {kind:20s} {t['entries']:5d} x {t['mean_data']:8.1f} B = "
                f"{t['data_per_comparison']:6.1f} B/comparison"
            )
    for s in out["streams"].values():
        for kind, t in s["types"].items():
            print(f"{kind}: {t['sample'][:600]}")


if __name__ == "__main__":
    main()
