"""The CJ consumer of `cj:callbacks`: apply each callback, advance batches whose wave is done.

Its reaper pass (`maintain`) reclaims callback entries left pending by a consumer that
died between reading and applying them (the apply is idempotent by entry id: the Lua
script applies only if its XACK acknowledged something), dead-letters an entry
delivered more than `max_deliveries` times (reason `max_deliveries`), advances batches
with nothing in flight (`sweep`), updates the pending gauge and prunes dead consumers.
"""

from __future__ import annotations

import asyncio
from typing import Any, Unpack

import structlog

from cj.continuation import WaveGate, advance
from cj.metrics import (
    CJ_CALLBACKS,
    CJ_OPEN_BATCHES,
    CJ_ORPHANS,
    CJ_STEP_SECONDS,
    keep_completion_of,
    show_completion,
)
from events.codec import DecodeError
from events.streams import CALLBACKS, CJ_GROUP
from events.text import as_str
from events.types import Callback, ComparisonCompleted, ComparisonFailed, Event
from projections import keys as pkeys
from projections.store import CallbackApplier, list_batches
from streams.consumer import GroupConsumer, GroupOptions
from streams.durability import is_cluster
from streams.keys import Keys
from streams.pending import Claimed, StuckAction, claim_idle
from streams.reader import Entry
from streams.resilience import REDIS_DOWN, Backoff, wait_for_redis

log = structlog.get_logger("cj.consumer")


class CJConsumer(GroupConsumer[Callback]):
    accepts = (ComparisonCompleted, ComparisonFailed)
    expire_action = "dead_lettered"
    stuck_noun = "callback"

    def __init__(
        self,
        r: Any,
        keys: Keys,
        consumer: str,
        *,
        wave_overlap: float = 1.0,
        **options: Unpack[GroupOptions],
    ):
        super().__init__(r, keys, CALLBACKS, CJ_GROUP, consumer, **options)
        self.applier = CallbackApplier(r, keys, CJ_GROUP)
        # The next wave is planned once this share of the current one is back (1: all).
        self.waves = WaveGate(wave_overlap)

    async def handle(self, entries: list[Entry]) -> None:
        callbacks = await self.accepted(entries)
        if not callbacks:
            return
        # One round trip for the page: each script call is atomic on its own.
        with CJ_STEP_SECONDS.labels("apply").time():
            if is_cluster(self.r):  # EVALSHA one by one: each loads its script where it runs
                results = [await self.applier.apply(c, e.entry_id) for e, c in callbacks]
            else:
                async with self.r.pipeline(transaction=False) as pipe:
                    for entry, callback in callbacks:
                        await self.applier.queue(pipe, callback, entry.entry_id)
                    results = await pipe.execute()
            await self.durable()
        to_advance: set[str] = set()
        for (entry, callback), (outcome, left) in zip(callbacks, results, strict=True):
            outcome = as_str(outcome)
            if outcome == "replayed":
                continue
            CJ_CALLBACKS.labels(outcome).inc()
            if outcome == "accepted":
                if self.waves.wants(callback.batch_id, int(left)):
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
            await advance(self.r, self.keys, batch_id, decider=self.waves.decide)

    async def sweep(self) -> int:
        """Advance every open batch that has nothing in flight (recovers a crash between the
        last callback of a wave and its continuation, and starts registered batches); set the
        open-batch gauges (count, and completion per open batch only)."""
        batch_ids = await list_batches(self.r, self.keys)
        async with self.r.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hmget(
                    pkeys.batch(self.keys, batch_id),
                    "status",
                    "in_flight",
                    "completed",
                    "failed",
                    "denominator",
                )
            rows = await pipe.execute() if batch_ids else []
        moved = 0
        open_ids = []
        for batch_id, (status, in_flight, completed, failed, denominator) in zip(
            batch_ids, rows, strict=True
        ):
            if status not in (b"registered", b"running"):
                continue
            open_ids.append(batch_id)
            total = int(denominator or 0)
            accepted = int(completed or 0) + int(failed or 0)
            show_completion(batch_id, accepted / total if total else 0.0)
            if int(in_flight or 0) == 0:
                decision = await advance(self.r, self.keys, batch_id, decider=self.waves.decide)
                moved += decision is not None
        CJ_OPEN_BATCHES.set(len(open_ids))
        keep_completion_of(open_ids)
        return moved

    async def reclaim(self) -> list[StuckAction]:
        """Claim callback entries idle past the processing timeout and apply them again; an
        entry delivered more than `max_deliveries` times goes to `dlq:cj:callbacks`."""
        claimed, deleted = await claim_idle(
            self.r, self.stream, CJ_GROUP, self.consumer, self.timeout_ms
        )
        if deleted:
            log.warning(
                "stuck_callbacks_deleted", stream=CALLBACKS, group=CJ_GROUP, entry_ids=deleted
            )
        return await self.settle(claimed)

    async def expire(self, items: list[tuple[Claimed, Event | None]]) -> None:
        limit = self.max_deliveries
        await self.dead_letter(
            [
                (
                    c.entry,
                    DecodeError(
                        "max_deliveries", f"delivered {c.deliveries} times (limit {limit})"
                    ),
                )
                for c, _ in items
            ]
        )

    async def maintain(self) -> list[StuckAction]:
        """One reaper pass: reclaim, sweep, pending gauge, dead consumers."""
        actions = await self.reclaim()
        await self.sweep()
        await self.upkeep()
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
