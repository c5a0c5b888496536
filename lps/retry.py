"""The one retry policy: every provider attempt goes through here, so every attempt is seen.

Bounded attempts; Retry-After honoured (never shortened; a little jitter on top so that
workers woken by the same Retry-After do not all call at once) unless it exceeds
`max_retry_after_s`, in which case we stop instead of hammering early; exponential
backoff with jitter otherwise; a bound on the total time spent waiting. With a shared
`Cooldown`, a 429/529 seen by one worker makes every worker wait before its next call
to that provider/model.

The caller (the LPS worker) gets one `on_attempt_failed(attempt, detail, will_retry,
delay_s, usage=, cost_usd=)` per failed attempt, in order, before any sleep, and turns it
into a `ProviderAttemptFailed` event; `record_attempt_failed` counts it in the metrics. So:
HTTP calls == failed attempts + (1 if the outcome is a judgement else 0). A billed failure
(an answer that was no valid judgement) passes its usage and cost; the outcome sums the
cost of every attempt.

A provider behind the shared limiter (`lps.limiter.LimitedProvider`) first waits for its
turn: a place among the worker's concurrent calls and the limiter's grant (then the
cooldown, if any, is waited out).

With a shared `Breaker`, each attempt then asks it for leave: an open breaker ends the
request at once with the breaker's error and no call (`Outcome.rejected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from events.types import NANO_USD, ComparisonRequested, ErrorDetail, TokenUsage, nano_usd
from lps.breaker import Breaker
from lps.cooldown import Cooldown
from lps.limiter import Call, LimitedProvider
from lps.metrics import LPS_PROVIDER_ERRORS, LPS_RETRIES
from lps.providers.base import Judgement, Provider, ProviderError

Sleep = Callable[[float], Awaitable[None]]


class OnAttemptFailed(Protocol):
    def __call__(
        self,
        attempt: int,
        detail: ErrorDetail,
        will_retry: bool,
        delay: float,
        *,
        usage: TokenUsage,
        cost_usd: float,
    ) -> Awaitable[None]: ...


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    """Attempts in all, the first included."""
    base_delay_s: float = 0.5
    """Backoff ceiling of the first retry; doubles per retry, up to `max_delay_s`."""
    max_delay_s: float = 20.0
    max_retry_after_s: float = 60.0
    """A Retry-After longer than this is not waited for: the attempt fails for good."""
    retry_after_jitter: float = 0.1
    """A Retry-After of r seconds is waited as r * (1 + U(0, retry_after_jitter))."""
    max_total_delay_s: float = 180.0
    """No retry whose delay would take the total waited past this."""

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Jittered exponential backoff after failed attempt `attempt` (1-based):
        uniform in [c/2, c] with c = min(max_delay_s, base_delay_s * 2**(attempt-1))."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return rng.uniform(ceiling / 2, ceiling)

    def delay_for(
        self, attempt: int, detail: ErrorDetail, rng: random.Random, *, waited_s: float = 0.0
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when not to retry."""
        if not detail.retryable or attempt >= self.max_attempts:
            return None
        if detail.retry_after_s is not None:
            if detail.retry_after_s > self.max_retry_after_s:
                return None
            ra = max(0.0, detail.retry_after_s)
            delay = ra * (1.0 + rng.uniform(0.0, self.retry_after_jitter))
        else:
            delay = self.backoff(attempt, rng)
        if waited_s + delay > self.max_total_delay_s:
            return None
        return delay


@dataclass(frozen=True)
class Outcome:
    judgement: Judgement | None
    error: ErrorDetail | None
    attempts: int
    waited_s: float = 0.0
    """Seconds slept between attempts and for cooldowns."""
    cost_usd: float = 0.0
    """What every attempt cost, the failed ones included."""
    usage: TokenUsage | None = None
    """The last attempt's usage when it failed billed (the judgement carries its own)."""
    rejected: bool = False
    """Ended by an open breaker before the call its `error` names was made."""


def record_attempt_failed(
    detail: ErrorDetail, will_retry: bool, *, provider: str = "", model: str = ""
) -> None:
    """Count one failed attempt: `lps_provider_errors_total` and, if retried, `lps_retries_total`.

    `provider`/`model` fill in when the detail does not carry them.
    """
    p = detail.provider or provider
    m = detail.model or model
    LPS_PROVIDER_ERRORS.labels(provider=p, model=m, error_type=detail.error_type).inc()
    if will_retry:
        LPS_RETRIES.labels(provider=p, model=m, error_type=detail.error_type).inc()


def _direct(
    provider: Provider,
) -> Callable[[ComparisonRequested], contextlib.AbstractAsyncContextManager[Call]]:
    @contextlib.asynccontextmanager
    async def turn(request: ComparisonRequested) -> AsyncIterator[Call]:
        yield lambda: provider.judge(request)

    return turn


async def judge_with_retries(
    provider: Provider,
    request: ComparisonRequested,
    policy: RetryPolicy,
    on_attempt_failed: OnAttemptFailed,
    *,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    cooldown: Cooldown | None = None,
    breaker: Breaker | None = None,
) -> Outcome:
    """Judge `request`, retrying per `policy`. Never raises ProviderError; other exceptions
    (bugs, cancellation) propagate."""
    rng = rng or random.Random()
    attempt = 0
    waited = 0.0
    spent = 0  # nano-dollars
    # A provider behind the shared limiter waits for its turn (lps.limiter) before the breaker
    # is asked: the breaker's leave is for a call made now, not after a queue.
    turn = provider.turn if isinstance(provider, LimitedProvider) else _direct(provider)
    while True:
        # The turn first: calls waiting for one touch nothing (Redis included), so a worker's
        # concurrency bounds its Redis connections too.
        async with turn(request) as call:
            # Cooldown and breaker are awaited only when a recent read does not already say
            # "go" (`clear_now`, `admit_now`, `settled_now`): two coroutines less per call
            # (issue 11), the same decisions.
            if cooldown is not None and not cooldown.clear_now(provider.name, request.model):
                budget = max(0.0, policy.max_total_delay_s - waited)
                cap = min(budget, policy.max_retry_after_s)
                waited += await cooldown.wait(provider.name, request.model, sleep, max_wait_s=cap)
            ticket = None
            if breaker is not None:
                ticket = breaker.admit_now(provider.name, request.model) or await breaker.admit(
                    provider.name, request.model, request.correlation_id
                )
                if ticket.rejected is not None:
                    return Outcome(
                        None, ticket.rejected, attempt, waited, spent / NANO_USD, rejected=True
                    )
            attempt += 1
            try:
                judgement = await call()
            except ProviderError as exc:
                detail, usage, cost = exc.detail, exc.usage, exc.cost_usd
            except BaseException:
                if breaker is not None and ticket is not None:
                    breaker.release(ticket)
                raise
            else:
                if (
                    breaker is not None
                    and ticket is not None
                    and not breaker.settled_now(ticket, None)
                ):
                    await breaker.settle(ticket, None)
                total = (spent + nano_usd(judgement.cost_usd)) / NANO_USD
                return Outcome(judgement, None, attempt, waited, total)
            if breaker is not None and ticket is not None:
                await breaker.settle(ticket, detail)
        spent += nano_usd(cost)
        if cooldown is not None:
            await cooldown.note_error(detail, provider=provider.name, model=request.model)
        delay = policy.delay_for(attempt, detail, rng, waited_s=waited)
        await on_attempt_failed(
            attempt, detail, delay is not None, delay or 0.0, usage=usage, cost_usd=cost
        )
        if delay is None:
            return Outcome(None, detail, attempt, waited, spent / NANO_USD, usage=usage)
        await sleep(delay)
        waited += delay
