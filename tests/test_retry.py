"""The retry policy through the real SDK: Retry-After, backoff, attempt accounting, cooldown."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from cj import metrics as cj_metrics
from events.types import ComparisonRequested, ErrorDetail, Essay, TokenUsage
from lps import metrics as lps_metrics
from lps.cooldown import Cooldown
from lps.providers.anthropic import AnthropicProvider
from lps.retry import Outcome, RetryPolicy, judge_with_retries, record_attempt_failed
from streams import metrics as stream_metrics
from streams.keys import Keys
from tests.anthropic_server import (
    AnthropicTestServer,
    Reply,
    client_env,
    drop_connection,
    error_reply,
    http_client,
    max_tokens_reply,
    overloaded,
    rate_limited,
    running_server,
    server_error,
    spend_limited,
    success,
    tool_reply,
)

MODEL = "claude-sonnet-4-6"


@dataclass
class FakeTime:
    """A clock that only moves when the code under test sleeps: no wall-clock waits."""

    now: float = 1_000_000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class Attempts:
    seen: list[tuple[int, ErrorDetail, bool, float]] = field(default_factory=list)
    costs: list[tuple[TokenUsage, float]] = field(default_factory=list)

    async def __call__(
        self,
        attempt: int,
        detail: ErrorDetail,
        will_retry: bool,
        delay: float,
        *,
        usage: TokenUsage,
        cost_usd: float,
    ) -> None:
        self.seen.append((attempt, detail, will_retry, delay))
        self.costs.append((usage, cost_usd))


def make_request(correlation_id: str = "corr-r1") -> ComparisonRequested:
    return ComparisonRequested(
        batch_id="b1",
        correlation_id=correlation_id,
        wave=1,
        essay_a=Essay("e1", "First essay."),
        essay_b=Essay("e2", "Second essay."),
        provider="anthropic",
        model=MODEL,
    )


@pytest.fixture
def server() -> Iterator[AnthropicTestServer]:
    with running_server() as s:
        yield s


@pytest.fixture
async def provider(
    server: AnthropicTestServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[AnthropicProvider]:
    client_env(monkeypatch, server, tmp_path)
    p = AnthropicProvider.from_env(http_client=http_client())
    yield p
    await p.aclose()


async def run(
    provider: AnthropicProvider,
    policy: RetryPolicy | None = None,
    *,
    clock: FakeTime | None = None,
    cooldown: Cooldown | None = None,
    request: ComparisonRequested | None = None,
    seed: int = 7,
) -> tuple[Outcome, Attempts, FakeTime]:
    clock = clock or FakeTime()
    attempts = Attempts()
    outcome = await judge_with_retries(
        provider,
        request or make_request(),
        policy or RetryPolicy(),
        attempts,
        rng=random.Random(seed),
        sleep=clock.sleep,
        cooldown=cooldown,
    )
    return outcome, attempts, clock


def assert_accounting(server: AnthropicTestServer, outcome: Outcome, attempts: Attempts) -> None:
    """HTTP calls == failed attempts (one event each) + the success, if any."""
    succeeded = 1 if outcome.judgement is not None else 0
    assert len(server.calls()) == len(attempts.seen) + succeeded == outcome.attempts
    assert [a[0] for a in attempts.seen] == list(range(1, len(attempts.seen) + 1))


# --- Retry-After ---------------------------------------------------------------


async def test_retry_after_seconds_is_honoured(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    server.script(rate_limited(retry_after=2), success())
    outcome, attempts, clock = await run(provider)
    assert outcome.judgement is not None and outcome.attempts == 2
    [delay] = clock.sleeps
    assert 2.0 <= delay <= 2.0 * 1.1
    [(attempt, detail, will_retry, reported)] = attempts.seen
    assert (attempt, detail.error_type, will_retry, reported) == (1, "rate_limit", True, delay)
    assert detail.retry_after_s == 2.0
    assert_accounting(server, outcome, attempts)


async def test_retry_after_ms_wins_over_retry_after(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    server.script(rate_limited(retry_after_ms=250, retry_after=9), success())
    outcome, attempts, clock = await run(provider)
    assert outcome.judgement is not None
    assert 0.25 <= clock.sleeps[0] <= 0.25 * 1.1
    assert_accounting(server, outcome, attempts)


async def test_retry_after_beyond_the_cap_is_not_waited_for(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    server.script(rate_limited(retry_after=600))
    outcome, attempts, clock = await run(provider, RetryPolicy(max_retry_after_s=60))
    assert outcome.error is not None and outcome.error.error_type == "rate_limit"
    assert outcome.error.retry_after_s == 600.0
    assert clock.sleeps == []
    assert attempts.seen[0][2] is False
    assert_accounting(server, outcome, attempts)


async def test_spend_limit_is_not_retried(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    server.script(spend_limited(), success())
    outcome, attempts, clock = await run(provider)
    assert outcome.error is not None
    assert (outcome.error.error_type, outcome.error.retryable) == ("rate_limit", False)
    assert clock.sleeps == [] and outcome.attempts == 1
    assert_accounting(server, outcome, attempts)


# --- backoff and bounds --------------------------------------------------------


async def test_overloaded_backs_off_exponentially_with_jitter(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    server.script(overloaded(), overloaded(), overloaded(), success())
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=20)
    outcome, attempts, clock = await run(provider, policy)
    assert outcome.judgement is not None and outcome.attempts == 4
    d1, d2, d3 = clock.sleeps
    assert 0.25 <= d1 <= 0.5 and 0.5 <= d2 <= 1.0 and 1.0 <= d3 <= 2.0
    assert [a[1].error_type for a in attempts.seen] == ["overloaded"] * 3
    assert_accounting(server, outcome, attempts)


async def test_backoff_is_capped(provider: AnthropicProvider, server: AnthropicTestServer) -> None:
    server.script(*[server_error()] * 5, success())
    policy = RetryPolicy(max_attempts=6, base_delay_s=1, max_delay_s=2, max_total_delay_s=1000)
    outcome, attempts, clock = await run(provider, policy)
    assert outcome.judgement is not None
    assert all(d <= 2.0 for d in clock.sleeps)
    assert_accounting(server, outcome, attempts)


async def test_attempts_are_bounded(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    server.script(*[server_error(503)] * 10)
    outcome, attempts, clock = await run(provider, RetryPolicy(max_attempts=3))
    assert outcome.error is not None and outcome.error.error_type == "server_error"
    assert outcome.attempts == 3 and len(clock.sleeps) == 2
    assert [a[2] for a in attempts.seen] == [True, True, False]
    assert server.pending_script() == 7
    assert_accounting(server, outcome, attempts)


async def test_total_delay_is_bounded(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    server.script(rate_limited(retry_after=4), rate_limited(retry_after=4), success())
    policy = RetryPolicy(max_attempts=5, max_total_delay_s=6)
    outcome, attempts, clock = await run(provider, policy)
    assert outcome.error is not None and outcome.attempts == 2
    assert len(clock.sleeps) == 1 and sum(clock.sleeps) <= 6
    assert_accounting(server, outcome, attempts)


@pytest.mark.parametrize(
    "reply",
    [
        error_reply(400, "invalid_request_error"),
        error_reply(401, "authentication_error"),
        max_tokens_reply(),
    ],
    ids=["400", "401", "max_tokens"],
)
async def test_non_retryable_errors_end_at_once(
    provider: AnthropicProvider, server: AnthropicTestServer, reply: Reply
) -> None:
    server.script(reply, success())
    outcome, attempts, clock = await run(provider)
    assert outcome.error is not None and outcome.attempts == 1 and clock.sleeps == []
    assert_accounting(server, outcome, attempts)


async def test_parse_error_and_connection_error_are_retried(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    bad = tool_reply({"winner": "essay_a", "justification": "j", "confidence": 9})
    server.script(bad, drop_connection(), success("essay_b", 2))
    outcome, attempts, _ = await run(provider)
    assert outcome.judgement is not None and outcome.judgement.winner == "essay_b"
    assert [a[1].error_type for a in attempts.seen] == ["parse_error", "connection"]
    assert_accounting(server, outcome, attempts)


@pytest.mark.parametrize("seed", range(6))
async def test_accounting_holds_for_random_fault_scripts(
    provider: AnthropicProvider, server: AnthropicTestServer, seed: int
) -> None:
    rng = random.Random(seed)
    faults = [
        rate_limited(retry_after=1),
        overloaded(),
        server_error(),
        drop_connection(),
        rate_limited(retry_after_ms=100),
        error_reply(504, "timeout_error"),
    ]
    script = [rng.choice(faults) for _ in range(rng.randint(0, 5))]
    end = rng.choice([success(), error_reply(400, "invalid_request_error"), server_error()])
    server.script(*script, end)
    outcome, attempts, _ = await run(provider, RetryPolicy(max_attempts=4), seed=seed)
    assert_accounting(server, outcome, attempts)
    assert (outcome.judgement is None) == (outcome.error is not None)


# --- metrics helper ---------------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_record_attempt_failed_counts_errors_and_retries(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    err = {"provider": "anthropic", "model": MODEL}
    e429 = sample("lps_provider_errors_total", **err, error_type="rate_limit")
    e529 = sample("lps_provider_errors_total", **err, error_type="overloaded")
    r429 = sample("lps_retries_total", **err, error_type="rate_limit")
    r529 = sample("lps_retries_total", **err, error_type="overloaded")
    server.script(rate_limited(retry_after=1), overloaded(), overloaded())
    attempts = Attempts()

    async def on_failed(
        attempt: int,
        detail: ErrorDetail,
        will_retry: bool,
        delay: float,
        *,
        usage: TokenUsage,
        cost_usd: float,
    ) -> None:
        record_attempt_failed(detail, will_retry)
        await attempts(attempt, detail, will_retry, delay, usage=usage, cost_usd=cost_usd)

    clock = FakeTime()
    outcome = await judge_with_retries(
        provider,
        make_request(),
        RetryPolicy(max_attempts=3),
        on_failed,
        rng=random.Random(1),
        sleep=clock.sleep,
    )
    assert outcome.error is not None and outcome.attempts == 3
    assert sample("lps_provider_errors_total", **err, error_type="rate_limit") - e429 == 1
    assert sample("lps_provider_errors_total", **err, error_type="overloaded") - e529 == 2
    assert sample("lps_retries_total", **err, error_type="rate_limit") - r429 == 1
    # the last overloaded attempt was not retried
    assert sample("lps_retries_total", **err, error_type="overloaded") - r529 == 1


def test_record_attempt_failed_fills_missing_labels() -> None:
    before = sample("lps_provider_errors_total", provider="p", model="m", error_type="timeout")
    record_attempt_failed(
        ErrorDetail(error_type="timeout", retryable=True, message="t"),
        False,
        provider="p",
        model="m",
    )
    assert sample("lps_provider_errors_total", provider="p", model="m", error_type="timeout") == (
        before + 1
    )


# --- shared cooldown ------------------------------------------------------------------


async def test_rate_limit_cools_down_every_worker(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    clock = FakeTime()
    redis: Any = fakeredis.FakeAsyncRedis()
    cooldown = Cooldown(redis, Keys("t:"), clock=clock.clock)
    # worker 1 meets a 429 asking for 3 s, waits it out and succeeds
    server.script(rate_limited(retry_after=3))
    w1 = Attempts()
    outcome1 = await judge_as_worker(provider, clock, cooldown, w1, "corr-w1")
    assert outcome1.judgement is not None
    sleeps_w1 = list(clock.sleeps)
    assert len(sleeps_w1) == 1 and 3.0 <= sleeps_w1[0] <= 3.3  # not twice: the cooldown is over

    # worker 2 starts at the moment of worker 1's 429, before the 3 s are over
    clock2 = FakeTime(now=clock.now - sleeps_w1[0])
    cooldown2 = Cooldown(redis, Keys("t:"), clock=clock2.clock)
    calls_before = len(server.calls())
    w2 = Attempts()
    outcome2 = await judge_with_retries(
        provider,
        make_request("corr-w2"),
        RetryPolicy(),
        w2,
        rng=random.Random(2),
        sleep=clock2.sleep,
        cooldown=cooldown2,
    )
    assert outcome2.judgement is not None and outcome2.attempts == 1 and w2.seen == []
    # worker 2 waited out the shared cooldown before its first call, then made one call
    assert clock2.sleeps == [pytest.approx(3.0)]
    assert outcome2.waited_s == pytest.approx(3.0)
    assert len(server.calls()) == calls_before + 1
    await redis.aclose()


async def judge_as_worker(
    provider: AnthropicProvider, clock: FakeTime, cooldown: Cooldown, attempts: Attempts, corr: str
) -> Outcome:
    return await judge_with_retries(
        provider,
        make_request(corr),
        RetryPolicy(),
        attempts,
        rng=random.Random(3),
        sleep=clock.sleep,
        cooldown=cooldown,
    )


async def test_overload_without_retry_after_sets_the_default_cooldown(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    clock = FakeTime()
    redis: Any = fakeredis.FakeAsyncRedis()
    cooldown = Cooldown(redis, Keys("t:"), clock=clock.clock, default_s={"overloaded": 2.0})
    server.script(overloaded())
    outcome, attempts, _ = await run(provider, clock=clock, cooldown=cooldown)
    assert outcome.judgement is not None
    # backoff (<= 0.5 s) first, then the rest of the 2 s cooldown before the next call
    assert sum(clock.sleeps) == pytest.approx(2.0)
    assert outcome.waited_s == pytest.approx(2.0)
    assert_accounting(server, outcome, attempts)
    await redis.aclose()


# --- policy units ---------------------------------------------------------------------


def test_delay_for_rules() -> None:
    rng = random.Random(0)
    policy = RetryPolicy(max_attempts=3, retry_after_jitter=0.0)
    ra = ErrorDetail(error_type="rate_limit", retryable=True, message="", retry_after_s=5)
    assert policy.delay_for(1, ra, rng) == 5.0
    assert policy.delay_for(3, ra, rng) is None  # attempts used up
    final = ErrorDetail(error_type="billing", retryable=False, message="")
    assert policy.delay_for(1, final, rng) is None
    assert policy.delay_for(1, ra, rng, waited_s=176.0) is None  # total delay bound


# --- the alert rules and the operations doc speak of real metrics -----------------------

ROOT = Path(__file__).resolve().parent.parent
_METRIC = re.compile(r"\b((?:lps|cj|events)_[a-z_]+)\b")
_KIND = re.compile(r'kind=~?"([^"]+)"')


def known_series() -> set[str]:
    out: set[str] = set()
    for module in (stream_metrics, cj_metrics, lps_metrics):
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                for family in obj.describe():
                    if family.type == "counter":
                        out.add(family.name + "_total")
                    elif family.type == "histogram":
                        out |= {family.name + s for s in ("_bucket", "_count", "_sum")}
                    else:
                        out.add(family.name)
    return out


def test_alert_rules_are_well_formed_and_use_known_metrics() -> None:
    doc = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert len({r["alert"] for r in rules}) == len(rules) >= 10
    series = known_series()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        used = set(_METRIC.findall(rule["expr"]))
        assert used <= series, (rule["alert"], used - series)
        for kinds in _KIND.findall(rule["expr"]):
            assert set(kinds.split("|")) <= set(TokenUsage.__struct_fields__)


def test_operations_doc_uses_known_metrics_and_names_every_alert() -> None:
    text = (ROOT / "docs/operations.md").read_text()
    queries = "\n".join(re.findall(r"```promql\n(.*?)```", text, flags=re.S))
    assert "lps_provider_errors_total" in queries and "lps_retries_total" in queries
    assert "cache_read_input_tokens" in queries
    used = set(_METRIC.findall(queries))
    assert used <= known_series(), used - known_series()
    for kinds in _KIND.findall(queries):
        assert set(kinds.split("|")) <= set(TokenUsage.__struct_fields__)
    doc = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] in text, rule["alert"]


# --- end to end through the LPS worker: one callback per request, every attempt an event ---


async def test_worker_every_request_one_callback_and_every_attempt_an_event(
    provider: AnthropicProvider, server: AnthropicTestServer
) -> None:
    from events import codec
    from events.types import ComparisonCompleted, ComparisonFailed, ProviderAttemptFailed
    from lps.worker import LPSWorker

    r: Any = fakeredis.FakeAsyncRedis()
    keys = Keys("e2e:")
    server.script(
        rate_limited(retry_after_ms=5),
        overloaded(),
        success(),
        server_error(502),
        drop_connection(),
        error_reply(400, "invalid_request_error"),
        success("essay_b", 2),
        tool_reply({"winner": "essay_c", "justification": "j", "confidence": 3}),
        spend_limited(),
        max_tokens_reply(),
    )  # then successes
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.002)
    worker = LPSWorker(
        r, keys, "w1", lambda name: provider, policy=policy, concurrency=3, block_ms=20
    )
    await worker.start()
    requests = [make_request(f"corr-e2e-{i}") for i in range(8)]
    for request in requests:
        await r.xadd(keys.requests, codec.encode(request))
    try:
        for _ in range(50):
            await worker.step()
            if await r.xlen(keys.callbacks) >= len(requests):
                break
    finally:
        await worker.committer.stop()
    callbacks = [codec.decode(f) for _, f in await r.xrange(keys.callbacks)]
    dispatches = [codec.decode(f) for _, f in await r.xrange(keys.dispatches)]
    attempts_failed = [e for e in dispatches if isinstance(e, ProviderAttemptFailed)]
    completed = [c for c in callbacks if isinstance(c, ComparisonCompleted)]
    failed = [c for c in callbacks if isinstance(c, ComparisonFailed)]
    finished: list[ComparisonCompleted | ComparisonFailed] = [*completed, *failed]
    # exactly one callback per request
    assert len(finished) == len(callbacks)
    assert sorted(c.correlation_id for c in finished) == sorted(q.correlation_id for q in requests)
    # every HTTP call is either a ProviderAttemptFailed or a ComparisonCompleted
    assert len(server.calls()) == len(attempts_failed) + len(completed)
    # attempts on the callbacks agree with the events
    for c in finished:
        mine = [a for a in attempts_failed if a.correlation_id == c.correlation_id]
        assert c.attempts == len(mine) + (1 if isinstance(c, ComparisonCompleted) else 0)
    assert {f.error.error_type for f in failed} <= {
        "invalid_request",
        "rate_limit",
        "max_tokens",
        "parse_error",
        "server_error",
        "connection",
        "overloaded",
    }
    assert await r.xpending(keys.requests, "lps") == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    await r.aclose()
