"""Message Batches mode through the real SDK: submit, poll, match by custom_id, classify."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from events import codec
from events.types import BundleDispatched, ComparisonRequested, Essay, new_id
from lps.message_batches import ItemFailure, MessageBatches, custom_id_for
from lps.prompt import TOOL_NAME, build_prompt
from lps.providers.anthropic import AnthropicProvider
from lps.providers.base import Judgement, ProviderError
from tests.anthropic_server import (
    AnthropicTestServer,
    Reply,
    batch_canceled,
    batch_errored,
    batch_expired,
    client_env,
    http_client,
    max_tokens_reply,
    rate_limited,
    refusal_reply,
    running_server,
    server_error,
    success,
    tool_reply,
)

MODEL = "claude-sonnet-4-6"


def make_requests(n: int, **kw: object) -> list[ComparisonRequested]:
    return [
        ComparisonRequested(
            **{  # type: ignore[arg-type]
                "batch_id": "b1",
                "correlation_id": new_id(),
                "wave": 1,
                "essay_a": Essay(f"e{i}", f"Essay number {i}."),
                "essay_b": Essay(f"f{i}", f"Another essay {i}."),
                "mode": "batch_api",
                "provider": "anthropic",
                "model": MODEL,
                **kw,
            }
        )
        for i in range(n)
    ]


@pytest.fixture
def server() -> Iterator[AnthropicTestServer]:
    with running_server() as s:
        yield s


@pytest.fixture
def env(server: AnthropicTestServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client_env(monkeypatch, server, tmp_path)


@pytest.fixture
async def batches(env: None) -> AsyncIterator[MessageBatches]:
    provider = AnthropicProvider.from_env(http_client=http_client())
    yield MessageBatches(provider)
    await provider.aclose()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_submit_sends_one_batch_of_cacheable_forced_tool_calls(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    requests = make_requests(3)
    submitted = await batches.submit_bundle(requests)
    assert submitted.message_batch_id == "msgbatch_0001"
    assert submitted.rejected == {}
    assert server.calls("/v1/messages") == []  # no per-request calls
    [create] = server.calls("/v1/messages/batches")
    items = create.body["requests"]
    assert [i["custom_id"] for i in items] == [r.correlation_id for r in requests]
    assert submitted.custom_ids == {r.correlation_id: r.correlation_id for r in requests}
    for item, request in zip(items, requests, strict=True):
        params = item["params"]
        assert params["model"] == MODEL
        assert params["tool_choice"] == {"type": "tool", "name": TOOL_NAME}
        assert params["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "5m"}
        assert params["system"] == items[0]["params"]["system"]
        assert request.essay_a.text in params["messages"][0]["content"][0]["text"]


async def test_poll_until_ended_then_match_results_by_custom_id(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    server.batch_polls_until_end = 3
    requests = make_requests(4)
    winners = ["essay_a", "essay_b", "essay_b", "essay_a"]
    for request, winner, conf in zip(requests, winners, [1, 2, 4, 5], strict=True):
        server.batch_results[request.correlation_id] = success(winner, conf, f"j-{winner}")
    submitted = await batches.submit_bundle(requests)
    assert submitted.message_batch_id is not None
    assert await batches.poll(submitted.message_batch_id, requests) is None
    assert await batches.poll(submitted.message_batch_id, requests) is None
    results = await batches.poll(submitted.message_batch_id, requests)
    assert results is not None and set(results) == {r.correlation_id for r in requests}
    for request, winner, conf in zip(requests, winners, [1, 2, 4, 5], strict=True):
        j = results[request.correlation_id]
        assert isinstance(j, Judgement)
        assert (j.winner, j.confidence) == (winner, float(conf))
        assert j.prompt_sha256 == build_prompt(request).sha256
        assert j.usage.output_tokens == 40
    # polling an ended batch again gives the same answer (idempotent)
    again = await batches.poll(submitted.message_batch_id, requests)
    assert again == results


async def test_a_bundle_of_two_batches_with_the_same_numbered_ids_gets_one_result_each(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    """Correlation ids are numbered per batch: a Message Batch holding requests of two CJ
    batches has two requests `1`; each is its own item and gets its own result."""
    ones = [
        *make_requests(1, batch_id="b1", correlation_id="1"),
        *make_requests(1, batch_id="b2", correlation_id="1"),
    ]
    server.batch_results["b1-1"] = success("essay_a", 1, "j-b1")
    server.batch_results["b2-1"] = success("essay_b", 5, "j-b2")
    submitted = await batches.submit_bundle(ones)
    assert submitted.message_batch_id is not None
    assert submitted.custom_ids == {"b1:1": "b1-1", "b2:1": "b2-1"}
    [create] = server.calls("/v1/messages/batches")
    assert [i["custom_id"] for i in create.body["requests"]] == ["b1-1", "b2-1"]
    results = await batches.poll(submitted.message_batch_id, ones)
    assert results is not None and set(results) == {"b1:1", "b2:1"}
    first, second = results["b1:1"], results["b2:1"]
    assert isinstance(first, Judgement) and isinstance(second, Judgement)
    assert (first.winner, second.winner) == ("essay_a", "essay_b")


async def test_item_outcomes_are_classified(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    requests = make_requests(8)
    outcomes: list[Reply | dict[str, Any]] = [
        batch_errored("overloaded_error", "busy"),
        batch_errored("invalid_request_error", "bad params"),
        batch_errored("api_error", "oops"),
        batch_expired(),
        batch_canceled(),
        max_tokens_reply(),
        refusal_reply(),
        tool_reply({"winner": "essay_a", "justification": "j", "confidence": 0}),
    ]
    expected = [
        ("overloaded", True),
        ("invalid_request", False),
        ("server_error", True),
        ("expired", True),
        ("expired", True),
        ("max_tokens", False),
        ("refusal", False),
        ("parse_error", True),
    ]
    for request, outcome in zip(requests, outcomes, strict=True):
        server.batch_results[request.correlation_id] = outcome
    submitted = await batches.submit_bundle(requests)
    assert submitted.message_batch_id is not None
    results = await batches.poll(submitted.message_batch_id, requests)
    assert results is not None
    for request, (error_type, retryable) in zip(requests, expected, strict=True):
        f = results[request.correlation_id]
        assert isinstance(f, ItemFailure), f
        d = f.detail
        assert (d.error_type, d.retryable) == (error_type, retryable)
        assert (d.provider, d.model, d.correlation_id) == (
            "anthropic",
            MODEL,
            request.correlation_id,
        )
    assert "canceled" in results[requests[4].correlation_id].detail.message  # type: ignore[union-attr]
    # answers that were no judgement were billed all the same: usage and cost travel with them
    for billed in requests[5:]:
        f = results[billed.correlation_id]
        assert isinstance(f, ItemFailure) and f.usage.output_tokens == 40 and f.cost_usd > 0
    for free in requests[:5]:
        f = results[free.correlation_id]
        assert isinstance(f, ItemFailure) and f.cost_usd == 0


async def test_every_request_gets_exactly_one_result(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    submitted_requests = make_requests(2)
    submitted = await batches.submit_bundle(submitted_requests)
    assert submitted.message_batch_id is not None
    stray = make_requests(1)  # pending with us, but never part of this batch
    results = await batches.poll(submitted.message_batch_id, [*submitted_requests, stray[0]])
    assert results is not None and len(results) == 3
    missing = results[stray[0].correlation_id]
    assert isinstance(missing, ItemFailure) and missing.detail.error_type == "server_error"
    assert all(isinstance(results[r.correlation_id], Judgement) for r in submitted_requests)


async def test_cancel_ends_items_as_expired(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    server.batch_polls_until_end = 100
    requests = make_requests(2)
    submitted = await batches.submit_bundle(requests)
    assert submitted.message_batch_id is not None
    status = await batches.cancel(submitted.message_batch_id)
    assert status.ended and status.counts["canceled"] == 2
    results = await batches.poll(submitted.message_batch_id, requests)
    assert results is not None
    assert {r.detail.error_type for r in results.values() if isinstance(r, ItemFailure)} == {
        "expired"
    }


async def test_resume_after_restart_from_the_dispatch_event(
    env: None, server: AnthropicTestServer
) -> None:
    server.batch_polls_until_end = 2
    requests = make_requests(3)
    first = AnthropicProvider.from_env()
    submitted = await MessageBatches(first).submit_bundle(requests)
    assert submitted.message_batch_id is not None
    event = BundleDispatched(
        bundle_id=new_id(),
        mode="batch_api",
        provider="anthropic",
        model=MODEL,
        consumer="lps-1",
        correlation_ids=[r.correlation_id for r in requests],
        batch_ids=["b1"],
        size=len(requests),
        provider_batch_id=submitted.message_batch_id,
    )
    entry: dict[bytes | str, bytes | str] = {k: v for k, v in codec.encode(event).items()}
    await first.aclose()  # the worker dies

    # a new worker: the pending requests plus the batch id from the event are enough
    decoded = codec.decode(entry)
    assert isinstance(decoded, BundleDispatched) and decoded.provider_batch_id is not None
    second = AnthropicProvider.from_env()
    try:
        resumed = MessageBatches(second)
        assert await resumed.poll(decoded.provider_batch_id, requests) is None
        results = await resumed.poll(decoded.provider_batch_id, requests)
    finally:
        await second.aclose()
    assert results is not None and set(results) == set(decoded.correlation_ids)
    assert len(server.calls("/v1/messages/batches")) == 1  # nothing was submitted twice


async def test_unrenderable_items_are_rejected_without_sinking_the_bundle(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    good = make_requests(2)
    bad = make_requests(1, prompt_version="v999")
    submitted = await batches.submit_bundle([good[0], bad[0], good[1]])
    assert set(submitted.rejected) == {bad[0].correlation_id}
    assert submitted.rejected[bad[0].correlation_id].error_type == "invalid_request"
    items = server.calls("/v1/messages/batches")[0].body["requests"]
    assert [i["custom_id"] for i in items] == [good[0].correlation_id, good[1].correlation_id]
    # all rejected: no batch is created at all
    only_bad = await batches.submit_bundle(make_requests(2, overrides={"temperature": "0"}))
    assert only_bad.message_batch_id is None and len(only_bad.rejected) == 2
    assert len(server.calls("/v1/messages/batches")) == 1


async def test_create_failure_is_classified(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    server.script_batch_create(rate_limited(retry_after=7))
    with pytest.raises(ProviderError) as info:
        await batches.submit_bundle(make_requests(2))
    d = info.value.detail
    assert (d.error_type, d.retryable, d.retry_after_s, d.status_code) == (
        "rate_limit",
        True,
        7.0,
        429,
    )


async def test_unknown_batch_is_an_invalid_request(batches: MessageBatches) -> None:
    with pytest.raises(ProviderError) as info:
        await batches.poll("msgbatch_nope", make_requests(1))
    assert (info.value.detail.error_type, info.value.detail.status_code) == (
        "invalid_request",
        404,
    )


async def test_tokens_of_batch_results_are_counted(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    at = {"provider": "anthropic", "model": MODEL}
    before = sample("lps_tokens_total", **at, kind="output_tokens")
    requests = make_requests(3)
    server.batch_results[requests[0].correlation_id] = refusal_reply()
    submitted = await batches.submit_bundle(requests)
    assert submitted.message_batch_id is not None
    assert await batches.poll(submitted.message_batch_id, requests) is not None
    assert sample("lps_tokens_total", **at, kind="output_tokens") - before == 3 * 40


def test_custom_ids() -> None:
    # A random correlation id of before alone, as Message Batches sent before the upgrade
    # hold it; a numbered one with its batch: unique in a Message Batch mixing CJ batches.
    assert custom_id_for("b1", "0123abcdef") == "0123abcdef"
    assert custom_id_for("b1", "12") == "b1-12"
    assert custom_id_for("b1", "12") != custom_id_for("b2", "12")
    assert custom_id_for("b-1", "2") != custom_id_for("b", "12")
    odd = custom_id_for("b1", "batch:1/corr 2")
    assert odd.startswith("h") and len(odd) == 41 and odd == custom_id_for("b2", "batch:1/corr 2")
    assert custom_id_for("b1", "x" * 65) != "x" * 65
    dotted = custom_id_for("v1.2", "7")  # a batch id the API does not take: hashed, stably
    assert dotted.startswith("h") and dotted == custom_id_for("v1.2", "7")
    assert dotted != custom_id_for("v1.2", "8")


async def test_duplicate_correlation_ids_are_refused(batches: MessageBatches) -> None:
    [r] = make_requests(1)
    with pytest.raises(ValueError, match="duplicate"):
        await batches.submit_bundle([r, r])


async def test_every_results_failure_is_classified_and_polling_again_recovers(
    batches: MessageBatches, server: AnthropicTestServer
) -> None:
    requests = make_requests(2)
    submitted = await batches.submit_bundle(requests)
    assert submitted.message_batch_id is not None
    server.null_results_url_polls = 2  # our status read, then the SDK's own in results()
    server.script_results(
        Reply(200, b'{"custom_id": "x", "result": {"type": "succ'),  # a line cut short
        Reply(200, b"<html>502 Bad Gateway</html>"),
        Reply(200, {"custom_id": "a"}, truncate=True),
        Reply(drop=True),
        server_error(503),
    )
    seen = []
    for _ in range(6):  # null results_url (AnthropicError), then each scripted fault
        with pytest.raises(ProviderError) as info:
            await batches.poll(submitted.message_batch_id, requests)
        d = info.value.detail
        seen.append((d.error_type, d.retryable))
        assert d.provider == "anthropic" and d.message
        if len(seen) == 1:  # the SDK raised AnthropicError, not an API error
            assert "results_url" in d.message and d.message.startswith("AnthropicError")
    assert all(retryable for _, retryable in seen), seen
    results = await batches.poll(submitted.message_batch_id, requests)
    assert results is not None and all(isinstance(v, Judgement) for v in results.values())
