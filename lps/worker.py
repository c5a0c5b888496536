"""The LPS worker: consumes `lps:requests` (group `lps`), judges, appends one callback per request.

Per request, the callback XADD, the request's XACK and the `lps:done` marker go
in one MULTI/EXEC: a request is acknowledged exactly when its result exists.
Results finishing together share that transaction (a coalescing committer), so
a fast judge costs one round trip per group of results, not per result.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from events import codec
from events.codec import DecodeError
from events.consumer import Entry, GroupReader, ensure_group, queue_dead_letter, split_decoded
from events.metrics import (
    LPS_BUNDLE_SIZE,
    LPS_PROVIDER_ERRORS,
    LPS_PROVIDER_LATENCY,
    LPS_REQUESTS,
    LPS_RETRIES,
    LPS_STUCK,
    LPS_TOKENS,
)
from events.names import LPS_GROUP, REQUESTS, Keys
from events.pending import Claimed, claim_idle, keep_alive
from events.types import (
    BundleDispatched,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    ErrorDetail,
    Event,
    ProviderAttemptFailed,
    RequestExpired,
    new_id,
)
from lps.providers.base import Provider
from lps.retry import Outcome, RetryPolicy, judge_with_retries

log = structlog.get_logger("lps.worker")

SERIAL_BUNDLE_MAX_REQUESTS_PER_CALL = 64
DONE_TTL_S = 7 * 24 * 3600

ProviderFactory = Callable[[str], Provider]


def bundle_size(preferred: int) -> int:
    """CJ's hint, capped; an invalid hint falls back to the cap."""
    if not isinstance(preferred, int) or preferred < 1:
        return SERIAL_BUNDLE_MAX_REQUESTS_PER_CALL
    return min(preferred, SERIAL_BUNDLE_MAX_REQUESTS_PER_CALL)


def plan_units(items: list[tuple[Entry, ComparisonRequested]]) -> list[list[tuple[Entry, ComparisonRequested]]]:
    """Split a page into units of work: one per request, or bundles of the same provider,
    model and overrides for `serial_bundle` / `batch_api` requests."""
    units: list[list[tuple[Entry, ComparisonRequested]]] = []
    groups: dict[tuple[str, str, str, str], list[tuple[Entry, ComparisonRequested]]] = defaultdict(list)
    for entry, req in items:
        if req.mode == "per_request":
            units.append([(entry, req)])
        else:
            overrides = "&".join(f"{k}={v}" for k, v in sorted(req.overrides.items()))
            groups[(req.mode, req.provider, req.model, overrides)].append((entry, req))
    for members in groups.values():
        cap = min(bundle_size(req.preferred_bundle_size) for _, req in members)
        units.extend(members[i : i + cap] for i in range(0, len(members), cap))
    return units


@dataclass
class _Commit:
    entry_id: str
    callback: Event
    extra: list[tuple[str, Event]] = field(default_factory=list)
    done: asyncio.Future[None] | None = None


class Committer:
    """Appends results: callback + XACK + done marker, many results per MULTI/EXEC."""

    def __init__(self, r: Any, keys: Keys) -> None:
        self.r = r
        self.keys = keys
        self._queue: asyncio.Queue[_Commit] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def commit(self, entry_id: str, callback: Event, extra: list[tuple[str, Event]] | None = None) -> None:
        item = _Commit(entry_id, callback, extra or [], asyncio.get_running_loop().create_future())
        await self._queue.put(item)
        assert item.done is not None
        await item.done

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception as exc:  # the callers decide; nothing was acknowledged
                for item in batch:
                    if item.done and not item.done.done():
                        item.done.set_exception(exc)
                continue
            for item in batch:
                if item.done and not item.done.done():
                    item.done.set_result(None)

    async def _write(self, batch: list[_Commit]) -> None:
        k = self.keys
        async with self.r.pipeline(transaction=True) as pipe:
            for item in batch:
                for stream, event in item.extra:
                    pipe.xadd(stream, codec.encode(event))
                pipe.xadd(k.callbacks, codec.encode(item.callback))
                pipe.xack(k.requests, LPS_GROUP, item.entry_id)
                cid = getattr(item.callback, "correlation_id", "")
                pipe.set(k.lps_done(cid), item.entry_id, ex=DONE_TTL_S)
            await pipe.execute()


class LPSWorker:
    def __init__(
        self,
        r: Any,
        keys: Keys,
        consumer: str,
        providers: ProviderFactory,
        *,
        policy: RetryPolicy | None = None,
        concurrency: int = 8,
        count: int = 64,
        block_ms: int = 1000,
        processing_timeout_s: float = 120.0,
        max_deliveries: int = 3,
    ) -> None:
        self.r = r
        self.keys = keys
        self.consumer = consumer
        self.providers = providers
        self._provider_cache: dict[str, Provider] = {}
        self.policy = policy or RetryPolicy()
        self.concurrency = concurrency
        self.reader = GroupReader(r, keys.requests, LPS_GROUP, consumer, count=count, block_ms=block_ms)
        self.committer = Committer(r, keys)
        self.processing_timeout_s = processing_timeout_s
        self.max_deliveries = max_deliveries
        self.in_hand: set[str] = set()
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random()

    def provider(self, name: str) -> Provider:
        if name not in self._provider_cache:
            self._provider_cache[name] = self.providers(name)
        return self._provider_cache[name]

    async def start(self) -> None:
        await ensure_group(self.r, self.keys.requests, LPS_GROUP)
        self.committer.start()

    async def close(self) -> None:
        await self.committer.stop()
        for provider in self._provider_cache.values():
            await provider.aclose()

    # --- reading ---------------------------------------------------------------

    async def step(self) -> int:
        entries = await self.reader.read()
        if entries:
            await self.handle(entries)
        return len(entries)

    async def handle(self, entries: list[Entry]) -> None:
        good, bad = split_decoded(entries)
        requests: list[tuple[Entry, ComparisonRequested]] = []
        for entry, event in good:
            if isinstance(event, ComparisonRequested):
                requests.append((entry, event))
            else:
                bad.append((entry, DecodeError("unexpected_type", f"{type(event).__name__} on {REQUESTS}")))
        if bad:
            async with self.r.pipeline(transaction=True) as pipe:
                for entry, error in bad:
                    queue_dead_letter(pipe, self.keys, REQUESTS, entry, error, LPS_GROUP, self.consumer)
                await pipe.execute()
        requests = await self._skip_done(requests)
        if not requests:
            return
        self.in_hand.update(e.entry_id for e, _ in requests)
        try:
            await asyncio.gather(*(self._run_unit(u) for u in plan_units(requests)))
        finally:
            self.in_hand.difference_update(e.entry_id for e, _ in requests)

    async def _skip_done(self, requests: list[tuple[Entry, ComparisonRequested]]) -> list[tuple[Entry, ComparisonRequested]]:
        """A redelivered request whose callback already exists is acknowledged, not judged again."""
        if not requests:
            return requests
        async with self.r.pipeline(transaction=False) as pipe:
            for _, req in requests:
                pipe.exists(self.keys.lps_done(req.correlation_id))
            flags = await pipe.execute()
        done = [entry for (entry, _), flag in zip(requests, flags, strict=True) if flag]
        if done:
            await self.r.xack(self.keys.requests, LPS_GROUP, *(e.entry_id for e in done))
            log.info("request_already_answered", entries=len(done))
        return [(e, q) for (e, q), flag in zip(requests, flags, strict=True) if not flag]

    # --- judging ---------------------------------------------------------------

    async def _run_unit(self, unit: list[tuple[Entry, ComparisonRequested]]) -> None:
        async with self._sem:
            first = unit[0][1]
            if first.mode != "per_request":
                await self._dispatch(unit)
            for entry, req in unit:  # a bundle is judged in sequence; each item stands alone
                await self._judge_one(entry, req)

    async def _dispatch(self, unit: list[tuple[Entry, ComparisonRequested]]) -> None:
        first = unit[0][1]
        event = BundleDispatched(
            bundle_id=new_id(),
            mode=first.mode,
            provider=first.provider,
            model=first.model,
            consumer=self.consumer,
            correlation_ids=[r.correlation_id for _, r in unit],
            batch_ids=sorted({r.batch_id for _, r in unit}),
            size=len(unit),
        )
        await self.r.xadd(self.keys.dispatches, codec.encode(event))
        LPS_BUNDLE_SIZE.labels(first.mode).observe(len(unit))
        log.info("bundle_dispatched", bundle_id=event.bundle_id, size=len(unit),
                 batch_ids=event.batch_ids, provider=first.provider, model=first.model)

    async def _judge_one(self, entry: Entry, req: ComparisonRequested) -> None:
        provider_name = req.provider
        try:
            provider = self.provider(provider_name)
        except Exception as exc:  # unknown provider or bad configuration: fail this request only
            detail = ErrorDetail(error_type="invalid_request", retryable=False, message=str(exc)[:300],
                                 provider=provider_name, model=req.model, correlation_id=req.correlation_id)
            await self._finish(entry, req, Outcome(None, detail, 0))
            return

        async def attempt_failed(attempt: int, detail: ErrorDetail, will_retry: bool, delay: float) -> None:
            LPS_PROVIDER_ERRORS.labels(provider_name, req.model, detail.error_type).inc()
            if will_retry:
                LPS_RETRIES.labels(provider_name, detail.error_type).inc()
            event = ProviderAttemptFailed(
                batch_id=req.batch_id, correlation_id=req.correlation_id, attempt=attempt,
                error=detail, will_retry=will_retry, delay_s=round(delay, 4),
            )
            await self.r.xadd(self.keys.dispatches, codec.encode(event))
            log.warning("provider_attempt_failed", batch_id=req.batch_id, correlation_id=req.correlation_id,
                        attempt=attempt, error_type=detail.error_type, status_code=detail.status_code,
                        will_retry=will_retry, delay_s=round(delay, 3))

        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = await judge_with_retries(provider, req, self.policy, attempt_failed, rng=self._rng)
        LPS_PROVIDER_LATENCY.labels(provider_name, req.model).observe(loop.time() - started)
        await self._finish(entry, req, outcome)

    async def _finish(self, entry: Entry, req: ComparisonRequested, outcome: Outcome) -> None:
        callback: Event
        if outcome.judgement is not None:
            j = outcome.judgement
            callback = ComparisonCompleted(
                batch_id=req.batch_id, correlation_id=req.correlation_id,
                essay_a_id=req.essay_a.essay_id, essay_b_id=req.essay_b.essay_id,
                winner=j.winner, confidence=j.confidence, justification=j.justification,
                provider=req.provider, model=req.model, latency_ms=round(j.latency_ms, 3),
                usage=j.usage, prompt_sha256=j.prompt_sha256, attempts=outcome.attempts,
            )
            for kind in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                         "cache_creation_input_tokens"):
                value = getattr(j.usage, kind)
                if value:
                    LPS_TOKENS.labels(kind).inc(value)
            result = "completed"
        else:
            assert outcome.error is not None
            callback = ComparisonFailed(
                batch_id=req.batch_id, correlation_id=req.correlation_id,
                essay_a_id=req.essay_a.essay_id, essay_b_id=req.essay_b.essay_id,
                error=outcome.error, attempts=outcome.attempts,
            )
            result = "failed"
        await self.committer.commit(entry.entry_id, callback)
        LPS_REQUESTS.labels(req.provider, req.model, req.mode, result).inc()

    # --- pending-entry maintenance --------------------------------------------

    async def refresh_in_hand(self) -> None:
        """Keep slow but healthy work from looking stuck."""
        await keep_alive(self.r, self.keys.requests, LPS_GROUP, self.consumer, sorted(self.in_hand))

    async def reclaim(self) -> list[Claimed]:
        """Claim requests stuck with other consumers; expire those delivered too often."""
        claimed, _ = await claim_idle(
            self.r, self.keys.requests, LPS_GROUP, self.consumer, int(self.processing_timeout_s * 1000)
        )
        if not claimed:
            return []
        retry: list[Entry] = []
        for c in claimed:
            try:
                req = codec.decode_as(c.entry.fields, ComparisonRequested)
            except DecodeError:
                retry.append(c.entry)  # handle() dead-letters it
                continue
            fields = dict(batch_id=req.batch_id, correlation_id=req.correlation_id, entry_id=c.entry.entry_id,
                          previous_consumer=c.previous_consumer, idle_s=round(c.idle_ms / 1000, 1),
                          deliveries=c.deliveries)
            if c.deliveries > self.max_deliveries:
                LPS_STUCK.labels("expired").inc()
                log.warning("stuck_request_expired", **fields)
                await self._expire(c, req)
            else:
                LPS_STUCK.labels("reclaimed").inc()
                log.warning("stuck_request_reclaimed", **fields)
                retry.append(c.entry)
        if retry:
            await self.handle(retry)
        return claimed

    async def _expire(self, c: Claimed, req: ComparisonRequested) -> None:
        expired = RequestExpired(
            batch_id=req.batch_id, correlation_id=req.correlation_id, entry_id=c.entry.entry_id,
            consumer=c.previous_consumer, deliveries=c.deliveries - 1, idle_s=round(c.idle_ms / 1000, 3),
        )
        failed = ComparisonFailed(
            batch_id=req.batch_id, correlation_id=req.correlation_id,
            essay_a_id=req.essay_a.essay_id, essay_b_id=req.essay_b.essay_id,
            error=ErrorDetail(
                error_type="expired", retryable=False, provider=req.provider, model=req.model,
                correlation_id=req.correlation_id,
                message=f"no result after {c.deliveries - 1} deliveries",
            ),
            attempts=0,
        )
        await self.committer.commit(c.entry.entry_id, failed, [(self.keys.dispatches, expired)])
        LPS_REQUESTS.labels(req.provider, req.model, req.mode, "expired").inc()

    async def run(self, stop: asyncio.Event, *, maintenance_every_s: float = 10.0) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        next_maintenance = loop.time() + maintenance_every_s

        async def maintenance() -> None:
            while not stop.is_set():
                await asyncio.sleep(min(maintenance_every_s, self.processing_timeout_s / 3))
                await self.refresh_in_hand()

        keeper = asyncio.create_task(maintenance())
        try:
            while not stop.is_set():
                await self.step()
                if loop.time() >= next_maintenance:
                    await self.reclaim()
                    next_maintenance = loop.time() + maintenance_every_s
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await self.close()

