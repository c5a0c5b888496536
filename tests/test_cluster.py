"""The pipeline on a real Redis Cluster (3 masters + 3 replicas, one per module): partitions
spread over the masters, concurrent batches with exact counters and one BatchFinalized
each, a slot migrated mid-batch, a master SIGKILLed mid-batch and its replica promoted."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings, keys_for
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import append_registration, register_once
from events import codec
from events.streams import CALLBACKS, CJ_GROUP, LPS_GROUP, REQUESTS
from events.types import BatchFinalized, ComparisonCompleted, ComparisonFailed
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from projections.replay import replay
from projections.store import list_batches, load_state
from streams.client import TopologyChanged, connect
from streams.dlq import dead_letter
from streams.keys import Keys, partition_of
from streams.packing import _HiredisPacking
from streams.paging import read_stream
from streams.reader import Entry, Fields
from tests.contract.recording import recording
from tests.helpers import (
    canonical,
    cli_json,
    decode_callback,
    deliver_to,
    registration,
    request,
    run_cli,
    snapshot,
)
from tests.redis_cluster import RedisClusterServer, skip_or_fail_without_cluster

pytestmark = pytest.mark.redis

PARTITIONS = 6
# Extra callbacks (re-sent commits) seen per batch: reported, never counted.
DUPLICATES: dict[str, int] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    skip_or_fail_without_cluster()
    server = RedisClusterServer(Path(tmp_path_factory.mktemp("cluster")))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def rc(cluster: RedisClusterServer) -> AsyncIterator[Any]:
    cluster.wait_ok()
    client, _ = connect(cluster.url, cluster=True, retries=4, connect_timeout_s=1.0)
    await client.initialize()
    yield client
    await client.aclose()


def _settings(cluster: RedisClusterServer, **kw: Any) -> Settings:
    return Settings(
        REDIS_URL=cluster.url,  # type: ignore[call-arg]  # the alias (redis_url= is dropped)
        prefix=f"t{uuid.uuid4().hex[:6]}:",
        partitions=PARTITIONS,
        redis_cluster=True,
        retry_base_delay_s=0.001,
        retry_max_delay_s=0.01,
        block_ms=50,
        reaper_interval_s=0.5,
        **kw,
    )


def _spread_ids(stem: str, count: int) -> list[str]:
    """`count` fresh batch ids, each in a partition of its own while there are partitions
    left: random ids alone all fell in one partition about once in 200 runs (crc32 % 6 of
    four ids), and a test of "every partition" then saw one."""
    ids: list[str] = []
    used: set[int] = set()
    while len(ids) < count:
        b = f"{stem}{len(ids)}-{uuid.uuid4().hex[:4]}"
        p = partition_of(b, PARTITIONS)
        if p not in used or len(used) == PARTITIONS:
            ids.append(b)
            used.add(p)
    return ids


async def _events(r: Any, stream: str) -> list[Any]:
    return [codec.decode(fields) async for _, fields in read_stream(r, stream)]


async def _run(
    r: Any, s: Settings, ids: list[str], *, n: int = 12, budget: int = 40, during: Any = None
) -> tuple[Keys, dict[str, Any]]:
    keys = keys_for(s)
    regs = [registration(n, batch_id=b, budget=budget) for b in ids]
    for reg in regs:
        await append_registration(r, keys, reg)
    runner = InProcess(
        r,
        keys,
        s,
        lambda name: make_provider(name, mock_profile=PROFILES["flaky"]),
        cj_consumers=1,
        lps_workers=1,
        concurrency=4,
    )
    runner.start()
    for reg in regs:
        await advance(r, keys, reg.batch_id)
    states: dict[str, Any] = {}
    try:
        if during is not None:
            await during(keys)
        deadline = time.monotonic() + 90
        while len(states) < len(ids):
            runner.check()
            assert time.monotonic() < deadline, f"batches not finalized: {set(ids) - set(states)}"
            for b in ids:
                try:
                    state = await load_state(r, keys, b)
                except TopologyChanged:  # this poll's own read met the move: read again
                    continue
                if state is not None and state.terminal:
                    states[b] = state
            await asyncio.sleep(0.05)
    finally:
        await runner.close()
    assert all(t.done() and not t.exception() for t in runner.tasks), "a consumer exited"
    return keys, states


async def _check_exact(r: Any, keys: Keys, states: dict[str, Any]) -> None:
    """Every request one callback, the counters equal to the callbacks, one BatchFinalized,
    nothing pending, and a replay of each batch's partition equal to the live projection."""
    for b, state in states.items():
        part = keys.for_batch(b)
        entries = [(eid, decode_callback(f)) async for eid, f in read_stream(r, part.callbacks)]
        callbacks = [c for _, c in entries if c.batch_id == b]
        # A commit whose reply a failover swallowed is sent again: the same result may be
        # appended twice. The projection counts the first of each and the rest as duplicates.
        first: dict[str, Any] = {}
        for c in callbacks:
            first.setdefault(c.correlation_id, c)
        assert state.accepted == len(first) == state.submitted
        assert state.completed == sum(isinstance(c, ComparisonCompleted) for c in first.values())
        assert state.failed == sum(isinstance(c, ComparisonFailed) for c in first.values())
        assert state.duplicates == len(callbacks) - len(first)
        DUPLICATES[b] = state.duplicates
        finals = [
            e
            for e in await _events(r, part.batches)
            if isinstance(e, BatchFinalized) and e.batch_id == b
        ]
        assert len(finals) == 1
        for stream, group in ((part.requests, LPS_GROUP), (part.callbacks, CJ_GROUP)):
            assert (await r.xpending(stream, group))["pending"] == 0
        replayed, _ = await replay(r, part, {b})
        assert await snapshot(r, keys, b) == canonical(replayed[b], keys)


async def test_partition_keys_spread_over_the_masters(cluster: RedisClusterServer, rc: Any) -> None:
    keys = Keys("x:", partitions=16)
    owners = Counter(rc.get_node_from_key(keys.for_partition(p).batches).port for p in range(16))
    # The partitions' hash tags put their slots evenly over the slot space: as even as 16
    # over 3 masters can be.
    assert sorted(owners.values()) == [5, 5, 6]
    # every key of a partition in one slot
    part = keys.for_partition(5)
    slots = {rc.keyslot(k) for k in (part.batches, part.requests, part.dlq("cj:callbacks"))}
    assert len(slots) == 1


async def test_concurrent_batches_exact_and_one_finalized_each(
    cluster: RedisClusterServer, rc: Any
) -> None:
    s = _settings(cluster)
    ids = _spread_ids("c", 6)
    keys, states = await _run(rc, s, ids)
    assert len({keys.partition_of(b) for b in ids}) == 6
    assert set(await list_batches(rc, keys)) == set(ids)
    await _check_exact(rc, keys, states)


async def test_slot_migrated_mid_batch(cluster: RedisClusterServer, rc: Any) -> None:
    s = _settings(cluster)
    b = f"m-{uuid.uuid4().hex[:6]}"

    async def migrate(keys: Keys) -> None:
        await asyncio.sleep(0.3)
        part = keys.for_batch(b)
        slot = rc.keyslot(part.batches)
        source = cluster.master_of_slot(slot)
        target = next(m for m in cluster.master_nodes() if m.port != source.port)
        await asyncio.to_thread(_migrate_slot, cluster, slot, source, target)
        assert cluster.master_of_slot(slot).port == target.port

    keys, states = await _run(rc, s, [b], n=14, budget=60, during=migrate)
    await _check_exact(rc, keys, states)


def _migrate_slot(cluster: RedisClusterServer, slot: int, source: Any, target: Any) -> None:
    """CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE the keys in pages, SETSLOT NODE."""
    src_id, dst_id = cluster.node_id(source), cluster.node_id(target)
    target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
    source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
    while True:
        names = source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
        if not names:
            break
        source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *names)
    for node in cluster.master_nodes():
        node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)


async def test_master_killed_mid_batch_replica_promoted(
    cluster: RedisClusterServer, rc: Any
) -> None:
    s = _settings(cluster, min_replicas_ack=1)
    b = f"k-{uuid.uuid4().hex[:6]}"

    async def kill(keys: Keys) -> None:
        await asyncio.sleep(0.5)
        slot = rc.keyslot(keys.for_batch(b).batches)
        victim = cluster.master_of_slot(slot)
        victim.kill()
        # the replica takes over after cluster-node-timeout (1 s)
        deadline = time.monotonic() + 30
        while True:
            try:
                if cluster.master_of_slot(slot).port != victim.port:
                    break
            except LookupError:
                pass
            assert time.monotonic() < deadline, "no failover"
            await asyncio.sleep(0.1)

    keys, states = await _run(rc, s, [b], n=14, budget=60, during=kill)
    await _check_exact(rc, keys, states)


async def test_tools_over_every_partition_of_the_cluster(
    cluster: RedisClusterServer, rc: Any
) -> None:
    """`status`, `replay` (one and --all), `stuck` (and --act by partition) and `dlq`, as a
    user runs them against the cluster, see the batches and entries of every partition."""
    s = _settings(cluster)
    ids = _spread_ids("t", 4)
    keys, _ = await _run(rc, s, ids, n=8, budget=12)
    assert len({keys.partition_of(b) for b in ids}) == 4
    held = keys.for_batch(ids[1])
    await rc.xadd(held.requests, codec.encode(request(ids[1], "ghost")))
    [ghost] = await deliver_to(rc, held.requests, LPS_GROUP, "ghost")
    # A letter is written with the XACK of a pending entry: one delivered to consumer x.
    lettered = keys.for_batch(ids[2])
    fields: Fields = {b"type": b"NoSuchEvent", b"data": b"{}"}
    await rc.xadd(lettered.callbacks, fields)
    [bad_id] = await deliver_to(rc, lettered.callbacks, CJ_GROUP, "x")
    bad = (Entry(bad_id, fields), codec.DecodeError("x", "y"))
    assert await dead_letter(rc, lettered, CALLBACKS, [bad], CJ_GROUP, "x") != [None]
    env = {
        "REDIS_URL": cluster.url,
        "CJS_REDIS_CLUSTER": "1",
        "CJS_PARTITIONS": str(PARTITIONS),
        "CJS_PREFIX": s.prefix,
    }

    def tools() -> None:
        for b in ids:
            status = cli_json(env, "status", b, "--json")
            assert status["status"] == "finalized"
            assert status["callbacks_accepted"] == status["submitted"] > 0
            assert cli_json(env, "replay", b, "--json")["matches_live"]
        every = cli_json(env, "replay", "--all", "--json")
        assert every["matches_live"] and every["batches"] == len(ids)
        view = cli_json(env, "stuck", "--idle", "0", "--json")
        [entry] = view["stuck"]
        assert (entry["entry_id"], entry["partition"]) == (ghost, held.partition)
        assert view["dead_letters"] == {CALLBACKS: 1}
        letters = cli_json(env, "dlq", "--json")
        assert letters["total"] == 1
        assert letters["dead_letters"][0]["partition"] == keys.partition_of(ids[2])
        unnamed = run_cli(env, "stuck", "--act", "dead_letter", "--entry", ghost)
        assert unnamed.exit_code == 2
        acted = cli_json(
            env,
            *("stuck", "--act", "dead_letter", "--entry", ghost, "--stream", REQUESTS),
            *("--partition", str(held.partition), "--json"),
        )
        assert acted["acted"]["batch_id"] == ids[1] and acted["stuck"] == []
        assert cli_json(env, "dlq", "--json")["counts"] == {
            "cj:batches": 0,
            "lps:requests": 1,
            "lps:dispatches": 0,
            "cj:callbacks": 1,
        }

    await asyncio.to_thread(tools)


async def test_a_transaction_command_is_not_sent_while_the_slots_are_being_refreshed() -> None:
    """redis-py runs a cluster transaction's commands in a thread of its own, which refreshes
    the slots first when a refresh is due and then fails (or waits forever) on the client's
    lock: a CJ consumer died, or hung, in `advance` during a failover. Such a command is not
    sent: it fails at once as the transient fault it is, and the caller goes again."""
    client, _ = connect("redis://127.0.0.1:1/0", cluster=True)
    assert client._initialize  # a refresh is due (never initialized)
    pipe = client.pipeline(transaction=True)
    started = time.monotonic()
    with pytest.raises(TopologyChanged):
        pipe.xadd("{p0}:s", {"a": "b"})
    assert time.monotonic() - started < 1.0
    await client.aclose()


async def test_submissions_spread_evenly_over_the_masters(
    cluster: RedisClusterServer, rc: Any
) -> None:
    """`cjs submit` puts each new batch on the least loaded master's least loaded partition."""
    keys = keys_for(_settings(cluster))
    ids = [(await register_once(rc, keys, registration(4, seed=k)))[0] for k in range(9)]
    per_master = Counter(rc.get_node_from_key(keys.for_batch(b).batches).port for b in ids)
    assert sorted(per_master.values()) == [3, 3, 3]
    assert set(await list_batches(rc, keys)) == set(ids)


async def test_the_cluster_client_speaks_resp2_in_and_out_of_transactions(
    cluster: RedisClusterServer, rc: Any
) -> None:
    """As the standalone client (streams/client.py: RESP3's maps cost ≈ 5× the CPU to read),
    with the replies' shapes the code reads, a transaction's HGETALL (a decision's read)
    included: redis-py 8.1 passes the RESP2 callbacks an argument they do not take there."""
    key = f"{{resp{uuid.uuid4().hex[:6]}}}:h"
    await rc.hset(key, mapping={"a": 1, "b": "x"})
    node = rc.get_node_from_key(key)
    assert (await rc.execute_command("CLIENT INFO", target_nodes=node))["resp"] == "2"
    assert await rc.hgetall(key) == {b"a": b"1", b"b": b"x"}
    async with rc.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        pipe.multi()
        pipe.hgetall(key)
        pipe.hmget(key, ["a", "b"])
        pipe.hset(key, "c", 2)
        assert await pipe.execute() == [{b"a": b"1", b"b": b"x"}, [b"1", b"x"], 1]
    await rc.delete(key)


async def test_a_transaction_runs_on_the_callers_thread_and_packs_with_hiredis(
    cluster: RedisClusterServer, rc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py runs each command of a cluster transaction (WATCH, reads under it, commands
    after MULTI) in a thread with an event loop of its own, the caller's loop stopped
    meanwhile; the client here runs none (streams/client.py `_Transaction`), and every node's
    connections pack commands with hiredis, as the standalone client's."""
    started: list[threading.Thread] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        started.append(thread)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    key = f"{{tx{uuid.uuid4().hex[:6]}}}:h"
    await rc.hset(key, "a", 1)
    async with rc.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        assert await pipe.hgetall(key) == {b"a": b"1"}
        pipe.multi()
        pipe.hset(key, "a", 2)
        pipe.eval("return redis.call('HGET', KEYS[1], 'a')", 1, key)
        assert await pipe.execute() == [0, b"2"]
    assert started == []
    assert all(issubclass(node.connection_class, _HiredisPacking) for node in rc.get_nodes())
    await rc.delete(key)


async def test_a_stream_read_asks_no_node_for_its_keys(
    cluster: RedisClusterServer, rc: Any
) -> None:
    """redis-py asks a node for XREADGROUP's and XREAD's keys (COMMAND GETKEYS, a round trip)
    before every read; the client here finds them itself (streams/client.py), a consumer
    named like the STREAMS token included, and reads what redis-py reads."""
    stream = f"{{rd{uuid.uuid4().hex[:6]}}}:s"
    entry = await rc.xadd(stream, {"f": "v"})
    await rc.xgroup_create(stream, "g", id="0")
    with recording() as recorder:
        grouped = await rc.xreadgroup("g", "STREAMS", {stream: ">"}, count=5)
        plain = await rc.xread({stream: "0"}, count=5)
    assert grouped == plain == [[stream.encode(), [(entry, {b"f": b"v"})]]]
    sent = [call for unit in recorder.units for call in unit.calls]
    assert [c[0].upper() for c in sent] == ["XREADGROUP", "XREAD"]
    await rc.delete(stream)
