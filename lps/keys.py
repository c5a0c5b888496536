"""LPS operational keys (not projections: nothing rebuilds them), under the `Keys` namespace."""

from __future__ import annotations

from streams.keys import Keys


def done(keys: Keys, correlation_id: str) -> str:
    """Set when a request's callback is committed: a redelivered request is not judged again."""
    return keys.key(f"lps:done:{correlation_id}")


def message_batch(keys: Keys, correlation_id: str) -> str:
    """The Message Batch holding a `batch_api` request (index of `BundleDispatched`)."""
    return keys.key(f"lps:batchapi:{correlation_id}")


def cooldown(keys: Keys, provider: str, model: str) -> str:
    """Shared by every partition: a provider's pause holds for all of its calls."""
    return keys.shared(f"lps:cooldown:{provider}:{model}")
