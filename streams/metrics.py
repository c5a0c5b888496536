"""Stream-level metrics, the same for every consumer group. The Prometheus names are public
(DESIGN.md, deploy/prometheus/alerts.yml) and keep their historical `lps_` prefix although
they count the `cj` group too."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

DEAD_LETTERED = Counter(
    "events_dead_lettered_total", "Entries moved to a dead-letter stream", ["stream", "reason"]
)
PENDING_ENTRIES = Gauge(
    "lps_pending_entries", "Pending entries per stream and group", ["stream", "group"]
)
STUCK_ITEMS = Counter("lps_stuck_items_total", "Stuck pending entries handled", ["action"])
