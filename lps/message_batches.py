"""The Anthropic Message Batches client wrapper: a bundle goes to Anthropic as one Message
Batch (half the price). Mode `batch_api` (`lps.modes.batch_api`) drives it:

1. `submitted = await batches.submit_bundle(requests)` creates one batch whose items
   are the same `messages.create` bodies as `per_request` would send, each with
   `custom_id = custom_id_for(correlation_id)`. Items that cannot be rendered (bad
   overrides, unknown prompt version) are not sent; they come back at once in
   `submitted.rejected` as ErrorDetails.
2. The worker records `submitted.message_batch_id` in `BundleDispatched.provider_batch_id`
   and leaves the requests pending (no XACK).
3. `await batches.poll(message_batch_id, requests)` → None while the batch is
   processing; once it has ended, `{correlation_id: Judgement | ErrorDetail}` for every
   given request, matched by `custom_id` (results come in any order). `errored` items
   are classified by their `error.type` like an HTTP error; `expired` and `canceled`
   items become `error_type="expired"`; a request without a result line becomes a
   retryable `server_error`.

Resume after a restart needs nothing but the event: the pending requests plus the
`provider_batch_id` of their `BundleDispatched` are all `poll` takes.

A failing HTTP call (create, retrieve, results) raises ProviderError with a classified
ErrorDetail; polling again later is safe (polling is idempotent). Token usage of
every result is counted in `lps_tokens_total` when the results are read.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anthropic
from anthropic.resources.messages.batches import AsyncBatches
from anthropic.types.messages.batch_create_params import Request as BatchRequest

from events.types import ComparisonRequested, ErrorDetail
from lps.classify import classify_exception, classify_response
from lps.providers.anthropic import (
    AnthropicProvider,
    PreparedCall,
    judgement_from_message,
    usage_of,
)
from lps.providers.base import Judgement, Provider, ProviderError, record_tokens

log = logging.getLogger(__name__)

ItemResult = Judgement | ErrorDetail
MAX_MESSAGE_BATCH_REQUESTS = 100_000
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def custom_id_for(correlation_id: str) -> str:
    """The batch item id of a request: its correlation id when the API accepts it as one
    (`^[A-Za-z0-9_-]{1,64}$`, true of our uuid4 hex ids), else a stable hash of it."""
    if _CUSTOM_ID.fullmatch(correlation_id):
        return correlation_id
    return "h" + hashlib.sha256(correlation_id.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class SubmittedMessageBatch:
    message_batch_id: str | None
    """None when no item could be sent (all rejected)."""
    custom_ids: dict[str, str] = field(default_factory=dict)
    """correlation_id → custom_id of every item sent."""
    rejected: dict[str, ErrorDetail] = field(default_factory=dict)
    """correlation_id → why the item was not sent (final: no HTTP call was made for it)."""


@dataclass(frozen=True)
class MessageBatchStatus:
    message_batch_id: str
    processing_status: str
    counts: dict[str, int]

    @property
    def ended(self) -> bool:
        return self.processing_status == "ended"


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
        if not (provider.supports_message_batches and isinstance(provider, AnthropicProvider)):
            raise TypeError(f"provider {provider.name!r} offers no Message Batches")
        return cls(provider)

    @property
    def _batches(self) -> AsyncBatches:
        return self.provider.sdk.messages.batches

    def _raise(self, exc: anthropic.APIError, model: str = "") -> ProviderError:
        return ProviderError(
            classify_exception(
                exc, provider=self.provider.name, model=model, secrets=self.provider.secrets()
            )
        )

    async def submit_bundle(self, requests: Sequence[ComparisonRequested]) -> SubmittedMessageBatch:
        """Create one Message Batch for `requests`. Raises ProviderError if the create call
        fails (nothing was submitted then), ValueError on duplicate correlation ids."""
        if len(requests) > MAX_MESSAGE_BATCH_REQUESTS:
            raise ValueError(f"at most {MAX_MESSAGE_BATCH_REQUESTS} requests per batch")
        prepared: list[PreparedCall] = []
        rejected: dict[str, ErrorDetail] = {}
        custom_ids: dict[str, str] = {}
        seen: set[str] = set()
        for request in requests:
            cid = custom_id_for(request.correlation_id)
            if cid in seen:
                raise ValueError(f"duplicate correlation id in bundle: {request.correlation_id}")
            seen.add(cid)
            try:
                prepared.append(self.provider.prepare(request))
            except ProviderError as exc:
                rejected[request.correlation_id] = exc.detail
                continue
            custom_ids[request.correlation_id] = cid
        if not prepared:
            return SubmittedMessageBatch(None, {}, rejected)
        items: list[BatchRequest] = [
            {"custom_id": custom_ids[call.correlation_id], "params": call.params()}
            for call in prepared
        ]
        try:
            batch = await self._batches.create(requests=items)
        except anthropic.APIError as exc:
            raise self._raise(exc, prepared[0].model) from None
        return SubmittedMessageBatch(str(batch.id), custom_ids, rejected)

    async def status(self, message_batch_id: str) -> MessageBatchStatus:
        try:
            batch = await self._batches.retrieve(message_batch_id)
        except anthropic.APIError as exc:
            raise self._raise(exc) from None
        counts = batch.request_counts
        return MessageBatchStatus(
            message_batch_id=message_batch_id,
            processing_status=str(batch.processing_status),
            counts={
                k: int(getattr(counts, k, 0) or 0)
                for k in ("processing", "succeeded", "errored", "canceled", "expired")
            },
        )

    async def poll(
        self, message_batch_id: str, requests: Sequence[ComparisonRequested]
    ) -> dict[str, ItemResult] | None:
        """None while the batch is processing; once ended, one result per given request,
        keyed by correlation id. Raises ProviderError when the API call fails."""
        status = await self.status(message_batch_id)
        if not status.ended:
            return None
        by_custom_id = {custom_id_for(r.correlation_id): r for r in requests}
        results: dict[str, ItemResult] = {}
        lines: list[Any] = []
        try:
            decoder = await self._batches.results(message_batch_id)
            try:
                async for line in decoder:
                    lines.append(line)
            finally:
                await decoder.close()
        except anthropic.APIError as exc:
            raise self._raise(exc) from None
        for line in lines:
            custom_id = str(getattr(line, "custom_id", ""))
            request = by_custom_id.get(custom_id)
            if request is None:
                log.warning(
                    "batch %s: result for unknown custom_id %s", message_batch_id, custom_id
                )
                continue
            results[request.correlation_id] = self._result(
                message_batch_id, request, getattr(line, "result", None)
            )
        for request in requests:
            if request.correlation_id not in results:
                results[request.correlation_id] = ErrorDetail(
                    error_type="server_error",
                    retryable=True,
                    message=f"batch {message_batch_id} ended without a result for this request",
                    provider=self.provider.name,
                    model=request.model,
                    correlation_id=request.correlation_id,
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
            record_tokens(usage_of(message))
            try:
                call = self.provider.prepare(request)
                return judgement_from_message(
                    message,
                    model=model,
                    correlation_id=request.correlation_id,
                    prompt_sha256=call.prompt.sha256,
                    secrets=self.provider.secrets(),
                )
            except ProviderError as exc:
                return exc.detail
        if kind == "errored":
            body = _as_mapping(getattr(result, "error", None))
            return classify_response(None, body, secrets=self.provider.secrets(), **where)
        if kind in ("expired", "canceled"):
            why = (
                "expired: the batch ended (24 h limit) before this request was processed"
                if kind == "expired"
                else "canceled: the batch was canceled before this request was processed"
            )
            return ErrorDetail(
                error_type="expired",
                retryable=True,
                message=f"batch {message_batch_id} item {why}",
                **where,
            )
        return ErrorDetail(
            error_type="server_error",
            retryable=True,
            message=f"batch {message_batch_id}: unknown result type {kind!r}",
            **where,
        )

    async def cancel(self, message_batch_id: str) -> MessageBatchStatus:
        """Ask the API to cancel; items not yet processed end `canceled` (→ expired)."""
        try:
            await self._batches.cancel(message_batch_id)
        except anthropic.APIError as exc:
            raise self._raise(exc) from None
        return await self.status(message_batch_id)
