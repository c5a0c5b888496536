"""LPS operational keys (not projections: nothing rebuilds them), under the `Keys` namespace."""

from __future__ import annotations

from events.ids import request_key
from streams.keys import Keys


def answered(keys: Keys, batch_id: str) -> str:
    """Hash of one batch's answered requests: correlation id -> the token of the commit that
    appended its callback (set by that commit, atomically): a redelivered request is not judged
    again, and a re-sent commit finds its own token. One hash per batch, expiring `DONE_TTL_S`
    after its last commit and deleted when the batch is archived; a string key per request
    (`done`) took about 190 B a comparison, a batch's hash (a listpack up to
    `hash-max-listpack-entries`) about 50. Named in `keys`' partition, the one whose stream held
    the request (as `done` was), so that the commit script stays in one slot even for a request
    naming a batch of another partition."""
    return keys.key(f"lps:answered:{batch_id}")


def done(keys: Keys, correlation_id: str) -> str:
    """The marker of one request written before `answered` (a string key holding the token):
    no longer written, and only ever for the random correlation ids of that time (unique among
    all batches); the archiver still deletes those of the requests it archives."""
    return keys.key(f"lps:done:{correlation_id}")


def message_batch(keys: Keys, batch_id: str, correlation_id: str) -> str:
    """The Message Batch holding a `batch_api` request (index of `BundleDispatched`):
    `lps:batchapi:<batch id>:<correlation id>`, correlation ids being numbered per batch; a
    request with a random id of before keeps its key of then, `lps:batchapi:<correlation id>`
    (`events.ids.request_key`)."""
    return keys.key(f"lps:batchapi:{request_key(batch_id, correlation_id)}")


def cooldown(keys: Keys, provider: str, model: str) -> str:
    """Shared by every partition: a provider's pause holds for all of its calls."""
    return keys.shared(f"lps:cooldown:{provider}:{model}")


def limiter(keys: Keys, provider: str, model: str) -> str:
    """The shared limiter of a provider + model (`lps.limiter`): one for every partition, as
    the provider's limit is one for the organisation."""
    return keys.shared(f"lps:limiter:{provider}:{model}")


def breaker(keys: Keys, provider: str, model: str | None = None) -> str:
    """The breaker of a provider (every model), or of one of its models; shared by every
    partition, as the account it guards is."""
    suffix = f":{model}" if model else ""
    return keys.shared(f"lps:breaker:{provider}{suffix}")


def breaker_pattern(keys: Keys) -> str:
    return keys.shared("lps:breaker:*")


def batch_intent(keys: Keys, intent_id: str) -> str:
    """A Message Batch about to be created: written before `batches.create`, so that whoever
    holds the requests next can find the batch if the creator died before recording it."""
    return keys.key(f"lps:batchintent:{intent_id}")


def batch_intents(keys: Keys) -> str:
    """Unresolved intents by time (a sorted set), for finding orphaned Message Batches."""
    return keys.key("lps:batchintents")


def recorded_message_batches(keys: Keys) -> str:
    """Message Batch ids recorded in a `BundleDispatched` (a sorted set by time): a batch not
    in it, found by listing, belongs to an unresolved intent or to nobody."""
    return keys.key("lps:batchapi:recorded")
