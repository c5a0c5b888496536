"""Stalled batches: open batches with no event for `CJS_BATCH_IDLE_TIMEOUT_S`.

A batch stalls when the callbacks it waits for will never come (its requests were
lost outside the pipeline, or no LPS worker runs) or when its continuation never
ran. `cjs stuck` lists such batches; `cjs stuck --reclaim` ends them, always with
events and through the same WATCH / MULTI path as `cj.continuation.advance`
(`queue_decision` writes the events and their projection together):

- when the comparisons that succeeded support a scoring (at least one, the
  comparison graph connected, failures within the batch's `max_failure_ratio`):
  `BatchScored`, then `BatchFinalized` with reason `stalled`;
- otherwise `BatchFailed` with reason `stalled` and a message saying why.

Either way `abandoned` names the correlation ids still pending: their callbacks,
should they come, count as late. The `reaper` worker role is `run_stall_finalizer`
(not the consumers' reclaim passes, which deal with pending entries).

Idle time is measured by the Redis server's clock (TIME), which is also the clock of
`last_event_at` (projections/batch.py): a reaper whose own clock runs ahead or behind
sees the same idle times as any other.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import structlog

from cj.continuation import Decision, advance, score, too_many_failures
from events import clock
from events.ids import id_order
from events.text import as_str
from events.types import BatchFailed, BatchFinalized
from projections.batch import PENDING, TERMINAL, BatchState, completion_pct
from projections.store import batch_fields, load_state
from streams.clock import server_time
from streams.errors import kind_of, policy_of
from streams.keys import Keys
from streams.resilience import sleep_unless

log = structlog.get_logger("cj.stalls")


def parse_time(value: str) -> datetime | None:
    """An event timestamp (ISO-8601, UTC) as an aware datetime; None when unparsable."""
    return clock.parse(value)


def idle_seconds(state: BatchState, now: datetime) -> float | None:
    last = parse_time(state.last_event_at)
    return None if last is None else max(0.0, (now - last).total_seconds())


def is_stalled(state: BatchState, idle_timeout_s: float, now: datetime) -> bool:
    idle = idle_seconds(state, now)
    return not state.terminal and idle is not None and idle >= idle_timeout_s


def pending_ids(state: BatchState) -> list[str]:
    return sorted((c for c, v in state.corr.items() if v == PENDING), key=id_order)


def stalled_view(state: BatchState, now: datetime) -> dict[str, Any]:
    idle = idle_seconds(state, now)
    return {
        "batch_id": state.batch_id,
        "status": state.status,
        "last_event_at": state.last_event_at,
        "idle_s": None if idle is None else round(idle, 3),
        "waves": state.waves,
        "denominator": state.denominator,
        "submitted": state.submitted,
        "completed": state.completed,
        "failed": state.failed,
        "in_flight": state.in_flight,
        "completion_pct": completion_pct(state),
        "pending_correlation_ids": pending_ids(state),
    }


async def find_stalled(
    r: Any, keys: Keys, idle_timeout_s: float, *, now: datetime | None = None
) -> list[BatchState]:
    """Open batches whose last event is `idle_timeout_s` old or older (by the server's clock
    unless `now` is given), oldest registration first."""
    now = now or await server_time(r)
    cutoff = now - timedelta(seconds=idle_timeout_s)
    out = []
    for batch_id, (status, last) in await batch_fields(r, keys, "status", "last_event_at"):
        if status is None or as_str(status) in TERMINAL:
            continue
        last_at = parse_time(as_str(last) if last else "")
        if last_at is None or last_at > cutoff:
            continue
        state = await load_state(r, keys, batch_id)
        if state is not None and is_stalled(state, idle_timeout_s, now):
            out.append(state)
    return out


def stalled_decision(state: BatchState, idle_timeout_s: float, now: datetime) -> Decision | None:
    """Pure: the events that end a stalled batch, or None when it is not (or no longer) stalled."""
    if not is_stalled(state, idle_timeout_s, now):
        return None
    abandoned = pending_ids(state)
    idle = idle_seconds(state, now) or 0.0
    why = ""
    decision = Decision()
    if state.completed == 0:
        why = f"no comparison succeeded ({state.failed} failed, {len(abandoned)} never answered)"
    else:
        scored = score(state, final=True)  # the batch's last scores
        failures = too_many_failures(state)
        if not scored.connected:
            why = f"the {state.completed} successful comparisons do not connect every essay"
        elif failures:
            why = failures
        else:
            decision.events.append(scored)
            decision.events.append(
                BatchFinalized(batch_id=state.batch_id, reason="stalled", abandoned=abandoned)
            )
            return decision
    decision.events.append(
        BatchFailed(
            batch_id=state.batch_id,
            reason="stalled",
            message=f"no event for {idle:.0f}s; {why}",
            abandoned=abandoned,
        )
    )
    return decision


async def finalize_stalled(
    r: Any,
    keys: Keys,
    batch_id: str,
    idle_timeout_s: float,
    *,
    now: datetime | None = None,
    max_tries: int = 50,
) -> Decision | None:
    """End a stalled batch through `advance` (WATCH, one MULTI with its events); None when
    it is not stalled (any more). Idle time by the server's clock unless `now` is given."""
    moment = now or await server_time(r)

    def decider(state: BatchState) -> Decision | None:
        return stalled_decision(state, idle_timeout_s, moment)

    return await advance(r, keys, batch_id, decider=decider, max_tries=max_tries)


async def run_stall_finalizer(
    r: Any, keys: Keys, stop: asyncio.Event, *, idle_timeout_s: float, every_s: float
) -> None:
    """The `reaper` worker role: end batches stalled for `idle_timeout_s`, as `cjs stuck
    --reclaim` does, every `every_s`. Safe beside others: each end goes through advance()."""
    while not stop.is_set():
        try:
            for state in await find_stalled(r, keys, idle_timeout_s):
                await finalize_stalled(r, keys, state.batch_id, idle_timeout_s)
        except Exception as exc:  # a bug must not silently end the reaping
            if policy_of(exc) is None:
                log.exception("stalled_reaper_error")
            else:
                log.warning(
                    "stalled_reaper_redis_unavailable",
                    error_kind=kind_of(exc),
                    error=str(exc)[:200],
                )
        await sleep_unless(stop, every_s)
