"""The tools over every partition (issue 12): `batches`, `status`, `replay` (one, --all,
--rebuild), `stuck` (view, --act with --partition), `dlq`, `export`/`import`, `validate
--batches`, `archive` and the reads of archived batches, the dashboard's overview, batch page
and entry actions, and the workers' gauges. Each test runs once per engine (fakeredis, a real
redis-server) and per layout: one partition (today's keys) and four. The same commands on a
real Redis Cluster are in tests/test_cluster.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from prometheus_client import REGISTRY

from app import connection, deadletters, overview
from app.batch_detail import batch_detail
from app.errors import InputError
from app.settings import Settings, keys_for
from app.stuck import stuck_page
from app.wiring import InProcess, cj_consumer
from cj import registration as registration_module
from cj.continuation import advance
from cj.registration import append_registration, content_digest, register_once, submissions
from events import codec
from events.streams import CALLBACKS, CJ_GROUP, LPS_GROUP, REQUESTS
from events.text import as_str
from events.types import ComparisonRequested
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from projections import keys as pkeys
from projections.store import load_state
from streams import client as streams_client
from streams.dlq import dead_letter
from streams.keys import Keys
from streams.pending import group_upkeep
from streams.reader import Entry, Fields, ensure_group
from tests.helpers import cli_json, deliver_to, registration, request, run_cli, until

# Over four partitions these ids fall in partitions 1, 3, 1, 2 and 0: every partition is used,
# and two batches share one.
IDS = ["pt-a", "pt-b", "pt-c", "pt-d", "pt-e"]
LAYOUTS = [
    pytest.param(("fakeredis", 1), id="fakeredis-1"),
    pytest.param(("fakeredis", 4), id="fakeredis-4"),
    pytest.param(("redis", 1), id="redis-1", marks=pytest.mark.redis),
    pytest.param(("redis", 4), id="redis-4", marks=pytest.mark.redis),
]


@dataclass
class World:
    """Five finished batches under a prefix of their own, spread over the partitions."""

    r: Any
    settings: Settings
    keys: Keys
    env: dict[str, str]
    tmp: Path
    ids: list[str] = field(default_factory=lambda: list(IDS))

    def cli(self, *args: str, code: int = 0, **env: str) -> Any:
        return cli_json({**self.env, **env}, *args, code=code)

    def part(self, batch_id: str) -> Keys:
        return self.keys.for_batch(batch_id)

    async def ghost_request(self, batch_id: str) -> str:
        """A request of the batch's partition held by a consumer that died: stuck."""
        part = self.part(batch_id)
        await self.r.xadd(part.requests, codec.encode(request(batch_id, f"ghost-{batch_id}")))
        [entry_id] = await deliver_to(self.r, part.requests, LPS_GROUP, "ghost")
        return entry_id

    async def dead_callback(self, batch_id: str) -> None:
        """A dead letter in the batch's partition's `dlq:cj:callbacks`: an entry of that stream
        delivered to consumer x (a letter is written only with the XACK of a pending entry)."""
        part = self.part(batch_id)
        fields: Fields = {b"type": b"NoSuchEvent", b"data": b"{}"}
        await ensure_group(self.r, part.callbacks, CJ_GROUP)
        entry_id = as_str(await self.r.xadd(part.callbacks, fields))
        await self.r.xreadgroup(CJ_GROUP, "x", {part.callbacks: ">"})
        bad = Entry(entry_id, fields)
        error = codec.DecodeError("unknown_type", "no such event")
        assert await dead_letter(self.r, part, CALLBACKS, [(bad, error)], CJ_GROUP, "x") != [None]


async def run_batches(r: Any, s: Settings, keys: Keys, ids: list[str]) -> None:
    for b in ids:
        await append_registration(r, keys, registration(6, batch_id=b, budget=10))
    runner = InProcess(r, keys, s, lambda name: make_provider(name, mock_profile=PROFILES["ideal"]))
    runner.start()
    try:
        for b in ids:
            await advance(r, keys, b)

        async def finished() -> bool:
            runner.check()
            states = [await load_state(r, keys, b) for b in ids]
            return all(st is not None and st.terminal for st in states)

        await until(finished, timeout=60)
    finally:
        await runner.close()


@pytest.fixture(params=LAYOUTS)
async def world(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    engine, partitions = request.param
    prefix = f"pt{uuid.uuid4().hex[:8]}:"
    if engine == "fakeredis":
        server = fakeredis.FakeServer()
        url = "redis://fakeredis.invalid:6379/0"

        def fake_connect(*_: Any, **__: Any) -> tuple[Any, str]:
            return fakeredis.FakeAsyncRedis(server=server), url

        async def reachable(*_: Any) -> None:
            return None

        # Every command of the CLI reaches the test's fakeredis server.
        monkeypatch.setattr(streams_client, "connect", fake_connect)
        monkeypatch.setattr(connection, "check_reachable", reachable)
        r: Any = fakeredis.FakeAsyncRedis(server=server)
    else:
        url = request.getfixturevalue("shared_redis_server").url
        r = streams_client.connect(url)[0]
    s = Settings(
        REDIS_URL=url,  # type: ignore[call-arg]  # the alias (redis_url= is dropped)
        prefix=prefix,
        partitions=partitions,
        block_ms=20,
        retry_base_delay_s=0.001,
        retry_max_delay_s=0.01,
    )
    keys = keys_for(s)
    await run_batches(r, s, keys, IDS)
    env = {
        "REDIS_URL": url,
        "CJS_PREFIX": prefix,
        "CJS_PARTITIONS": str(partitions),
        "CJS_REDIS_CLUSTER": "0",
        "CJS_ARCHIVE_URL": str(tmp_path / "archive"),
    }
    yield World(r, s, keys, env, tmp_path)
    await r.aclose()


async def cli(world: World, *args: str, code: int = 0, **env: str) -> Any:
    """A command in its own thread (it runs its own event loop), as a user runs it."""
    return await asyncio.to_thread(world.cli, *args, code=code, **env)


async def test_batches_status_and_replay_see_every_partition(world: World) -> None:
    if world.keys.partitions > 1:
        assert {world.keys.partition_of(b) for b in world.ids} == {0, 1, 2, 3}
    listed = await cli(world, "batches", "--json")
    assert listed["total"] == 5 and {b["batch_id"] for b in listed["batches"]} == set(world.ids)
    for b in world.ids:
        status = await cli(world, "status", b, "--json")
        assert status["status"] == "finalized"
        assert status["callbacks_accepted"] == status["submitted"] > 0
    every = await cli(world, "replay", "--all", "--json")
    assert every["matches_live"] and every["batches"] == 5 and every["events"] > 0
    states = [await load_state(world.r, world.keys, b) for b in world.ids]
    assert every["callbacks_applied"] == sum(st.accepted for st in states if st is not None)
    one = await cli(world, "replay", "pt-c", "--json")
    assert one["matches_live"] and one["batch_id"] == "pt-c" and one["events"] > 0

    # pt-d's projection is lost: replay --all finds it in its partition's stream, --rebuild
    # writes it back there.
    for name in pkeys.batch_keys(world.keys, "pt-d"):
        await world.r.delete(name)
    await world.r.hdel(pkeys.batch_index(world.part("pt-d")), "pt-d")
    lost = await cli(world, "replay", "--all", "--json", code=1)
    assert [row["batch_id"] for row in lost["mismatched"]] == ["pt-d"]
    rebuilt = await cli(world, "replay", "--all", "--rebuild", "--json")
    assert rebuilt["matches_live"] and rebuilt["batches_written"] == 5
    assert rebuilt["mismatched_before"] == ["pt-d"]
    assert (await cli(world, "status", "pt-d", "--json"))["status"] == "finalized"
    assert await world.r.hexists(pkeys.batch_index(world.part("pt-d")), "pt-d")


async def test_stuck_and_dead_letters_of_every_partition_and_actions_by_partition(
    world: World,
) -> None:
    ghost = await world.ghost_request("pt-b")
    await world.dead_callback("pt-d")
    k = world.keys.partition_of("pt-b")
    view = await cli(world, "stuck", "--idle", "0", "--json")
    assert view["partitions"] == world.keys.partitions
    groups = {g["stream"]: g for g in view["groups"]}
    assert groups[REQUESTS]["pending"] == 1 and groups[CALLBACKS]["pending"] == 0
    [entry] = view["stuck"]
    assert (entry["entry_id"], entry["batch_id"], entry["partition"]) == (ghost, "pt-b", k)
    ghosts = [c for c in groups[REQUESTS]["consumers"] if c["consumer"] == "ghost"]
    assert [(c["partition"], c["pending"]) for c in ghosts] == [(k, 1)]
    assert view["dead_letters"] == {CALLBACKS: 1}
    streams = {row["stream"]: row for row in view["streams"]}
    assert streams["dlq:cj:callbacks"]["length"] == 1
    assert streams[REQUESTS]["length"] == sum(
        [await world.r.xlen(part.requests) for part in world.keys.all_partitions()]
    )

    letters = await cli(world, "dlq", "--json")
    assert letters["total"] == 1 and letters["counts"][CALLBACKS] == 1
    assert letters["dead_letters"][0]["partition"] == world.keys.partition_of("pt-d")

    # The dashboard's page of the batch's pending entries is of its partition.
    page = await stuck_page(world.r, world.keys, stream_name=REQUESTS, batch_id="pt-b")
    assert page["partition"] == k and sum(page["partitions_pending"]) == 1
    assert [e["entry_id"] for e in page["entries"]] == [ghost]

    if world.keys.partitions > 1:  # an entry id names nothing without its partition
        result = await asyncio.to_thread(
            run_cli, world.env, "stuck", "--act", "dead_letter", "--entry", ghost, "--json"
        )
        assert result.exit_code == 2 and "partition" in result.stderr
    acted = await cli(
        world,
        *("stuck", "--act", "dead_letter", "--entry", ghost, "--stream", REQUESTS),
        *("--partition", str(k), "--json"),
    )
    assert acted["acted"]["partition"] == k and acted["acted"]["batch_id"] == "pt-b"
    assert {g["stream"]: g["pending"] for g in acted["groups"]}[REQUESTS] == 0
    letters = await cli(world, "dlq", "--stream", REQUESTS, "--json")
    [letter] = letters["dead_letters"]
    assert (letter["source_id"], letter["partition"]) == (ghost, k)

    # The dashboard's inspect and redrive, by partition: back into the batch's stream.
    if world.keys.partitions > 1:
        with pytest.raises(InputError):
            await deadletters.inspect(world.r, world.keys, "dlq:lps:requests", letter["entry_id"])
    shown = await deadletters.inspect(
        world.r, world.keys, "dlq:lps:requests", letter["entry_id"], partition=k
    )
    assert shown["text_hidden"] and shown["partition"] == k
    moved = await deadletters.redrive(
        world.r, world.keys, "dlq:lps:requests", letter["entry_id"], str(k)
    )
    back = await world.r.xrange(world.part("pt-b").requests, min=moved["new_entry_id"])
    redriven = codec.decode(back[0][1])
    assert isinstance(redriven, ComparisonRequested) and redriven.correlation_id == "ghost-pt-b"
    assert (await cli(world, "dlq", "--json"))["total"] == 1


async def test_export_import_and_validate_route_by_batch(world: World) -> None:
    out = world.tmp / "pt-a.jsonl"
    exported = await cli(world, "export", "pt-a", "-o", str(out), "--json")
    assert exported["events"] > 0 and exported["by_stream"][CALLBACKS] > 0
    other = f"imp{uuid.uuid4().hex[:6]}:"
    done = await cli(world, "import", str(out), "--prefix", other, "--json")
    assert done["batches"] == ["pt-a"] and all(done["ids_preserved"].values())
    target = Keys(other, partitions=world.keys.partitions)
    # The batch's events are in its partition of the target, nowhere else.
    for part in target.all_partitions():
        held = await world.r.xlen(part.batches)
        assert bool(held) == (part.partition == target.partition_of("pt-a"))
    original = await cli(world, "status", "pt-a", "--json")
    imported = await cli(world, "status", "pt-a", "--json", CJS_PREFIX=other)
    for name in ("status", "completed", "failed", "submitted", "callbacks_accepted", "waves"):
        assert imported[name] == original[name], name
    assert (await cli(world, "replay", "--all", "--json", CJS_PREFIX=other))["matches_live"]
    compared = await cli(world, "validate", "--batches", "pt-a", "pt-c", "--json")
    assert all(v["counters_match_events"] for v in compared["modes"].values())


async def test_archive_then_reads_of_archived_batches(world: World) -> None:
    done = await cli(world, "archive", "--older-than", "0", "--json")
    assert sorted(row["batch_id"] for row in done["archived"]) == sorted(world.ids)
    assert done["problems"] == [] and sum(done["trimmed"].values()) > 0
    assert (await cli(world, "batches", "--json"))["total"] == 0
    status = await cli(world, "status", "pt-e", "--json")
    assert status["archived"] and status["status"] == "finalized"
    one = await cli(world, "replay", "pt-e", "--json")
    assert one["matches_live"] and one["archived"]
    every = await cli(world, "replay", "--all", "--json")
    assert every["matches_live"] and every["archived_batches"] == 5 and every["batches"] == 0
    out = world.tmp / "pt-e.jsonl"
    assert (await cli(world, "export", "pt-e", "-o", str(out), "--json"))["events"] > 0


async def test_dashboard_overview_and_batch_page(world: World) -> None:
    await world.ghost_request("pt-c")
    view = await overview.overview(world.r, world.keys, world.settings)
    assert view["batch_counts"] == {"finalized": 5}
    groups = {g["stream"]: g for g in view["groups"]}
    assert groups[REQUESTS]["pending"] == 1
    detail = await batch_detail(world.r, world.keys, "pt-d")
    assert detail["timeline"][0]["type"] == "BatchRegistered"
    assert detail["timeline"][-1]["type"] == "BatchFinalized"
    assert detail["status"]["batch_id"] == "pt-d"


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_worker_gauges_add_up_over_partitions(world: World) -> None:
    await world.ghost_request("pt-b")
    await world.ghost_request("pt-d")
    for part in world.keys.all_partitions():  # each partition's reaper pass, in one process
        await group_upkeep(world.r, part, REQUESTS, LPS_GROUP, "me", dead_after_s=3600)
    assert _sample("stream_pending_entries", stream=REQUESTS, group=LPS_GROUP) == 2
    # Two open batches in two partitions: each partition's sweep keeps the other's series.
    fresh = ["pt-a-open", "pt-d-open"]
    if world.keys.partitions > 1:
        assert len({world.keys.partition_of(b) for b in fresh}) == 2
    for b in fresh:
        await append_registration(world.r, world.keys, registration(4, batch_id=b))
    for part in world.keys.all_partitions():
        consumer = cj_consumer(world.r, part, world.settings, "gauge")
        await consumer.start()
        await consumer.sweep()
    assert _sample("cj_open_batches") == 2
    for b in fresh:
        assert _sample("cj_batch_completion_ratio", batch_id=b) is not None


async def test_submissions_spread_by_load_and_register_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = world.keys
    for seed in range(8):
        batch_id, new = await register_once(world.r, keys, registration(4, seed=100 + seed))
        assert new and await load_state(world.r, keys, batch_id) is not None
    held = [await world.r.hlen(pkeys.batch_index(part)) for part in keys.all_partitions()]
    assert sum(held) == 13 and max(held) - min(held) <= 1  # 5 by their ids, 8 by load

    # The same content submitted five times at once (each submission with an id of its
    # own, as `cjs submit` makes them): one batch.
    def same() -> Any:
        return registration(4, seed=7)

    done = await asyncio.gather(*(register_once(world.r, keys, same()) for _ in range(5)))
    assert len({b for b, _ in done}) == 1 and sum(new for _, new in done) == 1
    again, new = await register_once(world.r, keys, same())
    assert (again, new) == (done[0][0], False)
    forced, new = await register_once(world.r, keys, same(), force=True)
    assert new and forced != again

    # A claim whose submission died before registering is taken over after the wait.
    monkeypatch.setattr(registration_module, "CLAIM_WAIT_S", 0.2)
    orphan = registration(4, seed=8)
    home = keys.for_partition(keys.partition_of(content_digest(orphan)))
    if keys.partitions > 1:
        await world.r.hset(submissions(home), content_digest(orphan), "died-before-registering")
    batch_id, new = await register_once(world.r, keys, orphan)
    assert new and batch_id != "died-before-registering"
    assert await load_state(world.r, keys, batch_id) is not None
