"""The shared provider limiter: keep the provider at its limit, not above it.

Every LPS worker takes from one limiter per provider + model before a call: a hash in Redis
(`lps.keys.limiter`, outside every partition) updated by one Lua script, `limiter.lua`, on
the server's clock. It is GCRA in two dimensions, requests and tokens per minute: a taker
is granted the time at which it may call, and the theoretical arrival time moves on by one
request and by the call's estimated tokens. Grants are made at most `horizon_s` ahead, so
that a change of rate applies within that time.

The rate is set from configuration (`CJS_LPS_RATE_LIMIT_RPM` / `_TPM`: the organisation's
limits) and adjusted AIMD from what the provider says: a successful reply's
`anthropic-ratelimit-*-limit` headers are the limit itself (the rate is `target` of it),
and while its `-remaining` is not 0 the rate grows back towards that (additive increase,
`increase_per_s` of the limit per second); a 429 cuts it (multiplicative decrease,
`decrease`, at most once per `decrease_every_s`: the 429s of one overshoot arrive together)
and nobody is granted a call before its `retry-after`. Without a configured limit and
before any header told one, calls are not paced (and Redis is asked only every
`recheck_s`), as before the limiter.

Per worker, calls wait for a grant in one queue per provider + model, and one task asks
Redis for all of them at once (one round trip per group of grants, not per call). How
many calls a worker lets run at once grows with what the limiter allows: rate × (latency
+ horizon) × 1.25, from the worker's `--concurrency` up to `max_concurrency`.

Redis trouble never blocks judging: the limiter then fails open (logs, grants the call).
Metrics: `lps_limiter_rate_per_minute`, `lps_limiter_waiting`, `lps_limiter_waiting_tokens`,
`lps_limiter_wait_seconds`, `lps_provider_calls_total` (outcome ok / rate_limited / error),
`lps_rate_limited_ratio` (over the worker's last `RATIO_WINDOW` calls),
`lps_concurrency_limit`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import structlog

from events.types import ComparisonRequested, TokenUsage
from lps import keys as lkeys
from lps.metrics import (
    LPS_CONCURRENCY_LIMIT,
    LPS_LIMITER_RATE,
    LPS_LIMITER_WAIT,
    LPS_LIMITER_WAITING,
    LPS_LIMITER_WAITING_TOKENS,
    LPS_PROVIDER_CALLS,
    LPS_RATE_LIMITED_RATIO,
)
from lps.providers.base import Judgement, Provider, ProviderError
from streams.keys import Keys
from streams.metrics import labelled

log = structlog.get_logger(__name__)

LIMITER_LUA = resources.files("lps").joinpath("limiter.lua").read_text()

Call = Callable[[], Awaitable[Judgement]]

RATIO_WINDOW = 200
"""Calls over which a worker reports its share of 429s."""
MAX_TAKERS = 64
"""Grants asked for in one round trip."""


@dataclass(frozen=True)
class LimiterSettings:
    rpm: float = 0.0
    """The provider's requests per minute (0: unknown until a reply's headers tell)."""
    tpm: float = 0.0
    """The provider's tokens per minute, input and output (0: unknown until told)."""
    tokens_per_call: float = 1000.0
    """Estimated tokens of a call before any reply said (then: the replies' average)."""
    target: float = 0.98
    """Share of the provider's limit paced at."""
    burst: float = 1.0
    """Calls granted at once (1: evenly spaced)."""
    horizon_s: float = 0.5
    """Grants are made at most this far ahead."""
    increase_per_s: float = 0.05
    """Additive increase: share of the limit per second of successful replies."""
    decrease: float = 0.7
    """Multiplicative decrease on a 429."""
    floor: float = 0.1
    """The rate never falls below this share of the limit."""
    decrease_every_s: float = 1.0
    recheck_s: float = 1.0
    """With no limit known, ask Redis again this often (another worker may have learnt one)."""
    feedback_every_s: float = 0.1
    """A worker tells Redis of its successful replies at most this often (a 429 at once)."""
    min_concurrency: int = 8
    max_concurrency: int = 64


@dataclass
class _Waiter:
    future: asyncio.Future[None]
    tokens: float
    since: float


@dataclass
class Lane:
    """One provider + model in this worker: its queue of calls waiting for a grant, its
    concurrency, and what it last heard of the shared limiter."""

    limiter: SharedLimiter
    provider: str
    model: str
    rate_r: float = 0.0
    rate_t: float = 0.0
    limit_r: float = 0.0
    limit_t: float = 0.0
    unlimited_until: float = 0.0
    tokens_per_call: float = 0.0
    latency_s: float = 0.0
    last_feedback: float = -math.inf
    in_use: int = 0
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=RATIO_WINDOW))
    limited_calls: int = 0
    _queue: deque[_Waiter] = field(default_factory=deque)
    _task: asyncio.Task[None] | None = None
    _slots: deque[asyncio.Future[None]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.tokens_per_call = self.limiter.settings.tokens_per_call
        self._labels = {"provider": self.provider, "model": self.model}

    @property
    def key(self) -> str:
        return lkeys.limiter(self.limiter.keys, self.provider, self.model)

    # -- concurrency ------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        """Calls run at once: enough for the paced rate over a call's latency and the
        horizon (Little's law, a quarter more), within the settings' bounds."""
        s = self.limiter.settings
        rate = self.rate_r / 60.0
        if rate <= 0 and self.rate_t > 0:
            rate = self.rate_t / 60.0 / max(1.0, self.tokens_per_call)
        if rate <= 0:
            return s.min_concurrency
        need = math.ceil(1.25 * rate * (self.latency_s + s.horizon_s)) + 1
        return max(s.min_concurrency, min(s.max_concurrency, need))

    async def enter(self) -> None:
        while self.in_use >= self.concurrency:
            future = asyncio.get_running_loop().create_future()
            self._slots.append(future)
            try:
                await future
            except asyncio.CancelledError:
                self._wake_slots()
                raise
        self.in_use += 1

    def leave(self) -> None:
        self.in_use -= 1
        self._wake_slots()

    def _wake_slots(self) -> None:
        if not self._slots:  # nobody waits (most calls): no need to work out the concurrency
            return
        free = self.concurrency - self.in_use
        while free > 0 and self._slots:
            future = self._slots.popleft()
            if not future.done():
                future.set_result(None)
                free -= 1

    # -- grants -----------------------------------------------------------------

    async def acquire(self) -> float:
        """Wait for this worker's turn to call; returns the seconds waited."""
        clock = self.limiter.clock
        if clock() < self.unlimited_until:
            return 0.0
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), self.tokens_per_call, clock())
        self._queue.append(waiter)
        self._gauge()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._grant())
        try:
            await waiter.future
        finally:
            self._gauge()
        waited = clock() - waiter.since
        LPS_LIMITER_WAIT.labels(**self._labels).observe(waited)
        return waited

    def _gauge(self) -> None:
        live = [w for w in self._queue if not w.future.done()]
        LPS_LIMITER_WAITING.labels(**self._labels).set(len(live))
        LPS_LIMITER_WAITING_TOKENS.labels(**self._labels).set(sum(w.tokens for w in live))

    async def _grant(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            while self._queue and self._queue[0].future.done():  # cancelled meanwhile
                self._queue.popleft()
            if not self._queue:
                break
            takers = list(self._queue)[:MAX_TAKERS]
            reply = None
            if self.limiter.clock() >= self.unlimited_until:
                reply = await self.limiter.take(self, len(takers), self.tokens_per_call)
            if reply is None:  # no limit known, or Redis trouble: go
                for w in takers:
                    self._queue.popleft()
                    if not w.future.done():
                        w.future.set_result(None)
                continue
            waits, retry_ms = reply
            for wait_ms in waits:
                w = self._queue.popleft()
                if w.future.done():
                    continue
                if wait_ms <= 0:
                    w.future.set_result(None)
                else:
                    loop.call_later(wait_ms / 1000.0, _wake, w.future)
            self._gauge()
            if len(waits) < len(takers):
                await asyncio.sleep(max(0.002, retry_ms / 1000.0))

    def learned(self, rate_r: float, rate_t: float, limit_r: float, limit_t: float) -> None:
        self.rate_r, self.rate_t, self.limit_r, self.limit_t = rate_r, rate_t, limit_r, limit_t
        LPS_LIMITER_RATE.labels(**self._labels, dimension="requests").set(rate_r)
        LPS_LIMITER_RATE.labels(**self._labels, dimension="tokens").set(rate_t)
        LPS_CONCURRENCY_LIMIT.labels(**self._labels).set(self.concurrency)
        self._wake_slots()

    # -- what the provider said ---------------------------------------------------

    def record(self, ok: bool, outcome: str) -> None:
        if len(self.outcomes) == RATIO_WINDOW and not self.outcomes[0]:
            self.limited_calls -= 1
        self.outcomes.append(ok)
        self.limited_calls += not ok
        labelled(LPS_PROVIDER_CALLS, self.provider, self.model, outcome).inc()
        labelled(LPS_RATE_LIMITED_RATIO, self.provider, self.model).set(
            self.limited_calls / len(self.outcomes)
        )

    async def replied(self, judgement: Judgement, latency_s: float) -> None:
        news = self.heard(judgement, latency_s)
        if news is not None:
            await self.limiter.feedback(self, "ok", *news)

    def heard(self, judgement: Judgement, latency_s: float) -> tuple[str, str, str, str] | None:
        """A successful reply, noted here; returns what to tell the shared limiter (limits
        and what is left of them), or None when that would be no news. `replied` tells it;
        the caller may also, and then needs no coroutine when there is no news (issue 11)."""
        self.record(True, "ok")
        self._observe_latency(latency_s)
        tokens = _tokens(judgement.usage)
        if tokens > 0:
            self.tokens_per_call += 0.1 * (tokens - self.tokens_per_call)
        told = _told(judgement.rate_limits)
        if told is None:
            return None
        limit_r, limit_t = told[0], told[1]
        clock = self.limiter.clock
        known = (_f(limit_r) in (None, self.limit_r)) and (_f(limit_t) in (None, self.limit_t))
        room = (self.limit_r > 0 and self.rate_r < self.limit_r * self.limiter.settings.target) or (
            self.limit_t > 0 and self.rate_t < self.limit_t * self.limiter.settings.target
        )
        # Only news is sent: a limit not known yet, or room to grow (at most every
        # feedback_every_s); at the limit, successful replies cost no round trip.
        if known and not room:
            return None
        if known and clock() - self.last_feedback < self.limiter.settings.feedback_every_s:
            return None
        self.last_feedback = clock()
        self.unlimited_until = 0.0
        return told

    async def failed(self, exc: ProviderError) -> None:
        detail = exc.detail
        if detail.error_type != "rate_limit" or not detail.retryable:
            self.record(True, "error")
            return
        self.record(False, "rate_limited")
        told = _told(exc.headers) or ("", "", "", "")
        retry_ms = 1000.0 * (detail.retry_after_s or 0.0)
        self.unlimited_until = 0.0
        await self.limiter.feedback(self, "limited", told[0], told[1], retry_ms=retry_ms)

    def _observe_latency(self, latency_s: float) -> None:
        before = self.concurrency
        if self.latency_s <= 0:
            self.latency_s = latency_s
        else:
            self.latency_s += 0.05 * (latency_s - self.latency_s)
        if self.concurrency != before:
            LPS_CONCURRENCY_LIMIT.labels(**self._labels).set(self.concurrency)
            self._wake_slots()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _tokens(usage: TokenUsage) -> int:
    return (
        usage.input_tokens
        + usage.output_tokens
        + usage.cache_read_input_tokens
        + usage.cache_creation_input_tokens
    )


def _f(value: str) -> float | None:
    try:
        return float(value) if value != "" else None
    except ValueError:
        return None


def _told(headers: Mapping[str, str]) -> tuple[str, str, str, str] | None:
    """(requests limit, tokens limit, requests left, tokens left) from `anthropic-ratelimit-*`
    headers ("" for each one absent), or None when there is none. Tokens: the API's
    combined `tokens-*` (the most restrictive of input and output), else input tokens."""
    if not headers:
        return None
    h = {k.lower(): v for k, v in headers.items()}

    def get(*names: str) -> str:
        for name in names:
            value = h.get(f"anthropic-ratelimit-{name}")
            if value is not None and _f(value) is not None:
                return value
        return ""

    told = (
        get("requests-limit"),
        get("tokens-limit", "input-tokens-limit"),
        get("requests-remaining"),
        get("tokens-remaining", "input-tokens-remaining"),
    )
    return told if any(told) else None


class SharedLimiter:
    """The limiter of every provider + model, as seen by this worker process."""

    def __init__(
        self,
        r: Any,
        keys: Keys,
        settings: LimiterSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.r = r
        self.keys = keys.whole
        self.settings = settings or LimiterSettings()
        self.clock = clock
        self._script = r.register_script(LIMITER_LUA)
        self._lanes: dict[tuple[str, str], Lane] = {}

    def lane(self, provider: str, model: str) -> Lane:
        key = (provider, model)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(self, provider, model)
        return lane

    def _common(self) -> list[str]:
        s = self.settings
        return [repr(float(s.rpm)), repr(float(s.tpm)), repr(s.target)]

    async def _call(self, lane: Lane, args: list[str]) -> list[Any] | None:
        try:
            reply = await self._script(keys=[lane.key], args=args)
        except Exception as exc:  # fail open: judging goes on without pacing
            log.warning("limiter_unavailable", error_kind=type(exc).__name__)
            return None
        return list(reply)

    async def take(
        self, lane: Lane, takers: int, tokens: float
    ) -> tuple[list[float], float] | None:
        """Grants for `takers` calls: (waits in ms, retry in ms for those not granted), or
        None when no limit is known (calls are not paced)."""
        s = self.settings
        args = [
            "take",
            *self._common(),
            str(takers),
            repr(float(tokens)),
            repr(1000.0 * s.horizon_s),
            repr(s.burst),
        ]
        reply = await self._call(lane, args)
        if reply is None:
            return None
        granted = int(float(reply[0]))
        lane.learned(float(reply[2]), float(reply[3]), float(reply[4]), float(reply[5]))
        if granted < 0:
            lane.unlimited_until = self.clock() + s.recheck_s
            return None
        return [float(w) for w in reply[6 : 6 + granted]], float(reply[1])

    async def feedback(
        self,
        lane: Lane,
        op: str,
        limit_r: str,
        limit_t: str,
        left_r: str = "",
        left_t: str = "",
        *,
        retry_ms: float = 0.0,
    ) -> None:
        s = self.settings
        if op == "ok":
            extra = [limit_r, limit_t, left_r, left_t, repr(s.increase_per_s)]
        else:
            extra = [
                limit_r,
                limit_t,
                repr(retry_ms),
                repr(s.decrease),
                repr(s.floor),
                repr(1000.0 * s.decrease_every_s),
            ]
        reply = await self._call(lane, [op, *self._common(), *extra])
        if reply is not None:
            lane.learned(*(float(x) for x in reply[:4]))

    async def state(self, provider: str, model: str) -> dict[str, float]:
        """The shared state (for tests and `cjs`-side views): the hash's numbers."""
        raw = await self.r.hgetall(lkeys.limiter(self.keys, provider, model))
        return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in raw.items()}


class LimitedProvider:
    """A provider whose calls go through the shared limiter: each call waits for a grant
    (and for a place among the worker's concurrent calls), and its reply or 429 adjusts the
    rate. Everything else is the wrapped provider's."""

    def __init__(self, inner: Provider, limiter: SharedLimiter) -> None:
        self.inner = inner
        self.limiter = limiter
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def supports_message_batches(self) -> bool:
        return self.inner.supports_message_batches

    async def aclose(self) -> None:
        await self.inner.aclose()

    def turn(self, request: ComparisonRequested) -> _Turn:
        """This call's turn: a place among the worker's concurrent calls and a grant of the
        limiter; `async with` it gives the call to make (what is checked last before a call,
        the breaker, goes inside: `lps.retry.judge_with_retries`)."""
        return _Turn(self, self.limiter.lane(self.inner.name, request.model), request)

    async def _call(self, lane: Lane, request: ComparisonRequested) -> Judgement:
        started = time.monotonic()
        try:
            judgement = await self.inner.judge(request)
        except ProviderError as exc:
            await lane.failed(exc)
            raise
        news = lane.heard(judgement, time.monotonic() - started)
        if news is not None:
            await self.limiter.feedback(lane, "ok", *news)
        return judgement

    async def judge(self, request: ComparisonRequested) -> Judgement:
        async with self.turn(request) as call:
            return await call()


class _Turn:
    """`LimitedProvider.turn`: a class, not a generator-based context manager, which took
    four times as long to enter and leave, once per call (issue 11)."""

    def __init__(self, provider: LimitedProvider, lane: Lane, request: ComparisonRequested):
        self.provider = provider
        self.lane = lane
        self.request = request

    async def __aenter__(self) -> Call:
        lane = self.lane
        # `enter` and `acquire` are awaited only when they would wait: a free place, and no
        # limit known (`acquire` returns at once then), take no coroutine (issue 11).
        if lane.in_use < lane.concurrency:
            lane.in_use += 1
        else:
            await lane.enter()
        try:
            if lane.limiter.clock() >= lane.unlimited_until:
                await lane.acquire()
        except BaseException:
            lane.leave()
            raise
        return self.call

    def call(self) -> Awaitable[Judgement]:
        return self.provider._call(self.lane, self.request)

    async def __aexit__(self, *exc: object) -> None:
        self.lane.leave()


def limited(
    factory: Callable[[str], Provider],
    limiter: SharedLimiter,
    bind: Callable[[Provider], None] | None = None,
) -> Callable[[str], Provider]:
    """`factory` with every provider it makes behind `limiter` (`bind` sees each first)."""

    def make(name: str) -> Provider:
        provider = factory(name)
        if bind is not None:
            bind(provider)
        return LimitedProvider(provider, limiter)

    return make
