"""LPS metrics: provider calls, retries, latency, bundles, tokens, cost, the breaker and the
shared limiter. The
names are public (docs/design.md, deploy/prometheus/alerts.yml); stream-level metrics are in
streams/metrics.py."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LPS_REQUESTS = Counter(
    "lps_requests_total",
    "Comparison requests finished by LPS",
    ["provider", "model", "mode", "outcome"],
)
LPS_PROVIDER_ERRORS = Counter(
    "lps_provider_errors_total",
    "Failed provider attempts by error type",
    ["provider", "model", "error_type"],
)
LPS_RETRIES = Counter(
    "lps_retries_total", "Provider attempts retried", ["provider", "model", "error_type"]
)
LPS_PROVIDER_LATENCY = Histogram(
    "lps_provider_latency_seconds",
    "Latency of one provider call",
    ["provider", "model"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
LPS_BUNDLE_SIZE = Histogram(
    "lps_bundle_size",
    "Requests per dispatched bundle",
    ["mode"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
LPS_TOKENS = Counter(
    "lps_tokens_total", "Provider tokens by provider, model and kind", ["provider", "model", "kind"]
)
LPS_COST = Counter(
    "lps_cost_usd",
    "Cost of provider responses in USD (price table), by provider, model and kind of token",
    ["provider", "model", "kind"],
)
LPS_CACHE_HIT_RATIO = Gauge(
    "lps_prompt_cache_hit_ratio",
    "Share of input tokens read from the prompt cache over this worker's recent responses "
    "(set after a warm-up)",
    ["provider", "model"],
)
LPS_BREAKER_OPENED = Counter(
    "lps_breaker_opened_total",
    "Times an account-wide error opened (or re-opened) a provider breaker",
    ["provider", "model", "reason"],
)
LPS_BREAKER_REJECTED = Counter(
    "lps_breaker_rejected_total",
    "Requests failed fast, without a call, by an open breaker",
    ["provider", "model", "reason"],
)
LPS_PROVIDER_CALLS = Counter(
    "lps_provider_calls_total",
    "Provider calls made through the shared limiter, by outcome (ok, rate_limited, error)",
    ["provider", "model", "outcome"],
)
LPS_RATE_LIMITED_RATIO = Gauge(
    "lps_rate_limited_ratio",
    "Share of this worker's last 200 provider calls answered 429 (rate limited)",
    ["provider", "model"],
)
LPS_LIMITER_RATE = Gauge(
    "lps_limiter_rate_per_minute",
    "Rate the shared limiter paces calls at, as this worker last heard it (requests or tokens "
    "per minute; 0: no limit known)",
    ["provider", "model", "dimension"],
)
LPS_LIMITER_WAITING = Gauge(
    "lps_limiter_waiting",
    "Provider calls of this worker waiting for a grant of the shared limiter",
    ["provider", "model"],
)
LPS_LIMITER_WAITING_TOKENS = Gauge(
    "lps_limiter_waiting_tokens",
    "Estimated tokens of the calls waiting for a grant of the shared limiter",
    ["provider", "model"],
)
LPS_LIMITER_WAIT = Histogram(
    "lps_limiter_wait_seconds",
    "Time a provider call waited for its grant from the shared limiter",
    ["provider", "model"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
LPS_CONCURRENCY_LIMIT = Gauge(
    "lps_concurrency_limit",
    "Provider calls this worker lets run at once (grows with the limiter's rate x latency)",
    ["provider", "model"],
)
