"""Stream, group and key names in one place, all under the `CJS_PREFIX` namespace.

Keys touched by one Lua script or MULTI share the prefix; a prefix carrying a
hash tag (for example `{cjs}:`) keeps them in one slot on Redis Cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BATCHES = "cj:batches"
REQUESTS = "lps:requests"
DISPATCHES = "lps:dispatches"
CALLBACKS = "cj:callbacks"

LPS_GROUP = "lps"
CJ_GROUP = "cj"

STREAMS = (BATCHES, REQUESTS, DISPATCHES, CALLBACKS)
CONSUMED = ((REQUESTS, LPS_GROUP), (CALLBACKS, CJ_GROUP))


@dataclass(frozen=True)
class Keys:
    prefix: str = ""

    @classmethod
    def from_env(cls) -> Keys:
        return cls(os.environ.get("CJS_PREFIX", ""))

    def stream(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def batches(self) -> str:
        return self.stream(BATCHES)

    @property
    def requests(self) -> str:
        return self.stream(REQUESTS)

    @property
    def dispatches(self) -> str:
        return self.stream(DISPATCHES)

    @property
    def callbacks(self) -> str:
        return self.stream(CALLBACKS)

    def dlq(self, stream_name: str) -> str:
        """Dead letters of `stream_name` (given without prefix)."""
        return f"{self.prefix}dlq:{stream_name}"

    # --- projections (rebuildable from the streams) ---
    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}proj:batch:{batch_id}"

    def batch_corr(self, batch_id: str) -> str:
        return f"{self.prefix}proj:batch:{batch_id}:corr"

    def batch_pairs(self, batch_id: str) -> str:
        return f"{self.prefix}proj:batch:{batch_id}:pairs"

    def batch_outcomes(self, batch_id: str) -> str:
        return f"{self.prefix}proj:batch:{batch_id}:outcomes"

    def batch_orphans(self, batch_id: str) -> str:
        return f"{self.prefix}proj:batch:{batch_id}:orphans"

    def batch_docs(self, batch_id: str) -> str:
        return f"{self.prefix}proj:batch:{batch_id}:docs"

    @property
    def batch_index(self) -> str:
        return f"{self.prefix}proj:batches"

    @property
    def stats(self) -> str:
        """Counters not tied to a known batch (orphans naming no batch)."""
        return f"{self.prefix}proj:stats"

    def batch_keys(self, batch_id: str) -> tuple[str, ...]:
        return (
            self.batch(batch_id),
            self.batch_corr(batch_id),
            self.batch_pairs(batch_id),
            self.batch_outcomes(batch_id),
            self.batch_orphans(batch_id),
            self.batch_docs(batch_id),
        )

    # --- operational keys (not projections) ---
    def lps_done(self, correlation_id: str) -> str:
        return f"{self.prefix}lps:done:{correlation_id}"

    def lps_provider_batch(self, correlation_id: str) -> str:
        """The Message Batch holding a `batch_api` request (index of `BundleDispatched`)."""
        return f"{self.prefix}lps:batchapi:{correlation_id}"

    def cooldown(self, provider: str, model: str) -> str:
        return f"{self.prefix}lps:cooldown:{provider}:{model}"
