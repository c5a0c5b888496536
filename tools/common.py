"""What every command shares: running the app's coroutines, output, log routing."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from app import batches, logs, settings
from app.connection import open_redis
from app.errors import ConfigError
from projections.batch import BatchState, completion_pct

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def with_redis(s: settings.Settings, use: Callable[[Any], Awaitable[T]]) -> T:
    """Run `use` on a checked client for REDIS_URL, to its end; the client is closed after."""

    async def main() -> T:
        r = await open_redis(s)
        try:
            return await use(r)
        finally:
            await r.aclose()

    return run(main)


def emit_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    click.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def quiet_logs(json_mode: bool, *, level: str = "WARNING") -> None:
    """Commands keep stdout for their answer; logs go to stderr, warnings only (errors only for
    the commands that run workers in process: their retries are the report's, not noise).
    JSON lines with --json or off a terminal, unless CJS_LOG_FORMAT says otherwise."""
    try:
        log_format = settings.load().log_format
    except ConfigError:  # the command reports the bad setting itself, in these logs' format
        log_format = "auto"
    logs.start(log_format, auto=json_mode or not sys.stderr.isatty(), level=level)


def batch_view(batch_id: str, view: Callable[[BatchState], T]) -> T:
    """Load one batch's projection from REDIS_URL and build a view of it (exits when missing)."""
    s = settings.load()
    return run(lambda: batches.read_view(s, batch_id, view))


class ProgressBar:
    """A batch's progress on stderr, counted in accepted callbacks of its denominator (a batch
    that settles early ends short of it): a bar on a terminal; elsewhere (`lines`), a line
    whenever the status, wave or count changes."""

    def __init__(self, *, lines: bool = False) -> None:
        self._bar: Any = None
        self._shown = 0
        self._lines = lines
        self._last: tuple[str, int, int] | None = None

    def __call__(self, state: BatchState) -> None:
        label = (
            f"{state.status} ({state.finalize_reason})" if state.terminal else f"wave {state.waves}"
        )
        if self._lines:
            key = (state.status, state.waves, state.accepted)
            if key != self._last:
                self._last = key
                click.echo(
                    f"{state.batch_id}: {label}, {state.accepted}/{state.denominator} "
                    f"comparisons ({completion_pct(state)}%)",
                    err=True,
                )
            return
        if self._bar is None:
            self._bar = click.progressbar(length=state.denominator, file=sys.stderr, show_pos=True)
        self._bar.label = label
        self._bar.update(state.accepted - self._shown)
        self._shown = state.accepted
        if state.terminal:  # the last label, even when the count did not move
            self._bar.render_progress()

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.render_finish()
