"""Stream and consumer-group names, without the key prefix (`streams.keys.Keys` adds it)."""

from __future__ import annotations

BATCHES = "cj:batches"
REQUESTS = "lps:requests"
DISPATCHES = "lps:dispatches"
CALLBACKS = "cj:callbacks"

LPS_GROUP = "lps"
CJ_GROUP = "cj"

STREAMS = (BATCHES, REQUESTS, DISPATCHES, CALLBACKS)
CONSUMED = ((REQUESTS, LPS_GROUP), (CALLBACKS, CJ_GROUP))


def dlq_name(stream_name: str) -> str:
    """The dead-letter stream of `stream_name` (both without prefix)."""
    return f"dlq:{stream_name}"
