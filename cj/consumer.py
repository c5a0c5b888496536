"""The CJ consumer of `cj:callbacks`: apply each callback, advance batches whose wave is done.

Its reaper pass (`maintain`) reclaims callback entries left pending by a consumer that
died between reading and applying them (the apply is idempotent by entry id: the Lua
script applies only if its XACK acknowledged something), dead-letters an entry
delivered more than `max_deliveries` times (reason `max_deliveries`), advances batches
with nothing in flight (`sweep`), updates the pending gauge and prunes dead consumers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from cj.continuation import advance
from cj.metrics import CJ_CALLBACKS, CJ_ORPHANS
from events import codec
from events.codec import DecodeError
from events.streams import CALLBACKS, CJ_GROUP
from events.text import as_str
from events.types import ComparisonCompleted, ComparisonFailed
from projections import keys as pkeys
from projections.store import CallbackApplier, list_batches
from streams.dlq import queue_dead_letter
from streams.keys import Keys
from streams.metrics import STUCK_ITEMS
from streams.pending import StuckAction, claim_idle, group_upkeep
from streams.reader import Entry, GroupReader, ensure_group, split_decoded
from streams.resilience import REDIS_DOWN, Backoff, wait_for_redis

log = structlog.get_logger("cj.consumer")


class CJConsumer:
    def __init__(
        self,
        r: Any,
        keys: Keys,
        consumer: str,
        *,
        count: int = 100,
        block_ms: int = 1000,
        processing_timeout_s: float = 120.0,
        max_deliveries: int = 3,
        dead_consumer_after_s: float = 3600.0,
    ):
        self.r = r
        self.keys = keys
        self.consumer = consumer
        self.processing_timeout_s = processing_timeout_s
        self.max_deliveries = max_deliveries
        self.dead_consumer_after_s = dead_consumer_after_s
        self.reader = GroupReader(
            r, keys.callbacks, CJ_GROUP, consumer, count=count, block_ms=block_ms
        )
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
                    queue_dead_letter(
                        pipe, self.keys, CALLBACKS, entry, error, CJ_GROUP, self.consumer
                    )
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
            outcome = as_str(outcome)
            if outcome == "replayed":
                continue
            CJ_CALLBACKS.labels(outcome).inc()
            if outcome == "accepted":
                if int(left) <= 0:
                    to_advance.add(callback.batch_id)
                continue
            details: dict[str, Any] = {}
            if outcome == "orphan":
                CJ_ORPHANS.labels(callback.source_service or "unknown").inc()
                known = bool(await self.r.exists(pkeys.batch(self.keys, callback.batch_id)))
                details = {
                    "unknown": "correlation_id" if known else "batch_id",
                    "essay_a_id": callback.essay_a_id,
                    "essay_b_id": callback.essay_b_id,
                    "event_id": callback.event_id,
                    "occurred_at": callback.occurred_at,
                }
            log.warning(
                f"callback_{outcome}",
                batch_id=callback.batch_id,
                correlation_id=callback.correlation_id,
                entry_id=entry.entry_id,
                source_service=callback.source_service,
                event_type=type(callback).__name__,
                **details,
            )
        for batch_id in sorted(to_advance):
            await advance(self.r, self.keys, batch_id)

    async def sweep(self) -> int:
        """Advance every open batch that has nothing in flight (recovers a crash between the
        last callback of a wave and its continuation, and starts registered batches)."""
        batch_ids = await list_batches(self.r, self.keys)
        if not batch_ids:
            return 0
        async with self.r.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hmget(pkeys.batch(self.keys, batch_id), "status", "in_flight")
            rows = await pipe.execute()
        moved = 0
        for batch_id, (status, in_flight) in zip(batch_ids, rows, strict=True):
            if status in (b"registered", b"running") and int(in_flight or 0) == 0:
                moved += await advance(self.r, self.keys, batch_id) is not None
        return moved

    async def reclaim(self) -> list[StuckAction]:
        """Claim callback entries idle past the processing timeout and apply them again; an
        entry delivered more than `max_deliveries` times goes to `dlq:cj:callbacks`."""
        claimed, deleted = await claim_idle(
            self.r,
            self.keys.callbacks,
            CJ_GROUP,
            self.consumer,
            int(self.processing_timeout_s * 1000),
        )
        if deleted:
            log.warning(
                "stuck_callbacks_deleted", stream=CALLBACKS, group=CJ_GROUP, entry_ids=deleted
            )
        actions: list[StuckAction] = []
        retry: list[Entry] = []
        dead: list[tuple[Entry, DecodeError]] = []
        for c in claimed:
            try:
                event = codec.decode(c.entry.fields)
            except DecodeError:
                event = None
            expire = c.deliveries > self.max_deliveries
            action = StuckAction.of(
                c,
                CALLBACKS,
                CJ_GROUP,
                "dead_lettered" if expire else "reclaimed",
                self.consumer,
                event,
            )
            actions.append(action)
            STUCK_ITEMS.labels(action.action).inc()
            log.warning(f"stuck_callback_{action.action}", **action.log_fields())
            if expire:
                dead.append(
                    (
                        c.entry,
                        DecodeError(
                            "max_deliveries",
                            f"delivered {c.deliveries} times (limit {self.max_deliveries})",
                        ),
                    )
                )
            else:
                retry.append(c.entry)
        if dead:
            async with self.r.pipeline(transaction=True) as pipe:
                for entry, error in dead:
                    queue_dead_letter(
                        pipe, self.keys, CALLBACKS, entry, error, CJ_GROUP, self.consumer
                    )
                await pipe.execute()
        if retry:
            await self.handle(retry)
        return actions

    async def maintain(self) -> list[StuckAction]:
        """One reaper pass: reclaim, sweep, pending gauge, dead consumers."""
        actions = await self.reclaim()
        await self.sweep()
        await group_upkeep(
            self.r,
            self.keys,
            CALLBACKS,
            CJ_GROUP,
            self.consumer,
            dead_after_s=self.dead_consumer_after_s,
        )
        return actions

    async def run(self, stop: asyncio.Event, *, sweep_every_s: float = 10.0) -> None:
        """Consume until `stop` is set; the page in hand is applied before returning (its
        entries are acknowledged by the apply itself). Survives Redis restarts."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        next_sweep = 0.0  # a first pass at once: recovers what a previous run left
        while not stop.is_set():
            try:
                if next_sweep == 0.0:
                    await self.start()
                    await self.sweep()
                    next_sweep = loop.time() + sweep_every_s
                await self.step()
                if loop.time() >= next_sweep:
                    await self.maintain()
                    next_sweep = loop.time() + sweep_every_s
                backoff.reset()
            except REDIS_DOWN as exc:
                await wait_for_redis(stop, backoff, exc, self.reader, self.consumer)
        log.info("cj_consumer_stopped", consumer=self.consumer)
