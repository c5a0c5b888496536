"""Essays by reference: requests name essays by id (and the batch's content key), LPS resolves
them from the batch's essay store (cached, checked against the key); first-version references
(with the text's hash) and old requests that embed texts are judged as before."""

from __future__ import annotations

from typing import Any

import msgspec

from cj.continuation import decide
from cj.registration import append_registration
from events import codec
from events.types import (
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    Essay,
    content_key,
    text_sha256,
)
from lps.essays import EssayStore
from lps.prompt import build_prompt
from lps.providers.mock import PROFILES, MockProvider
from lps.worker import LPSWorker
from projections import keys as pkeys
from projections.batch import register
from streams.keys import Keys
from tests.helpers import registration

TEXT = "word " * 400  # 2 KB


def _long_registration(batch_id: str = "b1") -> Any:
    reg = registration(8, batch_id=batch_id)
    essays = [msgspec.structs.replace(e, text=f"{e.essay_id} {TEXT}") for e in reg.essays]
    return msgspec.structs.replace(reg, essays=essays)


def _requests(reg: Any) -> list[ComparisonRequested]:
    decision = decide(register(reg))
    assert decision is not None and decision.requests
    return decision.requests


def test_requests_name_essays_by_id_alone_and_stay_small() -> None:
    reg = _long_registration()
    for req in _requests(reg):
        for essay in (req.essay_a, req.essay_b):
            assert essay.is_reference and essay == Essay(essay.essay_id)
        assert req.content_key == content_key(reg.essays, reg.config.grade_scale)
        # 2 KB texts, yet the entry is about 300 bytes: no text, hash or anchor in it.
        data = b" ".join(codec.encode(req).values())  # a flat entry (events/codec.py)
        assert len(data) < 300
        assert b'"text"' not in data and b"sha256" not in data and b"anchor" not in data


def test_old_requests_embedding_texts_still_decode() -> None:
    old = (
        b'{"event_id":"e","occurred_at":"2026-01-01T00:00:00.000000Z","batch_id":"b",'
        b'"correlation_id":"c","wave":1,"essay_a":{"essay_id":"a","text":"alpha"},'
        b'"essay_b":{"essay_id":"b","text":"beta","is_anchor":true,"anchor_grade":"C"}}'
    )
    req = codec.decode({b"type": b"ComparisonRequested", b"data": old})
    assert isinstance(req, ComparisonRequested)
    assert req.essay_a.text == "alpha" and not req.essay_a.is_reference
    assert req.essay_b.anchor_grade == "C"


async def test_store_resolves_with_one_read_per_batch_and_the_same_prompt(
    fake_redis: Any, keys: Keys
) -> None:
    reg = _long_registration()
    await append_registration(fake_redis, keys, reg)
    store = EssayStore(fake_redis, keys)
    requests = _requests(reg)
    for req in requests:
        resolved = await store.resolve(req)
        assert isinstance(resolved, ComparisonRequested)
        embedded = msgspec.structs.replace(
            req,
            essay_a=next(e for e in reg.essays if e.essay_id == req.essay_a.essay_id),
            essay_b=next(e for e in reg.essays if e.essay_id == req.essay_b.essay_id),
        )
        # An audit rebuilds the exact prompt from the reference and the registered texts.
        assert build_prompt(resolved).sha256 == build_prompt(embedded).sha256
    assert store.reads == 1
    # Old requests pass through without a read.
    embedded_only = msgspec.structs.replace(
        requests[0], essay_a=Essay("x", "one"), essay_b=Essay("y", "two")
    )
    assert await store.resolve(embedded_only) is embedded_only
    assert store.reads == 1


async def test_missing_or_changed_text_fails_the_request(fake_redis: Any, keys: Keys) -> None:
    reg = _long_registration()
    await append_registration(fake_redis, keys, reg)
    req = _requests(reg)[0]
    store = EssayStore(fake_redis, keys)
    unknown = msgspec.structs.replace(req, essay_b=Essay("nobody"))
    problem = await store.resolve(unknown)
    assert not isinstance(problem, ComparisonRequested) and "'nobody'" in problem.message
    gone = msgspec.structs.replace(req, batch_id="nope")
    problem = await store.resolve(gone)
    assert not isinstance(problem, ComparisonRequested) and "not in the batch" in problem.message
    # The store holds other texts than the batch was planned on: its key is not the request's.
    other = [msgspec.structs.replace(e, text=e.text + "!") for e in reg.essays]
    await fake_redis.hset(
        pkeys.batch_docs(keys, reg.batch_id), "essays", msgspec.json.encode(other)
    )
    store = EssayStore(fake_redis, keys)
    problem = await store.resolve(req)
    assert not isinstance(problem, ComparisonRequested)
    assert problem.error_type == "invalid_request" and "content key" in problem.message
    assert store.reads == 2  # the cached store was read again before failing
    # A first-version reference names its text by hash: a changed text is caught by it.
    first_version = msgspec.structs.replace(
        req, essay_a=Essay(req.essay_a.essay_id, sha256=text_sha256("another text"))
    )
    problem = await store.resolve(first_version)
    assert not isinstance(problem, ComparisonRequested)
    assert problem.error_type == "invalid_request" and "sha256" in problem.message


async def test_first_version_references_still_resolve(fake_redis: Any, keys: Keys) -> None:
    reg = _long_registration()
    await append_registration(fake_redis, keys, reg)
    req = _requests(reg)[0]
    registered = {e.essay_id: e for e in reg.essays}
    first_version = msgspec.structs.replace(
        req,
        essay_a=msgspec.structs.replace(
            registered[req.essay_a.essay_id],
            text="",
            sha256=text_sha256(registered[req.essay_a.essay_id].text),
        ),
        content_key="",
    )
    data = codec.encode(first_version)
    decoded = codec.decode(data)
    assert isinstance(decoded, ComparisonRequested) and decoded.essay_a.is_reference
    resolved = await EssayStore(fake_redis, keys).resolve(decoded)
    assert isinstance(resolved, ComparisonRequested)
    assert resolved.essay_a.text == registered[req.essay_a.essay_id].text
    assert resolved.essay_b == registered[req.essay_b.essay_id]


async def test_worker_judges_references_and_fails_unresolvable_ones(
    fake_redis: Any, keys: Keys
) -> None:
    r = fake_redis
    reg = _long_registration()
    await append_registration(r, keys, reg)
    requests = _requests(reg)[:4]
    orphan = msgspec.structs.replace(requests[-1], batch_id="unregistered", correlation_id="zz")
    worker = LPSWorker(r, keys, "w", lambda _: MockProvider(PROFILES["ideal"], seed=1))
    await worker.start()
    for req in [*requests, orphan]:
        await r.xadd(keys.requests, codec.encode(req))
    assert await worker.step() == 5
    await worker.close()
    callbacks = [codec.decode(f) for _, f in await r.xrange(keys.callbacks)]
    done = [c for c in callbacks if isinstance(c, ComparisonCompleted)]
    failed = [c for c in callbacks if isinstance(c, ComparisonFailed)]
    assert len(done) == 4 and {c.correlation_id for c in done} == {
        q.correlation_id for q in requests
    }
    assert [c.correlation_id for c in failed] == ["zz"]
    assert failed[0].error.error_type == "invalid_request" and not failed[0].error.retryable
    assert (await r.xpending(keys.requests, "lps"))["pending"] == 0
    assert await r.hexists(pkeys.batch_docs(keys, reg.batch_id), "essays")
