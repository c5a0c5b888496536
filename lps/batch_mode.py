"""Mode `batch_api`: a bundle becomes one Anthropic Message Batch, polled until it ends.

The requests stay pending (kept alive by the worker) until their results are in.
The provider batch id is recorded twice in the dispatch MULTI/EXEC: in the
`BundleDispatched` event (the record) and in `lps:batchapi:<correlation id>`
(an index of it), so that whichever worker holds the requests after a restart
or a reclaim polls the same batch instead of paying for a second one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import structlog

from events import codec
from events.text import as_str
from events.types import BundleDispatched, ComparisonRequested, new_id
from lps import keys as lkeys
from lps.metrics import LPS_BUNDLE_SIZE
from lps.providers.base import Judgement, ProviderError
from lps.retry import Outcome

if TYPE_CHECKING:
    from lps.worker import LPSWorker
    from streams.reader import Entry

log = structlog.get_logger("lps.batch_mode")

INDEX_TTL_S = 7 * 24 * 3600  # a Message Batch ends within 24 h; results stay 29 days

Unit = list[tuple["Entry", ComparisonRequested]]


def supports_batches(provider: Any) -> bool:
    return getattr(provider, "name", "") == "anthropic"


async def run_batch_unit(worker: LPSWorker, unit: Unit, *, poll_interval_s: float) -> None:
    first = unit[0][1]
    provider = worker.provider(first.provider)
    if not supports_batches(provider):
        # The mock judge has no batch endpoint: judge in sequence, as serial_bundle does.
        await worker.dispatch(unit)
        for entry, req in unit:
            await worker.judge_one(entry, req)
        return
    from lps.batch_api import MessageBatches

    batches = MessageBatches(provider)  # type: ignore[arg-type]
    known = await worker.r.mget(
        [lkeys.message_batch(worker.keys, q.correlation_id) for _, q in unit]
    )
    by_batch: dict[str, Unit] = defaultdict(list)
    fresh: Unit = []
    for item, batch_id in zip(unit, known, strict=True):
        if batch_id:
            by_batch[as_str(batch_id)].append(item)
        else:
            fresh.append(item)
    if fresh:
        submitted_id, sent = await _submit(worker, batches, fresh)
        if submitted_id is not None:
            by_batch[submitted_id].extend(sent)
    for batch_id, items in by_batch.items():
        await _poll_until_ended(worker, batches, batch_id, items, poll_interval_s)


async def _submit(worker: LPSWorker, batches: Any, unit: Unit) -> tuple[str | None, Unit]:
    """Create the Message Batch; returns its id and the items it holds (rejected ones failed)."""
    first = unit[0][1]
    try:
        submitted = await batches.submit_bundle([q for _, q in unit])
    except ProviderError as exc:
        if exc.detail.retryable:
            # Nothing was created: leave the requests pending; they are read again after a
            # release (or reclaimed after the processing timeout) and submitted then.
            log.warning("batch_submit_failed", error_type=exc.detail.error_type, size=len(unit))
            await worker.release(unit)
            return None, []
        for entry, req in unit:
            await worker.fail(entry, req, exc.detail)
        return None, []
    for entry, req in unit:
        if req.correlation_id in submitted.rejected:
            await worker.fail(entry, req, submitted.rejected[req.correlation_id])
    items = [(e, q) for e, q in unit if q.correlation_id not in submitted.rejected]
    if submitted.provider_batch_id is None:
        return None, []
    sent = [q for _, q in items]
    event = BundleDispatched(
        bundle_id=new_id(),
        mode="batch_api",
        provider=first.provider,
        model=first.model,
        consumer=worker.consumer,
        correlation_ids=[q.correlation_id for q in sent],
        batch_ids=sorted({q.batch_id for q in sent}),
        size=len(sent),
        provider_batch_id=submitted.provider_batch_id,
    )
    async with worker.r.pipeline(transaction=True) as pipe:
        pipe.xadd(worker.keys.dispatches, codec.encode(event))
        for q in sent:
            pipe.set(
                lkeys.message_batch(worker.keys, q.correlation_id),
                submitted.provider_batch_id,
                ex=INDEX_TTL_S,
            )
        await pipe.execute()
    LPS_BUNDLE_SIZE.labels("batch_api").observe(len(sent))
    log.info(
        "message_batch_submitted",
        provider_batch_id=submitted.provider_batch_id,
        size=len(sent),
        batch_ids=event.batch_ids,
    )
    return str(submitted.provider_batch_id), items


async def _poll_until_ended(
    worker: LPSWorker, batches: Any, batch_id: str, unit: Unit, poll_interval_s: float
) -> None:
    requests = [q for _, q in unit]
    while True:
        try:
            results = await batches.poll(batch_id, requests)
        except ProviderError as exc:
            if not exc.detail.retryable:
                for entry, req in unit:
                    await worker.fail(entry, req, exc.detail)
                return
            log.warning(
                "batch_poll_failed", provider_batch_id=batch_id, error_type=exc.detail.error_type
            )
            results = None
        if results is not None:
            break
        if worker.stopping:
            # Leave them pending: the next holder finds the batch id and polls it.
            await worker.release(unit)
            return
        await worker.wait_or_stop(poll_interval_s)
    for entry, req in unit:
        result = results[req.correlation_id]
        if isinstance(result, Judgement):
            await worker.finish(entry, req, Outcome(result, None, 1))
        else:
            await worker.fail(entry, req, result)
    log.info("message_batch_collected", provider_batch_id=batch_id, size=len(unit))
