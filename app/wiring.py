"""The composition root: CJ consumers, LPS workers and the stalled-batch reaper built from
Settings, and run as tasks of this process. Every place that needs one builds it here, so
a setting is honoured everywhere or nowhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from app.settings import Settings, consumer_name, dead_letter_policy
from cj.consumer import CJConsumer
from cj.stalls import run_stall_finalizer
from lps.breaker import Breaker
from lps.cooldown import Cooldown
from lps.providers.base import Provider
from lps.retry import RetryPolicy
from lps.worker import LPSWorker
from streams.keys import Keys

# In-process consumers block at most this long on a read, so that a stop is seen promptly.
MAX_BLOCK_MS = 200


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
        count=100,
        block_ms=min(s.block_ms, MAX_BLOCK_MS),
        processing_timeout_s=s.processing_timeout_s,
        max_deliveries=s.max_deliveries,
        dead_consumer_after_s=s.dead_consumer_after_s,
        dead_letters=dead_letter_policy(s),
    )


def lps_worker(
    r: Any,
    keys: Keys,
    s: Settings,
    name: str,
    providers: Callable[[str], Provider],
    *,
    concurrency: int = 8,
) -> LPSWorker:
    return LPSWorker(
        r,
        keys,
        name,
        providers,
        policy=retry_policy(s),
        concurrency=concurrency,
        count=s.read_count,
        block_ms=min(s.block_ms, MAX_BLOCK_MS),
        processing_timeout_s=s.processing_timeout_s,
        max_deliveries=s.max_deliveries,
        dead_consumer_after_s=s.dead_consumer_after_s,
        dead_letters=dead_letter_policy(s),
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


def stall_reaper(r: Any, keys: Keys, s: Settings, stop: asyncio.Event) -> Coroutine[Any, Any, None]:
    """The loop that ends batches with no event for CJS_BATCH_IDLE_TIMEOUT_S."""
    return run_stall_finalizer(
        r, keys, stop, idle_timeout_s=s.batch_idle_timeout_s, every_s=s.reaper_interval_s
    )


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
        s = self.settings
        for i in range(self.cj_consumers):
            cj = cj_consumer(self.r, self.keys, s, f"{consumer_name('cj')}-{i}")
            self._spawn(cj.run(self.stop, sweep_every_s=s.reaper_interval_s))
        for i in range(self.lps_workers):
            lps = lps_worker(
                self.r,
                self.keys,
                s,
                f"{consumer_name('lps')}-{i}",
                self.providers,
                concurrency=self.concurrency,
            )
            self._spawn(lps.run(self.stop, maintenance_every_s=s.reaper_interval_s))
        for _ in range(self.reapers):
            self._spawn(stall_reaper(self.r, self.keys, s, self.stop))

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
