"""Mode `batch_api`: a bundle becomes one Message Batch, polled until it ends.

The requests stay pending (kept alive by the worker) until their results are in.
The Message Batch id is recorded twice in the dispatch MULTI/EXEC: in the
`BundleDispatched` event (field `provider_batch_id`, the record) and in
`lps:batchapi:<correlation id>` (an index of it), so that whichever worker holds the
requests after a restart or a reclaim polls the same Message Batch instead of paying
for a second one. A provider without Message Batches judges the bundle in sequence.

Not covered yet (issue #10): a crash between creating the Message Batch and recording it
leaves a batch nobody polls, and the next holder pays for a second one. Recording the
intent before `submit_bundle` and adopting or cancelling on takeover belong here, with
the client calls they need in `lps.message_batches`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import structlog

from events.text import as_str
from lps import keys as lkeys
from lps.modes.base import ModeContext, Unit
from lps.modes.serial_bundle import run as judge_in_sequence
from lps.providers.base import Judgement, ProviderError
from lps.retry import Outcome

if TYPE_CHECKING:
    from lps.message_batches import MessageBatches

log = structlog.get_logger("lps.modes.batch_api")

INDEX_TTL_S = 7 * 24 * 3600  # a Message Batch ends within 24 h; results stay 29 days


async def run(ctx: ModeContext, unit: Unit) -> None:
    first = unit[0][1]
    provider = ctx.provider(first.provider)
    if not provider.supports_message_batches:
        await judge_in_sequence(ctx, unit)
        return
    from lps.message_batches import MessageBatches  # the SDK loads only when used

    batches = MessageBatches.of(provider)
    by_message_batch, fresh = await _recorded_message_batches(ctx, unit)
    if fresh:
        message_batch_id, sent = await _submit(ctx, batches, fresh)
        if message_batch_id is not None:
            by_message_batch[message_batch_id].extend(sent)
    for message_batch_id, items in by_message_batch.items():
        await _poll_until_ended(ctx, batches, message_batch_id, items)


async def _recorded_message_batches(ctx: ModeContext, unit: Unit) -> tuple[dict[str, Unit], Unit]:
    """The unit's requests by the Message Batch already holding them, and those in none yet."""
    known = await ctx.r.mget([lkeys.message_batch(ctx.keys, q.correlation_id) for _, q in unit])
    by_message_batch: dict[str, Unit] = defaultdict(list)
    fresh: Unit = []
    for item, message_batch_id in zip(unit, known, strict=True):
        if message_batch_id:
            by_message_batch[as_str(message_batch_id)].append(item)
        else:
            fresh.append(item)
    return by_message_batch, fresh


async def _submit(ctx: ModeContext, batches: MessageBatches, unit: Unit) -> tuple[str | None, Unit]:
    """Create the Message Batch; returns its id and the items it holds (rejected ones failed)."""
    try:
        submitted = await batches.submit_bundle([q for _, q in unit])
    except ProviderError as exc:
        if exc.detail.retryable:
            # Nothing was created: leave the requests pending; they are read again after a
            # release (or reclaimed after the processing timeout) and submitted then.
            log.warning("batch_submit_failed", error_type=exc.detail.error_type, size=len(unit))
            await ctx.release(unit)
            return None, []
        for entry, req in unit:
            await ctx.fail(entry, req, exc.detail)
        return None, []
    for entry, req in unit:
        if req.correlation_id in submitted.rejected:
            await ctx.fail(entry, req, submitted.rejected[req.correlation_id])
    items = [(e, q) for e, q in unit if q.correlation_id not in submitted.rejected]
    message_batch_id = submitted.message_batch_id
    if message_batch_id is None:
        return None, []

    def index(pipe: Any) -> None:
        for _, q in items:
            pipe.set(
                lkeys.message_batch(ctx.keys, q.correlation_id), message_batch_id, ex=INDEX_TTL_S
            )

    event = await ctx.dispatch(items, message_batch_id=message_batch_id, same_transaction=index)
    log.info(
        "message_batch_submitted",
        provider_batch_id=message_batch_id,
        size=len(items),
        batch_ids=event.batch_ids,
    )
    return message_batch_id, items


async def _poll_until_ended(
    ctx: ModeContext, batches: MessageBatches, message_batch_id: str, unit: Unit
) -> None:
    requests = [q for _, q in unit]
    while True:
        try:
            results = await batches.poll(message_batch_id, requests)
        except ProviderError as exc:
            if not exc.detail.retryable:
                for entry, req in unit:
                    await ctx.fail(entry, req, exc.detail)
                return
            log.warning(
                "batch_poll_failed",
                provider_batch_id=message_batch_id,
                error_type=exc.detail.error_type,
            )
            results = None
        if results is not None:
            break
        if ctx.stopping():
            # Leave them pending: the next holder finds the Message Batch id and polls it.
            await ctx.release(unit)
            return
        await ctx.wait_or_stop(ctx.poll_interval_s)
    for entry, req in unit:
        result = results[req.correlation_id]
        if isinstance(result, Judgement):
            await ctx.finish(entry, req, Outcome(result, None, 1))
        else:
            await ctx.fail(entry, req, result)
    log.info("message_batch_collected", provider_batch_id=message_batch_id, size=len(unit))
