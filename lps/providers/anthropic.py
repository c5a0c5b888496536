"""The Anthropic provider: one `messages.create` per attempt through the official SDK.

- The SDK's own retries are off (`max_retries=0`): `lps.retry` owns every retry, so
  every HTTP attempt is seen, counted and becomes an event.
- Credentials and base URL are read by the SDK itself (`ANTHROPIC_API_KEY`,
  `ANTHROPIC_BASE_URL`, ...); the key is never put in a message, log or event
  (`lps.classify.scrub` runs over every message that leaves here).
- The answer is a forced call of the tool `record_comparison`, validated strictly:
  a missing or unknown winner, a confidence outside 1–5 (or not a number), a missing
  justification, extra fields, or no / several tool calls are a `parse_error`. A
  confidence is never rescaled and a winner never defaulted.
- Every response that reports usage is priced (`lps.prices`): the cost travels on the
  Judgement, or on the ProviderError of an answer that was no valid judgement (those are
  billed too).
- Metrics recorded here (and only here): `lps_provider_latency_seconds{provider,model}`
  for every HTTP attempt, successful or not, and `lps_tokens_total` /
  `lps_cost_usd_total{provider,model,kind}` and the prompt cache hit ratio for every
  response that reports usage. Errors and retries are counted by the worker.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

import anthropic
import msgspec
from anthropic.types import Message
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

from events.types import NANO_USD, ComparisonRequested, ErrorDetail, TokenUsage, Winner
from lps.classify import (
    Origin,
    classify_exception,
    classify_stop_reason,
    parse_error,
    scrub,
    unexpected_error,
)
from lps.metrics import LPS_PROVIDER_LATENCY
from lps.prices import PriceTable, price_table
from lps.prompt import (
    CACHE_TTLS,
    CONFIDENCE_MAX,
    CONFIDENCE_MIN,
    TOOL_NAME,
    CacheTTL,
    PromptError,
    RenderedPrompt,
    build_prompt,
)
from lps.providers.base import Judgement, ProviderError, rate_limit_headers, record_tokens

PROVIDER_NAME = "anthropic"
DEFAULT_MODEL = "claude-sonnet-4-6"
"""Not deprecated in SDK 2.14 (claude-sonnet-4-5 is: EOL 2026-11-30); accepts a forced tool call."""

# Models documented to reject forced tool use (`tool_choice` any/tool) with a 400.
FORCED_TOOL_UNSUPPORTED_MODELS = frozenset(
    {"claude-sonnet-5-5", "claude-opus-5-5", "claude-fable-5-1"}
)
MAX_TOKENS_LIMIT = 8192

N = TypeVar("N", int, float)

# Sampling parameters do not exist in SDK 2.x, and the API version it speaks
# (anthropic-version 2026-10-21) answers 400 to any of them, even at default values.
UNSUPPORTED_OVERRIDES = frozenset({"temperature", "top_p", "top_k"})
SUPPORTED_OVERRIDES = frozenset({"max_tokens", "cache_ttl", "timeout_s"})

_WINNERS: tuple[Winner, ...] = ("essay_a", "essay_b")
_TOOL_FIELDS = frozenset({"winner", "justification", "confidence"})


class ProviderConfigError(RuntimeError):
    """The provider cannot be built (for example: no credentials in the environment)."""


@dataclass(frozen=True)
class AnthropicSettings:
    """Defaults for every request; a request's `overrides` can change the per-request ones."""

    model: str = DEFAULT_MODEL
    max_tokens: int = 1024
    cache_ttl: CacheTTL = "5m"
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AnthropicSettings:
        """`CJS_ANTHROPIC_MODEL`, `CJS_ANTHROPIC_MAX_TOKENS`, `CJS_ANTHROPIC_CACHE_TTL` (5m|1h),
        `CJS_ANTHROPIC_TIMEOUT_S`, `CJS_ANTHROPIC_CONNECT_TIMEOUT_S`."""
        env = os.environ if env is None else env
        base = cls()
        ttl = env.get("CJS_ANTHROPIC_CACHE_TTL", base.cache_ttl)
        if ttl not in CACHE_TTLS:
            raise ProviderConfigError(f"CJS_ANTHROPIC_CACHE_TTL must be one of {CACHE_TTLS}")
        try:
            return cls(
                model=env.get("CJS_ANTHROPIC_MODEL", base.model),
                max_tokens=int(env.get("CJS_ANTHROPIC_MAX_TOKENS", base.max_tokens)),
                cache_ttl=ttl,
                timeout_s=float(env.get("CJS_ANTHROPIC_TIMEOUT_S", base.timeout_s)),
                connect_timeout_s=float(
                    env.get("CJS_ANTHROPIC_CONNECT_TIMEOUT_S", base.connect_timeout_s)
                ),
            )
        except ValueError as exc:
            raise ProviderConfigError(f"bad CJS_ANTHROPIC_* setting: {exc}") from None


@dataclass(frozen=True)
class CallOptions:
    """The per-request knobs after applying a request's overrides to the settings."""

    max_tokens: int
    cache_ttl: CacheTTL
    timeout_s: float


def validate_overrides(overrides: Mapping[str, str]) -> list[str]:
    """Problems with a batch's `overrides` for this provider (empty when fine).

    Meant for submit time, so that a bad override fails the submission rather than
    every comparison of the batch.
    """
    problems: list[str] = []
    for key, value in overrides.items():
        if key in UNSUPPORTED_OVERRIDES:
            problems.append(
                f"override {key!r} is not supported: the Anthropic API version used by the SDK "
                "rejects sampling parameters"
            )
        elif key not in SUPPORTED_OVERRIDES:
            problems.append(f"unknown override {key!r}; supported: {sorted(SUPPORTED_OVERRIDES)}")
        elif key == "max_tokens":
            n = _number(key, value, int, "an integer", problems)
            if n is not None and not 1 <= n <= MAX_TOKENS_LIMIT:
                problems.append(f"override max_tokens must be in 1..{MAX_TOKENS_LIMIT}, got {n}")
        elif key == "cache_ttl":
            if value not in CACHE_TTLS:
                problems.append(f"override cache_ttl must be one of {CACHE_TTLS}, got {value!r}")
        elif key == "timeout_s":
            t = _number(key, value, float, "a number", problems)
            if t is not None and not (math.isfinite(t) and t > 0):
                problems.append(f"override timeout_s must be positive, got {value!r}")
    return problems


def _number(
    key: str, value: str, parse: Callable[[str], N], what: str, problems: list[str]
) -> N | None:
    """Override `key` read by `parse`; None, with the problem noted, when it does not parse."""
    try:
        return parse(value)
    except ValueError:
        problems.append(f"override {key} must be {what}, got {value!r}")
        return None


def model_problems(model: str) -> list[str]:
    """Problems with judging on `model` (empty when fine); for submit-time validation too."""
    if model in FORCED_TOOL_UNSUPPORTED_MODELS:
        return [
            f"model {model!r} rejects forced tool use (tool_choice), which the judge protocol "
            "needs; choose another model"
        ]
    return []


def call_options(settings: AnthropicSettings, overrides: Mapping[str, str]) -> CallOptions:
    """Settings with a request's overrides applied. Raises PromptError on a bad override."""
    problems = validate_overrides(overrides)
    if problems:
        raise PromptError("; ".join(problems))
    return CallOptions(
        max_tokens=int(overrides.get("max_tokens", settings.max_tokens)),
        cache_ttl=cast(CacheTTL, overrides.get("cache_ttl", settings.cache_ttl)),
        timeout_s=float(overrides.get("timeout_s", settings.timeout_s)),
    )


def validate_tool_input(value: object) -> tuple[Winner, str, float]:
    """(winner, justification, confidence) of a `record_comparison` input, or ValueError."""
    if not isinstance(value, Mapping):
        raise ValueError(f"tool input is not an object: {type(value).__name__}")
    extra = set(value) - _TOOL_FIELDS
    if extra:
        raise ValueError(f"unexpected fields in tool input: {sorted(map(str, extra))}")
    winner = value.get("winner")
    if winner is None:
        raise ValueError("tool input has no winner")
    if winner not in _WINNERS:
        raise ValueError(f"winner must be 'essay_a' or 'essay_b', got {winner!r}")
    justification = value.get("justification")
    if not isinstance(justification, str):
        raise ValueError("tool input has no justification string")
    confidence = value.get("confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise ValueError(f"confidence must be a number, got {confidence!r}")
    confidence = float(confidence)
    if not (math.isfinite(confidence) and CONFIDENCE_MIN <= confidence <= CONFIDENCE_MAX):
        raise ValueError(
            f"confidence must be within {CONFIDENCE_MIN:g}..{CONFIDENCE_MAX:g}, got {confidence!r}"
        )
    return cast(Winner, winner), justification, confidence


def _count(obj: object, name: str) -> int | None:
    v = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def usage_of(message: Message) -> TokenUsage:
    usage = getattr(message, "usage", None)
    if usage is None:
        return TokenUsage()

    def n(name: str) -> int:
        return _count(usage, name) or 0

    return TokenUsage(
        input_tokens=n("input_tokens"),
        output_tokens=n("output_tokens"),
        cache_read_input_tokens=n("cache_read_input_tokens"),
        cache_creation_input_tokens=n("cache_creation_input_tokens"),
    )


def cache_write_1h_of(message: Message) -> int | None:
    """Cache writes at the 1 h TTL, when the response breaks them down (`usage.cache_creation`)."""
    breakdown = getattr(getattr(message, "usage", None), "cache_creation", None)
    return None if breakdown is None else _count(breakdown, "ephemeral_1h_input_tokens")


def bill(
    prices: PriceTable,
    message: Message,
    *,
    model: str,
    cache_ttl: str,
    batch: bool,
    provider: str = PROVIDER_NAME,
) -> tuple[TokenUsage, float]:
    """Usage and cost of one response, counted in the token and cost metrics."""
    usage = usage_of(message)
    by_kind = prices.cost_by_kind(
        provider,
        model,
        usage,
        batch=batch,
        cache_ttl=cache_ttl,
        cache_write_1h_tokens=cache_write_1h_of(message),
    )
    record_tokens(usage, provider=provider, model=model, cost_by_kind=by_kind, prompt_cache=True)
    return usage, sum(by_kind.values()) / NANO_USD


def judgement_from_message(
    message: Message,
    *,
    model: str,
    correlation_id: str,
    prompt_sha256: str,
    latency_ms: float = 0.0,
    secrets: Sequence[str] = (),
    cost_usd: float = 0.0,
) -> Judgement:
    """The Judgement in a 200 response, or ProviderError (max_tokens, refusal, parse_error)
    carrying the response's usage and `cost_usd` (the answer was billed all the same)."""
    where: Origin = {
        "provider": PROVIDER_NAME,
        "model": model,
        "correlation_id": correlation_id,
        "secrets": secrets,
    }
    usage = usage_of(message)

    def failed(detail: ErrorDetail) -> ProviderError:
        return ProviderError(detail, usage=usage, cost_usd=cost_usd)

    stop_reason = getattr(message, "stop_reason", None)
    stop = classify_stop_reason(stop_reason if isinstance(stop_reason, str) else None, **where)
    if stop is not None:
        raise failed(stop)
    content = getattr(message, "content", None)
    if not isinstance(content, list):
        content = []
    calls = [
        block
        for block in content
        if getattr(block, "type", None) == "tool_use" and getattr(block, "name", None) == TOOL_NAME
    ]
    if len(calls) != 1:
        raise failed(
            parse_error(
                f"expected exactly one {TOOL_NAME} call, got {len(calls)} "
                f"(stop_reason={getattr(message, 'stop_reason', None)})",
                **where,
            )
        )
    raw_input: Any = getattr(calls[0], "input", None)
    try:
        winner, justification, confidence = validate_tool_input(raw_input)
    except ValueError as exc:
        raise failed(parse_error(f"invalid {TOOL_NAME} input: {exc}", **where)) from None
    return Judgement(
        winner=winner,
        confidence=confidence,
        justification=justification,
        usage=usage,
        prompt_sha256=prompt_sha256,
        latency_ms=latency_ms,
        cost_usd=cost_usd,
    )


@dataclass
class PreparedCall:
    """One request rendered for the API: what `messages.create` (or a batch item) is sent."""

    model: str
    options: CallOptions
    prompt: RenderedPrompt
    correlation_id: str

    def params(self) -> MessageCreateParamsNonStreaming:
        """The body of `messages.create`, as a Message Batches item's `params`."""
        return {
            "model": self.model,
            "max_tokens": self.options.max_tokens,
            "system": self.prompt.system,
            "messages": self.prompt.messages,
            "tools": self.prompt.tools,
            "tool_choice": self.prompt.tool_choice,
        }


@dataclass
class AnthropicProvider:
    """`Provider` for the Anthropic Messages API. Build it with `AnthropicProvider.from_env()`."""

    settings: AnthropicSettings = field(default_factory=AnthropicSettings)
    client: anthropic.AsyncAnthropic | None = None
    name: str = PROVIDER_NAME
    supports_message_batches: ClassVar[bool] = True
    records_call_metrics: bool = True
    """This provider records `lps_provider_latency_seconds` (per HTTP attempt) and
    `lps_tokens_total` (per response) itself; a worker must not record them again."""
    prices: PriceTable = field(default_factory=price_table)

    def __post_init__(self) -> None:
        if self.client is None:
            try:
                self.client = make_client(self.settings)
            except anthropic.AnthropicError as exc:  # e.g. CredentialsError: nothing configured
                raise ProviderConfigError(
                    "no usable Anthropic credentials: set ANTHROPIC_API_KEY "
                    f"({type(exc).__name__}: {scrub(str(exc))})"
                ) from None
        if (
            self.client.api_key is None
            and self.client.auth_token is None
            and self.client.credentials is None
        ):
            raise ProviderConfigError(
                "no Anthropic credentials: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN)"
            )

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, http_client: Any | None = None
    ) -> AnthropicProvider:
        """Settings from `CJS_ANTHROPIC_*`; key and base URL read by the SDK from `ANTHROPIC_*`.

        `http_client`: an `anthropic.DefaultAsyncHttpxClient` to share (connection pool,
        SSL context) between providers; by default the SDK makes its own.
        """
        settings = AnthropicSettings.from_env(env)
        if http_client is None:
            return cls(settings=settings)
        try:
            client = make_client(settings, http_client=http_client)
        except anthropic.AnthropicError as exc:
            raise ProviderConfigError(
                f"no usable Anthropic credentials: set ANTHROPIC_API_KEY ({type(exc).__name__})"
            ) from None
        return cls(settings=settings, client=client)

    @property
    def sdk(self) -> anthropic.AsyncAnthropic:
        assert self.client is not None
        return self.client

    def secrets(self) -> list[str]:
        return [s for s in (self.sdk.api_key, self.sdk.auth_token) if s]

    def _origin(self, request: ComparisonRequested, model: str) -> Origin:
        return {
            "provider": self.name,
            "model": model,
            "correlation_id": request.correlation_id,
            "secrets": self.secrets(),
        }

    def _error(self, request: ComparisonRequested, model: str, message: str) -> ProviderError:
        return ProviderError(
            ErrorDetail(
                error_type="invalid_request",
                retryable=False,
                message=scrub(message, self.secrets()),
                provider=self.name,
                model=model,
                correlation_id=request.correlation_id,
            )
        )

    def prepare(self, request: ComparisonRequested) -> PreparedCall:
        """Render one request. Raises ProviderError(invalid_request) for bad overrides/prompt."""
        model = request.model or self.settings.model
        problems = model_problems(model)
        if problems:
            raise self._error(request, model, "; ".join(problems))
        try:
            options = call_options(self.settings, request.overrides)
            prompt = build_prompt(request, cache_ttl=options.cache_ttl)
        except PromptError as exc:
            raise self._error(request, model, str(exc)) from None
        return PreparedCall(model, options, prompt, request.correlation_id)

    def prompt_sha256(self, request: ComparisonRequested) -> str:
        """The sha256 of the prompt this request renders to ("" when it cannot render)."""
        try:
            return self.prepare(request).prompt.sha256
        except ProviderError:
            return ""

    async def judge(self, request: ComparisonRequested) -> Judgement:
        call = self.prepare(request)
        model = call.model
        started = time.perf_counter()
        try:
            raw = await self.sdk.messages.with_raw_response.create(
                model=model,
                max_tokens=call.options.max_tokens,
                system=call.prompt.system,
                messages=call.prompt.messages,
                tools=call.prompt.tools,
                tool_choice=call.prompt.tool_choice,
                timeout=anthropic.Timeout(
                    call.options.timeout_s, connect=self.settings.connect_timeout_s
                ),
            )
            message = await raw.parse()
        except anthropic.APIError as exc:
            self._observe(model, started)
            response = getattr(exc, "response", None)
            raise ProviderError(
                classify_exception(
                    exc,
                    provider=self.name,
                    model=model,
                    correlation_id=request.correlation_id,
                    secrets=self.secrets(),
                ),
                headers=rate_limit_headers(response.headers) if response is not None else None,
            ) from None
        except (ValueError, TypeError) as exc:  # a 2xx body that is not a Message
            self._observe(model, started)
            why = f"unreadable response body: {type(exc).__name__}"
            raise ProviderError(parse_error(why, **self._origin(request, model))) from None
        except anthropic.AnthropicError as exc:  # any other SDK failure: never ends a worker
            self._observe(model, started)
            raise ProviderError(unexpected_error(exc, **self._origin(request, model))) from None
        latency_s = self._observe(model, started)
        _, cost = bill(
            self.prices, message, model=model, cache_ttl=call.options.cache_ttl, batch=False
        )
        judgement = judgement_from_message(
            message,
            model=model,
            correlation_id=request.correlation_id,
            prompt_sha256=call.prompt.sha256,
            latency_ms=latency_s * 1000.0,
            secrets=self.secrets(),
            cost_usd=cost,
        )
        # What the shared limiter learns the organisation's limits from.
        return msgspec.structs.replace(judgement, rate_limits=rate_limit_headers(raw.headers))

    def _observe(self, model: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        LPS_PROVIDER_LATENCY.labels(provider=self.name, model=model).observe(elapsed)
        return elapsed

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.close()


def credential_problems() -> list[str]:
    """Why no Anthropic client can be built from the environment (empty when one can)."""
    try:
        client = anthropic.Anthropic(max_retries=0)
    except anthropic.AnthropicError as exc:
        return [
            "no usable Anthropic credentials: set ANTHROPIC_API_KEY "
            f"({type(exc).__name__}: {scrub(str(exc))})"
        ]
    try:
        if client.api_key is None and client.auth_token is None and client.credentials is None:
            return ["no Anthropic credentials: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN)"]
        return []
    finally:
        client.close()


def make_client(
    settings: AnthropicSettings, *, http_client: Any | None = None
) -> anthropic.AsyncAnthropic:
    """An SDK client with retries off; key and base URL come from the environment, as the SDK
    reads them (`ANTHROPIC_API_KEY` / `ANTHROPIC_AUTH_TOKEN`, `ANTHROPIC_BASE_URL`)."""
    return anthropic.AsyncAnthropic(
        max_retries=0,
        timeout=anthropic.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
        http_client=http_client,
    )
