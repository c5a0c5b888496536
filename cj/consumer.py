"""The CJ consumer of `cj:callbacks`: apply each callback, advance batches whose wave is done."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from cj.continuation import advance
from events.codec import DecodeError
from events.consumer import Entry, GroupReader, ensure_group, queue_dead_letter, split_decoded
from events.metrics import CJ_CALLBACKS, CJ_ORPHANS
from events.names import CALLBACKS, CJ_GROUP, Keys
from events.types import ComparisonCompleted, ComparisonFailed
from projections.store import CallbackApplier, list_batches

log = structlog.get_logger("cj.consumer")


class CJConsumer:
    def __init__(self, r: Any, keys: Keys, consumer: str, *, count: int = 100, block_ms: int = 1000):
        self.r = r
        self.keys = keys
        self.consumer = consumer
        self.reader = GroupReader(r, keys.callbacks, CJ_GROUP, consumer, count=count, block_ms=block_ms)
        self.applier = CallbackApplier(r, keys, CJ_GROUP)

    async def start(self) -> None:
        await ensure_group(self.r, self.keys.callbacks, CJ_GROUP)

    async def step(self) -> int:
        """Read and apply one page of callbacks; returns how many entries it handled."""
        entries = await self.reader.read()
        if entries:
            await self.handle(entries)
        return len(entries)

    async def handle(self, entries: list[Entry]) -> None:
        good, bad = split_decoded(entries)
        callbacks = []
        for entry, event in good:
            if isinstance(event, ComparisonCompleted | ComparisonFailed):
                callbacks.append((entry, event))
            else:
                err = DecodeError("unexpected_type", f"{type(event).__name__} on {CALLBACKS}")
                bad.append((entry, err))
        if bad:
            async with self.r.pipeline(transaction=True) as pipe:
                for entry, error in bad:
                    queue_dead_letter(pipe, self.keys, CALLBACKS, entry, error, CJ_GROUP, self.consumer)
                await pipe.execute()
        if not callbacks:
            return
        # One round trip for the page: each script call is atomic on its own.
        async with self.r.pipeline(transaction=False) as pipe:
            for entry, callback in callbacks:
                await self.applier.queue(pipe, callback, entry.entry_id)
            results = await pipe.execute()
        to_advance: set[str] = set()
        for (entry, callback), (outcome, left) in zip(callbacks, results, strict=True):
            outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
            if outcome == "replayed":
                continue
            CJ_CALLBACKS.labels(outcome).inc()
            if outcome == "accepted":
                if int(left) <= 0:
                    to_advance.add(callback.batch_id)
                continue
            if outcome == "orphan":
                CJ_ORPHANS.labels(callback.source_service or "unknown").inc()
            log.warning(
                f"callback_{outcome}",
                batch_id=callback.batch_id,
                correlation_id=callback.correlation_id,
                entry_id=entry.entry_id,
                source_service=callback.source_service,
                event_type=type(callback).__name__,
            )
        for batch_id in sorted(to_advance):
            await advance(self.r, self.keys, batch_id)

    async def sweep(self) -> int:
        """Advance every open batch that has nothing in flight (recovers a crash between the
        last callback of a wave and its continuation, and starts registered batches)."""
        moved = 0
        for batch_id in await list_batches(self.r, self.keys):
            status, in_flight = await self.r.hmget(self.keys.batch(batch_id), "status", "in_flight")
            if status in (b"registered", b"running") and int(in_flight or 0) == 0:
                moved += await advance(self.r, self.keys, batch_id) is not None
        return moved

    async def run(self, stop: asyncio.Event, *, sweep_every_s: float = 10.0) -> None:
        await self.start()
        await self.sweep()
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + sweep_every_s
        while not stop.is_set():
            await self.step()
            if loop.time() >= next_sweep:
                await self.sweep()
                next_sweep = loop.time() + sweep_every_s
