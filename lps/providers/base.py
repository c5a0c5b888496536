"""What every provider offers the LPS worker: judge one request, or fail with an ErrorDetail."""

from __future__ import annotations

from typing import Protocol

import msgspec

from events.types import TOKEN_KINDS, ComparisonRequested, ErrorDetail, TokenUsage, Winner
from lps.metrics import LPS_TOKENS


class Judgement(msgspec.Struct, frozen=True):
    winner: Winner
    confidence: float
    justification: str
    usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    prompt_sha256: str = ""
    latency_ms: float = 0.0


class ProviderError(Exception):
    """One failed provider attempt, already classified."""

    def __init__(self, detail: ErrorDetail) -> None:
        super().__init__(f"{detail.error_type}: {detail.message}")
        self.detail = detail


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


def record_tokens(usage: TokenUsage) -> None:
    """`lps_tokens_total{kind}`, kind = TokenUsage field name (input_tokens: uncached input)."""
    for kind in TOKEN_KINDS:
        value = getattr(usage, kind)
        if value:
            LPS_TOKENS.labels(kind=kind).inc(value)
