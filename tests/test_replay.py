"""`cjs replay`: replayed projection equals the live one; `--all --rebuild` restores lost keys."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from app.archive import collect
from cj.consumer import CJConsumer
from cj.continuation import Decision, queue_decision
from cj.registration import append_registration
from events import codec
from events.streams import CJ_GROUP
from projections import keys as pkeys
from projections.rebuild import check, rebuild
from projections.replay import read_horizon, replay_live
from projections.store import CallbackApplier, load_state
from streams.keys import Keys
from streams.paging import read_pages
from streams.reader import ensure_group
from tests.helpers import canonical, completed, registration, session_5_form, snapshot, wave
from tools.cli import main


def cli(args: list[str], url: str, prefix: str) -> Any:
    return CliRunner().invoke(
        main, args, env={"REDIS_URL": url, "CJS_PREFIX": prefix}, catch_exceptions=False
    )


def one_json(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


def on_redis(url: str, fn: Any) -> Any:
    async def go() -> Any:
        r = aioredis.from_url(url)
        try:
            return await fn(r)
        finally:
            await r.aclose()

    return asyncio.run(go())


@pytest.mark.redis
def test_replay_matches_live_and_rebuild_restores_status_and_results(redis_server: Any) -> None:
    url, prefix = redis_server.url, "rp:"
    demo = cli(
        ["demo", "--json", "--essays", "10", "--profile", "flaky", "--seed", "5"], url, prefix
    )
    assert demo.exit_code == 0, demo.output
    b = one_json(demo.stdout)["batch_id"]
    demo2 = cli(
        ["demo", "--json", "--essays", "8", "--mode", "serial_bundle", "--seed", "6"], url, prefix
    )
    b2 = one_json(demo2.stdout)["batch_id"]

    out = one_json(cli(["replay", b, "--json"], url, prefix).stdout)
    assert out["batch_id"] == b and out["matches_live"] is True and out["diff"] == []
    assert out["events"] > 0 and out["seconds"] >= 0 and out["callbacks_unapplied"] == 0
    before = {
        x: {cmd: cli([cmd, x, "--json"], url, prefix).stdout for cmd in ("status", "results")}
        for x in (b, b2)
    }

    # A corrupted counter is found, named, and exits 1.
    on_redis(url, lambda r: r.hset(f"{prefix}proj:batch:{b}", "completed", "999"))
    bad = cli(["replay", b, "--json"], url, prefix)
    assert bad.exit_code == 1
    wrong = one_json(bad.stdout)
    assert wrong["matches_live"] is False
    assert {"key": f"{prefix}proj:batch:{b}", "field": "completed", "live": "999"}.items() <= wrong[
        "diff"
    ][0].items()

    # Every projection key lost: --all --rebuild writes them back; status and results are as before.
    async def drop(r: Any) -> int:
        names = [k async for k in r.scan_iter(match=f"{prefix}proj:*")]
        return int(await r.delete(*names))

    assert on_redis(url, drop) >= 2 * 4 + 1  # hashes of both batches and the index
    assert cli(["status", b, "--json"], url, prefix).exit_code != 0
    assert cli(["replay", "--all", "--json"], url, prefix).exit_code == 1  # nothing live yet
    rebuilt = cli(["replay", "--all", "--rebuild", "--json"], url, prefix)
    assert rebuilt.exit_code == 0, rebuilt.output
    report = one_json(rebuilt.stdout)
    assert report["matches_live"] is True and report["batches_written"] == 2
    assert set(report["mismatched_before"]) == {b, b2}
    after = {
        x: {cmd: cli([cmd, x, "--json"], url, prefix).stdout for cmd in ("status", "results")}
        for x in (b, b2)
    }
    assert after == before
    human = cli(["replay", b], url, prefix)
    assert human.exit_code == 0 and "matches the live projection" in human.output
    assert cli(["replay", "nope", "--json"], url, prefix).exit_code == 1
    assert cli(["replay"], url, prefix).exit_code == 2


async def _setup(r: Any, keys: Keys, n_pairs: int = 4) -> None:
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    await append_registration(r, keys, registration(4, batch_id="b1", budget=6))
    state = await load_state(r, keys, "b1")
    assert state is not None
    async with r.pipeline(transaction=True) as pipe:
        pipe.multi()
        queue_decision(
            pipe,
            keys,
            state,
            Decision(events=[wave("b1", 1, [(f"c{i}", "e0", "e1") for i in range(n_pairs)])]),
        )
        await pipe.execute()


async def test_pending_and_unread_callbacks_are_not_replayed_twice(
    fake_redis: Any, keys: Keys
) -> None:
    """A rebuild leaves callbacks the cj group has not applied yet to the consumer; when it applies
    them they are accepted (not duplicates) and replay still equals live."""
    r = fake_redis
    await _setup(r, keys)
    applier = CallbackApplier(r, keys, CJ_GROUP)
    events = [completed("b1", f"c{i}") for i in range(3)]
    ids = [(await r.xadd(keys.callbacks, codec.encode(e))).decode() for e in events]
    await r.xreadgroup(CJ_GROUP, "w", {keys.callbacks: ">"}, count=2)  # c0, c1 delivered; c2 unread
    async with r.pipeline(transaction=False) as pipe:
        await applier.queue(pipe, events[0], ids[0])
        await pipe.execute()  # c1 stays pending
    result, rows = await check(r, keys, ["b1"])
    assert rows[0]["matches_live"], rows
    assert (result.callbacks_applied, result.callbacks_unapplied) == (1, 2)
    for name in pkeys.batch_keys(keys, "b1"):
        await r.delete(name)
    await rebuild(r, keys, None)
    rebuilt = await load_state(r, keys, "b1")
    assert rebuilt is not None and rebuilt.completed == 1
    await r.xreadgroup(CJ_GROUP, "w", {keys.callbacks: ">"}, count=5)
    async with r.pipeline(transaction=False) as pipe:
        await applier.queue(pipe, events[1], ids[1])
        await applier.queue(pipe, events[2], ids[2])
        outcomes = await pipe.execute()
    assert [o[0] for o in outcomes] == [b"accepted", b"accepted"]
    live = await load_state(r, keys, "b1")
    assert live is not None
    assert (live.completed, live.duplicates, live.in_flight) == (3, 0, 1)
    full = await replay_live(r, keys, {"b1"})
    assert await snapshot(r, keys, "b1") == canonical(full.states["b1"], keys)


@pytest.mark.redis
async def test_callbacks_of_every_wire_form_are_applied_replayed_and_archived_alike(
    real_redis: Any, keys: Keys
) -> None:
    """A stream holds entries of every version: `{type, data}` (before session 5), flat with
    `type` first (session 5) and flat with the type as the first field's name (now; also
    another producer's order, the type last). The consumer applies them all, replay reads them
    as it did, and the archive's lines hold the JSON each makes."""
    r = real_redis
    await _setup(r, keys)
    events = [completed("b1", f"c{i}") for i in range(4)]
    now = [codec.encode(e) for e in events]
    forms = [
        {"type": b"ComparisonCompleted", "data": codec.encode_json(events[0])},
        session_5_form(now[1]),
        now[2],
        dict(list(now[3].items())[1:] + list(now[3].items())[:1]),
    ]
    ids = [(await r.xadd(keys.callbacks, fields)).decode() for fields in forms]
    cj = CJConsumer(r, keys, "cj-1", block_ms=10)
    await cj.start()
    assert await cj.step() == 4
    live = await load_state(r, keys, "b1")
    assert live is not None and (live.completed, live.callbacks_received) == (4, 4)
    result, rows = await check(r, keys, ["b1"])
    assert rows[0]["matches_live"], rows
    assert result.callbacks_applied == 4
    records = [x for x in await collect(r, keys, "b1") if x.stream == "cj:callbacks"]
    assert [x.entry_id for x in records] == ids
    # Byte for byte the JSON of the entry's form of before: `data`, or session 5's flat JSON.
    before = [forms[0]["data"], *(_flat_json(session_5_form(f)) for f in now[1:])]
    assert [x.data for x in records] == before


def _flat_json(fields: dict[str, bytes]) -> bytes:
    found = codec.entry_data(fields)
    assert found is not None
    return found[1]


async def test_rebuild_retries_when_a_consumer_writes_meanwhile(
    fake_redis: Any, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = fake_redis
    await _setup(r, keys)
    import projections.rebuild as mod

    real_check = mod.check
    calls = {"n": 0}

    async def racing_check(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # a consumer touches the batch between WATCH and EXEC
            await r.hincrby(pkeys.batch(keys, "b1"), "callbacks_received", 0)
            await r.hset(pkeys.batch(keys, "b1"), "last_event_at", "z")
        return await real_check(*args, **kw)

    monkeypatch.setattr(mod, "check", racing_check)
    done = await rebuild(r, keys, ["b1"])
    assert done["attempts"] == 2
    _, rows = await real_check(r, keys, ["b1"])
    assert rows[0]["matches_live"]


async def test_horizon_without_group_applies_nothing_and_pages_cover_the_stream(keys: Keys) -> None:
    r = fakeredis.FakeAsyncRedis()
    for i in range(25):
        await r.xadd(keys.callbacks, codec.encode(completed("b1", f"c{i}")))  # type: ignore[arg-type]
    hz = await read_horizon(r, keys)
    assert hz.callbacks_delivered is None and hz.batches_last is None
    assert not hz.callback_applied("1-0")
    pages = [len(p) async for p in read_pages(r, keys.callbacks, page=10)]
    assert pages == [10, 10, 5]
    assert [len(p) async for p in read_pages(r, keys.callbacks, page=5)] == [5] * 5
    await r.aclose()


async def test_rebuild_restores_the_unknown_batch_counter_and_drops_stale_batches(
    fake_redis: Any, keys: Keys
) -> None:
    r = fake_redis
    await _setup(r, keys)
    stray = completed("nobody", "cx")
    entry_id = (await r.xadd(keys.callbacks, codec.encode(stray))).decode()
    await r.xreadgroup(CJ_GROUP, "w", {keys.callbacks: ">"}, count=5)
    async with r.pipeline(transaction=False) as pipe:
        await CallbackApplier(r, keys, CJ_GROUP).queue(pipe, stray, entry_id)
        await pipe.execute()
    assert await r.hget(pkeys.stats(keys), "orphans_unknown_batch") == b"1"
    await r.delete(pkeys.stats(keys))
    await r.hset(
        pkeys.batch_index(keys), "ghost", "2020-01-01T00:00:00.000000Z"
    )  # no events at all
    await r.hset(pkeys.batch(keys, "ghost"), "status", "running")
    done = await rebuild(r, keys, None)
    assert done["stale_removed"] == ["ghost"] and done["result"].unknown_batch_callbacks == 1
    assert await r.hget(pkeys.stats(keys), "orphans_unknown_batch") == b"1"
    assert not await r.exists(pkeys.batch(keys, "ghost"))
    _, rows = await check(r, keys, None)
    assert [row["batch_id"] for row in rows] == ["b1"] and rows[0]["matches_live"]
