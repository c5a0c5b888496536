"""The Anthropic Message Batches client wrapper: a bundle goes to Anthropic as one Message
Batch (half the price). Mode `batch_api` (`lps.modes.batch_api`) drives it:

1. `submitted = await batches.submit_bundle(requests)` creates one batch whose items
   are the same `messages.create` bodies as `per_request` would send, each with
   `custom_id = custom_id_for(batch_id, correlation_id)`. Items that cannot be rendered (bad
   overrides, unknown prompt version) are not sent; they come back at once in
   `submitted.rejected` as ErrorDetails.
2. The worker records `submitted.message_batch_id` in `BundleDispatched.provider_batch_id`
   and leaves the requests pending (no XACK).
3. `await batches.poll(message_batch_id, requests)` → None while the batch is
   processing; once it has ended, `{request key: Judgement | ErrorDetail}` for every
   given request (`events.ids.request_key`: a bundle may hold several CJ batches, whose
   correlation ids are numbered each from 1), matched by `custom_id` (results come in any
   order). `errored` items
   are classified by their `error.type` like an HTTP error; `expired` and `canceled`
   items become `error_type="expired"`; a request without a result line becomes a
   retryable `server_error`.

Resume after a restart needs nothing but the event: the pending requests plus the
`provider_batch_id` of their `BundleDispatched` are all `poll` takes.

Every failing SDK call (create, retrieve, results, list, cancel) raises ProviderError
with a classified ErrorDetail, whatever the SDK raised: an API error is classified by its
status and body, anything else (an ended batch without `results_url`, a results line that
is not JSON, a dropped connection while streaming results) is a retryable `server_error`
named by the exception's class. Polling again later is safe (polling is idempotent).
Token usage and cost (at the batch discount) of every result are counted when the
results are read; a billed failure (max_tokens, refusal, parse error) carries them in its
`ItemFailure`.

`submit_bundle` is `prepare` then `create`: mode `batch_api` writes its intent between
the two, and `find_created` lists recent batches to find one that was created but never
recorded (by request count and creation time).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog
from anthropic.resources.messages.batches import AsyncBatches
from anthropic.types.messages.batch_create_params import Request as BatchRequest

from events.ids import request_key
from events.types import ComparisonRequested, ErrorDetail, TokenUsage
from lps.classify import classify_any, classify_response
from lps.providers.anthropic import (
    AnthropicProvider,
    PreparedCall,
    bill,
    judgement_from_message,
)
from lps.providers.base import Judgement, Provider, ProviderError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ItemFailure:
    """An item that did not end in a judgement; `usage`/`cost_usd` when it was billed."""

    detail: ErrorDetail
    usage: TokenUsage = field(default_factory=TokenUsage)
    cost_usd: float = 0.0


ItemResult = Judgement | ItemFailure
MAX_MESSAGE_BATCH_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def custom_id_for(batch_id: str, correlation_id: str) -> str:
    """The batch item id of a request, unique within a Message Batch, which may hold requests
    of several CJ batches: `<batch id>-<correlation id>` (the correlation id is numbered in its
    batch: digits, after the last `-`); a random correlation id of before alone, as then (a
    Message Batch sent before the upgrade is matched again); either when the API accepts it
    (`^[A-Za-z0-9_-]{1,64}$`), else a stable hash of it."""
    ref = request_key(batch_id, correlation_id).replace(":", "-")  # no id holds a ":"
    if _CUSTOM_ID.fullmatch(ref):
        return ref
    return "h" + hashlib.sha256(ref.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class SubmittedMessageBatch:
    message_batch_id: str | None
    """None when no item could be sent (all rejected)."""
    custom_ids: dict[str, str] = field(default_factory=dict)
    """request key (`events.ids.request_key`) → custom_id of every item sent."""
    rejected: dict[str, ErrorDetail] = field(default_factory=dict)
    """request key → why the item was not sent (final: no HTTP call was made for it)."""


@dataclass(frozen=True)
class PreparedBundle:
    """A bundle rendered for `batches.create`: the items to send and those refused."""

    items: list[BatchRequest]
    custom_ids: dict[str, str]
    """request key (`events.ids.request_key`) → custom_id of every item to send."""
    rejected: dict[str, ErrorDetail]
    model: str


@dataclass(frozen=True)
class MessageBatchStatus:
    message_batch_id: str
    processing_status: str
    counts: dict[str, int]
    created_at: float = 0.0
    """Epoch seconds (0 when the API did not say)."""

    @property
    def ended(self) -> bool:
        return self.processing_status == "ended"

    @property
    def requests(self) -> int:
        return sum(self.counts.values())


_COUNT_KINDS = ("processing", "succeeded", "errored", "canceled", "expired")


def _status_of(batch: Any) -> MessageBatchStatus:
    counts = getattr(batch, "request_counts", None)
    created = getattr(batch, "created_at", None)
    timestamp = getattr(created, "timestamp", None)
    return MessageBatchStatus(
        message_batch_id=str(getattr(batch, "id", "")),
        processing_status=str(getattr(batch, "processing_status", "")),
        counts={k: int(getattr(counts, k, 0) or 0) for k in _COUNT_KINDS},
        created_at=float(timestamp()) if callable(timestamp) else 0.0,
    )


def _as_mapping(obj: object) -> object:
    """An SDK model (results lines are built unvalidated) as plain JSON-like data."""
    if isinstance(obj, Mapping):
        return obj
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return obj


class MessageBatches:
    """Message Batches on top of an `AnthropicProvider` (its client, prompt and parsing)."""

    def __init__(self, provider: AnthropicProvider) -> None:
        self.provider = provider

    @classmethod
    def of(cls, provider: Provider) -> MessageBatches:
        """The client of a provider that declares `supports_message_batches`."""
        # Anthropic is the one provider with Message Batches; another would bring its own client.
        # Message Batches are not paced by the shared limiter: their limits are the batch API's.
        provider = getattr(provider, "inner", provider)
        if not (provider.supports_message_batches and isinstance(provider, AnthropicProvider)):
            raise TypeError(f"provider {provider.name!r} offers no Message Batches")
        return cls(provider)

    @property
    def _batches(self) -> AsyncBatches:
        return self.provider.sdk.messages.batches

    def _raise(self, exc: BaseException, model: str = "") -> NoReturn:
        raise ProviderError(
            classify_any(
                exc, provider=self.provider.name, model=model, secrets=self.provider.secrets()
            )
        ) from None

    async def submit_bundle(self, requests: Sequence[ComparisonRequested]) -> SubmittedMessageBatch:
        """Create one Message Batch for `requests`. Raises ProviderError if the create call
        fails, ValueError on a request given twice."""
        prepared = self.prepare(requests)
        if not prepared.items:
            return SubmittedMessageBatch(None, {}, prepared.rejected)
        message_batch_id = await self.create(prepared)
        return SubmittedMessageBatch(message_batch_id, prepared.custom_ids, prepared.rejected)

    def prepare(self, requests: Sequence[ComparisonRequested]) -> PreparedBundle:
        """Render the items of a Message Batch; requests that cannot be rendered are
        `rejected` (nothing is sent for them). ValueError on a request given twice."""
        if len(requests) > MAX_MESSAGE_BATCH_REQUESTS:
            raise ValueError(f"at most {MAX_MESSAGE_BATCH_REQUESTS} requests per batch")
        prepared: list[PreparedCall] = []
        items: list[BatchRequest] = []
        rejected: dict[str, ErrorDetail] = {}
        custom_ids: dict[str, str] = {}
        seen: set[str] = set()
        for request in requests:
            cid = custom_id_for(request.batch_id, request.correlation_id)
            if cid in seen:
                raise ValueError(
                    f"duplicate request in bundle: {request.batch_id} {request.correlation_id}"
                )
            seen.add(cid)
            try:
                call = self.provider.prepare(request)
            except ProviderError as exc:
                rejected[request.key] = exc.detail
                continue
            prepared.append(call)
            items.append({"custom_id": cid, "params": call.params()})
            custom_ids[request.key] = cid
        model = prepared[0].model if prepared else ""
        return PreparedBundle(items, custom_ids, rejected, model)

    async def create(self, prepared: PreparedBundle) -> str:
        """`batches.create` of a prepared bundle; its Message Batch id. Raises ProviderError
        (a failure without a response leaves it unknown whether the batch was created)."""
        try:
            batch = await self._batches.create(requests=prepared.items)
            batch_id = getattr(batch, "id", None)
        except Exception as exc:
            self._raise(exc, prepared.model)
        if not isinstance(batch_id, str) or not batch_id:
            raise ProviderError(
                ErrorDetail(
                    error_type="parse_error",
                    retryable=True,
                    message="batches.create answered without a batch id",
                    provider=self.provider.name,
                    model=prepared.model,
                    status_code=200,
                )
            )
        return batch_id

    async def status(self, message_batch_id: str) -> MessageBatchStatus:
        try:
            batch = await self._batches.retrieve(message_batch_id)
            return _status_of(batch)
        except Exception as exc:
            self._raise(exc)

    async def recent(self, since: float, *, limit: int = 1000) -> list[MessageBatchStatus]:
        """The Message Batches created at `since` (epoch seconds) or later, newest first (at
        most `limit`). Raises ProviderError."""
        out: list[MessageBatchStatus] = []
        try:
            async for batch in self._batches.list(limit=min(limit, 100)):
                status = _status_of(batch)
                if status.created_at and status.created_at < since:
                    break
                out.append(status)
                if len(out) >= limit:
                    break
        except Exception as exc:
            self._raise(exc)
        return out

    async def poll(
        self, message_batch_id: str, requests: Sequence[ComparisonRequested]
    ) -> dict[str, ItemResult] | None:
        """None while the batch is processing; once ended, one result per given request,
        keyed by request key (`events.ids.request_key`). Raises ProviderError when the API
        call fails."""
        status = await self.status(message_batch_id)
        if not status.ended:
            return None
        by_custom_id = {custom_id_for(r.batch_id, r.correlation_id): r for r in requests}
        results: dict[str, ItemResult] = {}
        lines: list[Any] = []
        try:
            decoder = await self._batches.results(message_batch_id)
            try:
                async for line in decoder:
                    lines.append(line)
            finally:
                await decoder.close()
        except Exception as exc:  # e.g. AnthropicError: an ended batch without results_url
            self._raise(exc)
        for line in lines:
            custom_id = str(getattr(line, "custom_id", ""))
            request = by_custom_id.get(custom_id)
            if request is None:
                log.warning(
                    "message_batch_result_unknown",
                    message_batch_id=message_batch_id,
                    custom_id=custom_id,
                )
                continue
            results[request.key] = self._result(
                message_batch_id, request, getattr(line, "result", None)
            )
        for request in requests:
            if request.key not in results:
                results[request.key] = ItemFailure(
                    ErrorDetail(
                        error_type="server_error",
                        retryable=True,
                        message=f"batch {message_batch_id} ended without a result for this request",
                        provider=self.provider.name,
                        model=request.model,
                        correlation_id=request.correlation_id,
                    )
                )
        return results

    def _result(
        self, message_batch_id: str, request: ComparisonRequested, result: object
    ) -> ItemResult:
        kind = getattr(result, "type", None)
        model = request.model or self.provider.settings.model
        where: dict[str, Any] = {
            "provider": self.provider.name,
            "model": model,
            "correlation_id": request.correlation_id,
        }
        if kind == "succeeded":
            message: Any = getattr(result, "message", None)
            try:
                call = self.provider.prepare(request)
            except ProviderError as exc:
                return ItemFailure(exc.detail)
            _, cost = bill(
                self.provider.prices,
                message,
                model=model,
                cache_ttl=call.options.cache_ttl,
                batch=True,
                provider=self.provider.name,
            )
            try:
                return judgement_from_message(
                    message,
                    model=model,
                    correlation_id=request.correlation_id,
                    prompt_sha256=call.prompt.sha256,
                    secrets=self.provider.secrets(),
                    cost_usd=cost,
                )
            except ProviderError as exc:
                return ItemFailure(exc.detail, exc.usage, exc.cost_usd)
        if kind == "errored":
            body = _as_mapping(getattr(result, "error", None))
            return ItemFailure(
                classify_response(None, body, secrets=self.provider.secrets(), **where)
            )
        if kind in ("expired", "canceled"):
            why = (
                "expired: the batch ended (24 h limit) before this request was processed"
                if kind == "expired"
                else "canceled: the batch was canceled before this request was processed"
            )
            return ItemFailure(
                ErrorDetail(
                    error_type="expired",
                    retryable=True,
                    message=f"batch {message_batch_id} item {why}",
                    **where,
                )
            )
        return ItemFailure(
            ErrorDetail(
                error_type="server_error",
                retryable=True,
                message=f"batch {message_batch_id}: unknown result type {kind!r}",
                **where,
            )
        )

    async def cancel(self, message_batch_id: str) -> MessageBatchStatus:
        """Ask the API to cancel; items not yet processed end `canceled` (→ expired)."""
        try:
            await self._batches.cancel(message_batch_id)
        except Exception as exc:
            self._raise(exc)
        return await self.status(message_batch_id)
