"""CJ metrics: callbacks, orphans, completion and finalized batches. The names are public
(DESIGN.md, deploy/prometheus/alerts.yml)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CJ_CALLBACKS = Counter("cj_callbacks_total", "Callbacks seen by CJ by outcome", ["outcome"])
CJ_ORPHANS = Counter(
    "cj_orphan_callbacks_total", "Callbacks for unknown correlation ids", ["source_service"]
)
CJ_COMPLETION = Gauge("cj_batch_completion_ratio", "Accepted callbacks / denominator", ["batch_id"])
CJ_FINALIZED = Counter("cj_batches_finalized_total", "Batches finalized by reason", ["reason"])
