"""Archive and trim (app/retention.py): finished batches go to the archive, verified; streams are
trimmed below what is still needed; archived batches read from the archive; dead letters expire."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from app.archive import ArchiveStore, decode_manifest
from app.batches import load_batch
from app.retention import run_pass
from app.views import results_view, status_view
from cj.positions import position_report
from events import codec
from events.streams import CALLBACKS, CJ_GROUP, DISPATCHES, LPS_GROUP, REQUESTS, STREAMS
from events.text import as_str
from projections import keys as pkeys
from projections.rebuild import StreamTrimmed, check, rebuild
from projections.store import list_batches, load_state
from streams.keys import Keys
from streams.paging import archived_trimmed_key, entries_lost
from streams.reader import ensure_group
from tests.archive_helpers import (
    abandoned_batch,
    archive_files,
    assert_archives_replay_to_before,
    assert_nothing_lost,
    finished_batch,
    record,
)
from tests.helpers import completed
from tests.test_replay import cli, on_redis, one_json


async def _pass(r: Any, keys: Keys, root: Path, **kw: Any) -> Any:
    kw.setdefault("older_than_s", 0)
    kw.setdefault("dlq_retention_s", 86400)
    return await run_pass(r, keys, ArchiveStore(str(root)), **kw)


async def test_finished_batches_are_archived_verified_and_trimmed(
    fake_redis: Any, keys: Keys, tmp_path: Path
) -> None:
    r = fake_redis
    batches = [
        await finished_batch(r, keys, seed=1),
        await finished_batch(r, keys, seed=2, mode="serial_bundle", profile="flaky"),
        await finished_batch(r, keys, seed=3, profile="cj_generic_batch"),
    ]
    views = {}
    for b in batches:
        state = await load_state(r, keys, b)
        assert state is not None
        views[b] = (status_view(state), results_view(state), position_report(state))
    before = await record(r, keys)

    dry = await _pass(r, keys, tmp_path, dry_run=True)
    assert [row["batch_id"] for row in dry.archived] == batches
    assert not list(tmp_path.rglob("*")) and await list_batches(r, keys) == batches

    report = await _pass(r, keys, tmp_path)
    assert [row["batch_id"] for row in report.archived] == batches and not report.problems
    assert await assert_archives_replay_to_before(r, keys, before, tmp_path) == 3
    await assert_nothing_lost(r, keys, before, tmp_path)
    # The streams keep at most the entry each group delivered last; projections are manifests.
    for name in STREAMS:
        assert await r.xlen(keys.stream(name)) <= (1 if name in (REQUESTS, CALLBACKS) else 0)
    assert await list_batches(r, keys) == []
    # No projection key, no LPS done marker is left of the archived batches.
    # (The consumer groups' own records, which outlive a group, and the provider limiter's
    # state belong to no batch.)
    left = sorted(
        as_str(k) for k in await r.keys("*") if b":group:" not in k and b":lps:limiter:" not in k
    )
    # Beside each trimmed stream, the count of archived entries trimmed from it.
    counts = {archived_trimmed_key(keys.stream(n)) for n in STREAMS if report.trimmed.get(n)}
    assert counts
    assert left == sorted({keys.stream(n) for n in STREAMS} | {pkeys.archived_index(keys)} | counts)
    assert len(archive_files(tmp_path)["batches"]) == 3

    for b in batches:  # the same views, read from the archive
        state, manifest = await load_batch(r, keys, b)
        assert manifest is not None and manifest.events == sum(
            p.count for p in manifest.streams.values()
        )
        assert (status_view(state), results_view(state), position_report(state)) == views[b]
    again = await _pass(r, keys, tmp_path)
    assert again.archived == [] and not any(again.trimmed.values())


@pytest.fixture(params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.redis)])
def either_redis(request: Any) -> Any:
    """The test on fakeredis, and again on a real redis-server (groups, pending entries and
    the trim script as Redis has them)."""
    if request.param == "fakeredis":
        return request.getfixturevalue("fake_redis")
    return request.getfixturevalue("real_redis")


async def test_busy_or_recent_batches_stay_and_hold_the_trim(
    either_redis: Any, keys: Keys, tmp_path: Path
) -> None:
    r = either_redis
    done = await finished_batch(r, keys, seed=1)
    later = await finished_batch(r, keys, seed=2)
    stalled = await abandoned_batch(r, keys)  # one request pending, the others undelivered
    before = await record(r, keys)

    recent = await _pass(r, keys, tmp_path, older_than_s=3600)
    assert recent.archived == [] and not any(recent.trimmed.values())

    report = await _pass(r, keys, tmp_path)
    assert [row["batch_id"] for row in report.archived] == [done, later]
    assert report.skipped == [
        {"batch_id": stalled, "reason": "lps:requests: entries not yet delivered to group lps"}
    ]
    await assert_nothing_lost(r, keys, before, tmp_path)
    # Everything of the stalled batch is still in the streams, from its registration on.
    assert report.blocked["cj:batches"]["batch_id"] == stalled
    left = await r.xrange(keys.requests)
    assert {codec.decode(f).batch_id for _, f in left} >= {stalled}  # type: ignore[attr-defined]

    # Delivered, but one still pending: still not archived.
    await r.xreadgroup(LPS_GROUP, "ghost", {keys.requests: ">"}, count=100)
    pel = [
        as_str(p["message_id"])
        for p in await r.xpending_range(keys.requests, LPS_GROUP, "-", "+", 100)
    ]
    await r.xack(keys.requests, LPS_GROUP, *pel[1:])
    report = await _pass(r, keys, tmp_path)
    assert report.skipped[0]["reason"] == "lps:requests: entries pending in group lps"
    await r.xack(keys.requests, LPS_GROUP, pel[0])
    now = await record(r, keys)
    report = await _pass(r, keys, tmp_path)
    assert [row["batch_id"] for row in report.archived] == [stalled]
    assert await assert_archives_replay_to_before(r, keys, before, tmp_path) == 3
    await assert_nothing_lost(r, keys, before, tmp_path, needed=now)


async def test_entries_of_no_batch_go_to_a_segment_first(
    fake_redis: Any, keys: Keys, tmp_path: Path
) -> None:
    r = fake_redis
    b = await finished_batch(r, keys, seed=1)
    # An orphan callback naming a batch never registered, delivered and acknowledged by the cj
    # group; an undecodable entry with bytes that are not UTF-8 where no group reads.
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    orphans = [
        as_str(await r.xadd(keys.callbacks, codec.encode(completed("never-registered", c))))
        for c in ("zz", "zy")
    ]
    await r.xreadgroup(CJ_GROUP, "t", {keys.callbacks: ">"}, count=10)
    await r.xack(keys.callbacks, CJ_GROUP, *orphans)
    orphan_id = orphans[0]
    junk_id = as_str(await r.xadd(keys.dispatches, {"type": b"Junk", "data": b"\xff\xfe{"}))
    # The group's last-delivered entry and those after it, not delivered yet, are kept.
    tail = [orphans[1]] + [
        as_str(await r.xadd(keys.callbacks, codec.encode(completed("x", f"t{i}"))))
        for i in range(2)
    ]
    before = await record(r, keys)

    report = await _pass(r, keys, tmp_path)
    assert [row["batch_id"] for row in report.archived] == [b]
    await assert_nothing_lost(r, keys, before, tmp_path)
    segments = {s["stream"]: s for s in report.segments}
    assert segments[CALLBACKS]["entries"] == 1 and segments[DISPATCHES]["entries"] == 1
    lines = {}
    for path in archive_files(tmp_path)["segments"]:
        for line in gzip.decompress(path.read_bytes()).splitlines():
            row = json.loads(line)
            lines[row["stream"], row["entry_id"]] = row["fields"]
    assert lines[DISPATCHES, junk_id] == {"type": "Junk", "data": {"base64": "//57"}}
    assert lines[CALLBACKS, orphan_id]["batch_id"] == "never-registered"  # fields as stored
    assert [as_str(i) for i, _ in await r.xrange(keys.callbacks)] == tail
    assert await r.xlen(keys.dispatches) == 0


async def test_lost_projections_stop_the_trim(fake_redis: Any, keys: Keys, tmp_path: Path) -> None:
    r = fake_redis
    b = await finished_batch(r, keys, seed=1)
    for name in pkeys.batch_keys(keys, b):
        await r.delete(name)
    await r.delete(pkeys.batch_index(keys))
    lengths = [await r.xlen(keys.stream(n)) for n in STREAMS]
    report = await _pass(r, keys, tmp_path)
    assert report.archived == [] and "look lost" in report.problems[0]
    assert [await r.xlen(keys.stream(n)) for n in STREAMS] == lengths


async def test_dead_letters_expire_into_the_archive(
    fake_redis: Any, keys: Keys, tmp_path: Path
) -> None:
    r = fake_redis
    dlq = keys.dlq(CALLBACKS)
    await r.xadd(dlq, {"reason": "invalid_data", "fields": "{}"}, id="1000-0")
    await r.xadd(dlq, {"reason": "max_deliveries", "fields": "{}"}, id="2000-0")
    fresh = as_str(await r.xadd(dlq, {"reason": "invalid_data", "fields": "{}"}))
    report = await _pass(r, keys, tmp_path, dlq_retention_s=3600)
    assert report.dead_letters_trimmed == {CALLBACKS: 2}
    assert [as_str(i) for i, _ in await r.xrange(dlq)] == [fresh]
    (path,) = archive_files(tmp_path)["dead-letters"]
    rows = [json.loads(x) for x in gzip.decompress(path.read_bytes()).splitlines()]
    assert [row["entry_id"] for row in rows] == ["1000-0", "2000-0"]
    assert rows[1]["fields"]["reason"] == "max_deliveries"


async def test_replaying_one_batch_reads_only_its_range(fake_redis: Any, keys: Keys) -> None:
    r = fake_redis
    batches = [await finished_batch(r, keys, seed=s, essays=5) for s in range(5)]
    total = sum([await r.xlen(keys.batches), await r.xlen(keys.callbacks)])
    per_batch = total // len(batches)
    for b in batches:
        result, rows = await check(r, keys, [b])
        assert rows[0]["matches_live"], rows
        # Its own events (and at most a few of a neighbour's), not the whole log.
        assert result.events <= per_batch + 4, (b, result.events, total)
    result, rows = await check(r, keys, None)
    assert all(row["matches_live"] for row in rows) and result.events == total


@pytest.mark.redis
def test_commands_read_archived_batches_from_the_archive(redis_server: Any, tmp_path: Path) -> None:
    url, prefix = redis_server.url, "ar:"
    env = {"CJS_ARCHIVE_URL": str(tmp_path / "archive")}

    def run(args: list[str]) -> Any:
        from click.testing import CliRunner

        from tools.cli import main

        return CliRunner().invoke(
            main,
            args,
            env={"REDIS_URL": url, "CJS_PREFIX": prefix, **env},
            catch_exceptions=False,
        )

    ids = []
    for seed, mode in ((3, "per_request"), (4, "serial_bundle")):
        demo = cli(
            ["demo", "--json", "--essays", "8", "--seed", str(seed), "--mode", mode], url, prefix
        )
        ids.append(one_json(demo.stdout)["batch_id"])
    b = ids[0]
    commands = (["status", b, "--json"], ["results", b, "--json"], ["positions", b, "--json"])
    before = [one_json(run(c).stdout) for c in commands]
    run(["export", b, "-o", str(tmp_path / "live.jsonl"), "--json"])
    validate_live = one_json(run(["validate", "--batches", *ids, "--json"]).stdout)

    dry = one_json(run(["archive", "--older-than", "0", "--dry-run", "--json"]).stdout)
    assert dry["dry_run"] and [x["batch_id"] for x in dry["archived"]] == ids
    assert not (tmp_path / "archive").exists()
    done = run(["archive", "--older-than", "0", "--json"])
    assert done.exit_code == 0, done.output
    report = one_json(done.stdout)
    assert [x["batch_id"] for x in report["archived"]] == ids and report["trimmed"][CALLBACKS] > 0

    after = [one_json(run(c).stdout) for c in commands]
    watched = one_json(run(["status", b, "--watch", "--json"]).stdout)
    assert watched == after[0]
    for old, new in zip(before, after, strict=True):
        assert new.pop("archived") is True and new == old
    replayed = one_json(run(["replay", b, "--json"]).stdout)
    assert replayed["matches_live"] and replayed["archived"] and replayed["events"] > 0
    all_view = one_json(run(["replay", "--all", "--json"]).stdout)
    assert all_view["matches_live"] and all_view["archived_batches"] == 2
    exported = run(["export", b, "-o", str(tmp_path / "archived.jsonl"), "--json"])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "archived.jsonl").read_bytes() == (tmp_path / "live.jsonl").read_bytes()
    validate_archived = one_json(run(["validate", "--batches", *ids, "--json"]).stdout)
    for view in validate_archived["modes"].values():
        assert view["counters_source"] == "replayed from the archive"
        assert view["counters_match_events"]
    assert validate_archived["comparison"] == validate_live["comparison"]
    assert run(["status", "nope", "--json"]).exit_code == 1

    manifests = on_redis(url, lambda r: r.hgetall(pkeys.archived_index(Keys(prefix))))
    assert sorted(as_str(k) for k in manifests) == sorted(ids)
    assert all(decode_manifest(v).url.startswith("file://") for v in manifests.values())


async def test_a_failing_store_deletes_nothing(fake_redis: Any, keys: Keys, tmp_path: Path) -> None:
    r = fake_redis
    b = await finished_batch(r, keys, seed=1)
    (tmp_path / "file").write_text("not a directory")
    lengths = [await r.xlen(keys.stream(n)) for n in STREAMS]
    report = await _pass(r, keys, tmp_path / "file" / "archive")
    assert report.archived == [] and "archive store failed" in report.problems[0]
    assert await load_state(r, keys, b) is not None and await list_batches(r, keys) == [b]
    assert [await r.xlen(keys.stream(n)) for n in STREAMS] == lengths


async def test_collect_finds_batch_ids_that_json_escapes(fake_redis: Any, keys: Keys) -> None:
    from app.archive import collect

    for b in ('we"ird\\id', "plain"):
        await fake_redis.xadd(keys.callbacks, codec.encode(completed(b, "c1")))
    assert [rec.entry_id for rec in await collect(fake_redis, keys, 'we"ird\\id')] == [
        as_str(i) for i, _ in (await fake_redis.xrange(keys.callbacks))[:1]
    ]


async def test_a_batch_with_a_parked_callback_waits_for_its_redrive(
    fake_redis: Any, keys: Keys, tmp_path: Path
) -> None:
    """A parked dead letter (acknowledged, not applied) is redriven from the stream: its batch
    is not archived (nor its entry trimmed) until the letter is gone from the parked hash."""
    r = fake_redis
    batch = await finished_batch(r, keys, seed=3)
    [(entry_id, _)] = await r.xrange(keys.callbacks, count=1)
    await r.hset(keys.dlq_parked(CALLBACKS), entry_id, "1-0")
    report = await _pass(r, keys, tmp_path)
    assert report.archived == [] and [s["batch_id"] for s in report.skipped] == [batch]
    assert "redrive" in report.skipped[0]["reason"]
    assert await r.xrange(keys.callbacks, min=entry_id, max=entry_id)
    await r.hdel(keys.dlq_parked(CALLBACKS), entry_id)
    report = await _pass(r, keys, tmp_path)
    assert [row["batch_id"] for row in report.archived] == [batch]


@pytest.mark.redis
async def test_entries_the_archiver_trimmed_are_not_reported_lost(
    real_redis: Any, tmp_path: Path
) -> None:
    """A stream that lost entries cannot be replayed whole: the consumers log it as an error
    and a rebuild refuses. Entries the archiver trimmed are in a verified archive, so they are
    not lost: after an archive pass, nothing is reported and a rebuild runs; an entry deleted
    by anyone else still is."""
    r, keys = real_redis, Keys("lost:")
    await finished_batch(r, keys, seed=1)
    report = await _pass(r, keys, tmp_path)
    assert report.trimmed[CALLBACKS] > 0
    assert await entries_lost(r, keys.stream(CALLBACKS)) is None
    live = await finished_batch(r, keys, seed=2)
    await rebuild(r, keys, [live])
    await rebuild(r, keys, None)  # every batch in the index: the live one
    assert await list_batches(r, keys) == [live]
    entry_id = (await r.xrange(keys.callbacks, count=2))[-1][0]
    await r.xdel(keys.callbacks, entry_id)
    assert (await entries_lost(r, keys.stream(CALLBACKS))) == {
        "entries_lost": 1,
        "first_entry_id": as_str((await r.xrange(keys.callbacks, count=1))[0][0]),
    }
    with pytest.raises(StreamTrimmed):
        await rebuild(r, keys, [live])
