"""Running a batch in this process on the mock judge: what `cjs demo` and `cjs validate` share."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec
from scipy.stats import spearmanr

from app.errors import InputError, TimedOut
from app.settings import Settings
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import BatchIn, append_registration, build_registration, scale_of
from cj.registration import InputError as RegistrationError
from events import codec
from events.names import Keys
from events.types import BatchRegistered, ComparisonCompleted, Mode, ProviderAttemptFailed, new_id
from lps.providers.mock import MockProfile, quality_of
from lps.providers.registry import make_provider
from projections.batch import BatchState
from projections.store import load_state

# Called with the batch's state at each poll while it runs.
Progress = Callable[[BatchState], None]


def mock_settings(s: Settings) -> Settings:
    """The mock judge's faults are simulated: back off in tens of milliseconds, not seconds
    (unless CJS_RETRY_BASE_DELAY_S says otherwise)."""
    if "CJS_RETRY_BASE_DELAY_S" in os.environ:
        return s
    return s.model_copy(
        update={
            "retry_base_delay_s": 0.02,
            "retry_max_delay_s": 0.2,
            "cooldown_rate_limit_s": 0.02,
            "cooldown_overloaded_s": 0.02,
        }
    )


def registration_for(
    data: dict[str, Any], mode: str, *, budget: int | None, seed: int
) -> BatchRegistered:
    """A validated `BatchRegistered` for input `data` (the sample or a user's file)."""
    try:
        batch_in = BatchIn.model_validate(data)
        scale_name, grades = scale_of(batch_in)
        return build_registration(
            batch_in, scale_name, grades, mode=cast(Mode, mode), budget=budget, seed=seed
        )
    except (RegistrationError, ValueError) as exc:
        raise InputError(str(exc)) from exc


async def with_readable_id(
    r: Any, keys: Keys, registered: BatchRegistered, base: str
) -> BatchRegistered:
    """A readable id that a seed reproduces (pairs derive from it), unique on a shared Redis."""
    batch_id = base
    if await r.exists(keys.batch(batch_id)):
        batch_id = f"{batch_id}-{new_id()[:8]}"
    return msgspec.structs.replace(registered, batch_id=batch_id)


async def run_to_end(
    r: Any,
    keys: Keys,
    s: Settings,
    registered: BatchRegistered,
    mock: MockProfile,
    *,
    timeout: float,
    progress: Progress | None = None,
) -> tuple[BatchState, float]:
    """Register the batch, run CJ and LPS consumers in this process until it is finalized or
    failed; returns its final state and the wall time. `progress` sees the state as it goes."""
    started = time.perf_counter()
    await append_registration(r, keys, registered)
    runner = InProcess(r, keys, s, lambda name: make_provider(name, mock_profile=mock))
    runner.start()
    await advance(r, keys, registered.batch_id)
    try:
        state = await wait_terminal(r, keys, registered.batch_id, runner, timeout, progress)
    finally:
        await runner.close()
    return state, time.perf_counter() - started


async def wait_terminal(
    r: Any,
    keys: Keys,
    batch_id: str,
    runner: InProcess,
    timeout: float,
    progress: Progress | None = None,
) -> BatchState:
    """Poll the batch until it is finalized or failed (raising a consumer's error at once)."""
    deadline = time.monotonic() + timeout
    while True:
        runner.check()
        state = await load_state(r, keys, batch_id)
        assert state is not None
        if progress is not None:
            progress(state)
        if state.terminal:
            return state
        if time.monotonic() > deadline:
            raise TimedOut(
                f"batch {batch_id} not finalized after {timeout:.0f}s "
                f"({state.accepted}/{state.denominator} callbacks)"
            )
        await asyncio.sleep(0.05)


async def count_provider_calls(r: Any, keys: Keys, batch_id: str) -> int:
    """Provider calls = failed attempts + completed comparisons, counted from the streams."""
    calls = 0
    for stream, kind in (
        (keys.dispatches, ProviderAttemptFailed),
        (keys.callbacks, ComparisonCompleted),
    ):
        last = "-"
        while True:
            page = await r.xrange(stream, min=last, max="+", count=1000)
            if last != "-":
                page = page[1:]
            if not page:
                break
            for _, fields in page:
                try:
                    event = codec.decode(fields)
                except codec.DecodeError:
                    continue
                if isinstance(event, kind) and event.batch_id == batch_id:
                    calls += 1
            last = page[-1][0].decode()
    return calls


def spearman_true(state: BatchState) -> float | None:
    """Spearman between the batch's θ and the essays' latent (mock) qualities."""
    if state.scores is None:
        return None
    theta = {s.essay_id: s.theta for s in state.scores.scores}
    ids = [e.essay_id for e in state.essays if e.essay_id in theta]
    if len(ids) < 3:
        return None
    truth = {e.essay_id: quality_of(e) for e in state.essays}
    rho = spearmanr([theta[i] for i in ids], [truth[i] for i in ids]).statistic
    return round(float(rho), 4)
