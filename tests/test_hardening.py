"""Issue #16, in one process: identifier grammar, time, secrets, the Redis error table,
delivery counting, fencing, bounded exactly-once dead letters and their redrive, a destroyed
group, a trimmed stream, the replay shortcut and the max-deliveries boundary.

The scenarios with worker processes are in test_hardening_processes.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from app.dlq import redrive
from app.logs import configure
from app.settings import Settings
from app.wiring import InProcess
from cj.consumer import CJConsumer
from cj.continuation import advance
from cj.registration import InputError, append_registration, build_registration, scale_of
from cj.stalls import finalize_stalled, find_stalled
from events import codec, redact
from events.clock import entry_iso, time_problem
from events.ids import event_id_problem, key_id_problem
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import ComparisonFailed, ComparisonRequested, ErrorDetail
from lps.providers.mock import MockProfile
from lps.providers.registry import make_provider
from lps.worker import Committer
from projections import keys as pkeys
from projections.batch import register
from projections.rebuild import StreamTrimmed, check, rebuild
from projections.replay import replay, replay_live
from projections.store import CallbackApplier, load_state
from streams.client import connect
from streams.dlq import DeadLetterPolicy, dead_letter, fields_digest, read_dead_letters
from streams.errors import Policy, policy_of
from streams.keys import Keys
from streams.paging import read_stream
from streams.pending import claim_idle, keep_alive, pending_details
from streams.reader import Entry, Fields, GroupReader, ensure_group
from tests.helpers import (
    answers,
    batch_in,
    canonical,
    completed,
    registration,
    request,
    session_5_form,
    snapshot,
)


def _keys() -> Keys:
    return Keys(f"h16{uuid.uuid4().hex[:6]}:")


async def _callback_counts(r: Any, keys: Keys, batch_id: str) -> dict[str, int]:
    """Counted from the stream itself (XRANGE), skipping what the consumers dead-letter."""
    from projections.replay import usable_callback

    parked = {i.decode() for i in await r.hkeys(keys.dlq_parked("cj:callbacks"))}
    seen: dict[str, int] = {}
    n = 0
    async for entry_id, fields in read_stream(r, keys.callbacks):
        try:
            event = codec.decode(fields, entry_id)
        except codec.DecodeError:
            continue
        if entry_id in parked or not usable_callback(event, entry_id):
            continue
        if getattr(event, "batch_id", None) == batch_id:
            n += 1
            seen[event.correlation_id] = seen.get(event.correlation_id, 0) + 1  # type: ignore[attr-defined]
    return {"callbacks_received": n, "distinct": len(seen)}


# --- identifiers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("b-1", True),
        ("0f3a.B_c-9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("live:pairs", False),  # the key separator
        ("{tag}", False),  # a Cluster hash tag
        ("-lead", False),
        ("a b", False),
        ("", False),
        ("é", False),
    ],
)
def test_batch_and_correlation_ids_follow_the_grammar(value: str, ok: bool) -> None:
    assert (key_id_problem("batch_id", value) is None) is ok


def test_registration_refuses_ids_outside_the_grammar() -> None:
    b = batch_in(4)
    with pytest.raises(InputError, match="batch_id"):
        build_registration(b, *scale_of(b), batch_id="live:pairs")
    bad = batch_in(4).model_dump()
    bad["essays"][0]["essay_id"] = "e\x00x"
    from pydantic import ValidationError

    from cj.registration import BatchIn

    with pytest.raises(ValidationError, match="control character"):
        BatchIn.model_validate(bad)
    reg = registration(4, batch_id="ok-1")
    assert event_id_problem(reg) is None
    assert event_id_problem(completed("ok-1", "c:1")) is not None


async def test_a_callback_naming_another_batch_key_is_dead_lettered_not_applied(
    fake_redis: Any,
) -> None:
    """Scenario 1 in one process: `<batch>:pairs` would have written into that batch's pairs
    hash; it is dead-lettered with reason invalid_id, and replay skips it likewise."""
    r, keys = fake_redis, _keys()
    reg = await append_registration(r, keys, registration(4, batch_id="live"))
    await advance(r, keys, reg.batch_id)
    pairs_before = await r.hgetall(pkeys.batch_pairs(keys, "live"))
    cj = CJConsumer(r, keys, "cj-1", block_ms=10)
    await cj.start()
    for suffix in (":pairs", ":corr"):
        await r.xadd(keys.callbacks, codec.encode(completed("live" + suffix, "c1")))
    assert await cj.step() == 2
    assert await r.hgetall(pkeys.batch_pairs(keys, "live")) == pairs_before
    view = await read_dead_letters(r, keys, stream="cj:callbacks")
    assert [d["reason"] for d in view["dead_letters"]] == ["invalid_id", "invalid_id"]
    assert await advance(r, keys, "live") is None  # decodes fine: nothing in flight is done
    full = await replay_live(r, keys, {"live"})
    assert await snapshot(r, keys, "live") == canonical(full.states["live"], keys)


# --- time -------------------------------------------------------------------------------------


def test_missing_occurred_at_takes_the_entry_time_and_absurd_times_are_rejected() -> None:
    fields = codec.encode(completed("b", "c1"))
    assert "occurred_at" not in fields  # a callback is dated by its entry id (EntryStamped)
    first = codec.decode(fields, "1700000000123-0")
    assert first.occurred_at == "2023-11-14T22:13:20.123000Z" == entry_iso("1700000000123-0")
    assert codec.decode(fields, "1700000000123-0") == first  # deterministic, unlike now()
    assert time_problem(first.occurred_at, "1700000000123-0") is None
    assert time_problem("9999-12-31T23:59:59.000000Z", "1700000000123-0") is not None
    assert time_problem("1970-01-02T00:00:00Z", "1700000000123-0") is not None
    assert time_problem("yesterday", "1700000000123-0") is not None
    # A producer clock a few minutes off is within tolerance.
    assert time_problem("2023-11-14T22:33:20.000000Z", "1700000000123-0") is None


async def test_last_event_at_is_the_server_clock_not_the_producers(fake_redis: Any) -> None:
    r, keys = fake_redis, _keys()
    reg = registration(4, batch_id="t1")
    stored = await append_registration(r, keys, reg)
    appended = entry_iso((await r.xrevrange(keys.batches, count=1))[0][0].decode())
    # Stamped by the server's TIME just before the XADD (compared to the millisecond).
    assert stored.occurred_at != reg.occurred_at and stored.occurred_at[:23] <= appended[:23]
    await advance(r, keys, "t1")
    state = await load_state(r, keys, "t1")
    assert state is not None
    cid = next(iter(state.corr))
    # Another producer may still write its own time (the format is public).
    future = codec.encode(completed("t1", cid))
    future["occurred_at"] = b"2099-01-01T00:00:00.000000Z"  # a flat entry's field (events/codec)
    cj = CJConsumer(r, keys, "cj-1", block_ms=10)
    await cj.start()
    entry_id = (await r.xadd(keys.callbacks, future)).decode()
    await cj.step()
    state = await load_state(r, keys, "t1")
    assert state is not None
    # Dead-lettered (more than a day ahead of its entry): it never touched last_event_at.
    assert state.last_event_at < "2099" and state.callbacks_received == 0
    before = state.last_event_at
    ok = completed("t1", cid)
    entry_id = (await r.xadd(keys.callbacks, codec.encode(ok))).decode()
    await cj.step()
    state = await load_state(r, keys, "t1")
    assert state is not None and state.last_event_at == max(before, entry_iso(entry_id))


# --- secrets ----------------------------------------------------------------------------------


def test_urls_are_masked_and_the_scrubber_ignores_case(monkeypatch: pytest.MonkeyPatch) -> None:
    assert redact.mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact.mask_url("rediss://user:s3cret@h/1") == "rediss://user:***@h/1"
    assert redact.mask_url("redis://h:6379/0") == "redis://h:6379/0"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "Custom-Key-ABCDEF")
    text = (
        "SK-ANT-api03-xyz and Sk-Ant-zz9 and X-API-KEY: abc123 and BEARER abcdefghijk and "
        "custom-key-abcdef and Api_Key=qq1 and redis://u:pw9@h/0"
    )
    out = redact.scrub(text)
    for secret in ("api03-xyz", "zz9", "abc123", "abcdefghijk", "abcdef", "qq1", "pw9"):
        assert secret.lower() not in out.lower(), (secret, out)
    failed = ComparisonFailed(
        batch_id="b",
        correlation_id="c",
        essay_a_id="e0",
        essay_b_id="e1",
        error=ErrorDetail(error_type="authentication", retryable=False, message=text),
    )
    clean = redact.scrub_struct(failed)
    assert "zz9" not in clean.error.message and clean.correlation_id == "c"
    same = completed("b", "c")
    assert redact.scrub_struct(same) is same  # nothing key-shaped: untouched


def test_the_quick_suspect_test_says_what_the_regex_says() -> None:
    """`_suspect` skips the case-insensitive regex on ASCII text holding none of its parts:
    it must agree with the regex on every text, key-shaped or not, ASCII or not."""
    rng = random.Random(11)
    pieces = [
        "sk-ant-", "SK-ANT-", "bearer ", "BeArEr", "api_key", "API-KEY", "apikey", "auth_token",
        "Authorization", "passw", "PASSWORD", "secret", "SeCrEt", "redis://u:pw@h", "://x:y@",
        "://", "api", "auth", "pass", "sk-", "essay ", "judge", " ", ":", "@", "/", "-", "_",
        "\u017fecret", "ſecret", "\u212a", "bearer\u0130", "İ", "é", "K", "ß", "x",
    ]  # fmt: skip
    texts = ["", "plain essay text", "Essay A argues more clearly. " * 5]
    for _ in range(3000):
        texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))))
    for text in texts:
        expected = redact._SUSPECT.search(text) is not None
        assert redact._suspect(text, text.lower()) == expected, text


def test_json_logs_carry_the_traceback_and_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    configure(json_logs=True, level="INFO")
    try:
        log = structlog.get_logger("t")
        try:
            raise RuntimeError("boom at redis://user:hunter2@db:6379/0")
        except RuntimeError:
            log.exception("it_failed", token="x-api-key: Sk-ANT-123")
    finally:
        configure(json_logs=None, level="WARNING")
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    record = json.loads(line)
    assert "RuntimeError: boom" in record["exception"] and "Traceback" in record["exception"]
    assert "hunter2" not in line and "123" not in record["token"]


# --- the Redis error table ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "policy"),
    [
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), Policy.WAIT),
        (
            OutOfMemoryError("Command # 1 (XADD s * a 1) of pipeline caused error: ('...',)"),
            Policy.WAIT,
        ),
        (ResponseError("BUSY Redis is busy running a script."), Policy.WAIT),
        (BusyLoadingError("Redis is loading the dataset in memory"), Policy.WAIT),
        (ReadOnlyError("You can't write against a read only replica."), Policy.RECONNECT),
        (MasterDownError("Link with MASTER is down"), Policy.RECONNECT),
        (ClusterDownError("The cluster is down"), Policy.WAIT),
        (TryAgainError("Multiple keys request during rehashing"), Policy.WAIT),
        (MovedError("3999 127.0.0.1:6381"), Policy.RECONNECT),
        (AskError("3999 127.0.0.1:6381"), Policy.RECONNECT),
        (ResponseError("NOGROUP No such key 's' or consumer group 'g'"), Policy.RECREATE),
        (
            ResponseError("Command # 2 (XREADGROUP ...) of pipeline caused error: NOGROUP no"),
            Policy.RECREATE,
        ),
        (ResponseError("MISCONF Redis is configured to save RDB snapshots"), Policy.WAIT),
        (RedisConnectionError("Connection refused"), Policy.RECONNECT),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), None),
        (ValueError("a bug"), None),
    ],
)
def test_every_redis_error_has_a_policy_and_bugs_have_none(
    exc: BaseException, policy: Policy | None
) -> None:
    assert policy_of(exc) is policy


# --- delivery counting ------------------------------------------------------------------------


async def _stream_with_group(r: Any, n: int) -> tuple[str, list[str]]:
    stream = f"s{uuid.uuid4().hex[:6]}"
    await r.xgroup_create(stream, "g", id="0", mkstream=True)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {"i": str(i)})
        ids = [i.decode() for i in await pipe.execute()]
    return stream, ids


@pytest.mark.redis
async def test_rereading_own_entries_is_not_a_delivery(real_redis: Any) -> None:
    """Scenario 3's cause: after an outage the reader re-reads its own pending entries; XREADGROUP
    with an id would count a delivery each time."""
    r = real_redis
    stream, ids = await _stream_with_group(r, 5)
    reader = GroupReader(r, stream, "g", "c1", count=2, block_ms=10)
    assert len(await reader.read()) == 0 or True  # nothing pending yet: reads new ones
    while await reader.read():
        pass
    for _ in range(3):  # three outages
        reader.rewind()
        seen = []
        while entries := await reader.read():
            seen += [e.entry_id for e in entries]
            if len(seen) >= len(ids):
                break
        assert seen == ids
    rows = await pending_details(r, stream, "g")
    assert [row["deliveries"] for row in rows] == [1] * 5


@pytest.mark.redis
async def test_keep_alive_never_takes_back_a_claimed_entry(real_redis: Any) -> None:
    r = real_redis
    stream, ids = await _stream_with_group(r, 3)
    await r.xreadgroup("g", "paused", {stream: ">"}, count=10)
    await r.xclaim(stream, "g", "other", 0, ids[:1])  # claimed away while "paused" slept
    lost = await keep_alive(r, stream, "g", "paused", ids)
    assert lost.taken == ids[:1] and lost.gone == []
    owners = {row["entry_id"]: row["consumer"] for row in await pending_details(r, stream, "g")}
    assert owners == {ids[0]: "other", ids[1]: "paused", ids[2]: "paused"}
    rows = await pending_details(r, stream, "g")
    assert [row["deliveries"] for row in rows] == [2, 1, 1]  # keep-alive counts none


@pytest.mark.redis
async def test_keep_alive_tells_an_answered_entry_from_one_taken(real_redis: Any) -> None:
    """A worker keeps entries in hand until their whole page is handled, after its commits
    acknowledged them: those are answered, not a claim lost (the soak warned `claim_lost` for
    a whole wave its worker had just answered)."""
    r = real_redis
    stream, ids = await _stream_with_group(r, 4)
    await r.xreadgroup("g", "w", {stream: ">"}, count=10)
    await r.xack(stream, "g", ids[0])  # answered by "w" itself
    await r.xclaim(stream, "g", "other", 0, ids[1:2])  # taken while "w" looked dead
    held = await keep_alive(r, stream, "g", "w", ids)
    assert held.taken == ids[1:2]
    assert held.gone == ids[:1]
    assert held.all == [ids[1], ids[0]]
    owners = {row["entry_id"]: row["consumer"] for row in await pending_details(r, stream, "g")}
    assert owners == {ids[1]: "other", ids[2]: "w", ids[3]: "w"}


@pytest.mark.redis
async def test_claim_idle_sees_every_pending_row(real_redis: Any) -> None:
    """More pending rows than the old 10,000-row window; counts come from each row."""
    r = real_redis
    stream, ids = await _stream_with_group(r, 10_050)
    await r.xreadgroup("g", "dead", {stream: ">"}, count=20_000)
    await r.xclaim(stream, "g", "dead", 0, ids[-3:], idle=600_000, retrycount=2, justid=True)
    claimed, deleted = await claim_idle(r, stream, "g", "live", 0, page=1000)
    assert len(claimed) == 10_050 and deleted == []
    counts = {c.entry.entry_id: c.deliveries for c in claimed}
    assert counts[ids[0]] == 2 and counts[ids[-1]] == 3


# --- dead letters -----------------------------------------------------------------------------


@pytest.mark.redis
async def test_dead_letter_is_written_once_bounded_and_hashed(real_redis: Any) -> None:
    """Scenario 2's cause: racing consumers and a re-sent call wrote one entry many times, whole."""
    r, keys = real_redis, _keys()
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    huge = b"\x00" * 2_000_000
    entry_id = (
        await r.xadd(keys.callbacks, {"type": "ComparisonCompleted", "data": huge})
    ).decode()
    await r.xreadgroup(CJ_GROUP, "a", {keys.callbacks: ">"}, count=1)
    fields: Fields = {b"type": b"ComparisonCompleted", b"data": huge}
    entry = Entry(entry_id, fields)
    error = codec.DecodeError("invalid_data", "NUL bytes")
    policy = DeadLetterPolicy(max_entry_bytes=1024, maxlen=1000, retention_s=3600)
    # Two consumers at once, then a client re-sending the same call.
    results = await asyncio.gather(
        *(
            dead_letter(r, keys, "cj:callbacks", [(entry, error)], CJ_GROUP, c, policy=policy)
            for c in ("a", "b", "c")
        )
    )
    again = await dead_letter(r, keys, "cj:callbacks", [(entry, error)], CJ_GROUP, "a")
    written = [i for res in [*results, again] for i in res if i]
    assert len(written) == 1
    [(_letter_id, stored)] = await r.xrange(keys.dlq("cj:callbacks"))
    stored = {k.decode(): v for k, v in stored.items()}
    assert sum(len(v) for v in stored.values()) < 2000
    assert stored["truncated"] == b"1" and int(stored["fields_bytes"]) == len(huge) + 4 + 4 + 19
    digest = hashlib.sha256()
    for part in (b"type", b"ComparisonCompleted", b"data", huge):
        digest.update(len(part).to_bytes(8, "big") + part)
    assert stored["fields_sha256"].decode() == digest.hexdigest() == fields_digest(fields)[1]
    view = await read_dead_letters(r, keys, stream="cj:callbacks")
    [letter] = view["dead_letters"]
    assert letter["truncated"] is True and letter["at"].startswith("20")
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0


@pytest.mark.redis
async def test_dead_letters_are_trimmed_by_length(real_redis: Any) -> None:
    r, keys = real_redis, _keys()
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    for _ in range(300):
        await r.xadd(keys.callbacks, {"junk": "x"})
    reply = await r.xreadgroup(CJ_GROUP, "a", {keys.callbacks: ">"}, count=1000)
    letters = [
        (Entry(i.decode(), f), codec.DecodeError("missing_field", "junk")) for i, f in reply[0][1]
    ]
    policy = DeadLetterPolicy(max_entry_bytes=256, maxlen=100, retention_s=0)
    await dead_letter(r, keys, "cj:callbacks", letters, CJ_GROUP, "a", policy=policy)
    assert 100 <= await r.xlen(keys.dlq("cj:callbacks")) < 300


# --- the max-deliveries boundary, parking and redrive -----------------------------------------


async def _wave(r: Any, keys: Keys, n: int = 4) -> tuple[str, list[str]]:
    reg = await append_registration(r, keys, registration(n, batch_id=f"b{uuid.uuid4().hex[:6]}"))
    await advance(r, keys, reg.batch_id)
    state = await load_state(r, keys, reg.batch_id)
    assert state is not None
    return reg.batch_id, sorted(state.corr)


@pytest.mark.redis
async def test_max_deliveries_boundary_parks_valid_callbacks_and_redrive_applies_them(
    real_redis: Any,
) -> None:
    """CJS_MAX_DELIVERIES=3: a callback claimed for its 3rd delivery is applied, one claimed for
    its 4th is dead-lettered (`>`, not `>=`) and parked; replay leaves the parked one out as
    the projection does; `redrive` applies it once and the batch moves on."""
    r, keys = real_redis, _keys()
    batch_id, cids = await _wave(r, keys)
    cj = CJConsumer(r, keys, "cj-live", processing_timeout_s=0.05, max_deliveries=3)
    await cj.start()
    events = await answers(r, keys, batch_id, cids)
    ids = [(await r.xadd(keys.callbacks, codec.encode(e))).decode() for e in events]
    await r.xreadgroup(CJ_GROUP, "cj-dead", {keys.callbacks: ">"}, count=100)
    # Delivered twice and three times so far: the claim makes the 3rd and the 4th delivery.
    await r.xclaim(keys.callbacks, CJ_GROUP, "cj-dead", 0, ids[:-1], idle=60_000, retrycount=2)
    await r.xclaim(keys.callbacks, CJ_GROUP, "cj-dead", 0, ids[-1:], idle=60_000, retrycount=3)
    actions = {a.entry_id: (a.action, a.deliveries) for a in await cj.reclaim()}
    assert actions == {
        **{i: ("reclaimed", 3) for i in ids[:-1]},
        ids[-1]: ("dead_lettered", 4),
    }
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.in_flight == 1 and state.corr[cids[-1]] == "pending"
    assert await r.hkeys(keys.dlq_parked("cj:callbacks")) == [ids[-1].encode()]
    # Replay equals live while the callback is parked (it is acknowledged, not applied).
    _, rows = await check(r, keys, [batch_id])
    assert rows[0]["matches_live"], rows[0]["diff"]
    states, _ = await replay(r, keys, {batch_id})
    assert await snapshot(r, keys, batch_id) == canonical(states[batch_id], keys)

    dry = await redrive(r, keys, dry_run=True)
    assert [a["outcome"] for a in dry["applied"]] == ["would apply"]
    out = await redrive(r, keys)
    assert [(a["source_id"], a["outcome"]) for a in out["applied"]] == [(ids[-1], "accepted")]
    assert out["advanced"] == [batch_id]
    assert (await redrive(r, keys))["applied"] == []  # once
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.completed == len(cids) and state.terminal
    assert await r.xlen(keys.dlq("cj:callbacks")) == 0
    assert await _callback_counts(r, keys, batch_id) == {
        "callbacks_received": state.callbacks_received,
        "distinct": state.completed,
    }
    states, _ = await replay(r, keys, {batch_id})
    assert await snapshot(r, keys, batch_id) == canonical(states[batch_id], keys)


@pytest.mark.redis
async def test_redrive_adopts_a_letter_written_before_parking_and_reappends_a_now_valid_one(
    real_redis: Any,
) -> None:
    r, keys = real_redis, _keys()
    batch_id, cids = await _wave(r, keys)
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    # An old-style letter: acknowledged without parking.
    [first] = await answers(r, keys, batch_id, cids[:1])
    entry_id = (await r.xadd(keys.callbacks, codec.encode(first))).decode()
    await r.xreadgroup(CJ_GROUP, "x", {keys.callbacks: ">"}, count=10)
    await r.xack(keys.callbacks, CJ_GROUP, entry_id)
    await r.xadd(
        keys.dlq("cj:callbacks"),
        {"reason": "max_deliveries", "source_stream": "cj:callbacks", "source_id": entry_id},
    )
    # A request dead-lettered as unknown_type by an older version, valid now.
    await ensure_group(r, keys.requests, LPS_GROUP)
    req = next(
        codec.decode(f)
        for _, f in await r.xrange(keys.requests)
        if codec.decode(f).correlation_id == cids[1]  # type: ignore[attr-defined]
    )
    assert isinstance(req, ComparisonRequested)
    old_id = (await r.xadd(keys.requests, codec.encode(req))).decode()
    await r.xadd(
        keys.dlq("lps:requests"),
        {"reason": "unknown_type", "source_stream": "lps:requests", "source_id": old_id},
    )
    out = await redrive(r, keys)
    assert [(a["source_id"], a["outcome"]) for a in out["applied"]] == [(entry_id, "accepted")]
    assert [(a["stream"], a["source_id"]) for a in out["reappended"]] == [("lps:requests", old_id)]
    assert out["skipped"] == []
    assert await r.xlen(keys.dlq("cj:callbacks")) == await r.xlen(keys.dlq("lps:requests")) == 0
    again = await redrive(r, keys)
    assert again["applied"] == again["reappended"] == []


@pytest.mark.redis
async def test_redrive_reappends_flat_requests_in_their_own_form(real_redis: Any) -> None:
    """Dead-lettered requests of either flat form, valid now, go back to their stream as they
    were written (names, order, values: the type's field first, or session 5's `type`), from
    the source entry or, when it is gone, from the letter's copy; a layout version this
    reader does not know stays a dead letter."""
    r, keys = real_redis, _keys()
    batch_id, cids = await _wave(r, keys)
    await ensure_group(r, keys.requests, LPS_GROUP)
    await r.xreadgroup(LPS_GROUP, "x", {keys.requests: ">"}, count=100)  # the wave's own
    await r.xack(keys.requests, LPS_GROUP, *[i for i, _ in await r.xrange(keys.requests)])
    requests = [
        codec.encode(request(batch_id, cids[0])),
        session_5_form(codec.encode(request(batch_id, cids[1]))),
        {**codec.encode(request(batch_id, cids[2])), "ComparisonRequested": b"2"},
    ]
    ids = [(await r.xadd(keys.requests, fields)).decode() for fields in requests]
    delivered = await r.xreadgroup(LPS_GROUP, "x", {keys.requests: ">"}, count=10)
    entries = [Entry(i.decode(), f) for i, f in delivered[0][1]]
    assert [e.entry_id for e in entries] == ids
    letters = await dead_letter(
        r,
        keys,
        "lps:requests",
        [(e, codec.DecodeError("unknown_type", "an older reader's")) for e in entries],
        LPS_GROUP,
        "x",
    )
    assert all(letters)
    await r.xdel(keys.requests, ids[0])  # the letter's copy is all that is left of it
    out = await redrive(r, keys)
    assert [a["source_id"] for a in out["reappended"]] == ids[:2]
    assert [(s["source_id"], s["why"][:19]) for s in out["skipped"]] == [
        (ids[2], "still unknown_type:")
    ]
    for moved, written in zip(out["reappended"], requests[:2], strict=True):
        [(_, stored)] = await r.xrange(keys.requests, moved["new_id"], moved["new_id"])
        assert list(stored.items()) == [(k.encode(), v) for k, v in written.items()]
        event = codec.decode(stored, moved["new_id"])
        assert isinstance(event, ComparisonRequested)
        assert event.correlation_id == moved["correlation_id"] in cids[:2]


# --- fencing ----------------------------------------------------------------------------------


@pytest.mark.redis
async def test_a_worker_that_lost_its_claim_cannot_commit_and_a_resent_commit_appends_once(
    real_redis: Any,
) -> None:
    r, keys = real_redis, _keys()
    _, cids = await _wave(r, keys)
    await ensure_group(r, keys.requests, LPS_GROUP)
    reply = await r.xreadgroup(LPS_GROUP, "paused", {keys.requests: ">"}, count=2)
    ids = [i.decode() for i, _ in reply[0][1]]
    await r.xclaim(keys.requests, LPS_GROUP, "other", 0, ids[:1])  # taken while paused
    paused = Committer(r, keys, "paused")
    stale = [completed("x", cids[0])]
    assert await paused._write([_item(ids[0], stale[0])]) == ["fenced"]
    item = _item(ids[1], completed("x", cids[1]))
    assert await paused._write([item]) == ["committed"]
    assert await paused._write([item]) == ["again"]  # the client re-sends after a timeout
    callbacks = [codec.decode(f) for _, f in await r.xrange(keys.callbacks)]
    assert [c.correlation_id for c in callbacks] == [cids[1]]  # type: ignore[attr-defined]
    assert [p["entry_id"] for p in await pending_details(r, keys.requests, LPS_GROUP)] == ids[:1]


def _item(entry_id: str, callback: Any) -> Any:
    from lps.worker import _Commit

    return _Commit(entry_id, callback)


# --- a destroyed group, a trimmed stream ------------------------------------------------------


@pytest.mark.redis
async def test_a_destroyed_group_is_recreated_at_its_position_and_applies_nothing_twice(
    real_redis: Any,
) -> None:
    """Scenario 5 in one process: destroyed with one page applied, one pending (read, not yet
    applied) and one unread: recreated where it was, it applies each exactly once."""
    r, keys = real_redis, _keys()
    batch_id, cids = await _wave(r, keys, 5)
    cj = CJConsumer(r, keys, "cj-1", count=3, block_ms=10)
    await cj.start()
    ids = [
        (await r.xadd(keys.callbacks, codec.encode(e))).decode()
        for e in await answers(r, keys, batch_id, cids[:6])
    ]
    await r.xadd(keys.callbacks, codec.encode(completed(batch_id, "not-asked")))  # an orphan
    assert await cj.step() == 3  # applied
    await cj.record_position()
    await cj.step()  # three more applied after the position was recorded
    late = await r.xreadgroup(CJ_GROUP, "cj-2", {keys.callbacks: ">"}, count=1)  # read only
    assert late
    await r.xgroup_destroy(keys.callbacks, CJ_GROUP)
    with pytest.raises(ResponseError) as err:
        await cj.step()
    assert policy_of(err.value) is Policy.RECREATE
    cj.group_missing = True
    while await cj.step():
        pass
    groups = {g["name"].decode(): g for g in await r.xinfo_groups(keys.callbacks)}
    assert groups[CJ_GROUP]["last-delivered-id"].decode() != "0-0"
    state = await load_state(r, keys, batch_id)
    assert state is not None
    assert (state.completed, state.duplicates, state.orphans) == (6, 0, 1)
    assert state.callbacks_received == len(ids) + 1
    full = await replay_live(r, keys, {batch_id})
    assert await snapshot(r, keys, batch_id) == canonical(full.states[batch_id], keys)


@pytest.mark.redis
async def test_a_trimmed_stream_is_reported_and_never_rebuilt_over(real_redis: Any) -> None:
    r, keys = real_redis, _keys()
    batch_id, cids = await _wave(r, keys)
    cj = CJConsumer(r, keys, "cj-1", block_ms=10)
    await cj.start()
    for e in await answers(r, keys, batch_id, cids[:3]):
        await r.xadd(keys.callbacks, codec.encode(e))
    await cj.step()
    result, _ = await check(r, keys, [batch_id])
    assert result.trimmed == {}
    await r.xtrim(keys.callbacks, maxlen=1, approximate=False)
    result, _ = await check(r, keys, [batch_id])
    assert set(result.trimmed) == {"cj:callbacks"}
    with pytest.raises(StreamTrimmed):
        await rebuild(r, keys, [batch_id])
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.completed == 3  # the live counts were not rebuilt over


# --- replay -----------------------------------------------------------------------------------


async def test_replay_applies_only_what_the_group_delivered_when_nothing_is_pending(
    fake_redis: Any,
) -> None:
    """The whole-page shortcut must still stop at the group's last-delivered id: nothing
    pending, 2 callbacks not yet delivered -> 1 applied, and replay equals live."""
    r, keys = fake_redis, _keys()
    batch_id, cids = await _wave(r, keys)
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    events = await answers(r, keys, batch_id, cids[:3])
    ids = [(await r.xadd(keys.callbacks, codec.encode(e))).decode() for e in events]
    await r.xreadgroup(CJ_GROUP, "w", {keys.callbacks: ">"}, count=1)
    applier = CallbackApplier(r, keys, CJ_GROUP)
    async with r.pipeline(transaction=False) as pipe:
        await applier.queue(pipe, events[0], ids[0])
        await pipe.execute()
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    result = await replay_live(r, keys, {batch_id})
    assert (result.callbacks_applied, result.callbacks_unapplied) == (1, 2)
    assert await snapshot(r, keys, batch_id) == canonical(result.states[batch_id], keys)
    result, rows = await check(r, keys, [batch_id])
    assert rows[0]["matches_live"], rows[0]["diff"]


def test_register_uses_the_events_time_for_both_clocks() -> None:
    reg = registration(3, batch_id="r")
    state = register(reg)
    assert state.registered_at == state.last_event_at == reg.occurred_at
    later = datetime.now(UTC) + timedelta(days=1)
    assert state.last_event_at < later.isoformat()


# --- scenarios in this process (real redis-server, the workers' loops as tasks) -----------------


@asynccontextmanager
async def running(
    r: Any,
    keys: Keys,
    *,
    cj: int = 1,
    lps: int = 1,
    reapers: int = 0,
    latency_ms: float = 0.0,
    **settings: Any,
) -> AsyncIterator[InProcess]:
    """CJ consumers, LPS workers (an ideal mock judge) and reapers as tasks of this process;
    on leaving, none of them may have died (the Goal: no worker exits)."""
    options: dict[str, Any] = {
        "processing_timeout_s": 1.5,
        "reaper_interval_s": 0.25,
        "block_ms": 50,
        "retry_base_delay_s": 0.01,
        **settings,
    }
    profile = MockProfile(
        "ideal", position_bias=0.0, noise=0.0, latency_ms=latency_ms, deterministic=True
    )
    runner = InProcess(
        r,
        keys,
        Settings(**options),
        lambda name: make_provider(name, mock_profile=profile),
        cj_consumers=cj,
        lps_workers=lps,
        reapers=reapers,
    )
    runner.start()
    try:
        yield runner
        runner.check()
    finally:
        await runner.close()
    runner.check()


async def _until(check_: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check_():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


@pytest.mark.redis
async def test_s2_huge_malformed_entries_are_dead_lettered_once_and_bounded(
    real_redis: Any,
) -> None:
    """16 MB entries of NUL bytes used to be stored up to 11 times as ~100 MB of JSON each:
    now once each, a few kB, under two racing consumers."""
    r, keys = real_redis, _keys()
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    size, count = 2_000_000, 4
    before = int((await r.info("memory"))["used_memory"])
    for _ in range(count):
        await r.xadd(keys.callbacks, {"type": "ComparisonCompleted", "data": b"\x00" * size})
    await r.xadd(keys.callbacks, {"type": b"\x00" * size})  # and no data at all
    input_bytes = (count + 1) * size

    async def consumed() -> bool:
        groups = {g["name"].decode(): g for g in await r.xinfo_groups(keys.callbacks)}
        return bool(groups[CJ_GROUP]["lag"] == 0 and groups[CJ_GROUP]["pending"] == 0)

    async with running(r, keys, cj=2, lps=0):
        await _until(consumed, 30, "malformed entries consumed")
    letters = await r.xrange(keys.dlq("cj:callbacks"))
    assert len(letters) == count + 1
    assert len({f[b"source_id"] for _, f in letters}) == count + 1  # each exactly once
    dlq_bytes = int(await r.memory_usage(keys.dlq("cj:callbacks")) or 0)
    after = int((await r.info("memory"))["used_memory"])
    assert dlq_bytes < 64 * 1024
    assert after - before <= 2 * input_bytes, (before, after)
    view = await read_dead_letters(r, keys)
    assert all(d["truncated"] and d["fields_bytes"] >= size for d in view["dead_letters"])
    print(
        f"\n[s2] {input_bytes / 1e6:.1f} MB of malformed input -> {len(letters)} letters, "
        f"{dlq_bytes / 1e3:.1f} kB of DLQ; Redis grew {(after - before) / 1e6:.1f} MB "
        f"({(after - before) / input_bytes:.2f}x the input, the input itself included)"
    )


@pytest.mark.redis
async def test_s2_valid_callbacks_dead_lettered_at_max_deliveries_are_redriven_by_the_cli(
    redis_server: Any, real_redis: Any
) -> None:
    """Valid callbacks past CJS_MAX_DELIVERIES left the batch `running` for ever, with no way
    back: now they are parked, replay still equals live, and `cjs dlq redrive` applies them
    once and the batch finishes."""
    r, keys = real_redis, _keys()
    reg = await append_registration(r, keys, registration(6, batch_id="s2"))
    await advance(r, keys, reg.batch_id)
    wave1 = (await load_state(r, keys, "s2")).submitted  # type: ignore[union-attr]

    async def answered() -> bool:
        return int(await r.xlen(keys.callbacks)) >= wave1

    async with running(r, keys, cj=0, lps=1):
        await _until(answered, 30, "wave 1 answered")
    # Their consumers kept dying: each callback delivered 3 times already, long idle.
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    reply = await r.xreadgroup(CJ_GROUP, "cj-gone", {keys.callbacks: ">"}, count=1000)
    ids = [i.decode() for _, items in reply for i, _ in items]
    await r.xclaim(keys.callbacks, CJ_GROUP, "cj-gone", 0, ids, idle=600_000, retrycount=3)

    async def parked() -> bool:
        return int(await r.hlen(keys.dlq_parked("cj:callbacks"))) == len(ids)

    async with running(r, keys, cj=1, lps=1):
        await _until(parked, 30, "callbacks parked")
        state = await load_state(r, keys, "s2")
        assert state is not None and state.in_flight == wave1 and state.status == "running"
        _, rows = await check(r, keys, ["s2"])
        assert rows[0]["matches_live"], rows[0]["diff"]
        out = await _cli(["dlq", "redrive", "--json"], redis_server.url, keys.prefix)
        assert len(out["applied"]) == len(ids)
        assert {a["outcome"] for a in out["applied"]} == {"accepted"}
        assert out["advanced"] == ["s2"]

        async def done() -> bool:
            s = await load_state(r, keys, "s2")
            return s is not None and s.terminal

        await _until(done, 30, "batch finalized")
    state = await load_state(r, keys, "s2")
    assert state is not None and state.status == "finalized"
    again = await _cli(["dlq", "redrive", "--json"], redis_server.url, keys.prefix)
    assert again["applied"] == []
    counted = await _callback_counts(r, keys, "s2")
    assert counted == {"callbacks_received": state.callbacks_received, "distinct": state.accepted}
    states, _ = await replay(r, keys, {"s2"})
    assert await snapshot(r, keys, "s2") == canonical(states["s2"], keys)


async def _cli(args: list[str], url: str, prefix: str, *, check: bool = True) -> Any:
    """`cjs ARGS` in this process (in a thread: the command runs its own event loop); its
    JSON answer, or (exit code, output) when not `check`."""
    from click.testing import CliRunner

    from tools.cli import main

    done = await asyncio.to_thread(
        CliRunner().invoke, main, args, env={"REDIS_URL": url, "CJS_PREFIX": prefix}
    )
    if not check:
        return done.exit_code, done.output
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.redis
async def test_s4_a_future_occurred_at_cannot_hide_a_stalled_batch(real_redis: Any) -> None:
    """An orphan whose producer's clock ran 6 h ahead used to pin `last_event_at` and hide the
    stall; idle time now runs on the server's clock, from the entry id."""
    r, keys = real_redis, _keys()
    reg = await append_registration(r, keys, registration(6, batch_id="s4b"))
    await advance(r, keys, "s4b")  # and no LPS worker: nobody answers
    ahead = (datetime.now(UTC) + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    orphan = completed("s4b", "x-ahead")
    data = json.loads(codec.encode_json(orphan))
    data["occurred_at"] = ahead  # written as {type, data}, the form of before (still read)
    await r.xadd(keys.callbacks, {"type": type(orphan).__name__, "data": json.dumps(data)})
    cj = CJConsumer(r, keys, "cj-1", block_ms=10)
    await cj.start()
    await cj.step()
    state = await load_state(r, keys, "s4b")
    assert state is not None and state.orphans == 1 and state.last_event_at < ahead

    async def stalled() -> bool:
        return [s.batch_id for s in await find_stalled(r, keys, 0.3)] == ["s4b"]

    await _until(stalled, 10, "the batch seen stalled")
    decision = await finalize_stalled(r, keys, "s4b", 0.3)
    assert decision is not None and decision.terminal is not None
    states, _ = await replay(r, keys, {reg.batch_id})
    assert await snapshot(r, keys, "s4b") == canonical(states["s4b"], keys)


@pytest.mark.redis
async def test_s8_no_command_output_shows_the_redis_password(
    redis_server: Any, real_redis: Any
) -> None:
    secret = "s3cr3t-Pa55"
    await real_redis.config_set("requirepass", secret)
    url = f"redis://:{secret}@127.0.0.1:{redis_server.port}/0"
    try:
        outputs, codes = [], []
        for args in (
            ["demo", "--essays", "6", "--seed", "3"],
            ["validate", "--essays", "6", "--modes", "per_request", "--seed", "3"],
            ["dlq"],
            ["status", "no-such-batch"],
        ):
            code, output = await _cli(args, url, "s8:", check=False)
            outputs.append(output)
            codes.append(code)
        assert codes == [0, 0, 0, 1], outputs
        assert "***@127.0.0.1" in outputs[0]  # the target is shown, masked
        assert secret not in "".join(outputs)
        assert connect(url)[1] == f"redis://:***@127.0.0.1:{redis_server.port}/0"
    finally:
        client = aioredis.from_url(url)
        await client.config_set("requirepass", "")
        await client.aclose()


@pytest.mark.redis
async def test_s9_a_backlog_of_orphans_costs_no_extra_round_trip_and_a_few_log_lines(
    real_redis: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    r, keys = real_redis, _keys()
    reg = await append_registration(r, keys, registration(4, batch_id="s9"))
    n = 4000
    async with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(
                keys.callbacks,
                codec.encode(completed(reg.batch_id if i % 2 else f"gone-{i}", f"o{i}")),
            )
        await pipe.execute()
    await r.config_resetstat()

    async def caught_up() -> bool:
        groups = {g["name"].decode(): g for g in await r.xinfo_groups(keys.callbacks)}
        g = groups.get(CJ_GROUP)
        return g is not None and g["lag"] == 0 and g["pending"] == 0

    configure(json_logs=True, level="INFO")
    try:
        async with running(r, keys, cj=1, lps=0):
            await _until(caught_up, 60, "backlog consumed")
    finally:
        configure(json_logs=None, level="WARNING")
    stats = await r.info("commandstats")
    # EXISTS runs inside callback.lua only, once per batch a page: once for each unknown
    # batch (n/2 of them), once a page for s9 (pages of at most `read_count`).
    pages = math.ceil(n / Settings().read_count)
    assert n // 2 < stats["cmdstat_exists"]["calls"] <= n // 2 + pages
    records = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    lines = [e for e in records if e.get("event") == "callback_orphan"]
    assert sum(e["count"] for e in lines) == n
    assert len(lines) <= math.ceil(n / 100) + 2
    assert sum(e["unknown_batch"] for e in lines) == n // 2
    state = await load_state(r, keys, "s9")
    assert state is not None and state.orphans == state.callbacks_received == n // 2
