"""Mode `batch_api`: a bundle becomes one Message Batch, polled until it ends.

The requests stay pending (kept alive by the worker) until their results are in. No
request is paid for twice, even when a worker dies at any point:

1. Before `batches.create`, an *intent* is written (`lps:batchintent:<id>`: when, how many
   items, which requests) and every request's index `lps:batchapi:<batch id>:<correlation
   id>` (`lps.keys.message_batch`) points at it (`intent:<id>`), in one MULTI/EXEC.
2. After the create, the Message Batch id is recorded in the same MULTI/EXEC as the
   `BundleDispatched` event (field `provider_batch_id`): the index then holds the batch id,
   the id joins `lps:batchapi:recorded`, the intent is resolved.
3. Whoever holds the requests next (a restart, a reclaim) reads the index: a batch id is
   polled, not paid for again; an intent means the creator died (or Redis failed) between
   1 and 2, so the worker lists the recent Message Batches and adopts the one that matches
   the intent (same number of requests, created in the intent's window, not recorded by
   anyone). If none matches, the batch was never created and the requests are submitted
   afresh; the intent stays, marked abandoned, and a batch that turns up for it later is
   cancelled by the orphan sweep (`sweep_orphans`, from the worker's maintenance pass).

A create that fails without an answer (timeout, dropped connection) leaves the same
doubt, and is settled the same way at once.

Items whose result is a retryable failure (overloaded, api_error, expired, canceled, a
parse error, no result at all) are submitted again in a new Message Batch, under the one
retry policy (attempts per item, backoff); each such item attempt is a
`ProviderAttemptFailed` with `will_retry`. Every SDK failure of create / poll / results is
classified and handled: a worker never ends on one. The breaker is asked before each
create. A provider without Message Batches judges the bundle in sequence.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from events.text import as_str
from events.types import ComparisonRequested, ErrorDetail, new_id
from lps import keys as lkeys
from lps.modes.base import ModeContext, Unit
from lps.modes.serial_bundle import run as judge_in_sequence
from lps.providers.base import Judgement, ProviderError
from lps.recorder import answered
from lps.retry import Outcome

if TYPE_CHECKING:
    from lps.message_batches import ItemFailure, MessageBatches

log = structlog.get_logger("lps.modes.batch_api")

INDEX_TTL_S = 7 * 24 * 3600  # a Message Batch ends within 24 h; results stay 29 days
INTENT_PREFIX = "intent:"
CREATE_WINDOW_S = 300.0
"""A batch created for an intent has `created_at` within this long after the intent was
written (the create call's timeout is far shorter) ..."""
CLOCK_SKEW_S = 120.0
"""... give or take this much disagreement between our clock and the API's."""
ORPHAN_SWEEP_AFTER_S = CREATE_WINDOW_S + CLOCK_SKEW_S
"""An abandoned intent is swept (its batch, if one appeared, cancelled) after this long."""
INTENT_TTL_S = 2 * 24 * 3600
MAX_POLL_FAILURES = 20
"""Consecutive failed polls of one Message Batch before its items are failed."""


@dataclass
class Intent:
    intent_id: str
    at: float
    count: int
    provider: str
    model: str
    correlation_ids: list[str]
    state: str = "pending"
    """pending (create under way or unresolved) | abandoned (no batch found: resubmitted)."""
    batch_ids: list[str] = field(default_factory=list)
    """The batch of each request (where its answer is recorded); empty in older intents."""

    def fields(self) -> dict[str, str]:
        return {
            "intent_id": self.intent_id,
            "at": repr(self.at),
            "count": str(self.count),
            "provider": self.provider,
            "model": self.model,
            "correlation_ids": json.dumps(self.correlation_ids),
            "state": self.state,
            "batch_ids": json.dumps(self.batch_ids),
        }

    @classmethod
    def of(cls, raw: dict[Any, Any]) -> Intent | None:
        f = {as_str(k): as_str(v) for k, v in raw.items()}
        try:
            return cls(
                intent_id=f["intent_id"],
                at=float(f["at"]),
                count=int(f["count"]),
                provider=f["provider"],
                model=f["model"],
                correlation_ids=list(json.loads(f["correlation_ids"])),
                state=f.get("state", "pending"),
                batch_ids=list(json.loads(f.get("batch_ids", "[]"))),
            )
        except (KeyError, ValueError, TypeError):
            return None

    def matches(self, created_at: float, requests: int) -> bool:
        return requests == self.count and (
            self.at - CLOCK_SKEW_S <= created_at <= self.at + CREATE_WINDOW_S + CLOCK_SKEW_S
        )


@dataclass
class _Attempts:
    """Per request (`events.ids.request_key`: a bundle may hold several CJ batches'), how many
    Message Batches it has been in here, and what they cost."""

    count: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    spent_usd: dict[str, float] = field(default_factory=lambda: defaultdict(float))


async def run(ctx: ModeContext, unit: Unit) -> None:
    first = unit[0][1]
    try:
        provider = ctx.provider(first.provider)
    except Exception:  # unknown provider or bad configuration: judge() fails each request
        await judge_in_sequence(ctx, unit)
        return
    if not provider.supports_message_batches:
        await judge_in_sequence(ctx, unit)
        return
    from lps.message_batches import MessageBatches  # the SDK loads only when used

    batches = MessageBatches.of(provider)
    attempts = _Attempts()
    rng = random.Random()
    pending = unit
    while pending:
        by_message_batch, intents, fresh = await _recorded(ctx, pending)
        for intent_id, items in intents.items():
            found = await _reconcile(ctx, batches, intent_id, items)
            if found is None:  # could not tell: released, a later holder looks again
                continue
            if found:
                by_message_batch[found].extend(items)
            else:
                fresh.extend(items)
        if fresh:
            message_batch_id, sent = await _submit(ctx, batches, fresh)
            if message_batch_id is not None:
                by_message_batch[message_batch_id].extend(sent)
        retry: Unit = []
        delay = 0.0
        for message_batch_id, items in by_message_batch.items():
            again, wait = await _poll_until_ended(
                ctx, batches, message_batch_id, items, attempts, rng
            )
            retry += again
            delay = max(delay, wait)
        if retry:
            await ctx.wait_or_stop(delay)
            if ctx.stopping():
                await ctx.release(retry)
                return
        pending = retry


async def _recorded(ctx: ModeContext, unit: Unit) -> tuple[dict[str, Unit], dict[str, Unit], Unit]:
    """The unit's requests by the Message Batch already holding them, by the intent of one
    that may exist, and those in none yet."""
    known = await ctx.r.mget([_index(ctx, q) for _, q in unit])
    by_message_batch: dict[str, Unit] = defaultdict(list)
    by_intent: dict[str, Unit] = defaultdict(list)
    fresh: Unit = []
    for item, value in zip(unit, known, strict=True):
        if not value:
            fresh.append(item)
            continue
        text = as_str(value)
        if text.startswith(INTENT_PREFIX):
            by_intent[text.removeprefix(INTENT_PREFIX)].append(item)
        else:
            by_message_batch[text].append(item)
    return by_message_batch, by_intent, fresh


async def _fail_all(
    ctx: ModeContext, unit: Unit, detail: ErrorDetail, *, call_made: bool = True
) -> None:
    for entry, req in unit:
        await ctx.record.fail(entry, req, _for(detail, req.correlation_id), call_made=call_made)


def _index(ctx: ModeContext, q: ComparisonRequested) -> str:
    return lkeys.message_batch(ctx.keys, q.batch_id, q.correlation_id)


def _for(detail: ErrorDetail, correlation_id: str) -> ErrorDetail:
    return msgspec.structs.replace(detail, correlation_id=correlation_id)


async def _submit(ctx: ModeContext, batches: MessageBatches, unit: Unit) -> tuple[str | None, Unit]:
    """Create the Message Batch; returns its id and the items it holds (rejected ones failed)."""
    first = unit[0][1]
    ticket = await ctx.breaker.admit(first.provider, first.model)
    if ticket.rejected is not None:
        await _fail_all(ctx, unit, ticket.rejected, call_made=False)
        return None, []
    try:
        prepared = batches.prepare([q for _, q in unit])
    except Exception:
        ctx.breaker.release(ticket)
        raise
    for entry, req in unit:
        refused = prepared.rejected.get(req.key)
        if refused is not None:
            await ctx.record.fail(entry, req, refused)
    items = [(e, q) for e, q in unit if q.key not in prepared.rejected]
    if not items:
        ctx.breaker.release(ticket)
        return None, []
    intent = Intent(
        intent_id=new_id(),
        at=time.time(),
        count=len(prepared.items),
        provider=first.provider,
        model=prepared.model or first.model,
        correlation_ids=[q.correlation_id for _, q in items],
        batch_ids=[q.batch_id for _, q in items],
    )
    try:
        await _write_intent(ctx, intent)
    except Exception:
        ctx.breaker.release(ticket)
        raise
    try:
        message_batch_id = await batches.create(prepared)
    except ProviderError as exc:
        await ctx.breaker.settle(ticket, exc.detail)
        return await _create_failed(ctx, batches, intent, items, exc.detail)
    await ctx.breaker.settle(ticket, None)
    await _record(ctx, items, message_batch_id, intent)
    log.info("message_batch_submitted", provider_batch_id=message_batch_id, size=len(items))
    return message_batch_id, items


async def _create_failed(
    ctx: ModeContext, batches: MessageBatches, intent: Intent, items: Unit, detail: ErrorDetail
) -> tuple[str | None, Unit]:
    log.warning(
        "batch_submit_failed",
        error_type=detail.error_type,
        status_code=detail.status_code,
        size=len(items),
    )
    if detail.status_code is not None:
        # The API answered with an error: nothing was created.
        await _drop_intent(ctx, intent, items)
        if detail.retryable:
            # Left pending: read again after the release (or reclaimed after the processing
            # timeout) and submitted then.
            await ctx.release(items)
        else:
            await _fail_all(ctx, items, detail)
        return None, []
    # No answer: the batch may exist. Look for it now; if it cannot be told, leave it to
    # the next holder (the intent stays).
    found = await _reconcile(ctx, batches, intent.intent_id, items, release_if_unsure=False)
    if found:
        return found, items
    await ctx.release(items)
    return None, []


async def _write_intent(ctx: ModeContext, intent: Intent) -> None:
    key = lkeys.batch_intent(ctx.keys, intent.intent_id)
    async with ctx.r.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=intent.fields())
        pipe.expire(key, INTENT_TTL_S)
        pipe.zadd(lkeys.batch_intents(ctx.keys), {intent.intent_id: intent.at})
        for batch_id, cid in zip(intent.batch_ids, intent.correlation_ids, strict=True):
            pipe.set(
                lkeys.message_batch(ctx.keys, batch_id, cid),
                INTENT_PREFIX + intent.intent_id,
                ex=INDEX_TTL_S,
            )
        await pipe.execute()


async def _drop_intent(ctx: ModeContext, intent: Intent, items: Unit) -> None:
    async with ctx.r.pipeline(transaction=True) as pipe:
        pipe.delete(lkeys.batch_intent(ctx.keys, intent.intent_id))
        pipe.zrem(lkeys.batch_intents(ctx.keys), intent.intent_id)
        for _, q in items:
            pipe.delete(_index(ctx, q))
        await pipe.execute()


async def _record(
    ctx: ModeContext, items: Unit, message_batch_id: str, intent: Intent | None
) -> None:
    """`BundleDispatched` + index + recorded set (+ the intent resolved), one MULTI/EXEC."""

    def index(pipe: Any) -> None:
        for _, q in items:
            pipe.set(_index(ctx, q), message_batch_id, ex=INDEX_TTL_S)
        pipe.zadd(lkeys.recorded_message_batches(ctx.keys), {message_batch_id: time.time()})
        if intent is not None:
            pipe.delete(lkeys.batch_intent(ctx.keys, intent.intent_id))
            pipe.zrem(lkeys.batch_intents(ctx.keys), intent.intent_id)

    await ctx.record.dispatch(items, message_batch_id=message_batch_id, same_transaction=index)


async def _load_intent(ctx: ModeContext, intent_id: str) -> Intent | None:
    return Intent.of(await ctx.r.hgetall(lkeys.batch_intent(ctx.keys, intent_id)))


async def _unrecorded(ctx: ModeContext, ids: list[str]) -> list[str]:
    if not ids:
        return []
    async with ctx.r.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.zscore(lkeys.recorded_message_batches(ctx.keys), i)
        scores = await pipe.execute()
    return [i for i, score in zip(ids, scores, strict=True) if score is None]


async def _reconcile(
    ctx: ModeContext,
    batches: MessageBatches,
    intent_id: str,
    items: Unit,
    *,
    release_if_unsure: bool = True,
) -> str | None:
    """For requests whose index names an intent: the Message Batch created for it (now
    adopted and recorded), "" when none was created (submit afresh), None when it cannot be
    told now (the requests are released when `release_if_unsure`)."""
    intent = await _load_intent(ctx, intent_id)
    if intent is None:  # expired or cleaned up: nothing to adopt
        return ""
    try:
        recent = await batches.recent(intent.at - CLOCK_SKEW_S)
    except ProviderError as exc:
        log.warning(
            "message_batch_reconcile_failed", intent_id=intent_id, error_type=exc.detail.error_type
        )
        await ctx.breaker.observe(intent.provider, intent.model, exc.detail)
        if not exc.detail.retryable:
            await _fail_all(ctx, items, exc.detail, call_made=False)
        elif release_if_unsure:
            await ctx.release(items)
        return None
    candidates = [
        b for b in recent if intent.matches(b.created_at, b.requests) and b.message_batch_id
    ]
    unrecorded = await _unrecorded(ctx, [b.message_batch_id for b in candidates])
    if unrecorded:
        # The one created closest after the intent was written.
        chosen = min(
            (b for b in candidates if b.message_batch_id in unrecorded),
            key=lambda b: abs(b.created_at - intent.at),
        )
        await _record(ctx, items, chosen.message_batch_id, intent)
        log.warning(
            "message_batch_adopted",
            provider_batch_id=chosen.message_batch_id,
            intent_id=intent_id,
            size=len(items),
        )
        return chosen.message_batch_id
    # None created (or none visible yet): submit afresh; a batch that appears later for this
    # intent is an orphan and gets cancelled.
    await ctx.r.hset(lkeys.batch_intent(ctx.keys, intent_id), "state", "abandoned")
    log.warning("message_batch_intent_abandoned", intent_id=intent_id, size=len(items))
    return ""


async def _poll_until_ended(
    ctx: ModeContext,
    batches: MessageBatches,
    message_batch_id: str,
    unit: Unit,
    attempts: _Attempts,
    rng: random.Random,
) -> tuple[Unit, float]:
    """Poll to the end and commit each result; returns the items to submit again (retryable
    failures the policy retries) and how long to wait before that."""
    requests = [q for _, q in unit]
    first = requests[0]
    failures = 0
    while True:
        try:
            results = await batches.poll(message_batch_id, requests)
        except ProviderError as exc:
            detail = exc.detail
            await ctx.breaker.observe(first.provider, first.model, detail)
            failures += 1
            log.warning(
                "batch_poll_failed",
                provider_batch_id=message_batch_id,
                error_type=detail.error_type,
                status_code=detail.status_code,
                failures=failures,
            )
            if not detail.retryable or failures >= MAX_POLL_FAILURES:
                # Its items may have been processed (and paid): never submitted again.
                for entry, req in unit:
                    key = req.key
                    attempts.count[key] += 1
                    await ctx.record.fail(
                        entry,
                        req,
                        _for(detail, req.correlation_id),
                        attempt=attempts.count[key],
                        spent_usd=attempts.spent_usd[key],
                    )
                return [], 0.0
            results = None
        if results is not None:
            break
        if ctx.stopping():
            # Left pending: the next holder finds the Message Batch id and polls it.
            await ctx.release(unit)
            return [], 0.0
        await ctx.wait_or_stop(ctx.poll_interval_s)
    retry: Unit = []
    delay = 0.0
    for entry, req in unit:
        key = req.key
        attempts.count[key] += 1
        attempt = attempts.count[key]
        result = results[key]
        if isinstance(result, Judgement):
            spent = attempts.spent_usd[key] + result.cost_usd
            await ctx.record.finish(entry, req, Outcome(result, None, attempt, cost_usd=spent))
            continue
        failure: ItemFailure = result
        wait = ctx.policy.delay_for(attempt, failure.detail, rng)
        if wait is not None and not ctx.stopping():
            await ctx.record.attempt_failed(
                req,
                attempt,
                failure.detail,
                True,
                wait,
                usage=failure.usage,
                cost_usd=failure.cost_usd,
            )
            attempts.spent_usd[key] += failure.cost_usd
            retry.append((entry, req))
            delay = max(delay, wait)
            continue
        await ctx.record.fail(
            entry,
            req,
            failure.detail,
            attempt=attempt,
            usage=failure.usage,
            cost_usd=failure.cost_usd,
            spent_usd=attempts.spent_usd[key],
        )
    if retry:
        # Submitted afresh, whoever holds them next.
        await ctx.r.delete(*(_index(ctx, q) for _, q in retry))
    log.info(
        "message_batch_collected",
        provider_batch_id=message_batch_id,
        size=len(unit),
        resubmitting=len(retry),
    )
    return retry, delay


async def sweep_orphans(ctx: ModeContext, *, now: float | None = None) -> list[str]:
    """Cancel Message Batches created for intents nobody recorded: abandoned intents (their
    requests were submitted again) and intents whose requests were all answered otherwise,
    once their creation window has passed. Returns the cancelled batch ids."""
    now = time.time() if now is None else now
    ids = [
        as_str(i)
        for i in await ctx.r.zrangebyscore(
            lkeys.batch_intents(ctx.keys), "-inf", now - ORPHAN_SWEEP_AFTER_S
        )
    ]
    cancelled: list[str] = []
    for intent_id in ids:
        intent = await _load_intent(ctx, intent_id)
        if intent is None:
            await ctx.r.zrem(lkeys.batch_intents(ctx.keys), intent_id)
            continue
        owners = intent.batch_ids or [""] * len(intent.correlation_ids)
        done = sum(
            await answered(ctx.r, ctx.keys, list(zip(owners, intent.correlation_ids, strict=True)))
        )
        if intent.state != "abandoned" and done < len(intent.correlation_ids):
            continue  # its requests are still waiting: a takeover will adopt the batch
        try:
            provider = ctx.provider(intent.provider)
            if not provider.supports_message_batches:
                raise TypeError(intent.provider)
            from lps.message_batches import MessageBatches

            batches = MessageBatches.of(provider)
            recent = await batches.recent(intent.at - CLOCK_SKEW_S)
            matching = [b for b in recent if intent.matches(b.created_at, b.requests)]
            for message_batch_id in await _unrecorded(ctx, [b.message_batch_id for b in matching]):
                status = next(b for b in matching if b.message_batch_id == message_batch_id)
                if status.processing_status == "in_progress":
                    await batches.cancel(message_batch_id)
                cancelled.append(message_batch_id)
                log.warning(
                    "orphan_message_batch_cancelled",
                    provider_batch_id=message_batch_id,
                    intent_id=intent_id,
                )
        except ProviderError as exc:
            log.warning("orphan_sweep_failed", intent_id=intent_id, error=exc.detail.message)
            continue
        except Exception as exc:  # a misconfigured provider: forget the intent, say so
            log.warning("orphan_sweep_skipped", intent_id=intent_id, error=repr(exc)[:200])
        async with ctx.r.pipeline(transaction=True) as pipe:
            pipe.delete(lkeys.batch_intent(ctx.keys, intent_id))
            pipe.zrem(lkeys.batch_intents(ctx.keys), intent_id)
            await pipe.execute()
    return cancelled
