"""What the LPS writes down of its work, for the worker and its modes alike: bundles and failed
attempts on `lps:dispatches`, and each request's result, committed with the request's XACK
(by the worker's committer, fenced by its hold on the request), with their metrics and logs.

One `Recorder` per worker; the modes reach it through their `ModeContext`, so the signatures
below are the only ones (no mode imports the worker).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from events import codec
from events.redact import scrub_struct
from events.types import (
    BundleDispatched,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    ErrorDetail,
    Event,
    ProviderAttemptFailed,
    TokenUsage,
    new_id,
)
from lps import keys as lkeys
from lps.metrics import LPS_BUNDLE_SIZE, LPS_REQUESTS
from lps.retry import Outcome, record_attempt_failed
from streams.keys import Keys
from streams.metrics import STUCK_ITEMS, labelled
from streams.reader import Entry

log = structlog.get_logger("lps.worker")

Unit = list[tuple[Entry, ComparisonRequested]]

Commit = Callable[[str, Event], Awaitable[str]]
"""Commit one callback for a request entry: 'committed' (or 'again') or 'fenced'."""


Reads = Callable[[Any], Callable[[list[Any] | BaseException], None]]
"""Reads made in another's round trip: queues its commands on a pipeline, returns what takes
their replies (an error among them comes as an exception, not raised), or the exception that
stopped the round trip: it is called once, whatever happens."""


async def answered(
    r: Any, keys: Keys, requests: list[tuple[str, str]], *, also: Sequence[Reads] = ()
) -> list[bool]:
    """Whether each (batch id, correlation id) has a committed callback (`lps.keys.answered`);
    a request named without its batch (a Message Batch intent written before) by the marker
    of that time (`lps.keys.done`). The reads `also` go in the same round trip."""
    if not requests:
        return []
    # One HMGET per batch's hash, not one HEXISTS per request: a page of requests is
    # mostly of a few batches (speed, issue 11: a command less per comparison).
    by_batch: dict[str, list[int]] = {}
    loose: list[int] = []
    for k, (batch_id, _) in enumerate(requests):
        if batch_id:
            by_batch.setdefault(batch_id, []).append(k)
        else:
            loose.append(k)
    if len(by_batch) == 1 and not loose and not also:  # a page of one batch, the usual
        # The same HMGET, without a pipeline's own work around it (issue 11: ≈ 40 µs of
        # client CPU a page, a third of the call).
        [(batch_id, ks)] = by_batch.items()
        replies = [await r.hmget(lkeys.answered(keys, batch_id), [requests[k][1] for k in ks])]
    else:
        async with r.pipeline(transaction=False) as pipe:
            for batch_id, ks in by_batch.items():
                pipe.hmget(lkeys.answered(keys, batch_id), [requests[k][1] for k in ks])
            for k in loose:
                pipe.exists(lkeys.done(keys, requests[k][1]))
            takes = []
            try:
                for read in also:
                    start = len(pipe)
                    takes.append((start, read(pipe), len(pipe)))
                replies = await pipe.execute(raise_on_error=not also)
            except BaseException as exc:
                for _, take, _ in takes:
                    take(exc)
                raise
            for start, take, end in takes:  # here: the pipeline's exit may raise
                take(replies[start:end])
        if also:
            del replies[len(by_batch) + len(loose) :]
            for reply in replies:  # what execute would have raised
                if isinstance(reply, Exception):
                    raise reply
    out = [False] * len(requests)
    for ks, values in zip(by_batch.values(), replies, strict=False):
        for k, value in zip(ks, values, strict=True):
            out[k] = value is not None
    for k, flag in zip(loose, replies[len(by_batch) :], strict=True):
        out[k] = bool(flag)
    return out


def encode(event: Event) -> dict[str, bytes]:
    """An event as the worker writes it: scrubbed of anything key-shaped."""
    return codec.encode(scrub_struct(event))


class Recorder:
    def __init__(
        self,
        r: Any,
        keys: Keys,
        consumer: str,
        commit: Commit,
        prompt_sha256: Callable[[ComparisonRequested], str],
    ) -> None:
        self.r = r
        self.keys = keys
        self.consumer = consumer
        self.commit = commit
        self.prompt_sha256 = prompt_sha256
        """What the provider rendered for a request, for failure events ("" if it cannot say)."""

    async def dispatch(
        self,
        unit: Unit,
        *,
        message_batch_id: str | None = None,
        same_transaction: Callable[[Any], object] | None = None,
    ) -> BundleDispatched:
        """Record the unit as one bundle (`BundleDispatched` on `lps:dispatches`, bundle-size
        metric). `same_transaction` adds commands to the MULTI/EXEC that appends the record."""
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
            provider_batch_id=message_batch_id,
        )
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dispatches, codec.encode(event))
            if same_transaction is not None:
                same_transaction(pipe)
            await pipe.execute()
        LPS_BUNDLE_SIZE.labels(first.mode).observe(len(unit))
        log.info(
            "bundle_dispatched",
            bundle_id=event.bundle_id,
            size=len(unit),
            batch_ids=event.batch_ids,
            provider=first.provider,
            model=first.model,
        )
        return event

    async def attempt_failed(
        self,
        req: ComparisonRequested,
        attempt: int,
        detail: ErrorDetail,
        will_retry: bool,
        delay: float = 0.0,
        *,
        usage: TokenUsage | None = None,
        cost_usd: float = 0.0,
    ) -> None:
        """One failed provider attempt: its event on `lps:dispatches` and its metrics;
        nothing is committed."""
        record_attempt_failed(detail, will_retry, provider=req.provider, model=req.model)
        event = ProviderAttemptFailed(
            batch_id=req.batch_id,
            correlation_id=req.correlation_id,
            attempt=attempt,
            error=detail,
            will_retry=will_retry,
            delay_s=round(delay, 4),
            prompt_sha256=self.prompt_sha256(req),
            usage=usage or TokenUsage(),
            cost_usd=cost_usd,
        )
        await self.r.xadd(self.keys.dispatches, encode(event))
        log.warning(
            "provider_attempt_failed",
            batch_id=req.batch_id,
            correlation_id=req.correlation_id,
            attempt=attempt,
            error_type=detail.error_type,
            status_code=detail.status_code,
            will_retry=will_retry,
            delay_s=round(delay, 3),
        )

    async def finish(self, entry: Entry, req: ComparisonRequested, outcome: Outcome) -> None:
        """Commit the request's callback for `outcome` (callback XADD, request XACK and done
        marker in one script call), however it was obtained."""
        callback: Event
        if outcome.judgement is not None:
            j = outcome.judgement
            callback = ComparisonCompleted(
                batch_id=req.batch_id,
                correlation_id=req.correlation_id,
                essay_a_id=req.essay_a.essay_id,
                essay_b_id=req.essay_b.essay_id,
                winner=j.winner,
                confidence=j.confidence,
                justification=j.justification,
                provider=req.provider,
                model=req.model,
                latency_ms=round(j.latency_ms, 3),
                usage=j.usage,
                prompt_sha256=j.prompt_sha256,
                attempts=outcome.attempts,
                cost_usd=outcome.cost_usd,
            )
            result = "completed"
        else:
            assert outcome.error is not None
            callback = ComparisonFailed(
                batch_id=req.batch_id,
                correlation_id=req.correlation_id,
                essay_a_id=req.essay_a.essay_id,
                essay_b_id=req.essay_b.essay_id,
                error=outcome.error,
                attempts=outcome.attempts,
                prompt_sha256=self.prompt_sha256(req),
                usage=outcome.usage or TokenUsage(),
                cost_usd=outcome.cost_usd,
            )
            result = "failed"
            if outcome.rejected:
                log.info(
                    "request_failed_by_breaker",
                    batch_id=req.batch_id,
                    correlation_id=req.correlation_id,
                    error_type=outcome.error.error_type,
                )
        if await self.commit(entry.entry_id, callback) == "fenced":
            self.fenced(entry, req)
            result = "fenced"
        labelled(LPS_REQUESTS, req.provider, req.model, req.mode, result).inc()

    def fenced(self, entry: Entry, req: ComparisonRequested) -> None:
        """A result dropped: another consumer holds (or answered) the request."""
        STUCK_ITEMS.labels("fenced").inc()
        log.warning(
            "commit_fenced",
            consumer=self.consumer,
            entry_id=entry.entry_id,
            batch_id=req.batch_id,
            correlation_id=req.correlation_id,
        )

    async def fail(
        self,
        entry: Entry,
        req: ComparisonRequested,
        detail: ErrorDetail,
        *,
        attempt: int = 1,
        usage: TokenUsage | None = None,
        cost_usd: float = 0.0,
        spent_usd: float = 0.0,
        call_made: bool = True,
    ) -> None:
        """A final failure without the retry loop (Message Batches items), recorded as failed
        provider attempt number `attempt`, an event like any other, so provider calls still
        equal attempts failed + completed. `usage`/`cost_usd`: that attempt's, when billed;
        `spent_usd`: what the earlier attempts cost; `call_made=False` (an open breaker
        stopped it) records no attempt."""
        if call_made:
            await self.attempt_failed(req, attempt, detail, False, usage=usage, cost_usd=cost_usd)
        outcome = Outcome(
            None,
            detail,
            attempt if call_made else attempt - 1,
            cost_usd=spent_usd + cost_usd,
            usage=usage,
            rejected=not call_made,
        )
        await self.finish(entry, req, outcome)
