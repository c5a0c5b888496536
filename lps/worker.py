"""The LPS worker: consumes `lps:requests` (group `lps`), judges, appends one callback per request.

Per request, the callback XADD, the request's XACK and its `lps:answered` mark go
in one Lua script: a request is acknowledged exactly when its result exists.
Results finishing together share that script call (a coalescing committer), so
a fast judge costs one round trip per group of results, not per result.

Fencing: the script commits a result only while this worker still holds the request
(it is pending for this consumer). A worker that was paused or cut off past the
processing timeout, whose request another worker claimed meanwhile, cannot commit:
its result is dropped (`commit_fenced`), the holder's counts. Each commit carries a
token, stored in the answered mark, so a call the client re-sends after a timeout finds
its own commit and appends nothing twice. Before judging a request it has held for half
the processing timeout, the worker checks that it still holds it.

Every event the worker writes goes through `events.redact.scrub_struct`: no key or
token a provider echoed reaches a stream.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Unpack

import structlog

from events.streams import LPS_GROUP, REQUESTS
from events.text import as_str
from events.types import (
    ComparisonFailed,
    ComparisonRequested,
    ErrorDetail,
    Event,
    RequestExpired,
    new_id,
)
from lps import keys as lkeys
from lps.breaker import Breaker
from lps.cooldown import Cooldown
from lps.essays import EssayStore
from lps.metrics import LPS_REQUESTS
from lps.modes import JUDGED_EACH, MODES, ModeContext, Unit, per_request, plan_units
from lps.modes.batch_api import sweep_orphans
from lps.providers.base import Provider
from lps.recorder import Reads, Recorder, answered, encode
from lps.retry import Outcome, RetryPolicy, judge_with_retries
from streams.consumer import GroupConsumer, GroupOptions
from streams.errors import Policy, kind_of, policy_of
from streams.keys import Keys
from streams.metrics import STUCK_ITEMS
from streams.pending import (
    Claimed,
    StuckAction,
    claim_ids,
    keep_alive,
    pending_details,
    release_entries,
)
from streams.reader import Entry
from streams.resilience import REDIS_ERRORS, Backoff, disconnect, sleep_unless

log = structlog.get_logger("lps.worker")

DONE_TTL_S = 7 * 24 * 3600

ProviderFactory = Callable[[str], Provider]


# Commit results (see the module's docstring). For each item: if this consumer still holds
# the request, append its extra events (to KEYS[3]) and its callback, acknowledge the request
# and record the commit's token under the request's correlation id in its batch's `answered`
# hash (lps/keys.py), whose expiry each commit renews.
# KEYS: 1 requests, 2 callbacks, 3 dispatches, 3+i the answered hash of item i's batch
# ARGV: 1 group, 2 consumer, 3 answered hash ttl s, 4 items; per item: entry id, token,
#       correlation id, number of extra events, then per event (the extras, then the
#       callback) its number of stream fields and those fields (name, value, ...): an event
#       is `type`, `data` or flat (events/codec.py).
# Returns per item: 'committed'; 'again' (this very commit was made before: a re-sent call);
# 'fenced' (the request is held by another consumer, or was answered by one).
_COMMIT_LUA = """
local out = {}
local a = 5
local function append(key)
  local n = tonumber(ARGV[a])
  redis.call('XADD', key, '*', unpack(ARGV, a + 1, a + n))
  a = a + 1 + n
end
local function skip()
  a = a + 1 + tonumber(ARGV[a])
end
local renewed = {}
for i = 1, tonumber(ARGV[4]) do
  local entry, token, cid, nextra = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  a = a + 4
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], entry, entry, 1, ARGV[2])
  if #held == 1 then
    for j = 1, nextra do append(KEYS[3]) end
    append(KEYS[2])
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    redis.call('HSET', KEYS[3 + i], cid, token)
    -- Once a hash a call: a second EXPIRE would move a 7-day deadline by microseconds at
    -- most (Redis 7 keeps a script's clock still: not at all). Issue 11: a command a comparison.
    if not renewed[KEYS[3 + i]] then
      redis.call('EXPIRE', KEYS[3 + i], ARGV[3])
      renewed[KEYS[3 + i]] = true
    end
    out[i] = 'committed'
  else
    for j = 0, nextra do skip() end
    if redis.call('HGET', KEYS[3 + i], cid) == token then
      out[i] = 'again'
    else
      out[i] = 'fenced'
    end
  end
end
return out
"""

COMMITTED = ("committed", "again")


class _Tokens:
    """Commit tokens: a random prefix of this process and a count, unique like a random id
    per commit (what a token must be: another worker's commit of the same request carries
    another) at a tenth of its cost (issue 11). A forked child draws a prefix of its own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = new_id()[:10]
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


_token = _Tokens()


@dataclass
class _Commit:
    entry_id: str
    callback: Event
    extra: list[tuple[str, Event]] = field(default_factory=list)
    done: asyncio.Future[str] | None = None
    # Tells this commit from another worker's of the same request (stored once per comparison).
    token: str = field(default_factory=_token)


class Committer:
    """Appends results: callback + XACK + answered mark, many results per script call, fenced
    by this consumer's hold on each request. A commit that meets a Redis error that passes
    (streams/errors.py) is tried again, with backoff, for up to `retry_for_s`: the script
    is idempotent, and a judgement is worth keeping."""

    def __init__(
        self,
        r: Any,
        keys: Keys,
        consumer: str,
        *,
        retry_for_s: float = 120.0,
        after: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.r = r
        self.keys = keys
        self.consumer = consumer
        self.retry_for_s = retry_for_s
        # Run after each commit, before its callers hear of it (waiting for a replica).
        self.after = after
        self._script = r.register_script(_COMMIT_LUA)
        self._queue: asyncio.Queue[_Commit] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def commit(
        self, entry_id: str, callback: Event, extra: list[tuple[str, Event]] | None = None
    ) -> str:
        """Commit one result; returns 'committed' (or 'again') or 'fenced'."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # The queue is unbounded: `put` would never wait, and costs a coroutine (issue 11).
        self._queue.put_nowait(_Commit(entry_id, callback, extra or [], done))
        return await done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            try:
                outcomes = await self._write_retrying(batch)
            except Exception as exc:  # the callers decide; nothing was acknowledged
                for item in batch:
                    if item.done and not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.done and not item.done.done():
                    item.done.set_result(outcome)

    async def _write_retrying(self, batch: list[_Commit]) -> list[str]:
        backoff = Backoff(base=0.05, cap=2.0)
        deadline = time.monotonic() + self.retry_for_s
        while True:
            try:
                return await self._write(batch)
            except Exception as exc:
                policy = policy_of(exc)
                if policy is None or policy is Policy.RECREATE or time.monotonic() > deadline:
                    raise
                if policy is Policy.RECONNECT:
                    await disconnect(self.r)
                delay = backoff.next()
                log.warning(
                    "commit_waiting_for_redis",
                    consumer=self.consumer,
                    results=len(batch),
                    error_kind=kind_of(exc),
                    error=str(exc)[:200],
                    retry_in_s=delay,
                )
                await asyncio.sleep(delay)

    async def _write(self, batch: list[_Commit]) -> list[str]:
        k = self.keys
        answered_keys = []
        args: list[Any] = [LPS_GROUP, self.consumer, DONE_TTL_S, len(batch)]
        for item in batch:
            answered_keys.append(lkeys.answered(k, getattr(item.callback, "batch_id", "")))
            cid = getattr(item.callback, "correlation_id", "")
            args += [item.entry_id, item.token, cid, len(item.extra)]
            for stream, event in item.extra:
                assert stream == k.dispatches, "extra events go to lps:dispatches"
                _append_fields(args, encode(event))
            _append_fields(args, encode(item.callback))
        outcomes = await self._script(
            keys=[k.requests, k.callbacks, k.dispatches, *answered_keys], args=args
        )
        if self.after is not None:
            await self.after()
        return [as_str(o) for o in outcomes]


def _append_fields(args: list[Any], fields: dict[str, bytes]) -> None:
    args.append(2 * len(fields))
    for name, value in fields.items():
        args += [name, value]


class LPSWorker(GroupConsumer[ComparisonRequested]):
    accepts = (ComparisonRequested,)
    expire_action = "expired"
    stuck_noun = "request"

    def __init__(
        self,
        r: Any,
        keys: Keys,
        consumer: str,
        providers: ProviderFactory,
        *,
        policy: RetryPolicy | None = None,
        concurrency: int = 8,
        batch_poll_interval_s: float = 30.0,
        cooldown: Cooldown | None = None,
        breaker: Breaker | None = None,
        max_pages: int = 2,
        **options: Unpack[GroupOptions],
    ) -> None:
        options.setdefault("count", 64)
        super().__init__(r, keys, REQUESTS, LPS_GROUP, consumer, **options)
        self.providers = providers
        self._provider_cache: dict[str, Provider] = {}
        self.policy = policy or RetryPolicy()
        self.concurrency = concurrency
        self.committer = Committer(
            r, keys, consumer, retry_for_s=self.processing_timeout_s, after=self.durable
        )
        # When each entry in hand was read (monotonic): one held long may have been claimed.
        self._read_at: dict[str, float] = {}
        self.max_pages = max_pages
        self.in_hand: set[str] = set()
        # Set by run() to its stop event: units not started when it is set are released.
        self._stop = asyncio.Event()
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random()
        # A 429/529 seen here makes every worker wait before its next call to that model.
        self.cooldown = cooldown or Cooldown(r, keys)
        # An account-wide failure (revoked key, billing) seen here stops every worker's calls.
        self.breaker = breaker or Breaker(r, keys)
        # Requests name essays by reference; their texts come from the batch's essay store.
        self.essays = EssayStore(r, keys)
        self.record = Recorder(r, keys, consumer, self.committer.commit, self.prompt_sha256)
        self.mode_context = ModeContext(
            provider=self.provider,
            judge=self.judge_one,
            record=self.record,
            breaker=self.breaker,
            policy=self.policy,
            release=self.release,
            stopping=lambda: self._stop.is_set(),
            wait_or_stop=self.wait_or_stop,
            r=r,
            keys=keys,
            poll_interval_s=batch_poll_interval_s,
        )

    def provider(self, name: str) -> Provider:
        if name not in self._provider_cache:
            self._provider_cache[name] = self.providers(name)
        return self._provider_cache[name]

    async def start(self) -> None:
        await super().start()
        self.committer.start()

    async def close(self) -> None:
        await self.committer.stop()
        for provider in self._provider_cache.values():
            await provider.aclose()

    def holding(self) -> Collection[str]:
        return self.in_hand

    # --- reading ---------------------------------------------------------------

    async def handle(self, entries: list[Entry]) -> None:
        # Entries already being worked on by this process (a rewound reader re-reads its own
        # pending entries, some of which a reclaim may hold) are not taken twice.
        entries = [e for e in entries if e.entry_id not in self.in_hand]
        if not entries:
            return
        ids = {e.entry_id for e in entries}
        self.in_hand.update(ids)
        now = time.monotonic()
        self._read_at.update((i, now) for i in ids)
        try:
            await self._handle(entries)
        finally:
            self.in_hand.difference_update(ids)
            for i in ids:
                self._read_at.pop(i, None)

    async def _handle(self, entries: list[Entry]) -> None:
        requests = await self._resolve(await self._skip_done(await self.accepted(entries)))
        if not requests:
            return
        # Every unit runs to its end even when one fails, so nothing is left half-done behind
        # an error; the first error is raised afterwards (its entries stay pending and are
        # read again or reclaimed).
        results = await asyncio.gather(
            *(self._run_unit(u) for u in plan_units(requests)), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _skip_done(
        self, requests: list[tuple[Entry, ComparisonRequested]]
    ) -> list[tuple[Entry, ComparisonRequested]]:
        """A redelivered request whose callback already exists is acknowledged, not judged again."""
        if not requests:
            return requests
        flags = await answered(
            self.r,
            self.keys,
            [(q.batch_id, q.correlation_id) for _, q in requests],
            also=self._page_reads(requests),
        )
        done = [entry for (entry, _), flag in zip(requests, flags, strict=True) if flag]
        if done:
            await self.r.xack(self.keys.requests, LPS_GROUP, *(e.entry_id for e in done))
            log.info("request_already_answered", entries=len(done))
        return [(e, q) for (e, q), flag in zip(requests, flags, strict=True) if not flag]

    def _page_reads(self, requests: list[tuple[Entry, ComparisonRequested]]) -> list[Reads]:
        """The reads of shared provider state (breakers, cooldown) the page's first calls
        would make: sent with its answered marks, in one round trip, not in two or three
        (issue 11). Only those on this worker's Redis client, and the cooldown's only for the
        calls that look at it (judge_one's: a Message Batch does not), so that no read is
        made that was not made before."""
        pairs = list(dict.fromkeys((q.provider, q.model) for _, q in requests))
        judged = list(
            dict.fromkeys((q.provider, q.model) for _, q in requests if q.mode in JUDGED_EACH)
        )
        return [
            functools.partial(state.read_in, due=due)
            for state, its in ((self.breaker, pairs), (self.cooldown, judged))
            if state.redis is self.r and (due := state.due(its))
        ]

    async def _resolve(
        self, requests: list[tuple[Entry, ComparisonRequested]]
    ) -> list[tuple[Entry, ComparisonRequested]]:
        """The requests with their essays' texts; one whose texts cannot be had fails at once."""
        out = []
        for entry, req in requests:
            resolved = await self.essays.resolve(req)
            if isinstance(resolved, ErrorDetail):
                log.warning(
                    "essay_text_unavailable",
                    batch_id=req.batch_id,
                    correlation_id=req.correlation_id,
                    message=resolved.message,
                )
                await self.record.finish(entry, req, Outcome(None, resolved, 0))
            else:
                out.append((entry, resolved))
        return out

    # --- judging ---------------------------------------------------------------

    async def _run_unit(self, unit: Unit) -> None:
        async with self._sem:
            if self._stop.is_set():
                await self.release(unit)
                return
            if self._held_long(unit):
                unit = await self.still_held(unit)
            if not unit:
                return
            run = MODES[unit[0][1].mode]
            if run is per_request.run:  # its loop, without its coroutine (issue 11)
                for entry, req in unit:
                    await self.judge_one(entry, req)
            else:
                await run(self.mode_context, unit)

    def _held_long(self, unit: Unit) -> bool:
        """Whether `still_held` has anything to check in `unit` (else it returns `unit`): it
        is awaited only then, a coroutine less on the common path (issue 11)."""
        now = time.monotonic()
        limit = now - self.processing_timeout_s / 2
        read_at = self._read_at
        return any(read_at.get(e.entry_id, now) <= limit for e, _ in unit)

    async def still_held(self, unit: Unit) -> Unit:
        """The requests of `unit` this worker still holds. Checked (and their idle time reset)
        only for those held half a processing timeout already: a pause that long (a stopped
        process, a lost network) may have let another worker claim them, and judging them
        here too would pay for the judgement twice."""
        now = time.monotonic()
        limit = now - self.processing_timeout_s / 2
        old = [e.entry_id for e, _ in unit if self._read_at.get(e.entry_id, now) <= limit]
        if not old:
            return unit
        held = await keep_alive(self.r, self.keys.requests, LPS_GROUP, self.consumer, old)
        lost = set(held.all)  # taken by another worker, or answered meanwhile: not judged here
        for entry_id in old:  # checked (and refreshed) now
            if entry_id not in lost and entry_id in self._read_at:
                self._read_at[entry_id] = now
        if not lost:
            return unit
        if held.taken:
            taken = set(held.taken)
            STUCK_ITEMS.labels("lost").inc(len(taken))
            log.warning(
                "claim_lost",
                consumer=self.consumer,
                entries=len(taken),
                batch_ids=sorted({q.batch_id for e, q in unit if e.entry_id in taken}),
                correlation_ids=[q.correlation_id for e, q in unit if e.entry_id in taken][:20],
            )
        return [(e, q) for e, q in unit if e.entry_id not in lost]

    async def release(self, unit: list[tuple[Entry, ComparisonRequested]]) -> None:
        """At shutdown: hand back requests not started, for a live worker to take at once."""
        ids = [e.entry_id for e, _ in unit]
        n = await release_entries(
            self.r,
            self.keys.requests,
            LPS_GROUP,
            self.consumer,
            ids,
            idle_ms=int(self.processing_timeout_s * 1000),
        )
        STUCK_ITEMS.labels("released").inc(n)
        log.info(
            "requests_released",
            entries=n,
            consumer=self.consumer,
            batch_ids=sorted({q.batch_id for _, q in unit}),
            correlation_ids=[q.correlation_id for _, q in unit],
        )

    def prompt_sha256(self, req: ComparisonRequested) -> str:
        """What the provider rendered for this request, for failure events ("" if it cannot say)."""
        fingerprint = getattr(self._provider_cache.get(req.provider), "prompt_sha256", None)
        return str(fingerprint(req)) if callable(fingerprint) else ""

    async def judge_one(self, entry: Entry, req: ComparisonRequested) -> None:
        provider_name = req.provider
        try:
            provider = self.provider(provider_name)
        except Exception as exc:  # unknown provider or bad configuration: fail this request only
            detail = ErrorDetail(
                error_type="invalid_request",
                retryable=False,
                message=str(exc)[:300],
                provider=provider_name,
                model=req.model,
                correlation_id=req.correlation_id,
            )
            await self.record.finish(entry, req, Outcome(None, detail, 0))
            return

        # Latency, tokens and cost are counted by the provider, per HTTP call, not here.
        unit = [(entry, req)]
        if self._held_long(unit) and not await self.still_held(unit):
            return
        outcome = await judge_with_retries(
            provider,
            req,
            self.policy,
            functools.partial(self.record.attempt_failed, req),
            rng=self._rng,
            cooldown=self.cooldown,
            breaker=self.breaker,
        )
        await self.record.finish(entry, req, outcome)

    async def wait_or_stop(self, seconds: float) -> None:
        await sleep_unless(self._stop, seconds)

    # --- pending-entry maintenance --------------------------------------------

    async def refresh_in_hand(self) -> None:
        """Keep slow but healthy work from looking stuck (the entries still held: one claimed
        by another worker meanwhile stays with it, and its result here will be fenced)."""
        held = await keep_alive(
            self.r, self.keys.requests, LPS_GROUP, self.consumer, sorted(self.in_hand)
        )
        # Entries stay in hand until their whole page is handled, after their commits have
        # acknowledged them: those (`gone`) are done, not lost.
        if held.taken:
            STUCK_ITEMS.labels("lost").inc(len(held.taken))
            log.warning(
                "claim_lost",
                consumer=self.consumer,
                entries=len(held.taken),
                entry_ids=held.taken[:20],
            )

    async def reclaim(self) -> list[StuckAction]:
        """Claim requests idle past the processing timeout (their worker died or hung) and
        process them again; expire those already delivered `max_deliveries` times.

        Entries delivered once (victims of a crash) are claimed together and judged as usual.
        Entries delivered more often are suspects (one of them may be what kills its
        workers): each is claimed alone and finished before the next is claimed, so a poison
        request burns only its own deliveries, never those of requests claimed with it.
        """
        if self.claims_paused:
            return []
        timeout_ms = self.timeout_ms
        rows = [
            row
            for row in await pending_details(
                self.r, self.keys.requests, LPS_GROUP, min_idle_ms=timeout_ms
            )
            # Its own entries this worker re-reads itself (streams/reader.py): claiming them
            # would count a delivery of a healthy worker's request.
            if row["consumer"] != self.consumer
        ]
        if not rows:
            return []
        to_expire = [row for row in rows if row["deliveries"] >= self.max_deliveries]
        fresh = [row for row in rows if row["deliveries"] <= 1 and row not in to_expire]
        suspects = [row for row in rows if row not in to_expire and row not in fresh]
        actions: list[StuckAction] = []
        claimed = await claim_ids(
            self.r, self.keys.requests, LPS_GROUP, self.consumer, timeout_ms, to_expire + fresh
        )
        actions += await self.settle(claimed)
        for row in suspects:
            if self._stop.is_set():
                break
            one = await claim_ids(
                self.r, self.keys.requests, LPS_GROUP, self.consumer, timeout_ms, [row]
            )
            actions += await self.settle(one)
        return actions

    def expires(self, claimed: Claimed, event: Event | None) -> bool:
        # An entry that is no request is not expired but dead-lettered by handle().
        return isinstance(event, ComparisonRequested) and super().expires(claimed, event)

    async def expire(self, items: list[tuple[Claimed, Event | None]]) -> None:
        for c, req in items:
            assert isinstance(req, ComparisonRequested)
            await self._expire(c, req)

    async def _expire(self, c: Claimed, req: ComparisonRequested) -> None:
        expired = RequestExpired(
            batch_id=req.batch_id,
            correlation_id=req.correlation_id,
            entry_id=c.entry.entry_id,
            consumer=c.previous_consumer,
            deliveries=c.deliveries - 1,
            idle_s=round(c.idle_ms / 1000, 3),
        )
        failed = ComparisonFailed(
            batch_id=req.batch_id,
            correlation_id=req.correlation_id,
            essay_a_id=req.essay_a.essay_id,
            essay_b_id=req.essay_b.essay_id,
            error=ErrorDetail(
                error_type="expired",
                retryable=False,
                provider=req.provider,
                model=req.model,
                correlation_id=req.correlation_id,
                message=f"no result after {c.deliveries - 1} deliveries",
            ),
            attempts=0,
        )
        outcome = await self.committer.commit(
            c.entry.entry_id, failed, [(self.keys.dispatches, expired)]
        )
        if outcome == "fenced":
            self.record.fenced(c.entry, req)
        result = "fenced" if outcome == "fenced" else "expired"
        LPS_REQUESTS.labels(req.provider, req.model, req.mode, result).inc()

    async def maintain(self) -> list[StuckAction]:
        """One reaper pass: reclaim stuck requests, pending gauge, prune dead consumers,
        cancel orphaned Message Batches."""
        actions = await self.reclaim()
        await self.upkeep()
        try:
            await sweep_orphans(self.mode_context)
        except Exception as exc:  # the sweep is a safety net; it must not stop reclaiming
            if policy_of(exc) is not None:  # Redis's passing state: the caller's to wait out
                raise
            log.exception("orphan_sweep_error", consumer=self.consumer)
        return actions

    async def run(self, stop: asyncio.Event, *, maintenance_every_s: float = 10.0) -> None:
        """Consume until `stop` is set, then finish the provider calls in progress, release the
        requests not started (see `release`) and return with nothing pending for this consumer.
        Survives Redis restarts: on a connection error it backs off, then reads its own pending
        entries again."""
        self._stop = stop
        backoff = Backoff()
        started = False
        while not started and not stop.is_set():
            try:
                await self.start()
                started = True
            except REDIS_ERRORS as exc:
                await self.recover(stop, backoff, exc)
        if not started:
            return

        async def keep_alive_loop() -> None:
            every = min(maintenance_every_s, self.processing_timeout_s / 3)
            while not await sleep_unless(stop, every):
                try:
                    await self.refresh_in_hand()
                except REDIS_ERRORS as exc:
                    if policy_of(exc) is None:
                        log.exception("keep_alive_error", consumer=self.consumer)

        async def maintenance_loop() -> None:
            while not await sleep_unless(stop, maintenance_every_s):
                try:
                    await self.maintain()
                except Exception as exc:  # a bug must not silently end reclaiming for this worker
                    if policy_of(exc) is None:
                        log.exception("maintenance_error", consumer=self.consumer)
                    else:
                        log.warning(
                            "maintenance_failed",
                            consumer=self.consumer,
                            error_kind=kind_of(exc),
                            error=str(exc)[:200],
                        )

        keeper = asyncio.create_task(keep_alive_loop())
        reaper = asyncio.create_task(maintenance_loop())
        # Pages in flight: the next page is read while one is judged, so a long unit (a
        # serial bundle, a Message Batch being polled) never stops this worker from reading.
        pages: set[asyncio.Task[None]] = set()
        failed_pages: list[BaseException] = []

        def page_done(task: asyncio.Task[None]) -> None:
            pages.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failed_pages.append(task.exception())  # type: ignore[arg-type]

        try:
            while not stop.is_set():
                try:
                    if failed_pages:
                        raise failed_pages.pop(0)
                    if len(pages) >= self.max_pages:
                        await asyncio.wait(pages, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    if self.group_missing:
                        await self.start()
                    entries = await self.reader.read()
                    if entries:
                        task = asyncio.create_task(self.handle(entries))
                        pages.add(task)
                        task.add_done_callback(page_done)
                    backoff.reset()
                except REDIS_ERRORS as exc:
                    await self.recover(stop, backoff, exc)
        finally:
            # Pages in flight finish what they started and release the rest (stop is set).
            await asyncio.gather(*pages, return_exceptions=True)
            if not stop.is_set():  # an unexpected error: the process is going down anyway
                reaper.cancel()
            # The reaper finishes (or releases) what it holds; the keeper runs until then.
            await asyncio.gather(reaper, return_exceptions=True)
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await self.close()
            log.info("lps_worker_stopped", consumer=self.consumer)
