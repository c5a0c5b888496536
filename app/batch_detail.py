"""Everything the dashboard's batch page shows, web-independent: the `status`, `results` and
`positions` views (the CLI's `--json` contracts), progress per wave, failures by error type,
reliability over waves and the batch's event timeline (its `cj:batches` events)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from app.batches import require_batch
from app.errors import NotFound
from app.views import results_view, status_view
from events.text import as_str
from events.types import (
    BatchFailed,
    BatchFinalized,
    BatchRegistered,
    BatchScored,
    Event,
    WaveSubmitted,
)
from projections.batch import ABANDONED, PENDING, BatchState
from projections.replay import decode_flat
from streams.keys import Keys
from streams.paging import raw_client, read_pages

# A batch's first event is looked for from this long before its registration time: the event's
# time is the producer's clock, the entry id the server's.
CLOCK_SLACK_MS = 300_000


def wave_progress(state: BatchState) -> list[dict[str, Any]]:
    """Per wave: pairs requested, and how many completed, failed, are pending or abandoned."""
    per: dict[int, Counter[str]] = {}
    for cid, (wave, _, _) in state.pairs.items():
        value = state.corr.get(cid, PENDING)
        kind = (
            "pending"
            if value == PENDING
            else "abandoned"
            if value == ABANDONED
            else "completed"
            if value.startswith("c ")
            else "failed"
        )
        per.setdefault(wave, Counter())[kind] += 1
    return [
        {
            "wave": wave,
            "requested": sum(c.values()),
            **{k: c[k] for k in ("completed", "failed", "pending", "abandoned")},
        }
        for wave, c in sorted(per.items())
    ]


def failures_by_type(state: BatchState) -> dict[str, int]:
    """Accepted failed comparisons per error type (the outcome that counts per request)."""
    counts = Counter(v.split(" ", 2)[2] for v in state.corr.values() if v.startswith("f "))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _summary(event: Event) -> dict[str, Any]:
    """What the timeline says of one event (counts and reasons, never essay text)."""
    if isinstance(event, BatchRegistered):
        anchors = sum(e.is_anchor for e in event.essays)
        return {"essays": len(event.essays), "anchors": anchors, "mode": event.config.mode}
    if isinstance(event, WaveSubmitted):
        return {"wave": event.wave, "pairs": len(event.pairs)}
    if isinstance(event, BatchScored):
        return {
            "wave": event.wave,
            "comparisons": event.comparisons,
            "reliability": event.reliability.posterior if event.reliability else None,
            "ssr": event.ssr,
            "split_half": event.split_half,
            "max_delta": event.max_delta,
        }
    if isinstance(event, BatchFinalized):
        return {"reason": event.reason, "abandoned": len(event.abandoned)}
    if isinstance(event, BatchFailed):
        return {"reason": event.reason, "message": event.message, "abandoned": len(event.abandoned)}
    return {}


def _start_id(state: BatchState) -> str:
    try:
        at = datetime.fromisoformat(state.registered_at.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    return f"{max(0, int(at.timestamp() * 1000) - CLOCK_SLACK_MS)}-0"


async def timeline(r: Any, keys: Keys, state: BatchState) -> list[dict[str, Any]]:
    """The batch's events on `cj:batches` in order: entry id, time, type and a summary."""
    needle = state.batch_id.encode()
    out: list[dict[str, Any]] = []
    stream = keys.for_batch(state.batch_id).batches
    async for entries in read_pages(raw_client(r), stream, min_id=_start_id(state)):
        for raw_id, flat in entries:
            data = flat[3] if len(flat) == 4 else None
            if isinstance(data, bytes) and needle not in data:
                continue
            event, _ = decode_flat(flat)
            if event is None or getattr(event, "batch_id", None) != state.batch_id:
                continue
            out.append(
                {
                    "entry_id": as_str(raw_id),
                    "at": event.occurred_at,
                    "type": type(event).__name__,
                    **_summary(event),
                }
            )
        if state.terminal and out and out[-1]["type"] in ("BatchFinalized", "BatchFailed"):
            break
    return out


def reliability(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The posterior reliability R, SSR, split-half and max |Δθ| of each scoring, from the
    timeline's BatchScored events (SSR and split-half: the last scores')."""
    keep = ("wave", "comparisons", "reliability", "ssr", "split_half", "max_delta")
    return [{k: e.get(k) for k in keep} for e in events if e["type"] == "BatchScored"]


async def batch_detail(r: Any, keys: Keys, batch_id: str) -> dict[str, Any]:
    """The batch page's data: `status`, `results`, `positions` (as `cjs status|results|positions
    --json`), `waves`, `failures`, `reliability` and `timeline`. NotFound for an unknown batch."""
    from cj.positions import position_report  # scipy: loaded when a batch page is asked for

    state = await require_batch(r, keys, batch_id)
    events = await timeline(r, keys, state)
    return {
        "status": status_view(state),
        "results": results_view(state),
        "positions": position_report(state),
        "waves": wave_progress(state),
        "failures": failures_by_type(state),
        "reliability": reliability(events),
        "timeline": events,
    }


async def essay_text(r: Any, keys: Keys, batch_id: str, essay_id: str) -> str:
    """One essay's text, for a user who asked to see it (never logged)."""
    state = await require_batch(r, keys, batch_id)
    for essay in state.essays:
        if essay.essay_id == essay_id:
            return essay.text
    raise NotFound(f"no essay {essay_id!r} in batch {batch_id!r}")
