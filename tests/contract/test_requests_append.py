"""A decision's requests, appended by one script call (cj/continuation.py `queue_requests`,
issue 11), on every engine: the same entries, in the same order, as an XADD each, inside the
decision's MULTI."""

from __future__ import annotations

from typing import Any

from cj.continuation import queue_requests
from events import codec
from events.types import ComparisonRequested, Essay
from streams.keys import Keys


def _requests(n: int) -> list[ComparisonRequested]:
    return [
        ComparisonRequested(
            batch_id="b1",
            correlation_id=str(k),
            wave=1 + k % 3,
            essay_a=Essay(f"e{k}"),
            essay_b=Essay(f"e{k + 1}"),
            mode="per_request" if k % 2 else "batch_api",
            provider="mock",
            model="mock-1",
            # An overridden field, a non-ASCII one and defaults: entries of different lengths.
            preferred_bundle_size=1 + k % 4,
            prompt_version="v1" if k % 5 else "vé",
            content_key="c" * (k % 7),
        )
        for k in range(n)
    ]


async def _entries(r: Any, stream: str) -> list[list[tuple[bytes, bytes]]]:
    """Each entry's fields and values, in their order."""
    return [list(fields.items()) for _, fields in await r.xrange(stream)]


async def test_the_requests_are_the_entries_of_an_xadd_each(r: Any, keys: Keys) -> None:
    requests = _requests(40)
    one_by_one, at_once = keys.key("each"), keys.key("all")
    async with r.pipeline(transaction=True) as pipe:
        for request in requests:
            pipe.xadd(one_by_one, codec.encode(request))
        queue_requests(pipe, at_once, requests)
        await pipe.execute()
    expected = await _entries(r, one_by_one)
    assert len(expected) == 40
    assert await _entries(r, at_once) == expected
    assert [codec.decode(dict(f)) for f in expected] == [
        codec.decode(codec.encode(q)) for q in requests
    ]


async def test_no_request_writes_nothing(r: Any, keys: Keys) -> None:
    stream = keys.key("none")
    async with r.pipeline(transaction=True) as pipe:
        queue_requests(pipe, stream, [])
        pipe.set(keys.key("marker"), "1")
        await pipe.execute()
    assert await r.exists(stream) == 0
