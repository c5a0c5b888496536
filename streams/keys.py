"""The key namespace: every stream and key of the project is built from a `Keys`.

Keys touched by one Lua script or MULTI share the prefix; a prefix carrying a
hash tag (for example `{cjs}:`) keeps them in one slot on Redis Cluster. Layers
build their own keys with plain functions that take a `Keys` and call `key`
(projections/keys.py, lps/keys.py), so a partition's hash tag is added here once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from events.streams import BATCHES, CALLBACKS, DISPATCHES, REQUESTS, dlq_name


@dataclass(frozen=True)
class Keys:
    prefix: str = ""

    @classmethod
    def from_env(cls) -> Keys:
        return cls(os.environ.get("CJS_PREFIX", ""))

    def key(self, name: str) -> str:
        """Any key of the namespace, streams and layer keys alike."""
        return f"{self.prefix}{name}"

    def stream(self, name: str) -> str:
        return self.key(name)

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
        return self.key(dlq_name(stream_name))

    def dlq_parked(self, stream_name: str) -> str:
        """Hash: entry id -> dead letter id, for dead-lettered entries of `stream_name` that
        were valid and are waiting for `cjs dlq redrive` (acknowledged, not applied)."""
        return self.key(f"{dlq_name(stream_name)}:parked")

    def group_record(self, stream_name: str, group: str) -> str:
        """Hash kept beside a consumer group, outlives it: `position`, the id up to which the
        group has handled every entry (recreating the group there loses and repeats nothing
        given `group_handled`)."""
        return self.key(f"group:{stream_name}:{group}")

    def group_handled(self, stream_name: str, group: str) -> str:
        """Sorted set (score: the id's milliseconds) of entries the group has handled after
        its recorded position: a group recreated at the position skips them."""
        return self.key(f"group:{stream_name}:{group}:handled")
