"""What every consumer of a group does the same way, written once: reading its stream,
moving what it cannot use to the dead letters, the bookkeeping of a reclaim, group upkeep.

A service subclasses `GroupConsumer`, names the events it `accepts`, and supplies
`handle` (use a page of entries) and `expire` (what becomes of an entry delivered too
often); how it claims stuck entries and how it runs stay its own.

What is accepted: an entry that decodes to an event of `accepts`, whose identifiers follow
the grammar (events/ids.py) and whose `occurred_at` is credible (events/clock.py). Anything
else is dead-lettered with its reason (`missing_field`, `unknown_type`, `invalid_data`,
`unexpected_type`, `invalid_id`, `invalid_time`); replay skips the same entries.

A delivery counts toward `max_deliveries` only when an entry is claimed away from a consumer
that stopped handling it: re-reading one's own entries does not count (streams/reader.py),
and for one processing timeout after its own Redis outage a consumer claims nothing (every
entry looks idle after an outage; their owners get the time to touch them again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any, ClassVar, Generic, TypedDict, TypeVar, cast

import structlog

from events import codec
from events.clock import time_problem
from events.codec import DecodeError
from events.ids import event_id_problem
from events.types import Event
from streams.dlq import DEFAULT_POLICY, DeadLetterPolicy, dead_letter
from streams.durability import wait_for_replicas
from streams.errors import Policy
from streams.keys import Keys
from streams.metrics import STUCK_ITEMS
from streams.paging import entries_lost
from streams.pending import Claimed, StuckAction, group_upkeep, pending_details
from streams.reader import Entry, GroupReader, ensure_group, record_position, split_decoded
from streams.resilience import Backoff, wait_for_redis

log = structlog.get_logger("streams.consumer")

E = TypeVar("E", bound=Event)

LOST_AFTER_MS = 5_000
"""How long an entry of a consumer's own, pending but not in its hands, waits before it is
taken for a delivery it never got (`GroupConsumer.reread_lost_deliveries`)."""


class GroupOptions(TypedDict, total=False):
    """How a consumer reads and looks after its group (defaults in `GroupConsumer`)."""

    count: int  # entries per read
    block_ms: int  # how long a read waits for new entries
    processing_timeout_s: float  # a pending entry idle this long is reclaimed
    max_deliveries: int  # an entry delivered more often is expired
    dead_consumer_after_s: float  # idle consumers with nothing pending are removed
    replicas_ack: int  # commits wait for this many replicas (CJS_MIN_REPLICAS_ACK)
    replica_ack_timeout_ms: int  # ... at most this long
    dead_letters: DeadLetterPolicy  # size cap, length and retention of dead letters


class GroupConsumer(Generic[E]):
    """One consumer (`consumer`) of `group` on the stream `stream_name` (named without prefix)."""

    # The event types this consumer uses; anything else on its stream is dead-lettered.
    accepts: ClassVar[tuple[type[Event], ...]]
    # What an entry delivered more than `max_deliveries` times becomes (a StuckAction action).
    expire_action: ClassVar[str]
    # The noun in the log line of a stuck entry: `stuck_<noun>_<action>`.
    stuck_noun: ClassVar[str]

    def __init__(
        self,
        r: Any,
        keys: Keys,
        stream_name: str,
        group: str,
        consumer: str,
        *,
        count: int = 100,
        block_ms: int = 1000,
        processing_timeout_s: float = 120.0,
        max_deliveries: int = 3,
        dead_consumer_after_s: float = 3600.0,
        replicas_ack: int = 0,
        replica_ack_timeout_ms: int = 1000,
        dead_letters: DeadLetterPolicy = DEFAULT_POLICY,
    ) -> None:
        self.keys = keys
        self.replicas_ack = replicas_ack
        self.replica_ack_timeout_ms = replica_ack_timeout_ms
        self.stream_name = stream_name
        self.dead_letter_policy = dead_letters
        # Monotonic time before which this consumer claims nothing (set after an outage).
        self.claims_paused_until = 0.0
        # The group was found missing (NOGROUP): recreate it before the next read.
        self.group_missing = False
        # What the stream had lost when last reported (see streams.paging.entries_lost).
        self.lost_seen: dict[str, Any] | None = None
        # The reader holds the connection and who this consumer is.
        self.reader = GroupReader(
            r,
            keys.stream(stream_name),
            group,
            consumer,
            count=count,
            block_ms=block_ms,
            name=stream_name,
        )
        self.processing_timeout_s = processing_timeout_s
        self.max_deliveries = max_deliveries
        self.dead_consumer_after_s = dead_consumer_after_s

    @property
    def r(self) -> Any:
        return self.reader.r

    @property
    def group(self) -> str:
        return self.reader.group

    @property
    def consumer(self) -> str:
        return self.reader.consumer

    @property
    def stream(self) -> str:
        return self.reader.stream

    @property
    def timeout_ms(self) -> int:
        return int(self.processing_timeout_s * 1000)

    async def durable(self) -> None:
        """After a commit: wait for CJS_MIN_REPLICAS_ACK replicas (streams/durability.py)."""
        await wait_for_replicas(self.r, self.keys, self.replicas_ack, self.replica_ack_timeout_ms)

    @property
    def group_record(self) -> str:
        return self.keys.group_record(self.stream_name, self.group)

    async def start(self) -> None:
        """Create the group if it is missing (where it had got to), and record its position."""
        await ensure_group(self.r, self.stream, self.group, self.group_record)
        # Seen in the group at once (a blocking read of nothing does not create a consumer).
        await self.r.xgroup_createconsumer(self.stream, self.group, self.consumer)
        self.group_missing = False
        await self.record_position()

    async def record_position(self) -> str | None:
        return await record_position(
            self.r,
            self.stream,
            self.group,
            self.group_record,
            self.keys.group_handled(self.stream_name, self.group),
        )

    async def step(self) -> int:
        """Read and handle one page; returns how many entries it held."""
        if self.group_missing:
            await self.start()
        entries = await self.reader.read()
        if entries:
            await self.handle(entries)
        return len(entries)

    async def handle(self, entries: list[Entry]) -> None:
        raise NotImplementedError

    async def expire(self, items: list[tuple[Claimed, Event | None]]) -> None:
        """End entries delivered too often (each with its event, None when undecodable)."""
        raise NotImplementedError

    def expires(self, claimed: Claimed, event: Event | None) -> bool:
        # Delivered more than max_deliveries times: with max_deliveries=3, the claim that makes
        # the 4th delivery expires the entry (the 3rd is still handled).
        return claimed.deliveries > self.max_deliveries

    def problem(self, entry: Entry, event: Event) -> DecodeError | None:
        """Why a decoded entry cannot be accepted, or None (see the module's docstring)."""
        if not isinstance(event, self.accepts):
            return DecodeError("unexpected_type", f"{type(event).__name__} on {self.stream_name}")
        id_problem = event_id_problem(event)
        if id_problem:
            return DecodeError("invalid_id", id_problem)
        when = time_problem(event.occurred_at, entry.entry_id)
        if when:
            return DecodeError("invalid_time", when)
        return None

    async def accepted(self, entries: list[Entry]) -> list[tuple[Entry, E]]:
        """The entries holding an event this consumer accepts; the others (undecodable, an
        event that does not belong on this stream, a bad id or time) go to the dead letters."""
        good, bad = split_decoded(entries)
        out: list[tuple[Entry, E]] = []
        for entry, event in good:
            problem = self.problem(entry, event)
            if problem is None:
                out.append((entry, cast(E, event)))
            else:
                bad.append((entry, problem))
        await self.dead_letter(bad)
        return out

    async def dead_letter(
        self, letters: list[tuple[Entry, DecodeError]], *, park: frozenset[str] = frozenset()
    ) -> list[str | None]:
        return await dead_letter(
            self.r,
            self.keys,
            self.stream_name,
            letters,
            self.group,
            self.consumer,
            policy=self.dead_letter_policy,
            park=park,
        )

    # --- after a Redis error ------------------------------------------------------------------

    async def recover(self, stop: asyncio.Event, backoff: Backoff, exc: BaseException) -> None:
        """After a Redis error: its policy (streams/errors.py) or, for a bug, raise it again.
        Claims pause for one processing timeout; a destroyed group is recreated before the
        next read."""
        policy = await wait_for_redis(stop, backoff, exc, self.reader, self.consumer)
        self.claims_paused_until = time.monotonic() + self.processing_timeout_s
        if policy is Policy.RECREATE:
            self.group_missing = True

    @property
    def claims_paused(self) -> bool:
        return time.monotonic() < self.claims_paused_until

    async def settle(self, claimed: list[Claimed]) -> list[StuckAction]:
        """After a claim: expire what was delivered too often, handle the rest again, and record
        (StuckAction, counter, log line) what became of each entry."""
        actions: list[StuckAction] = []
        expired: list[tuple[Claimed, Event | None]] = []
        retry: list[Entry] = []
        for c in claimed:
            event: Event | None
            try:
                event = codec.decode(c.entry.fields, c.entry.entry_id)
            except DecodeError:
                event = None
            expire = self.expires(c, event)
            action = StuckAction.of(
                c,
                self.stream_name,
                self.group,
                self.expire_action if expire else "reclaimed",
                self.consumer,
                event,
            )
            actions.append(action)
            STUCK_ITEMS.labels(action.action).inc()
            log.warning(f"stuck_{self.stuck_noun}_{action.action}", **action.log_fields())
            if expire:
                expired.append((c, event))
            else:
                retry.append(c.entry)
        if expired:
            await self.expire(expired)
        if retry:
            await self.handle(retry)
        return actions

    def holding(self) -> Collection[str]:
        """The entries this consumer is working on now, pending by design: none between pages
        (the CJ consumer's reaper pass runs between them); the LPS worker's in hand."""
        return ()

    async def reread_lost_deliveries(self) -> None:
        """Read again, through the reader's own-pending backlog, the entries this consumer holds
        but never got. Redis delivers a read's entries before it answers; when the connection
        drops in between and the client retries the read (redis-py's retries bridge a short
        outage, a failover's included), the retry reads on after them. Nobody else claims them
        (`claim_idle` spares a live consumer's own entries), so without this they stayed
        pending for ever and their batch never ended.

        Such an entry is one of this consumer's pending entries that it is not `holding`, idle
        `LOST_AFTER_MS` (or the processing timeout, when shorter), read again at the next
        reaper pass: not a processing timeout later (120 s by default), since a batch's last
        decision waits for every callback. Mistaking an entry that was only slow to reach its
        handler costs a read: what is in hand is left out of a read, a request already
        answered is acknowledged without a call, a callback already applied is not counted
        again."""
        held = self.holding()
        # Oldest first, those in hand among them: one more row than those can fill.
        stale = await pending_details(
            self.r,
            self.stream,
            self.group,
            min_idle_ms=min(self.timeout_ms, LOST_AFTER_MS),
            consumer=self.consumer,
            count=len(held) + 1,
        )
        lost = [row for row in stale if row["entry_id"] not in held]
        if lost:
            log.warning(
                "lost_delivery_read_again",
                stream=self.stream_name,
                consumer=self.consumer,
                entry_id=lost[0]["entry_id"],
                idle_ms=lost[0]["idle_ms"],
            )
            self.reader.rewind()

    async def upkeep(self) -> None:
        """The part of a reaper pass every group shares: the group's position recorded, the
        pending gauge, and removing consumers dead with nothing pending (never this one)."""
        await self.record_position()
        await self.reread_lost_deliveries()
        lost = await entries_lost(self.r, self.stream)
        if lost is not None and lost != self.lost_seen:
            # Streams are the source of truth: entries deleted from one cannot be replayed.
            log.error("stream_trimmed", stream=self.stream_name, **lost)
            self.lost_seen = lost
        await group_upkeep(
            self.r,
            self.keys,
            self.stream_name,
            self.group,
            self.consumer,
            dead_after_s=self.dead_consumer_after_s,
        )
