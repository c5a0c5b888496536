"""Helpers every command shares: settings, the Redis connection, output, exit codes."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from app.logs import configure
from app.settings import Settings
from app.wiring import connect
from events.names import Keys
from projections.batch import BatchState
from projections.store import load_state

T = TypeVar("T")

EXIT_USAGE = 2


def settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic's message names the variable
        raise click.UsageError(f"bad environment setting: {exc}") from exc


def keys_for(s: Settings, prefix: str | None = None) -> Keys:
    return Keys(s.prefix if prefix is None else prefix)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def emit_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    click.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def quiet_logs(json_mode: bool) -> None:
    """Commands keep stdout for their answer; logs go to stderr, warnings only."""
    configure(json_logs=json_mode or not sys.stderr.isatty(), level="WARNING")


async def open_redis(s: Settings, *, need_server: bool = True) -> Any:
    if need_server and not s.redis_url:
        raise click.ClickException(
            "REDIS_URL is not set. This command reads a shared Redis; e.g. REDIS_URL=redis://localhost:6379/0"
        )
    client, _ = connect(s)
    return client


def batch_view(batch_id: str, view: Callable[[BatchState], T]) -> T:
    """Load one batch's projection from REDIS_URL and build a view of it (exits when missing)."""
    s = settings()

    async def main() -> T:
        r = await open_redis(s)
        try:
            return view(await require_batch(r, keys_for(s), batch_id))
        finally:
            await r.aclose()

    return run(main)


async def require_batch(r: Any, keys: Keys, batch_id: str) -> BatchState:
    state = await load_state(r, keys, batch_id)
    if state is None:
        raise click.ClickException(f"no batch {batch_id!r} under prefix {keys.prefix!r}")
    return state
