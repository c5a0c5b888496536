"""Commits on every engine: a request is acknowledged exactly when its result exists.

LPS appends a callback, XACKs its request and records the commit's token under the request's
correlation id in its batch's `lps:answered` hash in one call of its commit script, fenced by
its hold on the request (an expired request: RequestExpired and ComparisonFailed with them); a
request already answered is acknowledged, not judged again. CJ applies a callback and XACKs
its entry in one script call. Checked on what the client sent (tests/contract/recording.py)
and on the streams."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cj.consumer import CJConsumer
from events import codec
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import ComparisonCompleted, ComparisonFailed, RequestExpired
from lps import keys as lkeys
from lps.worker import _COMMIT_LUA, LPSWorker
from streams.keys import Keys
from streams.reader import Entry
from tests.contract.recording import Recorder, recording
from tests.helpers import (
    Judge,
    answer,
    append_and_read,
    batch_with_wave,
    deliver_to,
    events_of,
    request,
)

COMMIT_SHA = hashlib.sha1(_COMMIT_LUA.encode()).hexdigest()


@dataclass
class Commit:
    """One item of a call of LPS's commit script (lps/worker.py `_COMMIT_LUA`)."""

    keys: tuple[str, ...]  # requests, callbacks, dispatches
    group: str
    consumer: str
    entry_id: str
    token: str
    correlation_id: str
    answered_key: str
    callback: tuple[str, dict[str, Any]]
    extra: list[tuple[str, dict[str, Any]]]


def _commits(recorder: Recorder) -> list[Commit]:
    """Every item of every commit-script call recorded, parsed from its KEYS and ARGV."""
    out = []
    for unit in recorder.scripts():
        for call in unit.texts("EVALSHA") + unit.texts("EVAL"):
            if call[1] not in (COMMIT_SHA, _COMMIT_LUA):
                continue
            nkeys = int(call[2])
            keys, args = call[3 : 3 + nkeys], call[3 + nkeys :]
            group, consumer, _ttl, n = args[0], args[1], args[2], int(args[3])
            a = 4
            for i in range(n):
                entry, token, cid, nextra = args[a : a + 4]
                a += 4
                events = []
                for _ in range(int(nextra) + 1):  # the extra events, then the callback
                    size = int(args[a])
                    events.append(_event(args[a + 1 : a + 1 + size]))
                    a += 1 + size
                out.append(
                    Commit(
                        keys[:3],
                        group,
                        consumer,
                        entry,
                        token,
                        cid,
                        keys[3 + i],
                        events[-1],
                        events[:-1],
                    )
                )
    return out


def _event(flat: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """An event's fields as the script appends them (either form, events/codec.py): its type
    name and its JSON object."""
    names = [k if isinstance(k, bytes) else str(k).encode() for k in flat[::2]]
    found = codec.entry_data(dict(zip(names, flat[1::2], strict=True)))
    assert found is not None
    return found[0].decode(), json.loads(found[1])


def _commit_of(recorder: Recorder, cid: str) -> Commit:
    """The one commit that appended the callback of `cid`."""
    # A call re-sent (after NOSCRIPT, or a timeout) is the same commit: same entry, same token.
    found = list(
        {
            (c.entry_id, c.token): c
            for c in _commits(recorder)
            if c.callback[1]["correlation_id"] == cid
        }.values()
    )
    assert len(found) == 1, f"{cid}: {len(found)} commits append its callback"
    return found[0]


async def test_a_callback_is_committed_with_its_request_xack_and_done_marker(
    r: Any, keys: Keys
) -> None:
    judge = Judge()
    worker = LPSWorker(r, keys, "lps-1", lambda _: judge, block_ms=10, concurrency=4)
    await worker.start()
    cids = [f"c{i}" for i in range(6)]
    batch_of = {cid: f"b{i % 2}" for i, cid in enumerate(cids)}
    entry_of = {
        cid: (await r.xadd(keys.requests, codec.encode(request(batch_of[cid], cid)))).decode()
        for cid in cids
    }
    try:
        with recording() as recorder:
            assert await worker.step() == len(cids)
    finally:
        await worker.close()

    token = {}
    for cid in cids:
        commit = _commit_of(recorder, cid)
        assert commit.keys == (keys.requests, keys.callbacks, keys.dispatches)
        assert (commit.group, commit.consumer) == (LPS_GROUP, "lps-1")
        assert commit.entry_id == entry_of[cid] and commit.correlation_id == cid
        assert commit.answered_key == lkeys.answered(keys, batch_of[cid])
        assert commit.callback[0] == "ComparisonCompleted" and not commit.extra
        token[cid] = commit.token
    assert len(set(token.values())) == len(cids)
    # Nothing acknowledges a request outside the commit script.
    assert not [u for u in recorder.units if "XACK" in u.names()]
    callbacks = [e for _, e in await events_of(r, keys.callbacks)]
    assert sorted(c.correlation_id for c in callbacks) == cids
    assert all(isinstance(c, ComparisonCompleted) for c in callbacks)
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0
    for cid in cids:
        assert (await r.hget(lkeys.answered(keys, batch_of[cid]), cid)).decode() == token[cid]
    for batch_id in ("b0", "b1"):  # one hash per batch, expiring after its last commit
        assert await r.hlen(lkeys.answered(keys, batch_id)) == 3
        assert await r.ttl(lkeys.answered(keys, batch_id)) > 0
    assert not await r.keys(f"{keys.prefix}lps:done:*")


async def test_a_request_already_answered_is_acknowledged_not_judged_again(
    r: Any, keys: Keys
) -> None:
    judge = Judge()
    worker = LPSWorker(r, keys, "lps-1", lambda _: judge, block_ms=10)
    await worker.start()
    try:
        await r.xadd(keys.requests, codec.encode(request("b1", "c1")))
        assert await worker.step() == 1
        again = (await r.xadd(keys.requests, codec.encode(request("b1", "c1")))).decode()
        assert await worker.step() == 1
    finally:
        await worker.close()
    assert judge.judged == ["c1"]
    assert [e.correlation_id for _, e in await events_of(r, keys.callbacks)] == ["c1"]
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0
    assert (await r.hget(lkeys.answered(keys, "b1"), "c1")).decode() != again


async def test_an_expired_request_ends_with_its_events_and_xack_in_one_transaction(
    r: Any, keys: Keys
) -> None:
    batch_id, requests = await batch_with_wave(r, keys)
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    delivered = await deliver_to(r, keys.requests, LPS_GROUP, "lps-dead")
    await r.xack(keys.requests, LPS_GROUP, *delivered[1:])
    entry_id, cid = delivered[0], requests[0].correlation_id
    await r.xclaim(
        keys.requests, LPS_GROUP, "lps-dead", 0, [entry_id], idle=600_000, retrycount=3, justid=True
    )
    worker = LPSWorker(
        r, keys, "lps-live", lambda _: Judge(), processing_timeout_s=0.5, max_deliveries=3
    )
    await worker.start()
    try:
        with recording() as recorder:
            [action] = await worker.reclaim()
    finally:
        await worker.close()
    assert (action.action, action.batch_id, action.correlation_id) == ("expired", batch_id, cid)
    commit = _commit_of(recorder, cid)
    assert commit.keys == (keys.requests, keys.callbacks, keys.dispatches)
    assert (commit.entry_id, commit.answered_key) == (entry_id, lkeys.answered(keys, batch_id))
    kind, data = commit.callback
    assert kind == "ComparisonFailed" and data["error"]["error_type"] == "expired"
    [(kind, data)] = commit.extra
    assert kind == "RequestExpired" and data["entry_id"] == entry_id
    assert not [u for u in recorder.units if "XACK" in u.names()]
    [failed] = [e for _, e in await events_of(r, keys.callbacks)]
    assert isinstance(failed, ComparisonFailed) and failed.correlation_id == cid
    [expired] = [e for _, e in await events_of(r, keys.dispatches)]
    assert isinstance(expired, RequestExpired) and expired.deliveries == 3
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0


async def test_a_callback_is_applied_and_acknowledged_by_one_script_call(
    r: Any, keys: Keys
) -> None:
    _, requests = await batch_with_wave(r, keys)
    consumer = CJConsumer(r, keys, "cj-1")
    await consumer.start()
    callbacks = [answer(q) for q in requests[:3]]
    ids = await append_and_read(r, keys, callbacks, consumer="cj-1")
    entries = [Entry(i.decode(), fields) for i, fields in await r.xrange(keys.callbacks)]
    assert [e.entry_id for e in entries] == ids
    with recording() as recorder:
        await consumer.handle(entries)
    # callback.lua: EVALSHA sha n, KEYS (batch, corr, orphans, callbacks stream, ...), then
    # ARGV (group, entry id, correlation id, ...): the XACK is the script's own. The page in
    # one call, each callback's 10 keys and 8 arguments in turn (on a cluster too: the keys
    # are the partition's, one slot).
    calls: list[tuple[str, ...]] = []
    for call in (c for u in recorder.scripts() for c in u.texts("EVALSHA")):
        if not calls or call != calls[-1]:  # the same call again: after NOSCRIPT, on a node
            calls.append(call)  # that lacked the script (a cluster loads it where it runs)
    assert len(calls) == 1
    split = [
        (c[3 + 10 * j : 3 + 10 * j + 10], c[3 + int(c[2]) + 8 * j :][:8])
        for c in calls
        for j in range(int(c[2]) // 10)
    ]
    assert [(k[3], a[0], a[1], a[2]) for k, a in split] == [
        (keys.callbacks, CJ_GROUP, i, cb.correlation_id)
        for i, cb in zip(ids, callbacks, strict=True)
    ]
    assert not [u for u in recorder.units if "XACK" in u.names()]
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
