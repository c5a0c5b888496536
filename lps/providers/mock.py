"""The mock judge: a seeded stand-in for an LLM with latent essay qualities.

P(essay_a wins) = σ(q_a − q_b + position_bias + ε), ε ~ N(0, noise²) per call.
Every draw is a function of (seed, the batch's content key, the pair in its slots,
the request's occurrence of that pair, and — for faults and latency only — the
attempt), so a run is reproducible for a seed and independent of worker scheduling
and of the batch and correlation ids.

The `realistic` profile answers like a real provider under load: latency drawn from a
lognormal (median 1.5 s, p99 12 s), and a provider-side rate limit in requests and tokens
per minute shared by every worker on the same Redis (`lps.providers.mock_limits`),
answering 429 with `retry-after` and the `anthropic-ratelimit-*` headers, classified by
`lps.classify` as the API's own 429 would be. Its rate-limit outcomes depend on timing,
so a realistic run is not reproducible call for call; judgements still are.
"""

from __future__ import annotations

import _random
import asyncio
import hashlib
import math
import os
import random
import re
import struct
from dataclasses import dataclass, replace
from typing import Any

from events.types import ComparisonRequested, ErrorDetail, ErrorType, Essay, TokenUsage
from lps.metrics import LPS_PROVIDER_LATENCY
from lps.providers import mock_limits
from lps.providers.base import Judgement, ProviderError, record_tokens
from streams.keys import Keys
from streams.metrics import labelled

# The normal quantile of the 99th percentile: a lognormal's σ from its median and p99.
_Z99 = 2.3263478740408408
# What one mock call uses, charged against the tokens-per-minute limit on arrival.
USAGE = TokenUsage(input_tokens=900, output_tokens=60)
CALL_TOKENS = USAGE.input_tokens + USAGE.output_tokens
# Tokens per minute allowed per request per minute when only the request limit is given:
# enough that requests are the binding limit, as for short prompts at the real API.
TOKENS_PER_REQUEST_LIMIT = 2000


@dataclass(frozen=True)
class MockProfile:
    name: str
    position_bias: float = 0.3
    noise: float = 0.5
    latency_ms: float = 2.0
    deterministic: bool = False
    # error_type -> probability per attempt (the flaky profile)
    faults: tuple[tuple[ErrorType, float], ...] = ()
    latency_median_ms: float = 0.0
    """When > 0, latency is lognormal with this median and `latency_p99_ms` (instead of
    uniform around `latency_ms`)."""
    latency_p99_ms: float = 0.0
    rate_limit_rpm: float = 0.0
    """Provider-side limit in requests per minute (0: none)."""
    rate_limit_tpm: float = 0.0
    """Provider-side limit in tokens per minute (0: `TOKENS_PER_REQUEST_LIMIT` × rpm)."""
    rate_burst_s: float = 1.0
    """Each bucket holds this many seconds of its rate."""
    rejection_ms: float = 30.0
    """How long a 429 takes to come back."""

    @property
    def tokens_per_minute(self) -> float:
        return self.rate_limit_tpm or TOKENS_PER_REQUEST_LIMIT * self.rate_limit_rpm


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
    "realistic": MockProfile(
        "realistic", latency_median_ms=1500.0, latency_p99_ms=12000.0, rate_limit_rpm=600.0
    ),
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
        profile = replace(profile, latency_ms=float(latency), latency_median_ms=0.0)
    if (median := os.environ.get("CJS_MOCK_LATENCY_MEDIAN_MS")) is not None:
        # The profile's tail in proportion (p99 = 8 × median for `realistic`) unless given.
        ratio = (
            profile.latency_p99_ms / profile.latency_median_ms if profile.latency_median_ms else 8.0
        )
        profile = replace(
            profile, latency_median_ms=float(median), latency_p99_ms=float(median) * ratio
        )
    if (p99 := os.environ.get("CJS_MOCK_LATENCY_P99_MS")) is not None:
        profile = replace(profile, latency_p99_ms=float(p99))
    if (rpm := os.environ.get("CJS_MOCK_RATE_LIMIT_RPM")) is not None:
        profile = replace(profile, rate_limit_rpm=float(rpm))
    if (tpm := os.environ.get("CJS_MOCK_RATE_LIMIT_TPM")) is not None:
        profile = replace(profile, rate_limit_tpm=float(tpm))
    if profile.latency_median_ms > 0 and profile.latency_p99_ms < profile.latency_median_ms:
        raise ValueError("CJS_MOCK_LATENCY_P99_MS must be at least the median")
    return profile


def _has_latency(profile: MockProfile) -> bool:
    """Whether `latency_s` draws for this profile."""
    return profile.latency_median_ms > 0 or profile.latency_ms > 0


def latency_s(profile: MockProfile, rng: random.Random) -> float:
    """One call's latency: lognormal (median, p99) when the profile has a median, else
    uniform in [0.5, 1.5] × latency_ms."""
    if profile.latency_median_ms > 0:
        sigma = math.log(profile.latency_p99_ms / profile.latency_median_ms) / _Z99
        return profile.latency_median_ms * math.exp(sigma * rng.gauss(0.0, 1.0)) / 1000.0
    if profile.latency_ms > 0:
        return rng.uniform(0.5, 1.5) * profile.latency_ms / 1000.0
    return 0.0


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


def _seed_of(parts: tuple[object, ...]) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(*parts: object) -> random.Random:
    return random.Random(_seed_of(parts))


# `random.Random.seed` without its Python wrapper (the generator's C seeding): what
# `random.Random(n)` runs, less ≈ 2 µs of a 14 µs call (issue 11).
_seed_generator = _random.Random.seed


_first_8_bytes = struct.Struct(">Q").unpack_from


def _outcome_draws(
    gen: random.Random, pair: tuple[object, object, object, object, object], noise: float
) -> tuple[float, float]:
    """ε ~ N(0, noise²) and u ~ U(0, 1), the first two draws of `_rng(*pair)`, from `gen`
    seeded as `_rng` seeds a new generator (the same numbers: tests/test_mock_judge.py), and
    drawn at once, before anything else may seed it."""
    # `_seed_of(pair)`, the pair's five parts formatted in one f-string (`format(x, "")` is
    # `str(x)`) and the digest's first 8 bytes read by struct: ≈ 2 µs less (issue 11).
    seed, content, a, b, occurrence = pair
    text = f"{seed}\x1f{content}\x1f{a}\x1f{b}\x1f{occurrence}"
    _seed_generator(gen, _first_8_bytes(hashlib.sha256(text.encode()).digest())[0])
    gen.gauss_next = None  # type: ignore[attr-defined]  # as Random.seed resets it
    return gen.gauss(0.0, noise), gen.random()


class MockProvider:
    name = "mock"
    supports_message_batches = False

    def __init__(self, profile: MockProfile | None = None, seed: int | None = None) -> None:
        self.profile = profile or profile_from_env()
        env_seed = os.environ.get("CJS_MOCK_SEED")
        self.seed = seed if seed is not None else (int(env_seed) if env_seed else None)
        # Attempts so far per request (`events.ids.request_key`: correlation ids are numbered
        # per batch, so the batch's id is part of it).
        self._attempts: dict[str, int] = {}
        # Seeded anew for each call's outcome (`_outcome_draws`): a generator made per call
        # cost more than its seeding.
        self._outcome = random.Random()
        # Test-only: CJS_MOCK_POISON_MARKER makes a request "poison" (it kills its worker
        # process, every time) when it equals the request's key (`events.ids.request_key`:
        # `<batch id>:<correlation id>`) or occurs in either essay's text. Unset, the normal
        # path never looks at it.
        self._poison = os.environ.get("CJS_MOCK_POISON_MARKER") or None
        # The provider-side rate limit: in Redis once `bind_redis` is called (every worker
        # then shares it), else in this process.
        self._redis: Any = None
        self._keys = Keys()
        self._bucket_script: Any = None
        self._local_bucket = mock_limits.LocalBucket()
        if self.profile.rate_limit_rpm > 0:
            import lps.classify  # noqa: F401  (the SDK's types load now, not at the first 429)

    def bind_redis(self, redis: Any, keys: Keys) -> None:
        """Share the provider-side rate limit with every mock bound to the same Redis and
        prefix (the wiring binds the worker's client)."""
        self._redis = redis
        self._keys = keys.whole
        self._bucket_script = redis.register_script(mock_limits.BUCKET_LUA)

    async def aclose(self) -> None:
        return None

    async def _admit(self, request: ComparisonRequested) -> dict[str, str]:
        """Charge this call to the rate limit: its `anthropic-ratelimit-*` headers, or
        ProviderError(rate_limit) as the API answers a 429."""
        p = self.profile
        rpm, tpm = p.rate_limit_rpm, p.tokens_per_minute
        if self._bucket_script is not None:
            reply = await self._bucket_script(
                keys=[mock_limits.key(self._keys, request.model)],
                args=[repr(rpm), repr(tpm), repr(p.rate_burst_s), CALL_TOKENS],
            )
            verdict = mock_limits.verdict_of(reply)
        else:
            verdict = self._local_bucket.take(request.model, rpm, tpm, p.rate_burst_s, CALL_TOKENS)
        headers = mock_limits.headers(verdict, rpm, tpm)
        if verdict.allowed:
            return headers
        from lps.classify import classify_response

        await asyncio.sleep(p.rejection_ms / 1000.0)
        LPS_PROVIDER_LATENCY.labels(provider=self.name, model=request.model).observe(
            p.rejection_ms / 1000.0
        )
        detail = classify_response(
            429,
            mock_limits.rate_limit_body(rpm, tpm),
            headers,
            provider=self.name,
            model=request.model,
            correlation_id=request.correlation_id,
        )
        raise ProviderError(detail, headers=headers)

    def _is_poison(self, request: ComparisonRequested) -> bool:
        marker = self._poison
        assert marker is not None
        return (
            request.key == marker
            or marker in request.essay_a.text
            or marker in request.essay_b.text
        )

    async def judge(self, request: ComparisonRequested) -> Judgement:
        if self._poison is not None and self._is_poison(request):
            os._exit(POISON_EXIT_CODE)  # no cleanup, no flush: like a segfault or the OOM killer
        p = self.profile
        seed = self.seed if self.seed is not None else request.seed
        key = request.key
        attempt = self._attempts.get(key, 0) + 1
        self._attempts[key] = attempt
        # Not the batch or correlation ids (the batch's is random, and a batch of before has
        # random correlation ids): the batch's content, the pair in its slots and how often it
        # was asked before, so the same input and seed give the same judgements whichever
        # worker answers, whenever. Faults and latency also depend on the attempt; the outcome
        # does not.
        pair = (
            seed,
            request.content_key or request.batch_id,
            request.essay_a.essay_id,
            request.essay_b.essay_id,
            request.occurrence,
        )
        # The attempt's draws (latency, faults) only where the profile has any: seeding a
        # generator is most of a zero-latency call's cost (issue 11), and one not drawn
        # from changes nothing.
        rng = _rng(*pair, attempt) if p.faults or _has_latency(p) else None
        # The outcome's draws now, before any await, from the one generator of this mock; none
        # for a deterministic profile (which never used them).
        eps, u = (0.0, 0.0) if p.deterministic else _outcome_draws(self._outcome, pair, p.noise)
        headers = await self._admit(request) if p.rate_limit_rpm > 0 else {}
        took_s = latency_s(p, rng) if rng is not None else 0.0
        if took_s:
            await asyncio.sleep(took_s)
        labelled(LPS_PROVIDER_LATENCY, self.name, request.model).observe(took_s)
        if rng is not None and p.faults:
            draw = rng.random()
            for error_type, chance in p.faults:
                if draw < chance:
                    self._raise(error_type, request, rng)
                draw -= chance
        self._attempts.pop(key, None)
        q_a, q_b = quality_of(request.essay_a), quality_of(request.essay_b)
        if p.deterministic:
            a_wins = (q_a, request.essay_a.essay_id) >= (q_b, request.essay_b.essay_id)
            prob = 1.0 if a_wins else 0.0
        else:
            prob = win_probability(q_a, q_b + eps, p.position_bias)
            a_wins = u < prob
        confidence = 1 + min(4, round(abs(prob - 0.5) * 8))
        record_tokens(USAGE, provider=self.name, model=request.model)
        return Judgement(
            winner="essay_a" if a_wins else "essay_b",
            confidence=float(confidence),
            justification="mock judgement from latent qualities",
            usage=USAGE,
            prompt_sha256="",
            latency_ms=round(took_s * 1000, 3),
            rate_limits=headers,
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
