"""The mock judge: a seeded stand-in for an LLM with latent essay qualities.

P(essay_a wins) = σ(q_a − q_b + position_bias + ε), ε ~ N(0, noise²) per call.
Every draw is a function of (seed, the batch's content key, the pair in its slots,
the request's occurrence of that pair, and — for faults and latency only — the
attempt), so a run is reproducible for a seed and independent of worker scheduling
and of the random batch and correlation ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, replace

from events.types import ComparisonRequested, ErrorDetail, ErrorType, Essay, TokenUsage
from lps.metrics import LPS_PROVIDER_LATENCY
from lps.providers.base import Judgement, ProviderError, record_tokens


@dataclass(frozen=True)
class MockProfile:
    name: str
    position_bias: float = 0.3
    noise: float = 0.5
    latency_ms: float = 2.0
    deterministic: bool = False
    # error_type -> probability per attempt (the flaky profile)
    faults: tuple[tuple[ErrorType, float], ...] = ()


PROFILES: dict[str, MockProfile] = {
    "ideal": MockProfile("ideal", position_bias=0.0, noise=0.0, latency_ms=0.0, deterministic=True),
    "cj_generic_batch": MockProfile("cj_generic_batch"),
    "flaky": MockProfile(
        "flaky",
        faults=(
            ("rate_limit", 0.10),
            ("overloaded", 0.05),
            ("server_error", 0.05),
            ("timeout", 0.03),
            ("max_tokens", 0.02),
        ),
    ),
    "slow": MockProfile("slow", latency_ms=250.0),
}
DEFAULT_PROFILE = "cj_generic_batch"
DEFAULT_MODEL = "mock-judge-1"
POISON_EXIT_CODE = 86

_FAULTS: dict[str, tuple[bool, int | None, str]] = {
    "rate_limit": (True, 429, "rate limit exceeded (mock)"),
    "overloaded": (True, 529, "overloaded (mock)"),
    "server_error": (True, 500, "internal server error (mock)"),
    "timeout": (True, None, "request timed out (mock)"),
    "max_tokens": (False, None, "stop_reason max_tokens: tool input truncated (mock)"),
}


def profile_from_env(name: str | None = None) -> MockProfile:
    """The named profile (or CJS_MOCK_PROFILE) with CJS_MOCK_* overrides applied."""
    chosen = name or os.environ.get("CJS_MOCK_PROFILE") or DEFAULT_PROFILE
    if chosen not in PROFILES:
        raise ValueError(f"unknown mock profile {chosen!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[chosen]
    if (bias := os.environ.get("CJS_MOCK_POSITION_BIAS")) is not None:
        profile = replace(profile, position_bias=float(bias))
    if (latency := os.environ.get("CJS_MOCK_LATENCY_MS")) is not None:
        profile = replace(profile, latency_ms=float(latency))
    return profile


def win_probability(q_a: float, q_b: float, position_bias: float) -> float:
    return 1.0 / (1.0 + math.exp(-(q_a - q_b + position_bias)))


_WORD = re.compile(r"[A-Za-zÀ-ÿ']+")


def quality_of(essay: Essay) -> float:
    """The essay's latent quality: `mock_quality` when given, else a crude text measure
    (length and vocabulary variety), roughly on a N(0, 1) scale."""
    if essay.mock_quality is not None:
        return essay.mock_quality
    words = _WORD.findall(essay.text.lower())
    if not words:
        return -3.0
    variety = len(set(words)) / math.sqrt(len(words))
    return round(0.9 * math.log(len(words) / 150.0) + 0.35 * (variety - 6.0), 6)


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class MockProvider:
    name = "mock"
    supports_message_batches = False

    def __init__(self, profile: MockProfile | None = None, seed: int | None = None) -> None:
        self.profile = profile or profile_from_env()
        env_seed = os.environ.get("CJS_MOCK_SEED")
        self.seed = seed if seed is not None else (int(env_seed) if env_seed else None)
        self._attempts: dict[str, int] = {}
        # Test-only: CJS_MOCK_POISON_MARKER makes a request "poison" (it kills its worker
        # process, every time) when it equals the request's correlation id or occurs in
        # either essay's text. Unset, the normal path never looks at it.
        self._poison = os.environ.get("CJS_MOCK_POISON_MARKER") or None

    async def aclose(self) -> None:
        return None

    def _is_poison(self, request: ComparisonRequested) -> bool:
        marker = self._poison
        assert marker is not None
        return (
            request.correlation_id == marker
            or marker in request.essay_a.text
            or marker in request.essay_b.text
        )

    async def judge(self, request: ComparisonRequested) -> Judgement:
        if self._poison is not None and self._is_poison(request):
            os._exit(POISON_EXIT_CODE)  # no cleanup, no flush: like a segfault or the OOM killer
        p = self.profile
        seed = self.seed if self.seed is not None else request.seed
        attempt = self._attempts.get(request.correlation_id, 0) + 1
        self._attempts[request.correlation_id] = attempt
        # Not the batch or correlation ids (random): the batch's content, the pair in its
        # slots and how often it was asked before, so the same input and seed give the
        # same judgements whichever worker answers, whenever. Faults and latency also
        # depend on the attempt; the outcome does not.
        pair = (
            seed,
            request.content_key or request.batch_id,
            request.essay_a.essay_id,
            request.essay_b.essay_id,
            request.occurrence,
        )
        rng = _rng(*pair, attempt)
        outcome = _rng(*pair)
        latency_s = rng.uniform(0.5, 1.5) * p.latency_ms / 1000.0 if p.latency_ms > 0 else 0.0
        if latency_s:
            await asyncio.sleep(latency_s)
        LPS_PROVIDER_LATENCY.labels(provider=self.name, model=request.model).observe(latency_s)
        draw = rng.random()
        for error_type, chance in p.faults:
            if draw < chance:
                self._raise(error_type, request, rng)
            draw -= chance
        self._attempts.pop(request.correlation_id, None)
        q_a, q_b = quality_of(request.essay_a), quality_of(request.essay_b)
        if p.deterministic:
            a_wins = (q_a, request.essay_a.essay_id) >= (q_b, request.essay_b.essay_id)
            prob = 1.0 if a_wins else 0.0
        else:
            prob = win_probability(q_a, q_b + outcome.gauss(0.0, p.noise), p.position_bias)
            a_wins = outcome.random() < prob
        confidence = 1 + min(4, round(abs(prob - 0.5) * 8))
        usage = TokenUsage(input_tokens=900, output_tokens=60)
        record_tokens(usage, provider=self.name, model=request.model)
        return Judgement(
            winner="essay_a" if a_wins else "essay_b",
            confidence=float(confidence),
            justification="mock judgement from latent qualities",
            usage=usage,
            prompt_sha256="",
            latency_ms=round(latency_s * 1000, 3),
        )

    def _raise(
        self, error_type: ErrorType, request: ComparisonRequested, rng: random.Random
    ) -> None:
        retryable, status, message = _FAULTS[error_type]
        retry_after = round(rng.uniform(0.01, 0.05), 3) if error_type == "rate_limit" else None
        raise ProviderError(
            ErrorDetail(
                error_type=error_type,
                retryable=retryable,
                message=message,
                provider=self.name,
                model=request.model,
                correlation_id=request.correlation_id,
                status_code=status,
                retry_after_s=retry_after,
            )
        )
