"""Projection keys (rebuildable from the streams), all under the `Keys` namespace.

Layout per batch:
- `proj:batch:<id>`          hash of scalars (status, counters, timestamps)
- `proj:batch:<id>:docs`     hash: essays, config, scores (JSON)
- `proj:batch:<id>:corr`     hash: correlation id -> request state
- `proj:batch:<id>:pairs`    hash: correlation id -> [wave, essay_a, essay_b]
- `proj:batch:<id>:orphans`  hash: unknown correlation id -> times seen
- `proj:batch:<id>:outcomes` written by nothing today; a full rewrite deletes it
- `proj:batch:<id>:range`    hash: where the batch's entries lie in each stream (range hints,
                             not compared by replay: see `batch_range`)
- `proj:batches`             hash: batch id -> registered_at (the index of a partition)
- `proj:archived`            hash: batch id -> manifest of its archive (what remains of an
                             archived batch's projection)
- `proj:stats`               counters not tied to a known batch (per partition)

A batch's keys are in its partition whatever partition the given `Keys` names
(`keys.for_batch`); the index and stats are a partition's own.
"""

from __future__ import annotations

from streams.keys import Keys


def batch(keys: Keys, batch_id: str) -> str:
    return keys.for_batch(batch_id).key(f"proj:batch:{batch_id}")


def _part(keys: Keys, batch_id: str, part: str) -> str:
    return f"{batch(keys, batch_id)}:{part}"


def batch_corr(keys: Keys, batch_id: str) -> str:
    return _part(keys, batch_id, "corr")


def batch_pairs(keys: Keys, batch_id: str) -> str:
    return _part(keys, batch_id, "pairs")


def batch_outcomes(keys: Keys, batch_id: str) -> str:
    return _part(keys, batch_id, "outcomes")


def batch_orphans(keys: Keys, batch_id: str) -> str:
    return _part(keys, batch_id, "orphans")


def batch_docs(keys: Keys, batch_id: str) -> str:
    return _part(keys, batch_id, "docs")


def batch_keys(keys: Keys, batch_id: str) -> tuple[str, ...]:
    """Every key of one batch's projection."""
    return (
        batch(keys, batch_id),
        batch_corr(keys, batch_id),
        batch_pairs(keys, batch_id),
        batch_outcomes(keys, batch_id),
        batch_orphans(keys, batch_id),
        batch_docs(keys, batch_id),
    )


def batch_range(keys: Keys, batch_id: str) -> str:
    """Range hints of one batch, per stream name (without prefix): `first:<stream>` its first
    entry, `after:<stream>` an entry before its first, `last:<stream>` its last entry applied.
    Written atomically with what they describe (registration, callback.lua); a missing hint
    means: read that stream from its start or to its end."""
    return _part(keys, batch_id, "range")


def archived_index(keys: Keys) -> str:
    """Archived batches: batch id -> the JSON manifest of its archive (the batch's summary)."""
    return keys.key("proj:archived")


def batch_index(keys: Keys) -> str:
    return keys.key("proj:batches")


def stats(keys: Keys) -> str:
    """Counters not tied to a known batch (orphans naming no batch)."""
    return keys.key("proj:stats")
