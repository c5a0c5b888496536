"""Dead letters on every engine (invariant 7 of docs/design.md): an entry a consumer cannot use
goes to `dlq:<stream>` with its reason, in the same script call as its XACK (the letter is
written only if that XACK acknowledged the entry), and the consumer keeps going;
`read_dead_letters` shows what was moved."""

from __future__ import annotations

import hashlib
from typing import Any

from cj.consumer import CJConsumer
from cj.registration import append_registration
from events import codec
from events.streams import CJ_GROUP, LPS_GROUP
from lps.worker import LPSWorker
from projections import keys as pkeys
from projections.store import load_state
from streams.dlq import _DEAD_LETTER_LUA, DeadLetterPolicy, dead_letter, read_dead_letters
from streams.keys import Keys
from streams.reader import Entry, ensure_group
from tests.contract.recording import Recorder, recording
from tests.helpers import (
    Judge,
    append_batch_event,
    completed,
    decode_callback,
    registration,
    request,
    session_5_form,
    wave,
)

DEAD_LETTER_SHA = hashlib.sha1(_DEAD_LETTER_LUA.encode()).hexdigest()


def _letter_ids(args: tuple[str, ...]) -> list[str]:
    """The entry ids a dead-letter script call moves (its ARGV: group, maxlen, retention,
    then per letter: entry id, park, n, n field arguments)."""
    out, i = [], 3
    while i < len(args):
        out.append(args[i])
        i += 3 + int(args[i + 2])
    return out


def _moved_together(recorder: Recorder, keys: Keys, stream_name: str, ids: list[str]) -> int:
    """Each dead letter was written by a call of the dead-letter script (a page of letters a
    call), whose XACK of each source entry gates that letter's XADD; nothing acknowledged an
    entry outside a script. Returns the number of distinct calls."""
    calls = [
        c
        for u in recorder.scripts()
        for c in u.texts("EVALSHA") + u.texts("EVAL")
        if c[1] in (DEAD_LETTER_SHA, _DEAD_LETTER_LUA)
    ]
    moved: set[str] = set()
    for call in calls:
        n = int(call[2])
        script_keys, args = call[3 : 3 + n], call[3 + n :]
        assert script_keys[:2] == (keys.stream(stream_name), keys.dlq(stream_name))
        moved.update(_letter_ids(args))
    assert sorted(moved) == sorted(ids)
    assert not [u for u in recorder.units if "XACK" in u.names() and u.kind != "script"]
    # An EVALSHA answered NOSCRIPT is sent again as EVAL: the same call.
    return len({call[2:] for call in calls})


async def test_undecodable_callbacks_are_dead_lettered_with_their_xack_and_the_consumer_goes_on(
    r: Any, keys: Keys
) -> None:
    await append_registration(r, keys, registration(4, batch_id="b1"))
    await append_batch_event(r, keys, wave("b1", 1, [("c0", "e0", "e1"), ("c1", "e0", "e1")]))
    consumer = CJConsumer(r, keys, "c1", block_ms=10)
    await consumer.start()
    bad: list[tuple[str, Any]] = [
        ("invalid_data", {"type": "ComparisonCompleted", "data": "garbage"}),
        ("invalid_data", {"type": "WaveSubmitted", "data": "{}"}),
        ("missing_field", {"hello": "world"}),
        ("unexpected_type", codec.encode(wave("b1", 2, []))),
        # Flat, of a type or a layout version a newer producer writes: redriven once known.
        ("unknown_type", {"ComparisonRetried": "1", "batch_id": "b1", "correlation_id": "c0"}),
        ("unknown_type", {"ComparisonCompleted": "2", "batch_id": "b1", "correlation_id": "c0"}),
    ]
    bad_ids = [(await r.xadd(keys.callbacks, fields)).decode() for _, fields in bad]
    await r.xadd(keys.callbacks, codec.encode(completed("no-such-batch", "c9")))
    await r.xadd(keys.callbacks, codec.encode(completed("b1", "c0")))
    with recording() as recorder:
        assert await consumer.step() == 8
    _moved_together(recorder, keys, "cj:callbacks", bad_ids)

    view = await read_dead_letters(r, keys)
    assert view["total"] == 6 and view["counts"]["cj:callbacks"] == 6
    letters = sorted(view["dead_letters"], key=lambda d: d["source_id"])
    assert [d["reason"] for d in letters] == [reason for reason, _ in bad]
    assert [d["source_id"] for d in letters] == bad_ids
    assert letters[0]["fields"] == {"type": "ComparisonCompleted", "data": "garbage"}
    assert {"hello": "world"} in [d["fields"] for d in letters]
    assert letters[-1]["fields"] == bad[-1][1]  # as written, in order: redrivable from the copy
    assert list(letters[-1]["fields"]) == list(bad[-1][1])
    assert [d["event_type"] for d in letters] == [
        "ComparisonCompleted",
        "WaveSubmitted",
        None,
        "WaveSubmitted",
        "ComparisonRetried",
        "ComparisonCompleted",
    ]
    assert {d["source_stream"] for d in letters} == {"cj:callbacks"}
    assert {(d["group"], d["consumer"]) for d in letters} == {(CJ_GROUP, "c1")}
    assert (await read_dead_letters(r, keys, stream="lps:requests"))["total"] == 0
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
    # The valid callbacks on either side of them were applied: one for an unknown batch is
    # counted in the namespace's stats, the other accepted.
    assert await r.hget(pkeys.stats(keys), "orphans_unknown_batch") == b"1"
    state = await load_state(r, keys, "b1")
    assert state is not None and (state.completed, state.in_flight) == (1, 1)
    # And the consumer goes on with what comes next (a callback flat as session 5 wrote it:
    # `type` first, still read).
    await r.xadd(keys.callbacks, {"type": "ComparisonFailed", "data": "[]"})
    await r.xadd(keys.callbacks, session_5_form(codec.encode(completed("b1", "c1"))))
    assert await consumer.step() == 2
    state = await load_state(r, keys, "b1")
    # ... as far as the next wave, which that last callback completed.
    assert state is not None and (state.completed, state.scored_wave, state.waves) == (2, 1, 2)
    assert (await read_dead_letters(r, keys))["total"] == 7
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0


async def test_undecodable_requests_are_dead_lettered_with_their_xack_and_the_worker_goes_on(
    r: Any, keys: Keys
) -> None:
    judge = Judge()
    worker = LPSWorker(r, keys, "lps-1", lambda _: judge, block_ms=10)
    await worker.start()
    try:
        bad_ids = [
            (await r.xadd(keys.requests, {"type": "ComparisonRequested", "data": "{}"})).decode(),
            (await r.xadd(keys.requests, codec.encode(completed("b1", "c0")))).decode(),
        ]
        await r.xadd(keys.requests, codec.encode(request("b1", "c1")))
        with recording() as recorder:
            assert await worker.step() == 3
        _moved_together(recorder, keys, "lps:requests", bad_ids)
        await r.xadd(keys.requests, codec.encode(request("b1", "c2")))
        assert await worker.step() == 1
    finally:
        await worker.close()
    view = await read_dead_letters(r, keys, stream="lps:requests")
    letters = sorted(view["dead_letters"], key=lambda d: d["source_id"])
    assert [(d["reason"], d["source_id"]) for d in letters] == [
        ("invalid_data", bad_ids[0]),
        ("unexpected_type", bad_ids[1]),
    ]
    assert {(d["group"], d["consumer"]) for d in letters} == {(LPS_GROUP, "lps-1")}
    assert judge.judged == ["c1", "c2"]
    callbacks = [decode_callback(f) for _, f in await r.xrange(keys.callbacks)]
    assert [c.correlation_id for c in callbacks] == ["c1", "c2"]
    assert (await r.xpending(keys.requests, LPS_GROUP))["pending"] == 0


async def test_a_page_of_letters_is_one_call_each_letter_written_once_and_parked_if_asked(
    r: Any, keys: Keys
) -> None:
    """One script call moves a page: per letter its id, None for an entry another call moved
    already (exactly once, letter by letter), and only the letters asked for parked."""
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    for k in range(4):
        await r.xadd(keys.callbacks, {"junk": str(k)})
    reply = await r.xreadgroup(CJ_GROUP, "a", {keys.callbacks: ">"}, count=10)
    entries = [Entry(i.decode(), f) for i, f in reply[0][1]]
    ids = [e.entry_id for e in entries]
    error = codec.DecodeError("missing_field", "junk")
    policy = DeadLetterPolicy(max_entry_bytes=256, maxlen=1000, retention_s=3600)
    first = await dead_letter(r, keys, "cj:callbacks", [(entries[1], error)], CJ_GROUP, "a")
    assert first[0]
    with recording() as recorder:
        page = await dead_letter(
            r,
            keys,
            "cj:callbacks",
            [(e, error) for e in entries],
            CJ_GROUP,
            "b",
            policy=policy,
            park=frozenset({ids[2]}),
        )
    assert _moved_together(recorder, keys, "cj:callbacks", ids) == 1
    assert page[1] is None and all(page[k] for k in (0, 2, 3))
    letters = {i.decode(): f for i, f in await r.xrange(keys.dlq("cj:callbacks"))}
    assert set(letters) == {first[0], page[0], page[2], page[3]}
    assert {f[b"source_id"].decode() for f in letters.values()} == set(ids)
    parked = await r.hgetall(keys.dlq_parked("cj:callbacks"))
    assert {k.decode(): v.decode() for k, v in parked.items()} == {ids[2]: page[2]}
    assert (
        await dead_letter(r, keys, "cj:callbacks", [(e, error) for e in entries], CJ_GROUP, "c")
        == [None] * 4
    )
    assert (await r.xpending(keys.callbacks, CJ_GROUP))["pending"] == 0
