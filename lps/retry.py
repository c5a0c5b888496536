"""The one retry policy: every provider attempt goes through here, so every attempt is seen.

Bounded attempts, exponential backoff with full jitter, Retry-After honoured up to a cap.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from events.types import ComparisonRequested, ErrorDetail
from lps.providers.base import Judgement, Provider, ProviderError

OnAttemptFailed = Callable[[int, ErrorDetail, bool, float], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 20.0
    max_retry_after_s: float = 60.0

    def delay_for(self, attempt: int, detail: ErrorDetail, rng: random.Random) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when not to retry."""
        if not detail.retryable or attempt >= self.max_attempts:
            return None
        if detail.retry_after_s is not None:
            if detail.retry_after_s > self.max_retry_after_s:
                return None
            return max(0.0, detail.retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Outcome:
    judgement: Judgement | None
    error: ErrorDetail | None
    attempts: int


async def judge_with_retries(
    provider: Provider,
    request: ComparisonRequested,
    policy: RetryPolicy,
    on_attempt_failed: OnAttemptFailed,
    *,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
) -> Outcome:
    rng = rng or random.Random()
    attempt = 0
    while True:
        attempt += 1
        try:
            return Outcome(await provider.judge(request), None, attempt)
        except ProviderError as exc:
            detail = exc.detail
        delay = policy.delay_for(attempt, detail, rng)
        await on_attempt_failed(attempt, detail, delay is not None, delay or 0.0)
        if delay is None:
            return Outcome(None, detail, attempt)
        await sleep(delay)
