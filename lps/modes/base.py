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

from events.types import ComparisonRequested
from lps.breaker import Breaker
from lps.providers.base import Provider
from lps.recorder import Recorder, Unit
from lps.retry import RetryPolicy
from streams.keys import Keys
from streams.reader import Entry

__all__ = ["ModeContext", "ModeUnit", "Unit"]


@dataclass(frozen=True)
class ModeContext:
    provider: Callable[[str], Provider]
    """The provider of that name, built once per worker; raises if unknown or unusable."""
    judge: Callable[[Entry, ComparisonRequested], Awaitable[None]]
    """Judge one request under the retry policy and commit its callback (callback XADD,
    request XACK and done marker in one MULTI/EXEC); a bad provider fails that request."""
    record: Recorder
    """Bundles and failed attempts recorded, outcomes obtained without the retry loop (a
    Message Batch item) committed."""
    breaker: Breaker
    """Asked before a call that `judge` does not make (creating a Message Batch)."""
    policy: RetryPolicy
    """The one retry policy, for what is retried outside `judge` (Message Batch items)."""
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
