"""What every provider offers the LPS worker: judge one request, or fail with an ErrorDetail."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from typing import Protocol

import msgspec

from events.types import (
    NANO_USD,
    TOKEN_KINDS,
    ComparisonRequested,
    ErrorDetail,
    TokenUsage,
    Winner,
)
from lps.metrics import LPS_CACHE_HIT_RATIO, LPS_COST, LPS_TOKENS
from streams.metrics import labelled


class Judgement(msgspec.Struct, frozen=True):
    winner: Winner
    confidence: float
    justification: str
    usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    prompt_sha256: str = ""
    latency_ms: float = 0.0
    cost_usd: float = 0.0
    """What the call cost (price table; 0 for the mock)."""
    rate_limits: dict[str, str] = msgspec.field(default_factory=dict)
    """The response's rate-limit headers (`anthropic-ratelimit-*`), names in lower case: what
    the shared limiter (`lps.limiter`) learns the provider's limits from."""


class ProviderError(Exception):
    """One failed provider attempt, already classified. A billed failure (an answer that was
    no valid judgement) carries the response's usage and cost; an HTTP error its rate-limit
    headers (`anthropic-ratelimit-*`, `retry-after`)."""

    def __init__(
        self,
        detail: ErrorDetail,
        *,
        usage: TokenUsage | None = None,
        cost_usd: float = 0.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{detail.error_type}: {detail.message}")
        self.detail = detail
        self.usage = usage or TokenUsage()
        self.cost_usd = cost_usd
        self.headers = dict(headers or {})


RATE_LIMIT_HEADER_PREFIX = "anthropic-ratelimit-"


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit headers of a response (`anthropic-ratelimit-*`, `retry-after`), names
    in lower case."""
    out = {}
    for name, value in headers.items():
        low = name.lower()
        if low.startswith(RATE_LIMIT_HEADER_PREFIX) or low == "retry-after":
            out[low] = value
    return out


class Provider(Protocol):
    name: str

    @property
    def supports_message_batches(self) -> bool:
        """Capability: the provider offers Message Batches (`lps.message_batches`), so mode
        `batch_api` submits a bundle as one batch; without it the bundle is judged in sequence."""
        ...

    async def judge(self, request: ComparisonRequested) -> Judgement:
        """One provider call for one request. Raises ProviderError; never retries by itself."""
        ...

    async def aclose(self) -> None: ...


CACHE_WARMUP_RESPONSES = 5
"""Responses per provider/model before the cache hit ratio is reported: the first calls of a
prefix write the cache, they cannot read it."""
CACHE_WINDOW_RESPONSES = 50


class _CacheHits:
    """The share of input tokens read from the prompt cache over recent responses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], deque[tuple[int, int]]] = {}
        self._count: dict[tuple[str, str], int] = {}

    def observe(self, provider: str, model: str, usage: TokenUsage) -> float | None:
        total = (
            usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
        )
        key = (provider, model)
        with self._lock:
            window = self._seen.setdefault(key, deque(maxlen=CACHE_WINDOW_RESPONSES))
            window.append((usage.cache_read_input_tokens, total))
            self._count[key] = self._count.get(key, 0) + 1
            if self._count[key] <= CACHE_WARMUP_RESPONSES:
                return None
            read = sum(r for r, _ in window)
            whole = sum(t for _, t in window)
        return read / whole if whole else None


_CACHE_HITS = _CacheHits()


def record_tokens(
    usage: TokenUsage,
    *,
    provider: str,
    model: str,
    cost_by_kind: Mapping[str, int] | None = None,
    prompt_cache: bool = False,
) -> None:
    """`lps_tokens_total{provider,model,kind}` (kind = TokenUsage field name; input_tokens is
    uncached input), `lps_cost_usd_total` from `cost_by_kind` (nano-dollars per kind), and,
    for a provider that caches the prompt prefix, `lps_prompt_cache_hit_ratio`."""
    for kind in TOKEN_KINDS:
        value = getattr(usage, kind)
        if value:
            labelled(LPS_TOKENS, provider, model, kind).inc(value)
    for kind, nano in (cost_by_kind or {}).items():
        if nano:
            labelled(LPS_COST, provider, model, kind).inc(nano / NANO_USD)
    if prompt_cache:
        ratio = _CACHE_HITS.observe(provider, model, usage)
        if ratio is not None:
            LPS_CACHE_HIT_RATIO.labels(provider=provider, model=model).set(ratio)
