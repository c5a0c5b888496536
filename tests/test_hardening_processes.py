"""Issue #16's scenarios against a real redis-server and real worker processes (`cjs worker`):
outside entries that named other keys, a flood of huge malformed entries and valid callbacks
dead-lettered, outages of a healthy worker, wrong clocks, a destroyed consumer group, Redis
out of memory or read-only, paused workers, secrets in URLs, and a backlog of orphans.

The Contract of test_worker_processes.py holds in each: no worker exits, every request ends in
exactly one accepted callback, counters equal an independent count of the streams (XRANGE),
exactly one BatchFinalized, and replay equals the live projection. Figures are printed: run
with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from events.streams import CJ_GROUP, LPS_GROUP
from events.text import as_str
from events.types import (
    BatchFailed,
    BatchFinalized,
    RequestExpired,
    new_id,
    now_iso,
)
from projections.rebuild import check
from streams.keys import Keys
from tests.helpers import registration
from tests.redis_server import RedisServer
from tests.test_hardening import running
from tests.test_worker_processes import (
    Procs,
    assert_one_accepted_callback_per_request,
    consumer_of,
    events_of,
    held_by,
    state_of,
    submit,
    until,
)

pytestmark = pytest.mark.redis


@pytest.fixture
def procs(tmp_path: Path, redis_server: RedisServer) -> Iterator[Procs]:
    p = Procs(tmp_path, redis_server)
    yield p
    p.close()


def alive(procs: Procs, *, besides: tuple[Any, ...] = ()) -> None:
    """The Goal: no worker exits (a supervisor would only turn an exit into a crash loop);
    `besides`: those the test itself stopped."""
    dead = [
        (role, proc.returncode)
        for role, proc, _ in procs.workers
        if proc.poll() is not None and proc not in besides
    ]
    assert dead == [], dead


async def holding(r: Any, keys: Keys, consumer: str) -> int:
    """How many requests `consumer` holds (0 before the group exists)."""
    try:
        return len(await held_by(r, keys, consumer))
    except ResponseError:
        return 0


async def finalized_once(r: Any, keys: Keys, batch_id: str) -> None:
    """Exactly one BatchFinalized (or BatchFailed) for the batch, counted in the stream."""
    ends = [
        e
        for _, e in await events_of(r, keys.batches)
        if isinstance(e, BatchFinalized | BatchFailed) and e.batch_id == batch_id
    ]
    assert len(ends) == 1, ends


async def wait_finalized(r: Any, keys: Keys, batch_id: str, timeout: float = 60) -> None:
    async def done() -> bool:
        return (await state_of(r, keys, batch_id)).terminal

    await until(done, timeout, f"batch {batch_id} finalized")


def callback_fields(batch_id: str, cid: str, **data: Any) -> dict[str, str]:
    body = {
        "event_id": new_id(),
        "occurred_at": now_iso(),
        "batch_id": batch_id,
        "correlation_id": cid,
        "essay_a_id": "e0",
        "essay_b_id": "e1",
        "winner": "essay_a",
        "confidence": 3,
        "source_service": "outside",
        **data,
    }
    return {
        "type": "ComparisonCompleted",
        "data": json.dumps({k: v for k, v in body.items() if v is not None}),
    }


# --- 1 ----------------------------------------------------------------------------------------


async def test_s1_callbacks_naming_another_batch_key_cannot_take_the_service_down(
    procs: Procs, real_redis: Any
) -> None:
    """The consumers run in this process while the outside entries arrive; then a CJ worker
    process starts on the same data (it used to die in its start-up sweep, for good)."""
    r, keys = real_redis, procs.keys
    reg = registration(6, batch_id=f"s1-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)
    bad = {}
    async with running(r, keys, latency_ms=100):

        async def some() -> bool:
            return (await state_of(r, keys, reg.batch_id)).accepted >= 2

        await until(some, 30, "some callbacks applied")
        cid = next(iter((await state_of(r, keys, reg.batch_id)).corr))
        for suffix in (":pairs", ":corr", ":docs"):
            fields = callback_fields(reg.batch_id + suffix, cid)
            bad[suffix] = (await r.xadd(keys.callbacks, fields)).decode()
        await wait_finalized(r, keys, reg.batch_id)
    letters = {
        f[b"source_id"].decode(): f[b"reason"].decode()
        for _, f in await r.xrange(keys.dlq("cj:callbacks"))
    }
    assert letters == {i: "invalid_id" for i in bad.values()}
    state, _ = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
    await finalized_once(r, keys, reg.batch_id)
    cj = procs.spawn("cj")
    await procs.started(cj)

    async def swept() -> bool:  # past its start-up sweep: reading the group
        names = {c["name"].decode() for c in await r.xinfo_consumers(keys.callbacks, CJ_GROUP)}
        return consumer_of("cj", cj) in names

    await until(swept, 30, "a CJ worker started on the same data")
    assert procs.cli("status", reg.batch_id, "--json")["status"] == "finalized"
    alive(procs)
    cj.send_signal(signal.SIGTERM)
    assert cj.wait(timeout=20) == 0
    print(
        f"\n[s1] 3 callbacks naming other keys dead-lettered (invalid_id); 0 exits; "
        f"{state.accepted} accepted"
    )


# --- 3 ----------------------------------------------------------------------------------------


async def test_s3_outages_of_a_healthy_worker_do_not_make_its_requests_poison(
    procs: Procs, redis_server: RedisServer, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    env = {"CJS_REDIS_RETRIES": "0", "CJS_PROCESSING_TIMEOUT_S": "1.5"}
    a = procs.spawn("lps", CJS_MOCK_LATENCY_MS="2500", **env)
    await procs.started(a)
    a_name = consumer_of("lps", a)
    reg = registration(6, batch_id=f"s3-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)

    async def a_holds() -> bool:
        return await holding(r, keys, a_name) >= 8

    await until(a_holds, 30, "worker A holding requests")
    for outage in range(2):

        async def noticed(n: int = outage) -> bool:
            waits = [e for e in procs.log_of(a) if e.get("event") == "redis_unavailable"]
            return len(waits) > n

        redis_server.stop(kill=True)
        time.sleep(2.0)  # an outage longer than the processing timeout (external: nothing to await)
        # Redis stays down until A has met the outage: a worker at its concurrency limit issues
        # no command until a 2.5-s judgement ends, which may fall after a 2-s outage.
        await until(noticed, 30, "worker A waited for Redis")
        redis_server.start()
    r = aioredis.from_url(redis_server.url)
    try:
        held = await held_by(r, keys, a_name)
        assert held and {h["deliveries"] for h in held} == {1}, held  # two outages: still 1
        a.send_signal(signal.SIGKILL)  # and then the crash of the healthy worker
        a.wait(timeout=10)
        procs.spawn("lps", **env)
        async with running(r, keys, lps=0, processing_timeout_s=1.5):
            await wait_finalized(r, keys, reg.batch_id)
        alive_workers = [p for role, p, _ in procs.workers if p is not a]
        assert all(p.poll() is None for p in alive_workers)
        expired = [
            e for _, e in await events_of(r, keys.dispatches) if isinstance(e, RequestExpired)
        ]
        assert expired == []
        state, _ = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
        await finalized_once(r, keys, reg.batch_id)
        assert state.failed == 0
    finally:
        await r.aclose()
    print(
        f"\n[s3] 2 outages of 2 s (timeout 1.5 s) + kill -9: {len(held)} requests held, "
        "deliveries 1; 0 expired"
    )


# --- 4 ----------------------------------------------------------------------------------------

SKEW = textwrap.dedent(
    """
    import datetime as _dt, time as _time
    _SKEW = {skew}
    _real_time = _time.time
    _time.time = lambda: _real_time() + _SKEW
    _time.time_ns = lambda: int((_real_time() + _SKEW) * 1e9)
    class _Skewed(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return _dt.datetime.fromtimestamp(_real_time() + _SKEW, tz)
        @classmethod
        def utcnow(cls):
            return _dt.datetime.utcfromtimestamp(_real_time() + _SKEW)
    _dt.datetime = _Skewed
    """
)


async def test_s4_a_fast_reaper_clock_and_odd_occurred_at_change_nothing(
    procs: Procs, real_redis: Any, tmp_path: Path
) -> None:
    """The reaper is a process whose clock runs 20 min ahead (its time functions shifted by a
    sitecustomize); the consumers run in this process."""
    r, keys = real_redis, procs.keys
    skewed = tmp_path / "skew"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(SKEW.format(skew=1200))
    path = os.pathsep.join([str(skewed), os.environ.get("PYTHONPATH", "")])
    env = {"CJS_BATCH_IDLE_TIMEOUT_S": "30"}
    reaper = procs.spawn("reaper", PYTHONPATH=path, **env)
    reg = registration(6, batch_id=f"s4-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)
    await procs.started(reaper)
    started = next(e for e in procs.log_of(reaper) if e.get("event") == "worker_started")
    ahead_by = datetime.fromisoformat(started["timestamp"]) - datetime.now(UTC)
    assert ahead_by > timedelta(minutes=15)  # its clock is 20 min ahead
    # An orphan from a producer whose clock says 9999, one with no occurred_at at all.
    absurd = await r.xadd(
        keys.callbacks, callback_fields(reg.batch_id, "x-9999", occurred_at="9999-12-31T00:00:00Z")
    )
    await r.xadd(keys.callbacks, callback_fields(reg.batch_id, "x-none", occurred_at=None))
    async with running(r, keys, latency_ms=300, batch_idle_timeout_s=30):
        await wait_finalized(r, keys, reg.batch_id)
    alive(procs)
    state = await state_of(r, keys, reg.batch_id)
    assert state.status == "finalized" and state.finalize_reason != "stalled"
    assert state.last_event_at < "9999" and state.orphans == 1
    letters = [
        (i.decode(), f[b"reason"].decode()) for i, f in await r.xrange(keys.dlq("cj:callbacks"))
    ]
    assert [(f, reason) for _, reason in letters for f in [absurd.decode()]] == [
        (absurd.decode(), "invalid_time")
    ]
    for _ in range(3):  # replay is deterministic: the missing time is the entry id's
        _, rows = await check(r, keys, [reg.batch_id])
        assert rows[0]["matches_live"], rows[0]["diff"]
    await finalized_once(r, keys, reg.batch_id)
    print(f"\n[s4] reaper 20 min ahead: batch {state.finalize_reason}, not stalled; 9999 rejected")


# --- 5 ----------------------------------------------------------------------------------------


async def test_s5_a_destroyed_group_is_recreated_where_it_was(
    procs: Procs, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    env = {"CJS_MOCK_LATENCY_MS": "20"}
    cjs = [procs.spawn("cj", **env), procs.spawn("cj", **env)]
    await procs.started(*cjs, procs.spawn("lps", **env))
    reg = registration(10, batch_id=f"s5-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)

    record = keys.group_record("cj:callbacks", CJ_GROUP)

    async def some() -> bool:  # part of the batch applied, and the group's position recorded
        position = await r.hget(record, "position")
        applied = (await state_of(r, keys, reg.batch_id)).accepted
        return applied >= 12 and position not in (None, b"0-0")

    await until(some, 30, "part of the batch applied")
    await r.xgroup_destroy(keys.callbacks, CJ_GROUP)
    await wait_finalized(r, keys, reg.batch_id)
    alive(procs)
    recreated = [
        e for c in cjs for e in procs.log_of(c) if e.get("event") == "consumer_group_recreated"
    ]
    assert recreated and all(e["position"] not in ("0", "0-0") for e in recreated)
    state, per_corr = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
    assert state.callbacks_received == sum(per_corr.values())  # nothing applied twice
    await finalized_once(r, keys, reg.batch_id)
    print(
        f"\n[s5] group destroyed with 12+ applied; recreated at {recreated[0]['position']}; "
        f"callbacks_received {state.callbacks_received} = {sum(per_corr.values())} in the stream"
    )


# --- 6 ----------------------------------------------------------------------------------------


async def test_s6_oom_and_readonly_are_waited_out_not_crashed_on(
    procs: Procs, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    env = {"CJS_MOCK_LATENCY_MS": "100", "CJS_REDIS_RETRIES": "1"}
    workers = [procs.spawn("cj", **env), procs.spawn("lps", **env)]
    await procs.started(*workers)
    reg = registration(8, batch_id=f"s6-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)
    seen: dict[str, int] = {}
    for fault, code in (("oom", "OOM"), ("readonly", "READONLY")):

        async def running_again(n: int = sum(seen.values()) + 4) -> bool:
            return (await state_of(r, keys, reg.batch_id)).accepted >= n

        await until(running_again, 30, "the batch moving")
        if fault == "oom":
            # Well below what is used: at `used_memory` itself the limit is crossed back and
            # forth as buffers come and go, and a small batch can end in a gap.
            used = int((await r.info("memory"))["used_memory"])
            await r.config_set("maxmemory-policy", "noeviction")
            await r.config_set("maxmemory", str(used // 2))
        else:
            await r.execute_command("REPLICAOF", "127.0.0.1", str(_dead_port()))

        def waits(code: str = code) -> list[dict[str, Any]]:
            return [e for w in workers for e in procs.log_of(w) if e.get("error_kind") == code]

        async def noticed(waits: Any = waits) -> bool:
            return len(waits()) >= 2

        await until(noticed, 30, f"workers waiting on {code}")
        time.sleep(1.0)  # the fault lasts a while (external state: nothing to await)
        alive(procs)
        if fault == "oom":
            await r.config_set("maxmemory", "0")
        else:
            await r.execute_command("REPLICAOF", "NO", "ONE")
        seen[code] = len(waits())
    await wait_finalized(r, keys, reg.batch_id)
    alive(procs)
    state, _ = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
    await finalized_once(r, keys, reg.batch_id)
    print(f"\n[s6] logged waits {seen}; 0 exits; batch {state.status}")


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 7 ----------------------------------------------------------------------------------------


async def test_s7_a_paused_worker_cannot_commit_what_another_took(
    procs: Procs, real_redis: Any
) -> None:
    r, keys = real_redis, procs.keys
    env = {"CJS_PROCESSING_TIMEOUT_S": "0.8", "CJS_MOCK_LATENCY_MS": "200"}
    a = procs.spawn("lps", "--concurrency", "4", **env)
    b = procs.spawn("lps", "--concurrency", "4", **env)
    a_name = consumer_of("lps", a)

    async def both_reading() -> bool:
        # A worker process that starts late (a loaded machine) would leave the whole batch to
        # the other one, and there would be nothing of A's to pause.
        try:
            rows = await r.xinfo_consumers(keys.requests, LPS_GROUP)
        except ResponseError:  # no group yet
            return False
        names = {as_str(row["name"]) for row in rows}
        return {a_name, consumer_of("lps", b)} <= names

    await until(both_reading, 60, "both LPS workers in their group")
    reg = registration(10, batch_id=f"s7-{uuid.uuid4().hex[:6]}")
    await submit(r, keys, reg)
    pauses = 0
    async with running(r, keys, lps=0, processing_timeout_s=0.8):
        for _ in range(2):

            async def a_busy() -> bool:
                done = (await state_of(r, keys, reg.batch_id)).terminal
                return done or await holding(r, keys, a_name) > 0

            await until(a_busy, 30, "worker A holding requests")
            if (await state_of(r, keys, reg.batch_id)).terminal:
                break
            a.send_signal(signal.SIGSTOP)
            await asyncio.sleep(1.6)  # paused twice the processing timeout
            a.send_signal(signal.SIGCONT)
            pauses += 1
        await wait_finalized(r, keys, reg.batch_id)
    assert pauses >= 1
    await wait_finalized(r, keys, reg.batch_id)
    alive(procs)
    state, per_corr = await assert_one_accepted_callback_per_request(r, keys, reg.batch_id)
    twice = [c for c, n in per_corr.items() if n > 1]
    assert twice == []  # no request judged twice into the streams
    await finalized_once(r, keys, reg.batch_id)
    log = procs.log_of(a)
    fenced = sum(1 for e in log if e.get("event") == "commit_fenced")
    lost = sum(e.get("entries", 0) for e in log if e.get("event") == "claim_lost")
    print(
        f"\n[s7] {pauses} SIGSTOP(s) of 1.6 s (timeout 0.8 s): {state.submitted} requests, "
        f"0 with two callbacks; {fenced} commit(s) fenced, {lost} claim(s) found lost before "
        "judging"
    )
