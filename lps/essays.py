"""Essays for requests that name them by reference.

A `ComparisonRequested` names each essay by its id; its `content_key` is the hash of the
batch's essays as registered (texts, anchors) and grade scale. The essays are stored once per
batch: in `BatchRegistered`, and in the batch projection's `essays` document
(`proj:batch:<id>:docs`, written in the same MULTI/EXEC as the event), which is the store read
here; the store is checked against the request's content key, so a text other than the one the
batch was planned on is never judged. A worker keeps the essays of the batches it has seen
recently, so a batch costs one read (and one hash) per worker, not one per request.

Requests written before carry more and are judged as before: the first version's references
also carry `sha256`, the hash of their essay's text, checked instead; requests older still
embed the texts and pass through unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events.types import ComparisonRequested, ErrorDetail, Essay, content_key, text_sha256
from projections.store import load_essay_store
from streams.keys import Keys

CACHED_BATCHES = 64


@dataclass
class _Batch:
    essays: dict[str, Essay]
    content_key: str
    # essay id -> sha256 of its text, computed when a first-version reference asks for it
    text_sha256: dict[str, str] = field(default_factory=dict)

    def sha256(self, essay_id: str) -> str:
        if essay_id not in self.text_sha256:
            self.text_sha256[essay_id] = text_sha256(self.essays[essay_id].text)
        return self.text_sha256[essay_id]


class EssayStore:
    """Resolves essay references against the per-batch store, with an LRU cache of batches."""

    def __init__(self, r: Any, keys: Keys, *, cached_batches: int = CACHED_BATCHES) -> None:
        self.r = r
        self.keys = keys
        self.cached_batches = cached_batches
        self._batches: OrderedDict[str, _Batch] = OrderedDict()
        self.reads = 0  # store reads, for tests and the curious

    async def _batch(self, batch_id: str, *, fresh: bool) -> _Batch | None:
        if not fresh and batch_id in self._batches:
            self._batches.move_to_end(batch_id)
            return self._batches[batch_id]
        self.reads += 1
        stored = await load_essay_store(self.r, self.keys, batch_id)
        if stored is None:
            return None
        essays, grade_scale = stored
        batch = _Batch({e.essay_id: e for e in essays}, content_key(essays, grade_scale))
        self._batches[batch_id] = batch
        self._batches.move_to_end(batch_id)
        while len(self._batches) > self.cached_batches:
            self._batches.popitem(last=False)
        return batch

    async def resolve(self, req: ComparisonRequested) -> ComparisonRequested | ErrorDetail:
        """The request with both essays as registered, or why it cannot be judged (a final
        failure: the batch's essays are gone, or are not the ones the request names)."""
        a, b = req.essay_a, req.essay_b
        if not a.is_reference and not b.is_reference:
            return req
        batch = await self._batch(req.batch_id, fresh=False)
        if batch is None or _mismatch(batch, req) is not None:
            # The cache may predate a rebuild: ask the store once more before failing.
            batch = await self._batch(req.batch_id, fresh=True)
        if batch is None:
            return self._problem(req, "the essays are not in the batch's store")
        problem = _mismatch(batch, req)
        if problem is not None:
            return self._problem(req, problem)
        return msgspec.structs.replace(
            req, essay_a=_resolved(batch, a), essay_b=_resolved(batch, b)
        )

    @staticmethod
    def _problem(req: ComparisonRequested, message: str) -> ErrorDetail:
        return ErrorDetail(
            error_type="invalid_request",
            retryable=False,
            message=f"batch {req.batch_id!r}: {message}",
            provider=req.provider,
            model=req.model,
            correlation_id=req.correlation_id,
        )


def _mismatch(batch: _Batch, req: ComparisonRequested) -> str | None:
    """Why the stored essays are not those `req` names, or None."""
    checked_key = False
    for essay in (req.essay_a, req.essay_b):
        if not essay.is_reference:
            continue
        if essay.essay_id not in batch.essays:
            return f"essay {essay.essay_id!r} is not in the batch's store"
        if essay.sha256:
            stored = batch.sha256(essay.essay_id)
            if stored != essay.sha256:
                return (
                    f"essay {essay.essay_id!r}: the stored text's sha256 {stored[:12]}… is "
                    f"not the {essay.sha256[:12]}… the request names"
                )
        elif req.content_key and not checked_key:
            checked_key = True
            if batch.content_key != req.content_key:
                return (
                    f"the stored essays hash to content key {batch.content_key}, not the "
                    f"request's {req.content_key}"
                )
    return None


def _resolved(batch: _Batch, essay: Essay) -> Essay:
    if not essay.is_reference:
        return essay
    stored = batch.essays[essay.essay_id]
    return msgspec.structs.replace(stored, sha256=essay.sha256) if essay.sha256 else stored
