"""The key namespace: every stream and key of the project is built from a `Keys`.

Partitions (CJS_PARTITIONS, fixed at deploy time). A batch belongs to one partition,
`partition_of(batch_id, n)` (CRC32 of the id, mod n), and every key of that batch and the
streams it travels on — its four streams, their dead letters, projections, `lps:answered`,
batch-API keys — is built by that partition's `Keys` (`keys.for_partition(p)`,
`keys.for_batch(id)`): `<CJS_PREFIX>{p<k>}:<name>` (`{p<k>.<j>}` for some partitions, see
`partition_tag`). The hash tag keeps every MULTI, WATCH and Lua script of a partition in one
slot of a Redis Cluster, and the tags are chosen so that the partitions spread evenly over
its masters. With one partition (and no cluster) the tag is left out: `<CJS_PREFIX><name>`,
today's layout, unchanged.

A `Keys` without a partition (`partition=None`, as `Keys.from_env()` or the settings give
it) names the whole namespace: `partitions()` lists every partition's `Keys`. With more
than one partition it refuses to build a partition's key (ValueError) rather than name a
key nobody writes. `shared(name)` is a key outside every partition, for single-key
commands only (provider cooldowns).

Layers build their own keys with plain functions that take a `Keys` and call `key`
(projections/keys.py, lps/keys.py), so a partition's hash tag is added here once.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import os
import zlib
from dataclasses import dataclass, replace

from events.streams import BATCHES, CALLBACKS, DISPATCHES, REQUESTS, dlq_name

SLOTS = 16384  # Redis Cluster's hash slots: CRC16 (XMODEM) of the hash tag, mod 16384


def slot_of(tag: str) -> int:
    """The cluster slot of a key whose hash tag is `tag` (as CLUSTER KEYSLOT computes it)."""
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


@functools.lru_cache(maxsize=4096)
def partition_tag(partition: int, partitions: int) -> str:
    """The hash tag of `partition` of `partitions`: `p<k>`, or `p<k>.<j>` with the smallest j
    that puts its slot in the middle of the k-th of `partitions` equal shares of the slot space.
    The partitions' slots are then evenly spaced, so masters holding equal contiguous slot
    ranges (what `redis-cli --cluster create` makes) hold as many partitions as can be, give
    or take one: 16 over 3 masters are 5, 6 and 5. (`p<k>` alone put 4, 5 and 7.)"""
    if partitions <= 1:
        return f"p{partition}"
    share = SLOTS / partitions
    centre = (partition + 0.5) * share
    within = max(share / 4, 0.5)
    suffixed = (f"p{partition}.{j}" for j in itertools.count())
    candidates = itertools.chain([f"p{partition}"], suffixed)
    return next(t for t in candidates if abs(slot_of(t) + 0.5 - centre) <= within)


def partition_of(batch_id: str, partitions: int) -> int:
    """The partition of a batch: stable across processes, versions and restarts."""
    if partitions <= 1:
        return 0
    return zlib.crc32(batch_id.encode()) % partitions


@dataclass(frozen=True)
class Keys:
    prefix: str = ""
    # How many partitions the deployment has (CJS_PARTITIONS), and which one these keys
    # name (None: the whole namespace). `tagged` adds the hash tag even with one partition
    # (a Redis Cluster: a unit's keys must share a slot).
    partitions: int = 1
    partition: int | None = None
    tagged: bool = False

    @classmethod
    def from_env(cls) -> Keys:
        return cls(
            os.environ.get("CJS_PREFIX", ""),
            partitions=max(1, int(os.environ.get("CJS_PARTITIONS", "1") or 1)),
            tagged=os.environ.get("CJS_REDIS_CLUSTER", "") in ("1", "true", "yes"),
        )

    @property
    def tag(self) -> str:
        """`{p<k>}:` (the partition's hash tag), or "" with one partition outside a cluster."""
        if self.partitions == 1 and not self.tagged:
            return ""
        if self.partition is None:
            if self.partitions == 1:
                return "{p0}:"
            raise ValueError(
                f"a key of one of {self.partitions} partitions needs its partition "
                "(Keys.for_partition / Keys.for_batch)"
            )
        return f"{{{partition_tag(self.partition, self.partitions)}}}:"

    def for_partition(self, partition: int) -> Keys:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} not in 0..{self.partitions - 1}")
        return _in_partition(self, partition)

    def for_batch(self, batch_id: str) -> Keys:
        """The keys of the partition holding `batch_id`."""
        return self.for_partition(partition_of(batch_id, self.partitions))

    def partition_of(self, batch_id: str) -> int:
        return partition_of(batch_id, self.partitions)

    def all_partitions(self) -> list[Keys]:
        """These keys' own partition, or every partition of a namespace-wide `Keys`."""
        if self.partition is not None:
            return [self]
        return [self.for_partition(p) for p in range(self.partitions)]

    @property
    def whole(self) -> Keys:
        """The namespace-wide `Keys` (no partition chosen)."""
        return replace(self, partition=None)

    def key(self, name: str) -> str:
        """Any key of the partition, streams and layer keys alike."""
        return f"{self.prefix}{self.tag}{name}"

    def shared(self, name: str) -> str:
        """A key outside every partition (single-key commands only)."""
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


@functools.lru_cache(maxsize=4096)
def _in_partition(keys: Keys, partition: int) -> Keys:
    # Speed (issue 11): asked several times per callback (every key of a batch is built
    # through it); a frozen dataclass's replace() costs more than the lookup.
    return replace(keys, partition=partition)
