"""Builders shared by the tests."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from cj.continuation import Decision, advance, queue_decision
from cj.registration import BatchIn, append_registration, build_registration, scale_of
from events import codec
from events.streams import CJ_GROUP
from events.types import (
    BatchRegistered,
    Callback,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    ErrorDetail,
    Essay,
    Mode,
    PairRequest,
    WaveSubmitted,
)
from lps.providers.base import Judgement
from projections.batch import BatchState
from projections.replay import replay
from projections.store import encode_state, load_state, read_raw
from streams.keys import Keys
from streams.paging import read_stream


def batch_in(n: int = 6, anchors: int = 2) -> BatchIn:
    grades = ["F", "E", "D", "C", "B", "A"]
    essays: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "essay_id": f"e{i}",
            "text": f"essay number {i} " * (i + 1),
            "mock_quality": (i - n / 2) / 2,
        }
        if i < anchors:
            row["anchor_grade"] = grades[min(len(grades) - 1, i * 2)]
        essays.append(row)
    return BatchIn.model_validate({"essays": essays})


def registration(
    n: int = 6,
    *,
    budget: int | None = None,
    seed: int = 1,
    mode: Mode = "per_request",
    batch_id: str | None = None,
    **kw: Any,
) -> BatchRegistered:
    b = batch_in(n)
    name, grades = scale_of(b)
    return build_registration(
        b,
        name,
        grades,
        budget=budget,
        seed=seed,
        mode=mode,
        batch_id=batch_id,
        **kw,
    )


def wave(batch_id: str, number: int, pairs: list[tuple[str, str, str]]) -> WaveSubmitted:
    return WaveSubmitted(
        batch_id=batch_id, wave=number, pairs=[PairRequest(c, a, b) for c, a, b in pairs]
    )


def completed(
    batch_id: str,
    cid: str,
    winner: str = "essay_a",
    a: str = "e0",
    b: str = "e1",
    *,
    cost_usd: float = 0.0,
) -> ComparisonCompleted:
    return ComparisonCompleted(
        batch_id=batch_id,
        correlation_id=cid,
        essay_a_id=a,
        essay_b_id=b,
        winner=winner,  # type: ignore[arg-type]
        confidence=3.0,
        cost_usd=cost_usd,
    )


def answer(q: ComparisonRequested, winner: str = "essay_a") -> ComparisonCompleted:
    """The callback answering request `q`: its correlation id and its essays, in its order."""
    return completed(q.batch_id, q.correlation_id, winner, q.essay_a.essay_id, q.essay_b.essay_id)


def naming(callback: Any, a: str, b: str) -> Any:
    """`callback` naming essays `a` and `b` instead."""
    return msgspec.structs.replace(callback, essay_a_id=a, essay_b_id=b)


async def answers(
    r: Any, keys: Keys, batch_id: str, cids: list[str], **kw: Any
) -> list[ComparisonCompleted]:
    """A completed callback for each of `cids`, naming the essays the batch's projection
    recorded for it (a callback naming others answers no request: an orphan)."""
    state = await load_state(r, keys, batch_id)
    assert state is not None
    return [completed(batch_id, c, "essay_a", *state.pairs[c][1:], **kw) for c in cids]


def failed(
    batch_id: str,
    cid: str,
    error_type: str = "server_error",
    *,
    cost_usd: float = 0.0,
    error_code: str | None = None,
    a: str = "e0",
    b: str = "e1",
) -> ComparisonFailed:
    return ComparisonFailed(
        batch_id=batch_id,
        correlation_id=cid,
        essay_a_id=a,
        essay_b_id=b,
        error=ErrorDetail(
            error_type=error_type,  # type: ignore[arg-type]
            retryable=False,
            message="x",
            error_code=error_code,
        ),
        cost_usd=cost_usd,
    )


def decode_callback(fields: Any, entry_id: str | None = None) -> Callback:
    """An entry of the callbacks stream, decoded: a callback, whichever kind."""
    event = codec.decode(fields, entry_id)
    assert isinstance(event, ComparisonCompleted | ComparisonFailed), event
    return event


def session_5_form(fields: dict[str, bytes]) -> dict[str, bytes]:
    """A flat entry (`codec.encode`) as session 5 wrote it: `type` and the type's name first,
    where the type now names the first field (events/codec.py)."""
    (type_name, _), *rest = fields.items()
    return {"type": type_name.encode(), **dict(rest)}


def request(batch_id: str, cid: str, mode: Mode = "per_request") -> ComparisonRequested:
    return ComparisonRequested(
        batch_id=batch_id,
        correlation_id=cid,
        wave=1,
        essay_a=Essay("e0", "first essay"),
        essay_b=Essay("e1", "second essay"),
        mode=mode,
        provider="mock",
        model="mock-1",
    )


class Judge:
    """A provider that prefers essay A at once and notes what it judged."""

    name = "mock"
    supports_message_batches = False

    def __init__(self) -> None:
        self.judged: list[str] = []

    async def judge(self, request: ComparisonRequested) -> Judgement:
        self.judged.append(request.correlation_id)
        return Judgement(winner="essay_a", confidence=3.0, justification="a")

    async def aclose(self) -> None:
        return None


async def append_and_read(r: Any, keys: Keys, events: list[Any], consumer: str = "t") -> list[str]:
    """Append callbacks to the callbacks stream and deliver them to `consumer` of the cj group."""
    ids = []
    for event in events:
        ids.append((await r.xadd(keys.callbacks, codec.encode(event))).decode())
    await r.xreadgroup(CJ_GROUP, consumer, {keys.callbacks: ">"}, count=len(events) + 10)
    return ids


async def snapshot(r: Any, keys: Keys, batch_id: str) -> dict[str, dict[str, str]]:
    raw = await read_raw(r, keys, batch_id)
    return {
        k: {
            (f.decode() if isinstance(f, bytes) else f): (v.decode() if isinstance(v, bytes) else v)
            for f, v in m.items()
        }
        for k, m in raw.items()
    }


def canonical(state: Any, keys: Keys) -> dict[str, dict[str, str]]:
    return encode_state(state, keys)


async def replay_equals_live(r: Any, keys: Keys, batch_id: str) -> BatchState:
    """The batch replayed from the streams, asserted equal to its live projection."""
    replayed: BatchState = (await replay(r, keys, {batch_id}))[0][batch_id]
    assert await snapshot(r, keys, batch_id) == canonical(replayed, keys)
    return replayed


async def append_batch_event(r: Any, keys: Keys, event: Any) -> None:
    """Append a batch event CJ writes itself, with its projection write, in one MULTI/EXEC."""
    state = await load_state(r, keys, event.batch_id)
    assert state is not None, event.batch_id
    async with r.pipeline(transaction=True) as pipe:
        pipe.multi()
        queue_decision(pipe, keys, state, Decision(events=[event]))
        await pipe.execute()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Await a condition Redis cannot signal: poll it, with a deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def events_of(r: Any, stream: str) -> list[tuple[str, Any]]:
    """Every entry of `stream`, decoded: [(entry id, event)]."""
    return [(i, codec.decode(f)) async for i, f in read_stream(r, stream)]


async def batch_with_wave(
    r: Any, keys: Keys, n: int = 6, **kw: Any
) -> tuple[str, list[ComparisonRequested]]:
    """A registered batch advanced to its first wave: its id and its requests."""
    reg = registration(n, batch_id=f"b-{uuid.uuid4().hex[:8]}", **kw)
    await append_registration(r, keys, reg)
    await advance(r, keys, reg.batch_id)
    requests = [
        e for _, e in await events_of(r, keys.requests) if isinstance(e, ComparisonRequested)
    ]
    return reg.batch_id, [q for q in requests if q.batch_id == reg.batch_id]


async def deliver_to(r: Any, stream: str, group: str, consumer: str) -> list[str]:
    """Read everything new into `consumer` (a consumer that then 'dies')."""
    reply = await r.xreadgroup(group, consumer, {stream: ">"}, count=10_000)
    return [i.decode() for _, items in reply for i, _ in items]


def run_cli(env: dict[str, str], *args: str) -> Any:
    """`cjs ARGS` in this process with `env` (a click Result)."""
    from click.testing import CliRunner

    from tools.cli import main

    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def cli_json(env: dict[str, str], *args: str, code: int = 0) -> Any:
    """`cjs ARGS --json`'s one JSON object, the command having exited with `code`."""
    result = run_cli(env, *args)
    assert result.exit_code == code, (args, result.output)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


async def apply_callbacks(
    r: Any, applier: Any, callbacks: list[Any], ids: list[str], *, page: bool = True
) -> list[Any]:
    """callback.lua on each (callback, entry id) as the CJ consumer runs it: the page in one
    script call (on a Redis Cluster too); `page=False`: a script call each, pipelined (as a
    redrive applies parked letters), or on a Redis Cluster (which refuses a pipelined
    EVALSHA) one call at a time."""
    from streams.durability import is_cluster

    if page:
        return list(await applier.apply_page(list(zip(callbacks, ids, strict=True))))
    if is_cluster(r):
        return [await applier.apply(c, i) for c, i in zip(callbacks, ids, strict=True)]
    async with r.pipeline(transaction=False) as pipe:
        for callback, entry_id in zip(callbacks, ids, strict=True):
            await applier.queue(pipe, callback, entry_id)
        return list(await pipe.execute())
