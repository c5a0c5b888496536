"""The dashboard's overview, web-independent: `cjs stuck`'s summary (streams, groups, consumers
with their verdicts, stalled batches, dead-letter counts: the same figures as `cjs stuck
--json`), the open batches (rows of `cjs batches --json`) and the providers' health."""

from __future__ import annotations

import time
from typing import Any

from app.batches import OPEN, list_view
from app.settings import Settings
from app.stuck import summary
from events.text import as_str
from lps import keys as lkeys
from streams.keys import Keys


async def _stored(r: Any, key: str) -> Any:
    """A key's value as stored: a hash as a dict, a string as text, None when absent."""
    kind = as_str(await r.type(key))
    if kind == "hash":
        return {as_str(f): as_str(v) for f, v in (await r.hgetall(key)).items()}
    if kind == "string":
        return as_str(await r.get(key))
    return None if kind == "none" else kind


async def provider_health(
    r: Any, keys: Keys, models: list[tuple[str, str]], *, now: float | None = None
) -> dict[str, Any]:
    """Cooldowns in force and breakers of the (provider, model) pairs the batches use. THE
    place to extend when the LPS keeps more shared provider state: issue 10's breaker is looked
    for at `lps:breaker:<provider>` and `lps:breaker:<provider>:<model>` and shown as stored
    until its format is known. Keys are read by name, never scanned for: a keyspace with
    millions of per-request keys would make a SCAN slow."""
    now = time.time() if now is None else now
    cooldowns = []
    breakers = []
    seen_providers: set[str] = set()
    for provider, model in sorted(set(models)):
        raw = await r.get(lkeys.cooldown(keys, provider, model))
        try:
            until = float(raw) if raw is not None else 0.0
        except ValueError:
            until = 0.0
        if until > now:
            cooldowns.append(
                {"provider": provider, "model": model, "remaining_s": round(until - now, 3)}
            )
        names = [(f"lps:breaker:{provider}:{model}", lkeys.breaker(keys, provider, model))]
        if provider not in seen_providers:
            seen_providers.add(provider)
            names.insert(0, (f"lps:breaker:{provider}", lkeys.breaker(keys, provider)))
        for name, key in names:  # shared by every partition: outside their hash tags
            state = await _stored(r, key)
            if state is not None:
                breakers.append({"key": name, "provider": provider, "state": state})
    return {"cooldowns": cooldowns, "breakers": breakers}


async def overview(r: Any, keys: Keys, s: Settings) -> dict[str, Any]:
    """The overview as one JSON-ready object: `summary` (what `cjs stuck --json` shows, without
    its list of stuck entries), `open_batches` (rows of `cjs batches --json --status open`),
    `batch_counts` (its `counts`), `providers` and the cost of every batch listed."""
    view, _ = await summary(
        r,
        keys,
        batch_idle_s=s.batch_idle_timeout_s,
        dead_after_s=s.processing_timeout_s,
    )
    listed = await list_view(r, keys)
    rows = listed["batches"]
    models = [(row["provider"], row["model"]) for row in rows if row["provider"] is not None]
    return {
        **view,
        "processing_timeout_s": s.processing_timeout_s,
        "batch_counts": listed["counts"],
        "open_batches": [row for row in rows if row["status"] in OPEN],
        "cost_usd_listed": round(sum(row["cost_usd"] for row in rows), 6) if rows else None,
        "providers": await provider_health(r, keys, models),
    }
