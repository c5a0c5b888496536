"""What the dashboard's buttons do, without a browser: one pending entry reclaimed, expired or
dead-lettered (app/stuck.py), a dead letter inspected without essay text, redriven once and
deleted (app/deadletters.py), the stuck page's server-side paging, and who may act
(web/security.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.exceptions import ConnectionError, OutOfMemoryError, ReadOnlyError, ResponseError
from starlette.requests import Request

from app import deadletters, stuck
from app.errors import Conflict, InputError, NotFound
from app.settings import Settings
from cj.continuation import advance
from cj.registration import append_registration
from events import codec
from events.streams import CALLBACKS, CJ_GROUP, LPS_GROUP, REQUESTS
from events.types import ComparisonFailed, RequestExpired
from projections.rebuild import check
from projections.store import load_state
from streams.dlq import dead_letter
from streams.keys import Keys
from streams.pending import HANDOFF_CONSUMER
from streams.reader import Entry, ensure_group
from tests.helpers import answers, registration
from web.security import CSRF_HEADER, SESSION_COOKIE, Guard, Refused

SETTINGS = Settings(processing_timeout_s=120)


async def _held(r: Any, keys: Keys, n: int = 3) -> tuple[str, list[str]]:
    """A batch whose first `n` requests a consumer `ghost` read and never finished."""
    await ensure_group(r, keys.requests, LPS_GROUP)
    reg = registration(6, seed=2)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    reply = await r.xreadgroup(LPS_GROUP, "ghost", {keys.requests: ">"}, count=n)
    return reg.batch_id, [i.decode() for i, _ in reply[0][1]]


async def _pending(r: Any, keys: Keys) -> dict[str, str]:
    rows = await r.xpending_range(keys.requests, LPS_GROUP, min="-", max="+", count=100)
    return {row["message_id"].decode(): row["consumer"].decode() for row in rows}


@pytest.mark.redis
async def test_reclaim_hands_the_entry_to_the_next_live_worker(real_redis: Any, keys: Keys) -> None:
    _, ids = await _held(real_redis, keys)
    done = await stuck.act_on_entry(
        real_redis, keys, SETTINGS, stream_name=REQUESTS, entry_id=ids[0], action="reclaim"
    )
    assert done["handed_to"] == HANDOFF_CONSUMER and done["consumer"] == "ghost"
    row = await stuck.pending_row(real_redis, keys, REQUESTS, ids[0])
    assert row["consumer"] == HANDOFF_CONSUMER and row["deliveries"] == 1
    assert row["idle_ms"] >= 120_000  # due for any live worker's next reclaim
    # An entry its consumer took up again (idle below what the user saw) is left alone.
    await real_redis.xclaim(keys.requests, LPS_GROUP, "ghost", 0, [ids[1]], justid=True)
    with pytest.raises(Conflict):
        await stuck.act_on_entry(
            real_redis,
            keys,
            SETTINGS,
            stream_name=REQUESTS,
            entry_id=ids[1],
            action="reclaim",
            min_idle_s=60,
        )
    assert (await _pending(real_redis, keys))[ids[1]] == "ghost"


@pytest.mark.redis
async def test_expire_ends_the_request_with_its_failed_callback(
    real_redis: Any, keys: Keys
) -> None:
    batch_id, ids = await _held(real_redis, keys)
    done = await stuck.act_on_entry(
        real_redis, keys, SETTINGS, stream_name=REQUESTS, entry_id=ids[0], action="expire"
    )
    assert done["batch_id"] == batch_id and done["correlation_id"]
    assert ids[0] not in await _pending(real_redis, keys)
    callbacks = [codec.decode(f) for _, f in await real_redis.xrange(keys.callbacks)]
    assert [
        (type(c), c.error.error_type if isinstance(c, ComparisonFailed) else None)
        for c in callbacks
    ] == [(ComparisonFailed, "expired")]
    assert isinstance(callbacks[0], ComparisonFailed)
    assert callbacks[0].correlation_id == done["correlation_id"]
    dispatched = [codec.decode(f) for _, f in await real_redis.xrange(keys.dispatches)]
    assert any(isinstance(e, RequestExpired) and e.entry_id == ids[0] for e in dispatched)
    consumers = {
        c["name"].decode() for c in await real_redis.xinfo_consumers(keys.requests, LPS_GROUP)
    }
    assert consumers == {"ghost"}  # the dashboard's own consumer is removed afterwards


@pytest.mark.redis
async def test_dead_letter_redrive_once_and_delete(real_redis: Any, keys: Keys) -> None:
    _, ids = await _held(real_redis, keys)
    original = (await real_redis.xrange(keys.requests, min=ids[0], max=ids[0]))[0][1]
    await stuck.act_on_entry(
        real_redis, keys, SETTINGS, stream_name=REQUESTS, entry_id=ids[0], action="dead_letter"
    )
    assert ids[0] not in await _pending(real_redis, keys)
    [(letter_id, _)] = await real_redis.xrange(keys.dlq(REQUESTS))
    letter_id = letter_id.decode()
    hidden = await deadletters.inspect(real_redis, keys, "dlq:lps:requests", letter_id)
    assert hidden["reason"] == "manual" and hidden["source_id"] == ids[0]
    # Requests name their essays by id and the batch's content key (issue 13): no text in the
    # letter to hide, shown or not (texts of older entries are hidden:
    # test_essay_text_is_hidden_in_any_...).
    assert "essay number" not in json.dumps(hidden) and "content_key" in json.dumps(hidden)
    shown = await deadletters.inspect(real_redis, keys, "lps:requests", letter_id, show_text=True)
    assert "essay number" not in json.dumps(shown["fields"]) and "content_key" in shown["fields"]

    moved = await deadletters.redrive(real_redis, keys, "dlq:lps:requests", letter_id)
    assert moved["source_stream"] == REQUESTS
    again = (await real_redis.xrange(keys.requests, min=moved["new_entry_id"], max="+"))[0][1]
    assert again == original  # the same two fields, byte for byte, as a new entry
    with pytest.raises(NotFound):
        await deadletters.redrive(real_redis, keys, "dlq:lps:requests", letter_id)
    assert await real_redis.xlen(keys.dlq(REQUESTS)) == 0

    await stuck.act_on_entry(
        real_redis, keys, SETTINGS, stream_name=REQUESTS, entry_id=ids[1], action="dead_letter"
    )
    [(other, _)] = await real_redis.xrange(keys.dlq(REQUESTS))
    assert (await deadletters.delete(real_redis, keys, "lps:requests", other.decode()))["deleted"]
    with pytest.raises(NotFound):
        await deadletters.delete(real_redis, keys, "lps:requests", other.decode())
    with pytest.raises(InputError):
        await deadletters.redrive(real_redis, keys, "dlq:nope", "1-0")


@pytest.mark.redis
async def test_a_callback_dead_lettered_by_hand_is_parked_and_redriven_in_place_once(
    real_redis: Any, keys: Keys
) -> None:
    """The dashboard's redrive is `cjs dlq redrive` for one letter: a valid callback
    dead-lettered from the stuck page is parked (replay leaves it out, as the live projection
    does), and its redrive applies it in place, with its cost, once: nothing is appended."""
    r = real_redis
    batch_id, _ = await _held(r, keys, n=1)
    state = await load_state(r, keys, batch_id)
    assert state is not None
    cids = sorted(state.corr)
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    cid = cids[0]
    [callback] = await answers(r, keys, batch_id, [cid], cost_usd=0.0025)
    entry_id = (await r.xadd(keys.callbacks, codec.encode(callback))).decode()
    await r.xreadgroup(CJ_GROUP, "ghost", {keys.callbacks: ">"}, count=10)
    await stuck.act_on_entry(
        r, keys, SETTINGS, stream_name=CALLBACKS, entry_id=entry_id, action="dead_letter"
    )
    assert await r.hkeys(keys.dlq_parked(CALLBACKS)) == [entry_id.encode()]
    [(letter_id, _)] = await r.xrange(keys.dlq(CALLBACKS))
    _, rows = await check(r, keys, [batch_id])
    assert rows[0]["matches_live"], rows[0]["diff"]
    length = await r.xlen(keys.callbacks)

    done = await deadletters.redrive(r, keys, "dlq:cj:callbacks", letter_id.decode())
    assert done["applied"] == "accepted" and done["new_entry_id"] is None
    assert done["source_id"] == entry_id and done["correlation_id"] == cid
    state = await load_state(r, keys, batch_id)
    assert state is not None and state.corr[cid].startswith(f"c {entry_id} ")
    assert state.cost_nusd == 2_500_000
    assert await r.xlen(keys.callbacks) == length  # applied in place, not appended
    assert await r.xlen(keys.dlq(CALLBACKS)) == 0 and not await r.hkeys(keys.dlq_parked(CALLBACKS))
    with pytest.raises(NotFound):
        await deadletters.redrive(r, keys, "dlq:cj:callbacks", letter_id.decode())
    _, rows = await check(r, keys, [batch_id])
    assert rows[0]["matches_live"], rows[0]["diff"]


@pytest.mark.redis
async def test_a_letter_that_would_be_dead_lettered_again_is_not_redriven(
    real_redis: Any, keys: Keys
) -> None:
    r = real_redis
    await ensure_group(r, keys.requests, LPS_GROUP)
    bad_id = (await r.xadd(keys.requests, {"type": "NoSuchEvent", "data": "{}"})).decode()
    await r.xreadgroup(LPS_GROUP, "ghost", {keys.requests: ">"}, count=10)
    await dead_letter(
        r,
        keys,
        REQUESTS,
        [(Entry(bad_id, {"type": "NoSuchEvent", "data": "{}"}), codec.DecodeError("x", "y"))],
        LPS_GROUP,
        "ghost",
    )
    [(letter_id, _)] = await r.xrange(keys.dlq(REQUESTS))
    with pytest.raises(InputError, match="still unknown_type"):
        await deadletters.redrive(r, keys, "dlq:lps:requests", letter_id.decode())
    assert await r.xlen(keys.dlq(REQUESTS)) == 1  # left where it is


@pytest.mark.redis
async def test_what_an_entry_action_refuses(real_redis: Any, keys: Keys) -> None:
    _, ids = await _held(real_redis, keys)
    act = stuck.act_on_entry
    with pytest.raises(InputError):  # callbacks are not expired
        await act(
            real_redis, keys, SETTINGS, stream_name=CALLBACKS, entry_id="1-0", action="expire"
        )
    with pytest.raises(InputError):  # no group reads it
        await act(
            real_redis, keys, SETTINGS, stream_name="cj:batches", entry_id="1-0", action="reclaim"
        )
    with pytest.raises(InputError):
        await act(real_redis, keys, SETTINGS, stream_name=REQUESTS, entry_id=ids[0], action="nuke")
    with pytest.raises(NotFound):  # not pending
        await act(
            real_redis, keys, SETTINGS, stream_name=REQUESTS, entry_id="1-0", action="reclaim"
        )
    assert set(await _pending(real_redis, keys)) == set(ids)


@pytest.mark.redis
async def test_the_stuck_page_pages_on_the_server(real_redis: Any, keys: Keys) -> None:
    batch_id, ids = await _held(real_redis, keys, n=5)
    pages: list[list[str]] = []
    after = None
    while True:
        page = await stuck.stuck_page(real_redis, keys, stream_name=REQUESTS, size=2, after=after)
        pages.append([e["entry_id"] for e in page["entries"]])
        after = page["next_after"]
        if after is None:
            break
    assert [i for p in pages for i in p] == ids and all(len(p) <= 2 for p in pages)
    assert page["pending"] == 5 and page["consumers"] == {"ghost": 5}
    mine = await stuck.stuck_page(real_redis, keys, stream_name=REQUESTS, batch_id=batch_id)
    assert [e["entry_id"] for e in mine["entries"]] == ids
    none = await stuck.stuck_page(real_redis, keys, stream_name=REQUESTS, batch_id="other")
    assert none["entries"] == [] and none["next_after"] is None
    idle = await stuck.stuck_page(real_redis, keys, stream_name=REQUESTS, min_idle_s=3600)
    assert idle["entries"] == []
    await real_redis.xdel(keys.requests, ids[0])  # deleted while pending: still listed
    page = await stuck.stuck_page(real_redis, keys, stream_name=REQUESTS, size=1)
    assert page["entries"][0]["deleted"] and page["entries"][0]["batch_id"] is None


# --- who may act --------------------------------------------------------------------------------


def _request(headers: dict[str, str], cookie: str | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if cookie:
        raw.append((b"cookie", f"{SESSION_COOKIE}={cookie}".encode()))
    raw.append((b"host", b"127.0.0.1:8080"))
    return Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": "http",
            "path": "/actions/stuck",
            "query_string": b"",
            "headers": raw,
            "server": ("127.0.0.1", 8080),
        }
    )


def test_the_guard() -> None:
    with pytest.raises(Refused, match="read-only"):
        Guard(None).authorize(_request({"Authorization": "Bearer anything"}))
    guard = Guard("s3cret")
    assert guard.authorize(_request({"Authorization": "Bearer s3cret"})) == "token"
    with pytest.raises(Refused) as wrong:
        guard.authorize(_request({"Authorization": "Bearer nope"}))
    assert wrong.value.status == 401
    with pytest.raises(Refused, match="log"):
        guard.authorize(_request({}))
    session = guard.open_session()
    with pytest.raises(Refused, match="CSRF"):
        guard.authorize(_request({}, session))
    with pytest.raises(Refused, match="CSRF"):
        guard.authorize(_request({CSRF_HEADER: guard.csrf_for("another")}, session))
    assert guard.authorize(_request({CSRF_HEADER: guard.csrf_for(session)}, session)) == "session"
    # Whatever it carries, a request a browser sends from another site is refused.
    for header in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        with pytest.raises(Refused, match="refused"):
            guard.authorize(_request({**header, "Authorization": "Bearer s3cret"}, session))
    assert guard.authorize(
        _request({"Origin": "http://127.0.0.1:8080"}, session), guard.csrf_for(session)
    )


def test_essay_text_is_hidden_in_any_dead_letter() -> None:
    letter = {
        "entry_id": "1-0",
        "fields": {
            "type": "X",
            "data": json.dumps({"essays": [{"essay_id": "a", "text": "secret"}]}),
        },
    }
    hidden = deadletters.redact(letter)
    assert "secret" not in json.dumps(hidden) and "6 characters hidden" in hidden["fields"]["data"]
    raw = deadletters.redact(
        {"entry_id": "1-0", "fields": {"type": "X", "data": "not json secret"}}
    )
    assert "secret" not in json.dumps(raw)
    assert "secret" not in json.dumps(deadletters.redact({"entry_id": "1-0", "fields": "secret"}))
    # A flat entry (events/codec.py): a text is in a nested value, an essay.
    flat = {
        "type": "ComparisonRequested",
        "batch_id": "b",
        "essay_a": json.dumps({"essay_id": "a", "text": "secret"}),
        "text": "secret",
    }
    hidden = deadletters.redact({"entry_id": "1-0", "fields": flat})
    assert "secret" not in json.dumps(hidden) and hidden["fields"]["batch_id"] == "b"
    assert json.loads(hidden["fields"]["essay_a"])["essay_id"] == "a"


@pytest.mark.redis
def test_cjs_stuck_acts_on_one_entry_as_the_dashboard_does(redis_server: Any) -> None:
    import asyncio

    import redis.asyncio as aioredis
    from click.testing import CliRunner

    from tools.cli import main

    keys = Keys("cli:")

    async def held() -> list[str]:
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            return (await _held(r, keys))[1]
        finally:
            await r.aclose()

    ids = asyncio.run(held())
    env = {"REDIS_URL": redis_server.url, "CJS_PREFIX": keys.prefix}
    result = CliRunner().invoke(
        main, ["stuck", "--act", "dead_letter", "--entry", ids[0], "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["acted"]["action"] == "dead_letter" and view["dead_letters"] == {REQUESTS: 1}
    assert [g["pending"] for g in view["groups"] if g["stream"] == REQUESTS] == [len(ids) - 1]
    again = CliRunner().invoke(main, ["stuck", "--act", "expire", "--entry", ids[0]], env=env)
    assert again.exit_code == 1 and "not pending" in again.output
    assert CliRunner().invoke(main, ["stuck", "--act", "expire"], env=env).exit_code == 2


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConnectionError("Connection refused"), 503),
        (OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), 503),
        (ReadOnlyError("You can't write against a read only replica."), 503),
        (ResponseError("LOADING Redis is loading the dataset in memory"), 503),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), 500),
    ],
    ids=["down", "oom", "readonly", "loading", "bug"],
)
def test_the_dashboard_answers_503_while_redis_is_in_a_state_that_passes(
    error: Exception, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard reads the workers' table (streams/errors.py): Redis down, out of memory,
    read-only or loading is 503 (try again), any other error a logged 500."""
    import fakeredis
    from starlette.testclient import TestClient

    from web.server import create_app

    r = fakeredis.FakeAsyncRedis(decode_responses=False)

    async def refuse(*_: Any, **__: Any) -> Any:
        raise error

    monkeypatch.setattr(r, "execute_command", refuse)
    app = create_app(Settings(), token=None, redis=r)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        reply = client.get("/api/dlq")
    assert reply.status_code == status, reply.text
    if status == 503:
        assert reply.json()["error"].startswith("Redis is unavailable")
