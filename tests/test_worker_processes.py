"""Worker PROCESSES (`cjs worker lps|cj`) on a real redis-server: kill -9 mid-bundle, a poison
request, SIGTERM, a Redis crash and restart, and entries appended by an outside client.

Every wait polls a condition with a deadline; nothing sleeps to synchronise. Figures
(reclaim latency, deaths, duplicates) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.views import status_view
from cj.continuation import advance
from cj.registration import append_registration
from events import codec
from events.ids import request_key
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import (
    BatchRegistered,
    ComparisonFailed,
    ComparisonRequested,
    RequestExpired,
    WaveSubmitted,
    new_id,
    now_iso,
)
from lps.providers.mock import POISON_EXIT_CODE
from projections import keys as pkeys
from projections.batch import BatchState
from projections.replay import replay
from projections.store import load_state
from streams.keys import Keys
from streams.paging import read_stream
from streams.pending import HANDOFF_CONSUMER, pending_details
from tests.helpers import canonical, registration, snapshot
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

CJS = [sys.executable, "-c", "from tools.cli import main; main()"]
HOST = socket.gethostname()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """`cjs` processes against one Redis and one random key prefix, logs in files."""

    def __init__(self, tmp_path: Path, server: RedisServer) -> None:
        self.dir = tmp_path
        self.prefix = f"wp{uuid.uuid4().hex[:8]}:"
        self.keys = Keys(self.prefix)
        self.env = {
            **os.environ,
            "REDIS_URL": server.url,
            "CJS_PREFIX": self.prefix,
            "CJS_PROCESSING_TIMEOUT_S": "1.5",
            "CJS_REAPER_INTERVAL_S": "0.25",
            "CJS_MAX_DELIVERIES": "3",
            "CJS_DEAD_CONSUMER_AFTER_S": "3600",
            "CJS_BLOCK_MS": "200",
            "CJS_RETRY_BASE_DELAY_S": "0.01",
            "CJS_RETRY_MAX_DELAY_S": "0.05",
            "CJS_MOCK_PROFILE": "ideal",
            "PYTHONUNBUFFERED": "1",
        }
        self.workers: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(self, role: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = self.dir / f"{role}-{len(self.workers)}.log"
        proc = subprocess.Popen(
            [*CJS, "worker", role, *args],
            env={**self.env, **env},
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        self.workers.append((role, proc, log))
        return proc

    async def started(self, *procs: subprocess.Popen[bytes], timeout: float = 180) -> None:
        """Wait until each worker has logged `worker_started` (imported and connected), so
        that a test's own time limits count from there: a loaded machine took up to ≈ 30 s to
        start a `cjs worker` (imports), which a 30 s wait for the first progress included."""

        async def all_started() -> bool:
            for proc in procs:
                code = proc.poll()
                assert code is None, f"worker exited with {code} before starting"
                if not any(e.get("event") == "worker_started" for e in self.log_of(proc)):
                    return False
            return True

        await until(all_started, timeout, "workers started")

    def log_of(self, proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
        path = next(p for _, w, p in self.workers if w is proc)
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def cli(self, *args: str, **env: str) -> Any:
        done = subprocess.run(
            [*CJS, *args], env={**self.env, **env}, capture_output=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return json.loads(done.stdout)

    def close(self) -> None:
        for _, proc, _ in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in self.workers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path: Path, redis_server: RedisServer) -> Iterator[Procs]:
    p = Procs(tmp_path, redis_server)
    yield p
    p.close()


def consumer_of(role: str, proc: subprocess.Popen[bytes]) -> str:
    return f"{role}-{HOST}-{proc.pid}-0"


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll `check` until true; returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - started
        except (aioredis.ConnectionError, ConnectionError):
            pass  # Redis restarting: ask again
        assert time.monotonic() - started < timeout, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def events_of(r: Any, stream: str) -> list[tuple[str, Any]]:
    return [(i, codec.decode(f)) async for i, f in read_stream(r, stream)]


async def submit(r: Any, keys: Keys, reg: BatchRegistered) -> None:
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)


async def state_of(r: Any, keys: Keys, batch_id: str) -> BatchState:
    state = await load_state(r, keys, batch_id)
    assert state is not None
    return state


async def held_by(r: Any, keys: Keys, consumer: str) -> list[dict[str, Any]]:
    return await pending_details(r, keys.requests, LPS_GROUP, consumer=consumer)


async def assert_one_accepted_callback_per_request(
    r: Any, keys: Keys, batch_id: str, *, duplicates_allowed: bool = False
) -> tuple[BatchState, Counter[str]]:
    """Every ComparisonRequested ends in exactly one accepted callback; nothing pending;
    the projection equals the replay of the streams."""
    state = await state_of(r, keys, batch_id)
    requests = [
        e
        for _, e in await events_of(r, keys.requests)
        if isinstance(e, ComparisonRequested) and e.batch_id == batch_id
    ]
    callbacks = [e for _, e in await events_of(r, keys.callbacks) if e.batch_id == batch_id]
    per_corr = Counter(c.correlation_id for c in callbacks)
    assert set(per_corr) == {q.correlation_id for q in requests}
    if not duplicates_allowed:
        assert set(per_corr.values()) == {1}
    assert state.accepted == len(requests) == state.submitted
    assert state.duplicates == sum(per_corr.values()) - len(per_corr)
    assert all(state.corr[q.correlation_id][0] in "cf" for q in requests)
    for stream, group in ((keys.requests, LPS_GROUP), (keys.callbacks, CJ_GROUP)):
        assert (await r.xpending(stream, group))["pending"] == 0
    states, _ = await replay(r, keys, {batch_id})
    assert await snapshot(r, keys, batch_id) == canonical(states[batch_id], keys)
    return state, per_corr


# --------------------------------------------------------------------------------------------


async def test_kill_9_mid_bundle_is_reclaimed_by_another_worker(
    procs: Procs, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    env = {"CJS_MOCK_LATENCY_MS": "100", "CJS_DEAD_CONSUMER_AFTER_S": "1"}
    cj = procs.spawn("cj", **env)
    a = procs.spawn("lps", **env)
    await procs.started(cj, a)
    a_name = consumer_of("lps", a)
    reg = registration(8, batch_id=f"kill-{uuid.uuid4().hex[:6]}", mode="serial_bundle")
    await submit(r, keys, reg)

    async def mid_bundle() -> bool:
        answered = await r.xlen(keys.callbacks)
        return answered >= 1 and len(await held_by(r, keys, a_name)) > 0

    await until(mid_bundle, 30, "worker A in the middle of its bundle")
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    killed_at = time.monotonic()
    held = await held_by(r, keys, a_name)
    assert held and {h["deliveries"] for h in held} == {1}

    # `cjs stuck` shows what the dead worker held, with batch, correlation ids and essays.
    view = procs.cli("stuck", "--json", "--idle", "0")
    mine = [e for e in view["stuck"] if e["consumer"] == a_name]
    assert sorted(e["entry_id"] for e in mine) == sorted(h["entry_id"] for h in held)
    assert {e["batch_id"] for e in mine} == {reg.batch_id}
    assert all(len(e["essay_ids"]) == 2 and e["correlation_id"] for e in mine)
    assert all(e["stream"] == "lps:requests" and e["group"] == "lps" for e in mine)
    lps_group = next(g for g in view["groups"] if g["group"] == "lps")
    assert any(
        c["consumer"] == a_name and c["pending"] == len(held) for c in lps_group["consumers"]
    )

    b = procs.spawn("lps", **env)
    await procs.started(b)
    b_name = consumer_of("lps", b)

    async def a_released() -> bool:
        return not await held_by(r, keys, a_name)

    await until(a_released, 30, "A's entries reclaimed")
    reclaim_latency = time.monotonic() - killed_at

    async def finalized() -> bool:
        return (await state_of(r, keys, reg.batch_id)).terminal

    await until(finalized, 60, "batch finalized")
    total = time.monotonic() - killed_at
    state, _ = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
    assert state.status == "finalized" and state.duplicates == 0 and state.failed == 0
    expired = [e for _, e in await events_of(r, keys.dispatches) if isinstance(e, RequestExpired)]
    assert expired == []
    reclaimed = [e for e in procs.log_of(b) if e.get("event") == "stuck_request_reclaimed"]
    assert {e["entry_id"] for e in reclaimed} == {h["entry_id"] for h in held}
    assert all(
        e["consumer"] == a_name
        and e["batch_id"] == reg.batch_id
        and e["deliveries"] == 2
        and e["claimed_by"] == b_name
        and e["idle_s"] >= 1.5
        and e["correlation_id"]
        for e in reclaimed
    )

    # The dead consumer, now with nothing pending, is removed from the group.
    async def a_pruned() -> bool:
        names = {c["name"].decode() for c in await r.xinfo_consumers(keys.requests, LPS_GROUP)}
        return a_name not in names and b_name in names

    await until(a_pruned, 20, "dead consumer pruned")
    print(
        f"\n[kill -9] held by the killed worker: {len(held)}; reclaimed after "
        f"{reclaim_latency:.2f}s (timeout 1.5s, reaper 0.25s; `cjs stuck` and the second "
        f"worker's start-up included; idle at claim "
        f"{min(e['idle_s'] for e in reclaimed):.2f}-{max(e['idle_s'] for e in reclaimed):.2f}s); "
        f"batch finalized "
        f"{total:.2f}s after the kill; {state.submitted} requests, 0 duplicates"
    )


async def test_poison_request_expires_after_max_deliveries_and_the_batch_finishes(
    procs: Procs, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    reg = registration(6, batch_id=f"poison-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)
    requests = [
        e for _, e in await events_of(r, keys.requests) if isinstance(e, ComparisonRequested)
    ]
    cid = requests[3].correlation_id
    env = {
        "CJS_MOCK_POISON_MARKER": request_key(reg.batch_id, cid),
        "CJS_PROCESSING_TIMEOUT_S": "1",
    }
    procs.spawn("cj", **env)
    lps = [procs.spawn("lps", **env), procs.spawn("lps", **env)]
    deaths: list[int] = []
    started = time.monotonic()

    async def finished_with_restarts() -> bool:
        # The supervisor (compose's `restart: always`): a dead worker is started again.
        for i, proc in enumerate(lps):
            if proc.poll() is not None:
                deaths.append(proc.returncode)
                lps[i] = procs.spawn("lps", **env)
        return (await state_of(r, keys, reg.batch_id)).terminal

    await until(finished_with_restarts, 60, "batch finished despite the poison request")
    elapsed = time.monotonic() - started
    assert deaths == [POISON_EXIT_CODE] * 3, "one death per delivery, CJS_MAX_DELIVERIES=3"
    expired = [e for _, e in await events_of(r, keys.dispatches) if isinstance(e, RequestExpired)]
    assert [(e.correlation_id, e.deliveries) for e in expired] == [(cid, 3)]
    state, _ = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
    assert state.status == "finalized"
    callbacks = [e for _, e in await events_of(r, keys.callbacks)]
    failures = [c for c in callbacks if isinstance(c, ComparisonFailed)]
    assert [(c.correlation_id, c.error.error_type) for c in failures] == [(cid, "expired")]
    assert state.corr[cid].startswith("f ") and state.corr[cid].endswith("expired")
    # Whether the pair is asked again depends on the budget left and the planner's choice;
    # if it was, the new request (another correlation id) is not poison and was answered.
    a, b = requests[3].essay_a.essay_id, requests[3].essay_b.essay_id
    again = [c for c, pair in state.pairs.items() if set(pair[1:]) == {a, b} and c != cid]
    assert all(state.corr[c].startswith("c ") for c in again)
    print(
        f"\n[poison] worker deaths: {len(deaths)} (exit {POISON_EXIT_CODE}); expired after "
        f"{expired[0].deliveries} deliveries; batch finalized in {elapsed:.2f}s; "
        f"{state.submitted} requests, 1 failed (expired)"
    )


async def test_sigterm_drains_and_leaves_nothing_pending_for_the_worker(
    procs: Procs, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    env = {"CJS_MOCK_LATENCY_MS": "100"}
    # Both event loops (app/loop.py): the LPS worker on uvloop (the default), CJ on asyncio's.
    cj = procs.spawn("cj", **env, CJS_EVENT_LOOP="asyncio")
    a = procs.spawn("lps", **env)
    await procs.started(cj, a)
    loops = [
        next(e["event_loop"] for e in procs.log_of(p) if e.get("event") == "worker_started")
        for p in (cj, a)
    ]
    assert loops == ["asyncio", "uvloop"]
    a_name = consumer_of("lps", a)
    reg = registration(8, batch_id=f"term-{uuid.uuid4().hex[:6]}", mode="serial_bundle")
    await submit(r, keys, reg)

    async def mid_bundle() -> bool:
        return await r.xlen(keys.callbacks) >= 1 and len(await held_by(r, keys, a_name)) > 0

    await until(mid_bundle, 30, "worker A in the middle of its bundle")
    sent = time.monotonic()
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=15) == 0
    shutdown_s = time.monotonic() - sent
    assert await held_by(r, keys, a_name) == []
    released = await held_by(r, keys, HANDOFF_CONSUMER)
    assert released and {p["deliveries"] for p in released} == {0}
    log = procs.log_of(a)
    [note] = [e for e in log if e.get("event") == "requests_released"]
    assert note["entries"] == len(released) and note["batch_ids"] == [reg.batch_id]
    assert any(e.get("event") == "worker_stopped" and e.get("exit_code") == 0 for e in log)

    b = procs.spawn("lps", **env)
    await procs.started(b)
    b_started = time.monotonic()

    async def taken() -> bool:
        return not await held_by(r, keys, HANDOFF_CONSUMER)

    await until(taken, 30, "released requests taken by another worker")
    pickup_s = time.monotonic() - b_started

    async def finalized() -> bool:
        return (await state_of(r, keys, reg.batch_id)).terminal

    await until(finalized, 60, "batch finalized")
    state, _ = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
    assert state.status == "finalized" and state.duplicates == 0
    expired = [e for _, e in await events_of(r, keys.dispatches) if isinstance(e, RequestExpired)]
    assert expired == []
    # SIGTERM to the CJ worker and the second LPS worker: both exit 0, nothing pending.
    for proc in (cj, b):
        proc.send_signal(signal.SIGTERM)
    assert cj.wait(timeout=15) == 0 and b.wait(timeout=15) == 0
    assert await pending_details(r, keys.callbacks, CJ_GROUP, consumer=consumer_of("cj", cj)) == []
    assert await held_by(r, keys, consumer_of("lps", b)) == []
    print(
        f"\n[SIGTERM] worker exited 0 after {shutdown_s:.2f}s; {len(released)} unstarted requests "
        f"handed back (deliveries reset) and taken {pickup_s:.2f}s after another worker started"
    )


async def test_a_worker_logs_readable_lines_with_cjs_log_format_console(procs: Procs) -> None:
    """Workers write JSON lines (for a log shipper) unless CJS_LOG_FORMAT=console asks for
    readable ones (a worker run by hand in a terminal). A misspelt setting is named at start."""
    worker = procs.spawn("cj", CJS_LOG_FORMAT="console", CJS_BLOCKMS="200")
    path = next(p for _, w, p in procs.workers if w is worker)

    async def logged() -> bool:
        assert worker.poll() is None, "the worker exited"
        return "worker_started" in path.read_text(errors="replace")

    await until(logged, 180, "the worker started")
    [line] = [x for x in path.read_text().splitlines() if "worker_started" in x]
    assert not line.lstrip().startswith("{") and "role=cj" in line
    assert procs.log_of(worker) == []  # no JSON line at all
    [typo] = [x for x in path.read_text().splitlines() if "unknown_setting" in x]
    assert "name=CJS_BLOCKMS" in typo and "did_you_mean=CJS_BLOCK_MS" in typo


@pytest.mark.parametrize("outage", ["quick", "long"])
async def test_redis_crash_and_restart_mid_batch_loses_nothing(
    procs: Procs, redis_server: RedisServer, real_redis: Any, outage: str
) -> None:
    """`quick`: Redis is back at once; the client's own retries bridge the gap. `long`: the
    client gives up at once (CJS_REDIS_RETRIES=0) and Redis stays down until every worker
    has noticed, so the workers' loops must back off, reconnect and re-read what they held."""
    r, keys = real_redis, procs.keys
    assert (await r.config_get("appendonly"))["appendonly"] in ("yes", b"yes")
    env = {"CJS_MOCK_LATENCY_MS": "20", "CJS_MOCK_PROFILE": "cj_generic_batch"}
    if outage == "long":
        env["CJS_REDIS_RETRIES"] = "0"
    workers = [procs.spawn("cj", **env), procs.spawn("lps", **env), procs.spawn("lps", **env)]
    await procs.started(*workers)
    reg = registration(10, batch_id=f"restart-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)

    async def part_done() -> bool:
        return (await state_of(r, keys, reg.batch_id)).accepted >= 8

    await until(part_done, 30, "part of the batch done")
    before = await state_of(r, keys, reg.batch_id)
    assert not before.terminal
    redis_server.stop(kill=True)  # a crash: SIGKILL, no shutdown save
    down_at = time.monotonic()
    if outage == "long":

        async def all_noticed() -> bool:
            return all(
                any(e.get("event") == "redis_unavailable" for e in procs.log_of(w)) for w in workers
            )

        await until(all_noticed, 30, "every worker noticed that Redis is gone")
    redis_server.start()  # same port, same dir: the AOF is replayed
    restarted_s = time.monotonic() - down_at
    r2 = aioredis.from_url(redis_server.url)
    try:

        async def finalized() -> bool:
            return (await state_of(r2, keys, reg.batch_id)).terminal

        await until(finalized, 60, "batch finalized after the restart")

        async def settled() -> bool:
            counts = [
                (await r2.xpending(s, g))["pending"]
                for s, g in ((keys.requests, LPS_GROUP), (keys.callbacks, CJ_GROUP))
            ]
            return counts == [0, 0]

        await until(settled, 20, "nothing pending")
        assert all(w.poll() is None for w in workers), "workers reconnected and kept running"
        state, _ = await assert_one_accepted_callback_per_request(
            r2, keys, reg.batch_id, duplicates_allowed=True
        )
        assert state.status == "finalized"
        # `cjs status` (the live projection) equals a replay of the streams.
        live = procs.cli("status", reg.batch_id, "--json")
        states, _ = await replay(r2, keys, {reg.batch_id})
        replayed = status_view(states[reg.batch_id])
        for field in (
            "status",
            "submitted",
            "completed",
            "failed",
            "callbacks_received",
            "duplicates",
            "orphans",
            "late_callbacks",
            "waves",
            "completion_pct",
        ):
            assert live[field] == replayed[field], field
        assert live["submitted"] == before.submitted or live["submitted"] > before.submitted
        reconnects = sum(
            1 for w in workers for e in procs.log_of(w) if e.get("event") == "redis_unavailable"
        )
    finally:
        await r2.aclose()
    print(
        f"\n[redis crash, {outage}] killed with {before.accepted}/{before.denominator} accepted; "
        f"back in {restarted_s:.2f}s; finalized with {state.accepted} accepted, "
        f"{state.duplicates} duplicate callback(s), {reconnects} logged reconnect wait(s)"
    )


async def test_orphan_duplicate_and_malformed_entries_from_an_outside_client(
    procs: Procs, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    port = _free_port()
    cj = procs.spawn("cj", "--metrics-port", str(port))
    await procs.started(cj)
    reg = registration(4, batch_id=f"outside-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)
    requests = [
        e for _, e in await events_of(r, keys.requests) if isinstance(e, ComparisonRequested)
    ]
    q = requests[0]

    def raw(cid: str, batch_id: str, source: str = "lps") -> dict[str, str]:
        data = {
            "event_id": new_id(),
            "occurred_at": now_iso(),
            "batch_id": batch_id,
            "correlation_id": cid,
            "essay_a_id": q.essay_a.essay_id,
            "essay_b_id": q.essay_b.essay_id,
            "winner": "essay_a",
            "confidence": 4,
            "source_service": source,
        }
        return {"type": "ComparisonCompleted", "data": json.dumps(data)}

    # An outside client appends with plain XADD: a good callback, the same again, two
    # orphans (unknown correlation id in a known batch; unknown batch) and four bad entries.
    ids = {}
    ids["good"] = await r.xadd(keys.callbacks, raw(q.correlation_id, reg.batch_id))
    ids["dup"] = await r.xadd(keys.callbacks, raw(q.correlation_id, reg.batch_id, "replayer"))
    ids["orphan"] = await r.xadd(keys.callbacks, raw("never-requested", reg.batch_id, "rogue"))
    ids["nobatch"] = await r.xadd(keys.callbacks, raw("also-never", "no-such-batch", "rogue"))
    ids["notjson"] = await r.xadd(keys.callbacks, {"type": "ComparisonCompleted", "data": "{oops"})
    ids["nodata"] = await r.xadd(keys.callbacks, {"type": "ComparisonCompleted"})
    ids["unknown"] = await r.xadd(keys.callbacks, {"type": "ComparisonMaybe", "data": "{}"})
    ids["wrongtype"] = await r.xadd(
        keys.callbacks,
        {
            "type": "RequestExpired",
            "data": json.dumps(
                {
                    "batch_id": reg.batch_id,
                    "correlation_id": "x",
                    "entry_id": "1-0",
                    "consumer": "c",
                    "deliveries": 3,
                    "idle_s": 1.0,
                }
            ),
        },
    )
    last = ids["wrongtype"]

    async def consumed() -> bool:
        groups = {g["name"].decode(): g for g in await r.xinfo_groups(keys.callbacks)}
        g = groups.get(CJ_GROUP)
        return g is not None and g["last-delivered-id"] == last and g["pending"] == 0

    await until(consumed, 30, "CJ worker consumed the outside entries")
    status = procs.cli("status", reg.batch_id, "--json")
    assert (status["completed"], status["duplicates"], status["orphans"]) == (1, 1, 1)
    assert status["orphan_correlation_ids"] == ["never-requested"]
    assert status["callbacks_received"] == 3 and status["failed"] == 0
    assert int(await r.hget(pkeys.stats(keys), "orphans_unknown_batch")) == 1
    dlq = procs.cli("dlq", "--json", "--stream", "cj:callbacks")
    got = {d["source_id"]: d["reason"] for d in dlq["dead_letters"]}
    assert got == {
        ids["notjson"].decode(): "invalid_data",
        ids["nodata"].decode(): "missing_field",
        ids["unknown"].decode(): "unknown_type",
        ids["wrongtype"].decode(): "unexpected_type",
    }
    assert {d["source_stream"] for d in dlq["dead_letters"]} == {"cj:callbacks"}

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    async def gauge_set() -> bool:  # by the worker's periodic reaper pass
        return 'lps_pending_entries{group="cj",stream="cj:callbacks"} 0.0' in scrape()

    await until(gauge_set, 10, "pending gauge exported")
    metrics = scrape()
    assert 'cj_orphan_callbacks_total{source_service="rogue"} 2.0' in metrics
    assert 'cj_callbacks_total{outcome="duplicate"} 1.0' in metrics
    assert 'cj_callbacks_total{outcome="accepted"} 1.0' in metrics
    for reason in ("invalid_data", "missing_field", "unknown_type", "unexpected_type"):
        assert (
            f'events_dead_lettered_total{{reason="{reason}",stream="cj:callbacks"}} 1.0' in metrics
        )
    # One log line per page and kind, with counts and examples (not one line per callback).
    log = procs.log_of(cj)
    orphan_lines = [e for e in log if e.get("event") == "callback_orphan"]
    assert sum(e["count"] for e in orphan_lines) == 2
    assert sum(e["unknown_batch"] for e in orphan_lines) == 1
    orphans = {x["correlation_id"]: x for e in orphan_lines for x in e["examples"]}
    assert orphans["never-requested"]["unknown"] == "correlation_id"
    assert orphans["never-requested"]["batch_id"] == reg.batch_id
    assert orphans["never-requested"]["source_service"] == "rogue"
    assert orphans["never-requested"]["entry_id"] == ids["orphan"].decode()
    assert orphans["also-never"]["unknown"] == "batch_id"
    dup = [x for e in log if e.get("event") == "callback_duplicate" for x in e["examples"]]
    assert [x["source_service"] for x in dup] == ["replayer"]
    states, _ = await replay(r, keys, {reg.batch_id})
    assert await snapshot(r, keys, reg.batch_id) == canonical(states[reg.batch_id], keys)
    cj.send_signal(signal.SIGTERM)
    assert cj.wait(timeout=15) == 0


async def test_cjs_stuck_reclaim_expires_judges_and_ends_a_stalled_batch(
    procs: Procs, real_redis: Any
) -> None:
    """The cleanup from the command line, with no LPS worker running at all."""
    r, keys = real_redis, procs.keys
    reg = registration(6, batch_id=f"cli-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    reply = await r.xreadgroup(LPS_GROUP, "lps-gone", {keys.requests: ">"}, count=100)
    ids = [i.decode() for _, items in reply for i, _ in items]
    # Long idle; the first one already delivered CJS_MAX_DELIVERIES times.
    await r.xclaim(keys.requests, LPS_GROUP, "lps-gone", 0, ids[:1], idle=600_000, retrycount=3)
    await r.xclaim(keys.requests, LPS_GROUP, "lps-gone", 0, ids[1:], idle=600_000, retrycount=1)

    out = procs.cli("stuck", "--reclaim", "--json", "--batch-idle", "0")
    done = out["reclaimed"]
    actions = {a["entry_id"]: a["action"] for a in done["requests"]}
    assert actions == {ids[0]: "expired", **{i: "reclaimed" for i in ids[1:]}}
    assert done["batches"] == [] and done["skipped_batches"] == [reg.batch_id]
    assert out["stuck"] == [] and out["groups"][0]["pending"] == 0
    # The command's own consumer is gone again.
    names = {c["name"].decode() for c in await r.xinfo_consumers(keys.requests, LPS_GROUP)}
    assert names == {"lps-gone"}

    # A CJ worker applies the callbacks, which completes wave 1 and submits wave 2; no LPS
    # worker runs, so wave 2 never gets answered.
    cj = procs.spawn("cj")
    await procs.started(cj)

    async def wave_2() -> bool:
        state = await state_of(r, keys, reg.batch_id)
        return state.waves == 2 and state.accepted == len(ids)

    await until(wave_2, 30, "wave 1 applied and wave 2 submitted")
    cj.send_signal(signal.SIGTERM)
    assert cj.wait(timeout=15) == 0
    state = await state_of(r, keys, reg.batch_id)
    waiting = sorted(c for c, v in state.corr.items() if v == "pending")
    assert waiting and state.in_flight == len(waiting)

    text = subprocess.run(
        [*CJS, "stuck", "--batch-idle", "0"], env=procs.env, capture_output=True, check=True
    ).stdout.decode()
    assert "Stalled batches" in text and reg.batch_id in text

    out = procs.cli("stuck", "--reclaim", "--json", "--batch-idle", "0")
    [ended] = out["reclaimed"]["batches"]
    assert ended["batch_id"] == reg.batch_id and ended["abandoned"] == waiting
    assert (ended["event"], ended["reason"], ended["scored"]) == ("BatchFinalized", "stalled", True)
    assert out["stalled_batches"] == []
    state = await state_of(r, keys, reg.batch_id)
    assert state.status == "finalized" and state.finalize_reason == "stalled"
    assert state.in_flight == 0 and state.failed == 1 and state.completed == len(ids) - 1
    states, _ = await replay(r, keys, {reg.batch_id})
    assert await snapshot(r, keys, reg.batch_id) == canonical(states[reg.batch_id], keys)


async def test_same_input_and_seed_give_the_same_waves_and_judgements_whatever_the_workers(
    procs: Procs, real_redis: Any, tmp_path: Path
) -> None:
    """`cjs submit` of one input twice with --seed 17, side by side under two key prefixes:
    one batch judged by a single `cjs worker all` at concurrency 1, the other by a CJ
    worker and two LPS workers at concurrency 8 with jittered latency. Batch ids,
    correlation ids, workers and timing differ; the waves (pairs, in order, in their
    slots) and every judgement do not."""
    r = real_redis
    rng = random.Random(9)
    essays = [
        {"essay_id": f"s{i:02d}", "text": f"essay {i}", "mock_quality": rng.gauss(0, 1)}
        for i in range(16)
    ]
    essays += [
        {"essay_id": f"a{g}", "text": f"anchor {g}", "anchor_grade": g, "mock_quality": q}
        for g, q in zip("FEDCBA", (-1.5, -0.9, -0.3, 0.3, 0.9, 1.5), strict=True)
    ]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"essays": essays}))
    # Waves barriered (the default plans a wave on whichever 80 % of the last is back: the
    # workers' timing then shapes it); reproducibility is what CJS_WAVE_OVERLAP=1 buys.
    mock = {"CJS_MOCK_PROFILE": "cj_generic_batch", "CJS_MOCK_SEED": "5", "CJS_WAVE_OVERLAP": "1"}
    one = {**mock, "CJS_PREFIX": f"{procs.prefix}one:", "CJS_MOCK_LATENCY_MS": "0"}
    many = {**mock, "CJS_PREFIX": f"{procs.prefix}many:", "CJS_MOCK_LATENCY_MS": "8"}
    workers = [
        procs.spawn("all", "--concurrency", "1", **one),
        procs.spawn("cj", **many),
        procs.spawn("lps", "--concurrency", "8", **many),
        procs.spawn("lps", "--concurrency", "8", **many),
    ]
    runs = []
    for env in (one, many):
        out = procs.cli(
            "submit", str(path), "--seed", "17", "--comparisons-per-essay", "9", "--json", **env
        )
        runs.append((Keys(env["CJS_PREFIX"]), str(out["batch_id"])))

    async def both_done() -> bool:
        states = [await state_of(r, k, b) for k, b in runs]
        return all(s.terminal for s in states)

    await until(both_done, 120, "both batches finalized")
    for w in workers:
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=15) == 0

    async def record(keys: Keys, batch_id: str) -> tuple[list[Any], dict[Any, str]]:
        waves = [e for _, e in await events_of(r, keys.batches) if isinstance(e, WaveSubmitted)]
        slot = {p.correlation_id: (e.wave, p.essay_a, p.essay_b) for e in waves for p in e.pairs}
        judged = {slot[c.correlation_id]: c.winner for _, c in await events_of(r, keys.callbacks)}
        return [(e.wave, [(p.essay_a, p.essay_b) for p in e.pairs]) for e in waves], judged

    (waves_1, judged_1), (waves_2, judged_2) = [await record(k, b) for k, b in runs]
    assert runs[0][1] != runs[1][1] and len(waves_1) >= 3
    assert waves_1 == waves_2
    assert len(judged_1) == sum(len(p) for _, p in waves_1) and judged_1 == judged_2
    assert 0 < sum(w == "essay_a" for w in judged_1.values()) < len(judged_1)  # a noisy judge
    s1, s2 = [await state_of(r, k, b) for k, b in runs]
    assert s1.finalize_reason == s2.finalize_reason
    assert s1.scores is not None and s2.scores is not None
    assert [(s.essay_id, s.theta, s.grade) for s in s1.scores.scores] == [
        (s.essay_id, s.theta, s.grade) for s in s2.scores.scores
    ]
