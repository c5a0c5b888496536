"""What every consumer of a group does the same way, written once: reading its stream,
moving what it cannot use to the dead letters, the bookkeeping of a reclaim, group upkeep.

A service subclasses `GroupConsumer`, names the events it `accepts`, and supplies
`handle` (use a page of entries) and `expire` (what becomes of an entry delivered too
often); how it claims stuck entries and how it runs stay its own.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypedDict, TypeVar, cast

import structlog

from events import codec
from events.codec import DecodeError
from events.types import Event
from streams.dlq import dead_letter
from streams.durability import wait_for_replicas
from streams.keys import Keys
from streams.metrics import STUCK_ITEMS
from streams.pending import Claimed, StuckAction, group_upkeep
from streams.reader import Entry, GroupReader, ensure_group, split_decoded

log = structlog.get_logger("streams.consumer")

E = TypeVar("E", bound=Event)


class GroupOptions(TypedDict, total=False):
    """How a consumer reads and looks after its group (defaults in `GroupConsumer`)."""

    count: int  # entries per read
    block_ms: int  # how long a read waits for new entries
    processing_timeout_s: float  # a pending entry idle this long is reclaimed
    max_deliveries: int  # an entry delivered more often is expired
    dead_consumer_after_s: float  # idle consumers with nothing pending are removed
    replicas_ack: int  # commits wait for this many replicas (CJS_MIN_REPLICAS_ACK)
    replica_ack_timeout_ms: int  # ... at most this long


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
    ) -> None:
        self.keys = keys
        self.replicas_ack = replicas_ack
        self.replica_ack_timeout_ms = replica_ack_timeout_ms
        self.stream_name = stream_name
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

    async def start(self) -> None:
        await ensure_group(self.r, self.stream, self.group)

    async def step(self) -> int:
        """Read and handle one page; returns how many entries it held."""
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
        return claimed.deliveries > self.max_deliveries

    async def accepted(self, entries: list[Entry]) -> list[tuple[Entry, E]]:
        """The entries holding an event this consumer accepts; the others (undecodable, or an
        event that does not belong on this stream) go to the dead letters in one MULTI/EXEC."""
        good, bad = split_decoded(entries)
        out: list[tuple[Entry, E]] = []
        for entry, event in good:
            if isinstance(event, self.accepts):
                out.append((entry, cast(E, event)))
            else:
                detail = f"{type(event).__name__} on {self.stream_name}"
                bad.append((entry, DecodeError("unexpected_type", detail)))
        await self.dead_letter(bad)
        return out

    async def dead_letter(self, letters: list[tuple[Entry, DecodeError]]) -> None:
        await dead_letter(self.r, self.keys, self.stream_name, letters, self.group, self.consumer)

    async def settle(self, claimed: list[Claimed]) -> list[StuckAction]:
        """After a claim: expire what was delivered too often, handle the rest again, and record
        (StuckAction, counter, log line) what became of each entry."""
        actions: list[StuckAction] = []
        expired: list[tuple[Claimed, Event | None]] = []
        retry: list[Entry] = []
        for c in claimed:
            event: Event | None
            try:
                event = codec.decode(c.entry.fields)
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

    async def upkeep(self) -> None:
        """The part of a reaper pass every group shares: the pending gauge, and removing
        consumers dead with nothing pending (never this one)."""
        await group_upkeep(
            self.r,
            self.keys,
            self.stream_name,
            self.group,
            self.consumer,
            dead_after_s=self.dead_consumer_after_s,
        )
