"""A provider/model cooldown shared by every worker, in Redis.

After a 429 or 529 one worker sets `lps:cooldown:<provider>:<model>` to the time until
which nobody should call that provider/model (the server's Retry-After, else a short
default), and every worker waits for it before its next attempt. One rate limit then
costs one failed call instead of a storm of them.

The key holds the end of the cooldown as epoch seconds and expires with it (PX), so it
cleans itself up. A new cooldown only ever extends the one in force (a Lua script
compares and sets atomically). Redis trouble never blocks judging: the cooldown fails
open (logs, and reports no cooldown).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from events.types import ErrorDetail
from lps import keys as lkeys
from lps.single_flight import SingleFlight
from streams.keys import Keys

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# KEYS[1] cooldown key; ARGV[1] until (epoch s, decimal string); ARGV[2] ttl ms.
# Sets the key only if it extends the cooldown in force; returns the `until` in force.
_EXTEND = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local new = tonumber(ARGV[1])
if new > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return tostring(cur)
"""

COOLDOWN_ERROR_TYPES = frozenset({"rate_limit", "overloaded"})


@dataclass
class Cooldown:
    """Shared cooldown. `redis` is a `redis.asyncio.Redis` (or `fakeredis.FakeAsyncRedis`)."""

    redis: Any
    keys: Keys = field(default_factory=Keys)
    default_s: dict[str, float] = field(
        default_factory=lambda: {"rate_limit": 5.0, "overloaded": 2.0}
    )
    max_s: float = 120.0
    clock: Clock = time.time
    fresh_s: float = 0.0
    """Reuse a read for this long (per provider/model) instead of asking Redis before every
    call: at hundreds of calls a second the check was most of a worker's round trips. A
    cooldown set by another worker is then seen up to `fresh_s` late."""
    _seen: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict, repr=False)
    _flight: SingleFlight[tuple[str, str], float] = field(default_factory=SingleFlight, repr=False)

    async def remaining(self, provider: str, model: str, *, fresh: bool = False) -> float:
        """Seconds left in the cooldown of provider/model (0 when none); `fresh` asks Redis
        even when a recent read could be reused."""
        key = (provider, model)
        seen = self._seen.get(key)
        now = self.clock()
        if not fresh and seen is not None and now - seen[1] < self.fresh_s:
            return min(self.max_s, max(0.0, seen[0] - now))
        if fresh or self.fresh_s <= 0:
            until = await self._read(key, now)
        else:
            # Calls that miss the reusable read together share one GET (issue 11).
            until = await self._flight.run(key, lambda: self._read(key, now))
        return min(self.max_s, max(0.0, until - self.clock()))

    def clear_now(self, provider: str, model: str) -> bool:
        """Whether a reusable read (within `fresh_s`) found no cooldown in force now: then
        `wait` would sleep nothing, and need not be awaited (issue 11: most calls)."""
        seen = self._seen.get((provider, model))
        if seen is None:
            return False
        now = self.clock()
        return now - seen[1] < self.fresh_s and seen[0] - now <= 0

    async def _read(self, key: tuple[str, str], now: float) -> float:
        """The cooldown's end (epoch seconds; 0: none, or the read failed: fail open)."""
        try:
            raw = await self.redis.get(lkeys.cooldown(self.keys, *key))
        except Exception as exc:  # fail open
            log.warning("cooldown_read_failed", error_kind=type(exc).__name__)
            return 0.0
        return self._saw(key, raw, now)

    def _saw(self, key: tuple[str, str], raw: Any, now: float) -> float:
        try:
            until = 0.0 if raw is None else float(raw)
        except ValueError:
            until = 0.0
        self._seen[key] = (until, now)
        return until

    def due(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (provider, model) of `pairs` whose next call would read the cooldown: no read
        within `fresh_s` (never with `fresh_s` 0: then every call reads)."""
        if self.fresh_s <= 0:
            return []
        now = self.clock()
        seen = self._seen
        return [key for key in pairs if key not in seen or now - seen[key][1] >= self.fresh_s]

    def read_in(
        self, pipe: Any, due: list[tuple[str, str]]
    ) -> Callable[[list[Any] | BaseException], None]:
        """The reads `_read` would make for `due` (from `due`), queued on `pipe` (on this
        cooldown's Redis) and shared as `_read`'s are (`SingleFlight.along`); a failed one
        ends as `_read`'s does (logged, nothing learnt, no cooldown). The LPS worker sends
        them with its page's answered marks: a round trip less (issue 11)."""
        learn = functools.partial(self._learn, now=self.clock())
        return self._flight.along(pipe, due, self._queue_read, learn)

    def _queue_read(self, pipe: Any, key: tuple[str, str]) -> int:
        pipe.get(lkeys.cooldown(self.keys, *key))
        return 1

    def _learn(self, key: tuple[str, str], replies: list[Any] | BaseException, now: float) -> float:
        raw = replies if isinstance(replies, BaseException) else replies[0]
        if isinstance(raw, BaseException):  # fail open
            log.warning("cooldown_read_failed", error_kind=type(raw).__name__)
            return 0.0
        return self._saw(key, raw, now)

    async def trigger(self, provider: str, model: str, seconds: float) -> float:
        """Cool provider/model down for `seconds` (capped at `max_s`) unless a longer cooldown
        is already in force. Returns the seconds left of the cooldown now in force."""
        if not math.isfinite(seconds) or seconds <= 0:
            return await self.remaining(provider, model)
        seconds = min(seconds, self.max_s)
        now = self.clock()
        until = now + seconds
        ttl_ms = max(1, math.ceil(seconds * 1000))
        try:
            in_force = await self.redis.eval(
                _EXTEND, 1, lkeys.cooldown(self.keys, provider, model), repr(until), str(ttl_ms)
            )
        except Exception as exc:  # fail open
            log.warning("cooldown_write_failed", error_kind=type(exc).__name__)
            return 0.0
        try:
            until_in_force = float(in_force)
        except (TypeError, ValueError):
            return seconds
        self._seen[(provider, model)] = (until_in_force, now)
        return min(self.max_s, max(0.0, until_in_force - now))

    async def note_error(
        self, detail: ErrorDetail, *, provider: str | None = None, model: str | None = None
    ) -> float:
        """Start (or extend) a cooldown for a retryable 429/529-like error.

        The key is `provider`/`model` when given, else the detail's. Returns seconds in force.
        """
        if detail.error_type not in COOLDOWN_ERROR_TYPES or not detail.retryable:
            return 0.0
        seconds = detail.retry_after_s
        if seconds is None or seconds <= 0:
            seconds = self.default_s.get(detail.error_type, 0.0)
        return await self.trigger(
            detail.provider if provider is None else provider,
            detail.model if model is None else model,
            seconds,
        )

    async def clear(self, provider: str, model: str) -> None:
        await self.redis.delete(lkeys.cooldown(self.keys, provider, model))

    async def wait(
        self, provider: str, model: str, sleep: Sleep, *, max_wait_s: float | None = None
    ) -> float:
        """Sleep out the cooldown of provider/model (at most `max_wait_s` in all); returns the
        seconds slept. After each sleep it looks again: another worker may have extended the
        cooldown meanwhile."""
        slept = 0.0
        left = await self.remaining(provider, model)
        for _ in range(100):  # a clock that does not move must not spin us forever
            if left <= 0:
                break
            if max_wait_s is not None:
                left = min(left, max_wait_s - slept)
                if left <= 0:
                    break
            await sleep(left)
            slept += left
            left = await self.remaining(provider, model, fresh=True)
        return slept
