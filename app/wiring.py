"""The composition root: CJ consumers, LPS workers and the stalled-batch reaper built from
Settings, and run as tasks of this process. Every place that needs one builds it here, so
a setting is honoured everywhere or nowhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from app.archive import store_for
from app.retention import run_archiver
from app.settings import Settings, consumer_name, dead_letter_policy, worker_partitions
from cj.consumer import CJConsumer
from cj.stalls import run_stall_finalizer
from lps.breaker import Breaker
from lps.cooldown import Cooldown
from lps.limiter import LimiterSettings, SharedLimiter, limited
from lps.providers.base import Provider
from lps.retry import RetryPolicy
from lps.worker import LPSWorker
from streams.consumer import GroupOptions
from streams.keys import Keys

# In-process consumers block at most this long on a read, so that a stop is seen promptly.
MAX_BLOCK_MS = 200
# Pages of requests an LPS worker holds at once (CJS_READ_COUNT entries each).
LPS_PAGES = 8


def group_options(s: Settings, *, count: int) -> GroupOptions:
    """How every consumer built here reads and looks after its group; `count` entries a read."""
    return GroupOptions(
        count=count,
        block_ms=min(s.block_ms, MAX_BLOCK_MS),
        processing_timeout_s=s.processing_timeout_s,
        max_deliveries=s.max_deliveries,
        dead_consumer_after_s=s.dead_consumer_after_s,
        replicas_ack=s.min_replicas_ack,
        replica_ack_timeout_ms=s.replica_ack_timeout_ms,
        dead_letters=dead_letter_policy(s),
    )


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.retry_max_attempts,
        base_delay_s=settings.retry_base_delay_s,
        max_delay_s=settings.retry_max_delay_s,
        max_retry_after_s=settings.retry_max_after_s,
        max_total_delay_s=settings.retry_max_total_delay_s,
    )


def cj_consumer(r: Any, keys: Keys, s: Settings, name: str) -> CJConsumer:
    return CJConsumer(
        r,
        keys,
        name,
        wave_overlap=s.wave_overlap,
        **group_options(s, count=100),
    )


def limiter_settings(s: Settings, concurrency: int = 8) -> LimiterSettings:
    return LimiterSettings(
        rpm=s.lps_rate_limit_rpm,
        tpm=s.lps_rate_limit_tpm,
        tokens_per_call=s.lps_tokens_per_call,
        min_concurrency=min(concurrency, s.lps_max_concurrency),
        max_concurrency=s.lps_max_concurrency,
    )


def shared_limiter(r: Any, keys: Keys, s: Settings, concurrency: int = 8) -> SharedLimiter:
    """The provider limiter of this process (one for all its LPS workers)."""
    return SharedLimiter(r, keys, limiter_settings(s, concurrency))


def _bind(r: Any, keys: Keys) -> Callable[[Provider], None]:
    def bind(provider: Provider) -> None:
        # The mock's provider-side rate limit is kept in this Redis: one for every worker.
        bind_redis = getattr(provider, "bind_redis", None)
        if callable(bind_redis):
            bind_redis(r, keys)

    return bind


def lps_worker(
    r: Any,
    keys: Keys,
    s: Settings,
    name: str,
    providers: Callable[[str], Provider],
    *,
    concurrency: int = 8,
    limiter: SharedLimiter | None = None,
) -> LPSWorker:
    """An LPS worker whose provider calls go through the shared limiter: `concurrency` calls
    at once while no limit is known, up to CJS_LPS_MAX_CONCURRENCY as the limiter allows."""
    limiter = limiter or shared_limiter(r, keys, s, concurrency)
    return LPSWorker(
        r,
        keys,
        name,
        limited(providers, limiter, _bind(r, keys)),
        policy=retry_policy(s),
        # Units in hand; the limiter's lanes decide how many of their calls run at once.
        concurrency=max(concurrency, s.lps_max_concurrency),
        # A page is done when its slowest call is: with two pages at most, the slow tail of
        # one wave kept the worker from reading the next (issue 11: a third of a batch's time
        # at 1.5 s median latency). Calls at once stay bounded by the limiter's lanes.
        max_pages=LPS_PAGES,
        **group_options(s, count=s.read_count),
        batch_poll_interval_s=s.batch_poll_s,
        cooldown=Cooldown(
            r,
            keys,
            default_s={
                "rate_limit": s.cooldown_rate_limit_s,
                "overloaded": s.cooldown_overloaded_s,
            },
            fresh_s=0.1,
        ),
        breaker=Breaker(r, keys, probe_after_s=s.breaker_probe_s, fresh_s=0.1),
    )


def archiver(r: Any, keys: Keys, s: Settings, stop: asyncio.Event) -> Coroutine[Any, Any, None]:
    """The loop that archives finished batches and trims the streams (app/retention.py)."""
    return run_archiver(
        r,
        keys,
        store_for(s),
        stop,
        older_than_s=s.retention_s,
        dlq_retention_s=s.dlq_retention_s,
        every_s=s.archive_interval_s,
    )


def stall_reaper(r: Any, keys: Keys, s: Settings, stop: asyncio.Event) -> Coroutine[Any, Any, None]:
    """The loop that ends batches with no event for CJS_BATCH_IDLE_TIMEOUT_S."""
    return run_stall_finalizer(
        r, keys, stop, idle_timeout_s=s.batch_idle_timeout_s, every_s=s.reaper_interval_s
    )


def _name(base: str, i: int, part: Keys) -> str:
    """A consumer's name: `<role>-<host>-<pid>-<i>`, and `.p<k>` with several partitions."""
    return f"{base}-{i}" if part.partitions == 1 else f"{base}-{i}.p{part.partition}"


@dataclass
class InProcess:
    """CJ consumers and LPS workers as tasks of this process."""

    r: Any
    keys: Keys
    settings: Settings
    providers: Callable[[str], Provider]
    cj_consumers: int = 1
    lps_workers: int = 1
    concurrency: int = 8
    reapers: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        """Each consumer reads every partition of CJS_WORKER_PARTITIONS (all by default) with
        a loop of its own per partition, so a busy partition never starves another."""
        s = self.settings
        parts = worker_partitions(s, self.keys)
        limiter = shared_limiter(self.r, self.keys, s, self.concurrency)
        for i in range(self.cj_consumers):
            for part in parts:
                name = _name(consumer_name("cj"), i, part)
                cj = cj_consumer(self.r, part, s, name)
                self._spawn(cj.run(self.stop, sweep_every_s=s.reaper_interval_s))
        for i in range(self.lps_workers):
            for part in parts:
                lps = lps_worker(
                    self.r,
                    part,
                    s,
                    _name(consumer_name("lps"), i, part),
                    self.providers,
                    concurrency=self.concurrency,
                    limiter=limiter,
                )
                self._spawn(lps.run(self.stop, maintenance_every_s=s.reaper_interval_s))
        for _ in range(self.reapers):
            self._spawn(stall_reaper(self.r, self.keys, s, self.stop))
            self._spawn(archiver(self.r, self.keys, s, self.stop))

    def _spawn(self, loop: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.create_task(loop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def check(self) -> None:
        """Raise the first error of a task that died."""
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
