"""What a mode runs against: `ModeContext`, the few services of the LPS worker a mode needs.

A mode judges one unit of requests (one request, or a bundle of requests sharing mode,
provider, model and overrides; see `lps.modes.plan_units`). The worker builds the context
and picks the mode by name, so no mode imports the worker. While a unit runs, its entries
stay pending and the worker keeps them alive; a mode only has to end every request of its
unit with a committed result or hand it back with `release`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from events.types import BundleDispatched, ComparisonRequested, ErrorDetail, TokenUsage
from lps.breaker import Breaker
from lps.providers.base import Provider
from lps.retry import Outcome, RetryPolicy
from streams.keys import Keys
from streams.reader import Entry

Unit = list[tuple[Entry, ComparisonRequested]]


class Dispatch(Protocol):
    async def __call__(
        self,
        unit: Unit,
        *,
        message_batch_id: str | None = None,
        same_transaction: Callable[[Any], object] | None = None,
    ) -> BundleDispatched:
        """Record the unit as one bundle (`BundleDispatched` on `lps:dispatches`, bundle-size
        metric). `same_transaction` adds commands to the MULTI/EXEC that appends the record."""
        ...


class Fail(Protocol):
    async def __call__(
        self,
        entry: Entry,
        req: ComparisonRequested,
        detail: ErrorDetail,
        *,
        attempt: int = 1,
        usage: TokenUsage | None = None,
        cost_usd: float = 0.0,
        spent_usd: float = 0.0,
        call_made: bool = True,
    ) -> None:
        """Commit a final failure, recorded as failed provider attempt number `attempt`
        (none when `call_made` is False: an open breaker stopped it). `usage`/`cost_usd`:
        that attempt's, when billed; `spent_usd`: what the earlier attempts cost."""
        ...


class AttemptFailed(Protocol):
    async def __call__(
        self,
        req: ComparisonRequested,
        attempt: int,
        detail: ErrorDetail,
        will_retry: bool,
        delay: float = 0.0,
        *,
        usage: TokenUsage | None = None,
        cost_usd: float = 0.0,
    ) -> None:
        """Record one failed attempt that is retried (event and metrics), committing nothing."""
        ...


@dataclass(frozen=True)
class ModeContext:
    provider: Callable[[str], Provider]
    """The provider of that name, built once per worker; raises if unknown or unusable."""
    judge: Callable[[Entry, ComparisonRequested], Awaitable[None]]
    """Judge one request under the retry policy and commit its callback (callback XADD,
    request XACK and done marker in one MULTI/EXEC); a bad provider fails that request."""
    finish: Callable[[Entry, ComparisonRequested, Outcome], Awaitable[None]]
    """Commit an outcome obtained without the retry loop (a Message Batch item)."""
    fail: Fail
    attempt_failed: AttemptFailed
    breaker: Breaker
    """Asked before a call that `judge` does not make (creating a Message Batch)."""
    policy: RetryPolicy
    """The one retry policy, for what is retried outside `judge` (Message Batch items)."""
    dispatch: Dispatch
    release: Callable[[Unit], Awaitable[None]]
    """Hand requests not started back to the group, for a live worker to take at once."""
    stopping: Callable[[], bool]
    """True once the worker is shutting down: start nothing new, release the rest."""
    wait_or_stop: Callable[[float], Awaitable[None]]
    """Sleep that many seconds, or less if the worker starts shutting down."""
    r: Any
    """The Redis client, for what a mode keeps itself (the Message Batch index)."""
    keys: Keys
    poll_interval_s: float
    """How often a running Message Batch is polled."""


class ModeUnit(Protocol):
    async def __call__(self, ctx: ModeContext, unit: Unit) -> None: ...
