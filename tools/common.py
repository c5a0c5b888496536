"""What every command shares: running the app's coroutines, output, log routing."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from app import batches, settings
from app.logs import configure
from projections.batch import BatchState

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def emit_json(obj: Any) -> None:
    """Exactly one JSON object on stdout."""
    click.echo(json.dumps(obj, indent=None, sort_keys=False, default=str))


def quiet_logs(json_mode: bool) -> None:
    """Commands keep stdout for their answer; logs go to stderr, warnings only."""
    configure(json_logs=json_mode or not sys.stderr.isatty(), level="WARNING")


def batch_view(batch_id: str, view: Callable[[BatchState], T]) -> T:
    """Load one batch's projection from REDIS_URL and build a view of it (exits when missing)."""
    s = settings.load()
    return run(lambda: batches.read_view(s, batch_id, view))
