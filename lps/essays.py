"""Essay texts for requests that name their essays by reference (id and text hash).

A `ComparisonRequested` carries each essay without its text and with the sha256 of the text
registered for the batch. The text is stored once per batch: in `BatchRegistered`, and in the
batch projection's `essays` document (`proj:batch:<id>:docs`, written in the same MULTI/EXEC as
the event), which is the store read here. A worker keeps the essays of the batches it has seen
recently, so a batch costs one read per worker, not one per request.

Requests written before references embed the text: they pass through unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec

from events.types import ComparisonRequested, ErrorDetail, Essay, text_sha256
from projections.store import load_essays
from streams.keys import Keys

CACHED_BATCHES = 64


class EssayStore:
    """Resolves essay references against the per-batch store, with an LRU cache of batches."""

    def __init__(self, r: Any, keys: Keys, *, cached_batches: int = CACHED_BATCHES) -> None:
        self.r = r
        self.keys = keys
        self.cached_batches = cached_batches
        # batch id -> essay id -> (essay with text, sha256 of its text)
        self._batches: OrderedDict[str, dict[str, tuple[Essay, str]]] = OrderedDict()
        self.reads = 0  # store reads, for tests and the curious

    async def _essays(self, batch_id: str, *, fresh: bool) -> dict[str, tuple[Essay, str]]:
        if not fresh and batch_id in self._batches:
            self._batches.move_to_end(batch_id)
            return self._batches[batch_id]
        self.reads += 1
        essays = await load_essays(self.r, self.keys, batch_id) or []
        table = {e.essay_id: (e, text_sha256(e.text)) for e in essays}
        if table:
            self._batches[batch_id] = table
            self._batches.move_to_end(batch_id)
            while len(self._batches) > self.cached_batches:
                self._batches.popitem(last=False)
        return table

    async def resolve(self, req: ComparisonRequested) -> ComparisonRequested | ErrorDetail:
        """The request with both essays' texts, or why it cannot be judged (a final failure:
        the batch's essays are gone, or a text is not the one the request names)."""
        a, b = req.essay_a, req.essay_b
        if not a.is_reference and not b.is_reference:
            return req
        resolved: list[Essay] = []
        for essay in (a, b):
            if not essay.is_reference:
                resolved.append(essay)
                continue
            found = (await self._essays(req.batch_id, fresh=False)).get(essay.essay_id)
            if found is None or found[1] != essay.sha256:
                # The cache may predate a rebuild: ask the store once more before failing.
                found = (await self._essays(req.batch_id, fresh=True)).get(essay.essay_id)
            if found is None:
                return self._problem(req, f"essay {essay.essay_id!r} is not in the batch's store")
            if found[1] != essay.sha256:
                return self._problem(
                    req,
                    f"essay {essay.essay_id!r}: the stored text's sha256 {found[1][:12]}… is "
                    f"not the {essay.sha256[:12]}… the request names",
                )
            resolved.append(msgspec.structs.replace(found[0], sha256=essay.sha256))
        return msgspec.structs.replace(req, essay_a=resolved[0], essay_b=resolved[1])

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
