"""Stream-level metrics, the same for every consumer group. The Prometheus names are public
(docs/design.md, deploy/prometheus/alerts.yml). `lps_pending_entries` keeps its historical `lps_`
prefix although it counts the `cj` group too: it is deprecated for `stream_pending_entries`
(same labels, same values) and goes in the release after next."""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

DEAD_LETTERED = Counter(
    "events_dead_lettered_total", "Entries moved to a dead-letter stream", ["stream", "reason"]
)
PENDING_ENTRIES = Gauge(
    "lps_pending_entries",
    "Pending entries per stream and group (deprecated: use stream_pending_entries)",
    ["stream", "group"],
)
STREAM_PENDING_ENTRIES = Gauge(
    "stream_pending_entries", "Pending entries per stream and group", ["stream", "group"]
)
STUCK_ITEMS = Counter("lps_stuck_items_total", "Stuck pending entries handled", ["action"])
QUEUE_WAIT = Histogram(
    "stream_queue_wait_seconds",
    "From an entry's append to its first delivery to a consumer of the group",
    ["stream", "group"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
)
REDIS_RECONNECTS = Counter(
    "redis_reconnects_total",
    "Times a consumer lost its Redis connection and waited to reconnect (once per outage)",
    ["group"],
)


# Per (stream, group): the namespace (key prefix) last read, and the pending count of each of
# its partitions this process has read. With partitions the gauge is their sum, not whichever
# partition's loop set it last; another namespace (tests) starts afresh.
_pending_parts: dict[tuple[str, str], tuple[str, dict[str, int]]] = {}
_TAG = re.compile(r"(\{p\d+(?:\.\d+)?\}:)$")


def set_pending(stream_name: str, group: str, n: int, key: str | None = None) -> None:
    """The pending gauges of `stream_name` (no prefix) and `group`: `n`, or, given the
    partition's stream `key`, the sum over every partition stream of its namespace that this
    process has read."""
    head = (key or stream_name).removesuffix(stream_name)
    tag = _TAG.search(head)
    prefix, part = (head[: tag.start()], tag.group(1)) if tag else (head, "")
    known, parts = _pending_parts.get((stream_name, group), (prefix, {}))
    if known != prefix:
        parts = {}
    parts[part] = n
    _pending_parts[(stream_name, group)] = (prefix, parts)
    value = sum(parts.values())
    PENDING_ENTRIES.labels(stream_name, group).set(value)
    STREAM_PENDING_ENTRIES.labels(stream_name, group).set(value)


def observe_queue_wait(stream_name: str, group: str, entry_ids: Iterable[str]) -> None:
    """Entry ids begin with Redis's clock in milliseconds at the append. The entries of a page
    were mostly appended in the same millisecond or few: each time's wait is worked out once
    and observed as often as it occurs (`observe_counted`)."""
    now_ms = time.time() * 1000
    appended: dict[str, int] = {}
    for entry_id in entry_ids:
        ms = entry_id.partition("-")[0]
        appended[ms] = appended.get(ms, 0) + 1
    observe_counted(
        labelled(QUEUE_WAIT, stream_name, group),
        [(max(0.0, now_ms - int(ms)) / 1000, n) for ms, n in appended.items() if ms.isdigit()],
    )


def observe_counted(histogram: Any, counted: Iterable[tuple[float, int]]) -> None:
    """`histogram.observe(amount)` `n` times for each (amount, n) of `counted` (no NaN), on a
    labelled child or a histogram without labels: the same bucket counts, and the same sum
    but for float rounding (the sum of the `amount × n` added once, where `observe` adds each
    amount in turn). One locked increment per amount and one for the sum, where `observe`
    takes a lock and loops over the bounds per observation (issue 11: a page of 12 queue
    waits, with observe_queue_wait's counting, 5× less CPU: ≈ 60 → 10 µs by timeit on a
    loaded machine; every comparison has two, its request's and its callback's). It uses the
    histogram's own fields (`_upper_bounds`, `_buckets`, `_sum`), prometheus_client's
    internals: tests/test_metrics_observe_counted.py holds it to `observe`'s result, and a
    histogram without them (another prometheus_client; pyproject asks only >= 0.19) is
    observed one amount at a time."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None or not hasattr(histogram, "_sum"):
        for amount, n in counted:
            for _ in range(n):
                histogram.observe(amount)
        return
    total = 0.0
    for amount, n in counted:
        # `observe` counts an amount in the first bucket whose bound is ≥ it (the last +Inf).
        buckets[bisect_left(bounds, amount)].inc(n)
        total += amount * n
    if total:  # (a sum of zeros leaves the sum as it is)
        histogram._sum.inc(total)


REPLICA_ACK_SHORT = Counter(
    "redis_replica_ack_short_total",
    "Commits that CJS_MIN_REPLICAS_ACK waited for and fewer replicas acknowledged in time",
)


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once per label set (speed, issue 11: labels()
    checks and locks at every call, ≈ 3 µs, and the hot path asks it several times per
    comparison). Only for label sets never removed: a removed child kept here would count
    for nobody."""
    key = (id(metric), values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child
