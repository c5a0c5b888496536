"""The tools over partitions (CJS_PARTITIONS): which partition an operation on one entry
addresses, and how figures read per partition add up to the namespace's.

A batch's keys are routed by its id (`Keys.for_batch`); an entry of a stream or a dead letter
is not: its id is only unique within its partition's stream, so a view of one says which
partition it is in (`partition`), and an action on one names it back (`one_partition`).
"""

from __future__ import annotations

from collections.abc import Iterable

from app.errors import InputError
from projections.batch import entry_id_key
from streams.keys import Keys


def one_partition(keys: Keys, partition: int | str | None) -> Keys:
    """The partition an entry-level action addresses: `keys`' own, the one given, or the only
    one there is. InputError when there are several and none is named, or a bad one is."""
    if keys.partition is not None:
        if partition not in (None, "", keys.partition, str(keys.partition)):
            raise InputError(f"these keys are partition {keys.partition}, not {partition}")
        return keys
    if partition is None or partition == "":
        if keys.partitions == 1:
            return keys.for_partition(0)
        raise InputError(
            f"the namespace has {keys.partitions} partitions (CJS_PARTITIONS): name the "
            "entry's partition (its `partition` in the listing)"
        )
    try:
        number = int(partition)
    except (TypeError, ValueError) as exc:
        raise InputError(f"partition {partition!r} is not a number") from exc
    if not 0 <= number < keys.partitions:
        raise InputError(f"no partition {number}: the namespace has 0..{keys.partitions - 1}")
    return keys.for_partition(number)


def number(part: Keys) -> int:
    """A partition's number (a namespace-wide `Keys` of one partition is partition 0)."""
    return part.partition or 0


def label(part: Keys, name: str) -> str:
    """`name` (a stream, without the prefix) as it is keyed in `part`: `{p3}:cj:batches`, or
    plain `cj:batches` with one partition outside a cluster. Names a per-partition figure
    of a report keyed by stream, and an archive segment of that stream."""
    return part.key(name)[len(part.prefix) :]


def max_id(ids: Iterable[str | None]) -> str | None:
    known = [i for i in ids if i]
    return max(known, key=entry_id_key) if known else None


def min_id(ids: Iterable[str | None]) -> str | None:
    known = [i for i in ids if i]
    return min(known, key=entry_id_key) if known else None


def total(values: Iterable[int | None]) -> int | None:
    """The sum of the known values; None when none is known (Redis < 7 counts no lag)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None
