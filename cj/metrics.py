"""CJ metrics: callbacks, orphans, open batches and their completion, finalized batches, and how
long CJ's steps take. The names are public (docs/design.md, deploy/prometheus/alerts.yml)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

CJ_CALLBACKS = Counter("cj_callbacks_total", "Callbacks seen by CJ by outcome", ["outcome"])
CJ_ORPHANS = Counter(
    "cj_orphan_callbacks_total",
    "Callbacks for unknown correlation ids, or naming other essays than their request",
    ["source_service"],
)
# One series per OPEN batch: a batch's series goes when it ends (see forget_completion), so the
# cardinality is bounded by the batches running at once, not by every batch ever.
CJ_COMPLETION = Gauge(
    "cj_batch_completion_ratio", "Accepted callbacks / denominator of an open batch", ["batch_id"]
)
CJ_FINALIZED = Counter("cj_batches_finalized_total", "Batches finalized by reason", ["reason"])
CJ_OPEN_BATCHES = Gauge("cj_open_batches", "Batches registered or running, as of the last sweep")
CJ_BATCH_DURATION = Histogram(
    "cj_batch_duration_seconds",
    "From a batch's registration to its end, by finalize reason",
    ["reason"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
CJ_STEP_SECONDS = Histogram(
    "cj_step_duration_seconds",
    "Time of one CJ step: apply (a page of callbacks), score (a BT fit), plan (a wave)",
    ["step"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_completion_shown: set[str] = set()


def show_completion(batch_id: str, ratio: float) -> None:
    CJ_COMPLETION.labels(batch_id).set(ratio)
    _completion_shown.add(batch_id)


def forget_completion(batch_id: str) -> None:
    if batch_id in _completion_shown:
        _completion_shown.discard(batch_id)
        CJ_COMPLETION.remove(batch_id)


def keep_completion_of(open_batch_ids: Iterable[str]) -> None:
    """Drop the series of every batch not open any more (ended by another process)."""
    for batch_id in _completion_shown - set(open_batch_ids):
        forget_completion(batch_id)


# The open batches each partition's last sweep saw: a sweep sees its own partition only, and
# must not drop the series of another's batches.
_open_by_partition: dict[int, set[str]] = {}


def show_open_batches(partition: int, partitions: int, open_batch_ids: Iterable[str]) -> None:
    """After a sweep of `partition` (of `partitions`): `cj_open_batches` over every partition
    swept here, and the completion series of the batches no partition has open dropped."""
    for stale in [p for p in _open_by_partition if p >= partitions]:
        del _open_by_partition[stale]
    _open_by_partition[partition] = set(open_batch_ids)
    still_open = set().union(*_open_by_partition.values())
    CJ_OPEN_BATCHES.set(len(still_open))
    keep_completion_of(still_open)
