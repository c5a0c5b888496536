"""Running a batch in this process on the mock judge (what `cjs demo` and `cjs validate` share),
and getting the runs `cjs validate` compares: run here in each mode, or recorded in files."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

import msgspec

from app.archive import archived_manifest, archived_state, collect, load, read_export
from app.connection import open_checked, open_redis
from app.errors import InputError, NotFound, TimedOut
from app.settings import Settings, keys_for
from app.validation import Run
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import BatchIn, append_registration, build_registration, scale_of
from cj.registration import InputError as RegistrationError
from events import codec
from events.streams import STREAMS
from events.types import (
    BatchRegistered,
    ComparisonCompleted,
    Event,
    Mode,
    ProviderAttemptFailed,
    new_id,
)
from lps.providers.mock import MockProfile, profile_from_env
from lps.providers.registry import make_provider
from projections import keys as pkeys
from projections.batch import BatchState, entry_id_key
from projections.store import load_state
from streams.keys import Keys

# Called with the batch's state at each poll while it runs.
Progress = Callable[[BatchState], None]


def mock_settings(s: Settings) -> Settings:
    """The mock judge's faults are simulated: back off in tens of milliseconds, not seconds
    (unless CJS_RETRY_BASE_DELAY_S says otherwise). Waves one after the other (unless
    CJS_WAVE_OVERLAP says otherwise): with overlap, which callbacks are back when the next
    wave is planned depends on timing, and a seed would no longer reproduce a run."""
    update: dict[str, float] = {}
    if "CJS_WAVE_OVERLAP" not in os.environ:
        update["wave_overlap"] = 1.0
    if "CJS_RETRY_BASE_DELAY_S" not in os.environ:
        update |= {
            "retry_base_delay_s": 0.02,
            "retry_max_delay_s": 0.2,
            "cooldown_rate_limit_s": 0.02,
            "cooldown_overloaded_s": 0.02,
        }
    return s.model_copy(update=update)


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
    if await r.exists(pkeys.batch(keys, batch_id)) or await r.hexists(
        pkeys.archived_index(keys.for_batch(batch_id)), batch_id
    ):
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
    part = keys.for_batch(batch_id)
    for stream, kind in (
        (part.dispatches, ProviderAttemptFailed),
        (part.callbacks, ComparisonCompleted),
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


# --- the runs `cjs validate` compares -----------------------------------------------------------


async def events_of(r: Any, keys: Keys, batch_id: str) -> list[tuple[str, str, Event]]:
    """The batch's events as (stream without prefix, entry id, event), in entry-id order."""
    out = []
    for rec in await collect(r, keys, batch_id):
        out.append((rec.stream, rec.entry_id, codec.decode({"type": rec.type, "data": rec.data})))
    return out


class ModeRuns(NamedTuple):
    runs: list[Run]
    source: str  # where they ran, for the report
    kept_prefix: str | None  # the namespace holding them still (--keep), else None


async def run_modes(
    s: Settings,
    registered: BatchRegistered,
    modes: list[str],
    mock_name: str | None,
    seed: int,
    timeout: float,
    announce: Callable[[str], None] | None = None,
    *,
    keep: bool = False,
) -> ModeRuns:
    """Run `registered` once in each mode on the mock judge, one after the other; returns the
    runs and where they ran. On a shared Redis they run in a namespace of their own under
    CJS_PREFIX (`validate-<id>:`), so that no live worker takes their requests and nothing is
    left among the live batches: it is deleted afterwards unless `keep`."""
    s = mock_settings(s)
    mock = profile_from_env(mock_name)
    r, where = await open_checked(s, need_server=False)
    shared = bool(s.redis_url)
    keys = keys_for(s, f"{s.prefix}validate-{new_id()[:8]}:") if shared else keys_for(s)
    if not shared:
        source = "in-process runs on an embedded Redis"
    else:
        fate = "kept" if keep else "deleted afterwards"
        source = f"in-process runs on {where}, namespace {keys.prefix!r} ({fate})"
    runs = []
    try:
        for mode in modes:
            config = msgspec.structs.replace(registered.config, mode=cast(Mode, mode))
            reg = msgspec.structs.replace(registered, config=config)
            reg = await with_readable_id(
                r, keys, reg, f"validate-{mode}-s{seed}-n{len(reg.essays)}"
            )
            if announce is not None:
                announce(
                    f"validate: {mode} on {where} (prefix {keys.prefix!r}), {len(reg.essays)} "
                    f"essays, judge mock/{mock.name} ..."
                )
            state, wall = await run_to_end(r, keys, s, reg, mock, timeout=timeout)
            runs.append(
                Run(mode, await events_of(r, keys, reg.batch_id), state, "live projection", wall)
            )
    finally:
        try:
            if shared and not keep:
                await delete_namespace(r, keys)
        finally:
            await r.aclose()
    return ModeRuns(runs, source, keys.prefix if shared and keep else None)


_GLOB = re.compile(r"([*?\[\]\\])")


async def delete_namespace(r: Any, keys: Keys) -> int:
    """Delete every key under `keys.prefix` (a namespace of this process's own: never the
    live one, which other processes share). Returns how many went."""
    assert keys.prefix, "refusing to delete the empty namespace"
    pattern = _GLOB.sub(r"\\\1", keys.prefix) + "*"
    deleted = 0
    batch: list[Any] = []
    async for name in r.scan_iter(match=pattern, count=1000):
        batch.append(name)
        if len(batch) >= 500:
            deleted += await r.unlink(*batch)
            batch = []
    if batch:
        deleted += await r.unlink(*batch)
    return deleted


async def batch_runs(s: Settings, batch_ids: list[str]) -> list[Run]:
    """Batches of the namespace as runs: live ones from the streams and their projection,
    archived ones replayed from their archive."""
    r = await open_redis(s)
    keys = keys_for(s)
    runs = []
    try:
        for batch_id in batch_ids:
            manifest = await archived_manifest(r, keys, batch_id)
            if manifest is not None:
                state, per = await archived_state(manifest, s.archive_options)
                events = sorted(
                    (
                        (name, entry_id, event)
                        for name in STREAMS
                        for entry_id, _, _, event in per[name]
                    ),
                    key=lambda row: (entry_id_key(row[1]), STREAMS.index(row[0])),
                )
                runs.append(Run(batch_id, events, state, "replayed from the archive"))
                continue
            live = await load_state(r, keys, batch_id)
            if live is None:
                raise NotFound(f"no batch {batch_id!r} under prefix {keys.prefix!r}")
            runs.append(Run(batch_id, await events_of(r, keys, batch_id), live, "live projection"))
    finally:
        await r.aclose()
    return runs


async def load_runs(paths: list[Path]) -> list[Run]:
    """Recorded runs, each imported into its own namespace of an embedded Redis."""
    import fakeredis

    r = fakeredis.FakeAsyncRedis()
    runs = []
    try:
        for k, path in enumerate(paths):
            keys = Keys(f"run{k}:")
            report = await load(r, keys, read_export(path))
            batch_id = report["batches"][0]
            state = await load_state(r, keys, batch_id)
            assert state is not None
            runs.append(
                Run(
                    path.name,
                    await events_of(r, keys, batch_id),
                    state,
                    "rebuilt from the recorded events",
                )
            )
    finally:
        await r.aclose()
    return runs
