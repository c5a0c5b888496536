"""The CJ consumer of `cj:callbacks`: apply each callback, advance batches whose wave is done.

Its reaper pass (`maintain`) reclaims callback entries left pending by a consumer that
died between reading and applying them (the apply is idempotent by entry id: the Lua
script applies only if its XACK acknowledged something), dead-letters an entry
delivered more than `max_deliveries` times (reason `max_deliveries`; a valid callback is
also parked, for `cjs dlq redrive` to apply later), advances batches with nothing in
flight (`sweep`), records the group's position, updates the pending gauge and prunes dead
consumers.

Unusual callbacks (duplicates, orphans, late ones) are logged once per page, with counts
and a few examples: a backlog of thousands of them costs a few lines, not one each. An
orphan's example says why (`reason`: its batch unknown, its correlation id unknown, or a
known id naming other essays than the pair it was asked for, `essay_mismatch`).
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from typing import Any, Unpack

import structlog

from cj.continuation import WaveGate, advance
from cj.metrics import (
    CJ_CALLBACKS,
    CJ_ORPHANS,
    CJ_STEP_SECONDS,
    show_completion,
    show_open_batches,
)
from cj.step_lease import StepLease
from events.codec import DecodeError
from events.streams import CALLBACKS, CJ_GROUP
from events.text import as_str
from events.types import Callback, ComparisonCompleted, ComparisonFailed, Event
from projections import keys as pkeys
from projections.store import CallbackApplier, list_batches
from streams.consumer import GroupConsumer, GroupOptions
from streams.errors import policy_of
from streams.keys import Keys
from streams.metrics import labelled
from streams.pending import Claimed, StuckAction, claim_idle
from streams.reader import Entry
from streams.resilience import REDIS_ERRORS, Backoff

log = structlog.get_logger("cj.consumer")

EXAMPLES = 5  # examples per log line of unusual callbacks


# Why callback.lua counted a callback as an orphan, by the in_flight it returned for it.
ORPHAN_REASONS = {-2: "unknown_batch", -3: "essay_mismatch"}


def _orphan_reason(callback: Callback, left: int) -> dict[str, str]:
    """An orphan example's reason: its batch or its correlation id unknown, or a known id
    naming other essays than the pair it was asked for (their ids, never their text)."""
    reason = ORPHAN_REASONS.get(left, "unknown_correlation_id")
    if reason == "essay_mismatch":
        return {
            "reason": reason,
            "essay_a_id": callback.essay_a_id,
            "essay_b_id": callback.essay_b_id,
        }
    return {
        "reason": reason,
        "unknown": "batch_id" if reason == "unknown_batch" else "correlation_id",
    }


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
        # The sweep advances without it: the safety net for a holder that died.
        self.lease = StepLease(r, keys, consumer)

    async def handle(self, entries: list[Entry]) -> None:
        callbacks = await self.accepted(entries)
        if not callbacks:
            return
        # One round trip for the page: each callback's apply is atomic on its own. The page's
        # keys are its partition's, one slot on a cluster too.
        with CJ_STEP_SECONDS.labels("apply").time():
            results = await self.applier.apply_page([(c, e.entry_id) for e, c in callbacks])
            await self.durable()
        to_advance = self.report(callbacks, results)
        for batch_id in sorted(to_advance):
            await self.lease.run(batch_id, functools.partial(self.advance_batch, batch_id))

    def report(self, callbacks: list[tuple[Entry, Callback]], results: list[Any]) -> set[str]:
        """Count and log what the scripts said about a page; the batches to advance."""
        to_advance: set[str] = set()
        unusual: dict[str, list[tuple[Entry, Callback, int]]] = {}
        counts: Counter[str] = Counter()  # counted once per outcome (issue 11: a lock each)
        for (entry, callback), (outcome, left) in zip(callbacks, results, strict=True):
            outcome = as_str(outcome)
            if outcome == "replayed":
                continue
            counts[outcome] += 1
            if outcome == "accepted":
                if self.waves.wants(callback.batch_id, int(left)):
                    to_advance.add(callback.batch_id)
                continue
            if outcome == "orphan":
                CJ_ORPHANS.labels(callback.source_service or "unknown").inc()
            unusual.setdefault(outcome, []).append((entry, callback, int(left)))
        for outcome, count in counts.items():
            labelled(CJ_CALLBACKS, outcome).inc(count)
        for outcome, items in unusual.items():
            log.warning(
                f"callback_{outcome}",
                count=len(items),
                batch_ids=sorted({c.batch_id for _, c, _ in items})[:EXAMPLES],
                source_services=dict(Counter(c.source_service for _, c, _ in items)),
                first_entry_id=items[0][0].entry_id,
                last_entry_id=items[-1][0].entry_id,
                examples=[
                    {
                        "entry_id": e.entry_id,
                        "batch_id": c.batch_id,
                        "correlation_id": c.correlation_id,
                        "source_service": c.source_service,
                        "event_type": type(c).__name__,
                        **(_orphan_reason(c, left) if outcome == "orphan" else {}),
                    }
                    for e, c, left in items[:EXAMPLES]
                ],
                **(
                    {
                        reason: sum(1 for _, _, left in items if left == code)
                        for code, reason in ORPHAN_REASONS.items()
                    }
                    if outcome == "orphan"
                    else {}
                ),
            )
        return to_advance

    async def advance_batch(self, batch_id: str) -> bool:
        """The batch's next step; True when one was taken. A failure that is not Redis's
        passing state (streams/errors.py) is logged and the consumer goes on with the other
        batches (the stalled-batch reaper ends that one in time) instead of dying on it at
        every restart; Redis's state is raised to the run loop, which waits it out."""
        try:
            decision = await advance(self.r, self.keys, batch_id, decider=self.waves.decide)
            return decision is not None
        except Exception as exc:
            if policy_of(exc) is not None:
                raise
            log.exception("advance_failed", batch_id=batch_id, error=f"{type(exc).__name__}: {exc}")
            return False

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
                moved += await self.advance_batch(batch_id)
        show_open_batches(self.keys.partition or 0, self.keys.partitions, open_ids)
        return moved

    async def reclaim(self) -> list[StuckAction]:
        """Claim callback entries idle past the processing timeout and apply them again; an
        entry delivered more than `max_deliveries` times goes to `dlq:cj:callbacks`."""
        if self.claims_paused:
            return []
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
        # A valid callback is parked: acknowledged without being applied, it waits for
        # `cjs dlq redrive`, and replay leaves it out meanwhile as the projection does.
        park = frozenset(
            c.entry.entry_id
            for c, event in items
            if event is not None and self.problem(c.entry, event) is None
        )
        await self.dead_letter(
            [
                (
                    c.entry,
                    DecodeError(
                        "max_deliveries", f"delivered {c.deliveries} times (limit {limit})"
                    ),
                )
                for c, _ in items
            ],
            park=park,
        )

    async def maintain(self) -> list[StuckAction]:
        """One reaper pass: reclaim, sweep, group position, pending gauge, dead consumers."""
        actions = await self.reclaim()
        await self.sweep()
        await self.upkeep()
        return actions

    async def run(self, stop: asyncio.Event, *, sweep_every_s: float = 10.0) -> None:
        """Consume until `stop` is set; the page in hand is applied before returning (its
        entries are acknowledged by the apply itself). Survives Redis restarts and failures
        (streams/errors.py); a destroyed group is recreated where it had got to."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        next_sweep = 0.0  # a first pass at once: recovers what a previous run left
        resweep = False
        while not stop.is_set():
            try:
                if next_sweep == 0.0:
                    await self.start()
                    await self.sweep()
                    next_sweep = loop.time() + sweep_every_s
                if resweep:
                    # A fault can fall between a page's apply (its callbacks acknowledged: never
                    # delivered again) and its batches' advance, here or in a consumer that
                    # died: sweep once Redis answers, not a pass later (bench/failover.py:
                    # batches ended 10-20 s after a failover, one or two passes).
                    await self.sweep()
                    resweep = False
                await self.step()
                if loop.time() >= next_sweep:
                    await self.maintain()
                    next_sweep = loop.time() + sweep_every_s
                backoff.reset()
            except REDIS_ERRORS as exc:
                await self.recover(stop, backoff, exc)
                resweep = True
        log.info("cj_consumer_stopped", consumer=self.consumer)
