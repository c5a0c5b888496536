"""Running consumers in this process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.settings import Settings, consumer_name
from cj.consumer import CJConsumer
from cj.reaper import run_stalled_reaper
from events.names import Keys
from lps.cooldown import Cooldown
from lps.providers.base import Provider
from lps.retry import RetryPolicy
from lps.worker import LPSWorker


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.retry_max_attempts,
        base_delay_s=settings.retry_base_delay_s,
        max_delay_s=settings.retry_max_delay_s,
        max_retry_after_s=settings.retry_max_after_s,
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
            cj = CJConsumer(
                self.r,
                self.keys,
                f"{consumer_name('cj')}-{i}",
                count=100,
                block_ms=min(s.block_ms, 200),
                processing_timeout_s=s.processing_timeout_s,
                max_deliveries=s.max_deliveries,
                dead_consumer_after_s=s.dead_consumer_after_s,
            )
            self.tasks.append(
                asyncio.create_task(cj.run(self.stop, sweep_every_s=s.reaper_interval_s))
            )
        for i in range(self.lps_workers):
            lps = LPSWorker(
                self.r,
                self.keys,
                f"{consumer_name('lps')}-{i}",
                self.providers,
                policy=retry_policy(s),
                concurrency=self.concurrency,
                count=s.read_count,
                block_ms=min(s.block_ms, 200),
                processing_timeout_s=s.processing_timeout_s,
                max_deliveries=s.max_deliveries,
                dead_consumer_after_s=s.dead_consumer_after_s,
                batch_poll_interval_s=s.batch_poll_s,
                cooldown=Cooldown(
                    self.r,
                    self.keys,
                    default_s={
                        "rate_limit": s.cooldown_rate_limit_s,
                        "overloaded": s.cooldown_overloaded_s,
                    },
                    fresh_s=0.1,
                ),
            )
            self.tasks.append(
                asyncio.create_task(lps.run(self.stop, maintenance_every_s=s.reaper_interval_s))
            )

        for _ in range(self.reapers):
            self.tasks.append(
                asyncio.create_task(
                    run_stalled_reaper(
                        self.r,
                        self.keys,
                        self.stop,
                        idle_timeout_s=s.batch_idle_timeout_s,
                        every_s=s.reaper_interval_s,
                    )
                )
            )

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def check(self) -> None:
        """Raise the first error of a task that died."""
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
