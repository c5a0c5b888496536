"""Every atomic unit the production code sends keeps its keys in one Redis Cluster slot.

Each scenario runs one piece of production code (a registration, a decision, a commit, a
dead letter ...) on the engine and records what its client sends (tests/contract/recording.py):
every MULTI/EXEC (with its WATCH and the reads under it), every script call and every
multi-key command. The keys of each unit are found the way redis-py's cluster client finds
them (`AsyncCommandsParser`, from the COMMAND table of a real redis-server), then hashed
(`redis.crc.key_slot`).

Under the namespace's hash-tagged prefix (the engine's `{t...}:`, a deployment's
`CJS_PREFIX='{cjs}:'`, or one partition's `{p<k>}:`: `streams/keys.py`), every unit is in one
slot. Units naming the keys of two partitions do not exist by construction: each partition's
keys come from its own `Keys` and each worker step works on one partition; the cluster tests
(tests/test_cluster.py, 6 partitions over 3 masters) run the whole pipeline where such a
unit would be refused with CROSSSLOT.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis._parsers.commands import AsyncCommandsParser
from redis.crc import key_slot

from cj.consumer import CJConsumer
from cj.continuation import advance
from cj.registration import append_registration
from cj.stalls import finalize_stalled
from events import codec
from events.streams import CJ_GROUP, LPS_GROUP
from events.types import ComparisonRequested, Mode
from lps.cooldown import Cooldown
from lps.message_batches import MessageBatches, PreparedBundle
from lps.modes import batch_api
from lps.providers.base import Judgement
from lps.worker import LPSWorker
from projections.replay import read_horizon
from projections.store import CallbackApplier
from streams.dlq import _DEAD_LETTER_LUA
from streams.keys import Keys
from streams.pending import pending_details, prune_consumer, release_entries
from streams.reader import Entry, ensure_group
from streams.trim import trim_below
from tests.contract.engines import ENGINES, Engine
from tests.contract.recording import Recorder, Unit, normalise, recording
from tests.helpers import (
    Judge,
    append_and_read,
    batch_with_wave,
    completed,
    deliver_to,
    events_of,
    registration,
    request,
)

Run = Callable[[Any, Keys, pytest.MonkeyPatch], Awaitable[Recorder]]


async def _worker(r: Any, keys: Keys, judge: Any = None, **kw: Any) -> LPSWorker:
    judge = judge or Judge()
    worker = LPSWorker(r, keys, "lps-1", lambda _: judge, block_ms=10, **kw)
    await worker.start()
    return worker


async def _requests(r: Any, keys: Keys, mode: Mode) -> list[tuple[Entry, ComparisonRequested]]:
    """Requests of two batches, appended (entries without their fields: units only need ids)."""
    out = []
    for i, batch_id in enumerate(["b1", "b2", "b1", "b2"]):
        q = request(batch_id, f"c{i}", mode=mode)
        out.append((Entry((await r.xadd(keys.requests, codec.encode(q))).decode(), {}), q))
    return out


# --- the scenarios: each records one kind of unit -------------------------------------------


async def registering(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    with recording() as rec:
        await append_registration(r, keys, registration(4, batch_id="b1"))
    return rec


async def next_wave(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    await append_registration(r, keys, registration(4, batch_id="b1"))
    with recording() as rec:
        assert await advance(r, keys, "b1") is not None
    return rec


async def batch_end(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    batch_id, requests = await batch_with_wave(r, keys, n=4, budget=4)
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    callbacks = [
        completed(batch_id, q.correlation_id, "essay_a", q.essay_a.essay_id, q.essay_b.essay_id)
        for q in requests
    ]
    ids = await append_and_read(r, keys, callbacks)
    async with r.pipeline(transaction=False) as pipe:
        for callback, entry_id in zip(callbacks, ids, strict=True):
            await CallbackApplier(r, keys, CJ_GROUP).queue(pipe, callback, entry_id)
        await pipe.execute()
    with recording() as rec:
        decision = await advance(r, keys, batch_id)
    assert decision is not None and decision.terminal is not None
    return rec


async def stalled_close(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    batch_id, _requests = await batch_with_wave(r, keys)
    with recording() as rec:
        assert await finalize_stalled(r, keys, batch_id, 0) is not None
    return rec


async def callback_apply(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    batch_id, requests = await batch_with_wave(r, keys)
    consumer = CJConsumer(r, keys, "cj-1")
    await consumer.start()
    callbacks = [completed(batch_id, requests[0].correlation_id), completed("no-batch", "x")]
    await append_and_read(r, keys, callbacks, consumer="cj-1")
    entries = [Entry(i.decode(), f) for i, f in await r.xrange(keys.callbacks)]
    with recording() as rec:
        await consumer.handle(entries)
    assert rec.scripts()
    return rec


async def lps_commit(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    worker = await _worker(r, keys, concurrency=4)
    await _requests(r, keys, "per_request")
    try:
        with recording() as rec:
            assert await worker.step() == 4
    finally:
        await worker.close()
    return rec


async def lps_expiry(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    await _requests(r, keys, "per_request")
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    ids = await deliver_to(r, keys.requests, LPS_GROUP, "dead")
    await r.xclaim(keys.requests, LPS_GROUP, "dead", 0, ids, idle=600_000, retrycount=3)
    worker = await _worker(r, keys, processing_timeout_s=0.5, max_deliveries=3)
    try:
        with recording() as rec:
            assert len(await worker.reclaim()) == 4
    finally:
        await worker.close()
    return rec


async def message_batch_dispatch(r: Any, keys: Keys, mp: pytest.MonkeyPatch) -> Recorder:
    class FakeMessageBatches:
        """The client calls the mode makes, answered at once (no provider)."""

        def prepare(self, requests: list[ComparisonRequested]) -> PreparedBundle:
            ids = {q.correlation_id: q.correlation_id for q in requests}
            return PreparedBundle([], ids, {}, "mock-judge-1")

        async def create(self, prepared: PreparedBundle) -> str:
            return "mb-1"

        async def poll(self, message_batch_id: str, requests: list[ComparisonRequested]) -> Any:
            return {q.correlation_id: Judgement("essay_a", 3.0, "j") for q in requests}

    class BatchJudge(Judge):
        supports_message_batches = True

    mp.setattr(MessageBatches, "of", classmethod(lambda cls, provider: FakeMessageBatches()))
    worker = await _worker(r, keys, BatchJudge())
    unit = await _requests(r, keys, "batch_api")
    await deliver_to(r, keys.requests, LPS_GROUP, "lps-1")
    try:
        with recording() as rec:
            await batch_api.run(worker.mode_context, unit)
    finally:
        await worker.close()
    assert len(await events_of(r, keys.callbacks)) == 4
    return rec


async def bundle_dispatch(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    worker = await _worker(r, keys)
    unit = await _requests(r, keys, "serial_bundle")
    try:
        with recording() as rec:
            await worker.record.dispatch(unit)
    finally:
        await worker.close()
    return rec


async def dead_lettering(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    consumer = CJConsumer(r, keys, "cj-1", block_ms=10)
    await consumer.start()
    worker = await _worker(r, keys)
    for stream in (keys.callbacks, keys.requests):
        await r.xadd(stream, {"type": "Nonsense", "data": "{}"})
    try:
        with recording() as rec:
            assert await consumer.step() == 1
            assert await worker.step() == 1
    finally:
        await worker.close()
    # One dead-letter script call per stream (its XACK and the letter together).
    sha = hashlib.sha1(_DEAD_LETTER_LUA.encode()).hexdigest()
    calls = [c for u in rec.scripts() for c in u.texts("EVALSHA") if c[1] == sha]
    assert len({c[3] for c in calls}) == 2, "one dead letter in each of the two streams"
    return rec


async def max_deliveries_dead_letter(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    consumer = CJConsumer(r, keys, "cj-1", processing_timeout_s=0.5, max_deliveries=3)
    await consumer.start()
    ids = await append_and_read(r, keys, [completed("b1", "c1")], consumer="dead")
    await r.xclaim(keys.callbacks, CJ_GROUP, "dead", 0, ids, idle=600_000, retrycount=3)
    with recording() as rec:
        [action] = await consumer.reclaim()
    assert action.action == "dead_lettered"
    return rec


async def release_at_shutdown(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    await _requests(r, keys, "serial_bundle")
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    ids = await deliver_to(r, keys.requests, LPS_GROUP, "lps-1")
    with recording() as rec:
        assert await release_entries(r, keys.requests, LPS_GROUP, "lps-1", ids, idle_ms=1) == 4
    return rec


async def consumer_prune(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    await r.xgroup_create(keys.requests, LPS_GROUP, id="0", mkstream=True)
    await r.xgroup_createconsumer(keys.requests, LPS_GROUP, "gone")
    with recording() as rec:
        assert await prune_consumer(r, keys.requests, LPS_GROUP, "gone", min_idle_ms=0)
    assert await pending_details(r, keys.requests, LPS_GROUP) == []
    return rec


async def replay_horizon(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    await batch_with_wave(r, keys)
    await r.xgroup_create(keys.callbacks, CJ_GROUP, id="0", mkstream=True)
    with recording() as rec:
        await read_horizon(r, keys)
    return rec


async def cooldown(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    with recording() as rec:
        assert await Cooldown(r, keys).trigger("anthropic", "m", 5.0) > 0
    return rec


async def archive_trim(r: Any, keys: Keys, _: pytest.MonkeyPatch) -> Recorder:
    await r.xadd(keys.callbacks, {"type": "x", "data": "{}"})
    with recording() as rec:
        await trim_below(r, keys.callbacks, "9999999999999-0")
    return rec


@dataclass(frozen=True)
class Scenario:
    run: Run
    # The kind of unit the scenario is about (it records at least one).
    kind: str


SCENARIOS: dict[str, Scenario] = {
    "registration": Scenario(registering, "transaction"),
    "advance: next wave": Scenario(next_wave, "transaction"),
    "advance: end of the batch": Scenario(batch_end, "transaction"),
    "stalled close": Scenario(stalled_close, "transaction"),
    "callback.lua": Scenario(callback_apply, "script"),
    "LPS commit": Scenario(lps_commit, "script"),
    "LPS expiry": Scenario(lps_expiry, "script"),
    "Message Batch dispatch": Scenario(message_batch_dispatch, "transaction"),
    "bundle dispatch": Scenario(bundle_dispatch, "transaction"),
    "dead-lettering": Scenario(dead_lettering, "script"),
    "dead-lettering after max deliveries": Scenario(max_deliveries_dead_letter, "script"),
    "release at shutdown": Scenario(release_at_shutdown, "transaction"),
    "consumer prune": Scenario(consumer_prune, "script"),
    "replay horizon": Scenario(replay_horizon, "transaction"),
    "cooldown": Scenario(cooldown, "script"),
    "archive trim": Scenario(archive_trim, "script"),
}


# --- keys and slots ---------------------------------------------------------------------------

pytestmark = pytest.mark.redis


@pytest.fixture
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """One engine is enough: the keys a unit touches are the production code's, whatever the
    engine; the real one, whose command table names them. (On a cluster engine every contract
    test checks this for real: a unit across slots is refused.)"""
    built = ENGINES["redis"](request)
    yield built
    await built.aclose()


@pytest.fixture
async def key_parser(shared_redis: Any) -> AsyncCommandsParser:
    """Keys of a command as redis-py's cluster client finds them: from a real server's table."""
    parser = AsyncCommandsParser()
    await parser.initialize(shared_redis)
    return parser


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def atomic_units(parser: AsyncCommandsParser, rec: Recorder) -> list[tuple[Unit, set[str]]]:
    """The recorded transactions, script calls and multi-key commands with their keys."""
    out = []
    for unit in rec.units:
        keys: set[str] = set()
        for call in unit.calls:
            found = await parser.get_keys(*(_text(a) for a in normalise(call)))
            keys.update(_text(k) for k in found or [])
        if unit.kind != "command" or len(keys) > 1:
            out.append((unit, keys))
    return out


class SpansSlots(AssertionError):
    """A unit whose keys hash to more than one slot."""


def one_slot(units: list[tuple[Unit, set[str]]]) -> None:
    """Every unit's keys hash to one slot."""
    for unit, keys in units:
        if len({key_slot(k.encode()) for k in keys}) > 1:
            raise SpansSlots(f"{unit.kind} {unit.names()} spans slots: {sorted(keys)}")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_every_unit_is_in_one_slot_under_a_hash_tagged_prefix(
    r: Any,
    keys: Keys,
    key_parser: AsyncCommandsParser,
    monkeypatch: pytest.MonkeyPatch,
    scenario: str,
) -> None:
    run, kind = SCENARIOS[scenario].run, SCENARIOS[scenario].kind
    units = await atomic_units(key_parser, await run(r, keys, monkeypatch))
    assert any(u.kind == kind for u, _ in units), f"no {kind} recorded"
    assert re.fullmatch(r"\{[^}]+\}:", keys.prefix)
    for _, unit_keys in units:
        assert all(k.startswith(keys.prefix) for k in unit_keys), unit_keys
    one_slot(units)


async def test_the_slot_check_sees_a_unit_across_slots(
    r: Any, keys: Keys, key_parser: AsyncCommandsParser
) -> None:
    """The check can fail: a transaction or a script reaching outside the tag is caught."""
    with recording() as rec:
        async with r.pipeline(transaction=True) as pipe:
            pipe.set(keys.key("a"), 1)
            pipe.set("elsewhere", 1)
            await pipe.execute()
        await r.eval("return 1", 2, keys.key("a"), "{other}:b")
    units = await atomic_units(key_parser, rec)
    assert [u.kind for u, _ in units] == ["transaction", "script"]
    for unit in units:
        with pytest.raises(AssertionError, match="spans slots"):
            one_slot([unit])
