"""Prometheus metrics. The names are public (DESIGN.md) and defined only here."""

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
LPS_RETRIES = Counter("lps_retries_total", "Provider attempts retried", ["provider", "error_type"])
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
LPS_PENDING = Gauge(
    "lps_pending_entries", "Pending entries per stream and group", ["stream", "group"]
)
LPS_STUCK = Counter("lps_stuck_items_total", "Stuck pending entries handled", ["action"])
LPS_TOKENS = Counter("lps_tokens_total", "Provider tokens by kind", ["kind"])
CJ_CALLBACKS = Counter("cj_callbacks_total", "Callbacks seen by CJ by outcome", ["outcome"])
CJ_ORPHANS = Counter(
    "cj_orphan_callbacks_total", "Callbacks for unknown correlation ids", ["source_service"]
)
CJ_COMPLETION = Gauge("cj_batch_completion_ratio", "Accepted callbacks / denominator", ["batch_id"])
CJ_FINALIZED = Counter("cj_batches_finalized_total", "Batches finalized by reason", ["reason"])
DEAD_LETTERED = Counter(
    "events_dead_lettered_total", "Entries moved to a dead-letter stream", ["stream", "reason"]
)
