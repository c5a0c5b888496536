"""The event loop a worker runs on (app/loop.py): uvloop unless asked for asyncio's own."""

from __future__ import annotations

import asyncio

import pytest

from app import loop
from app.settings import Settings


async def _kind_and_sum() -> tuple[str, int]:
    # A thread hop and a timer: what a worker's decide step and its waits use.
    total = await asyncio.to_thread(sum, range(10))
    await asyncio.sleep(0)
    return loop.running_kind(), total


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_run_on_the_loop_asked_for(kind: loop.LoopKind) -> None:
    assert loop.run(_kind_and_sum(), kind) == (kind, 45)


def test_uvloop_is_the_default_and_the_setting_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CJS_EVENT_LOOP", raising=False)
    assert Settings().event_loop == "uvloop"
    monkeypatch.setenv("CJS_EVENT_LOOP", "asyncio")
    assert Settings().event_loop == "asyncio"
    monkeypatch.setenv("CJS_EVENT_LOOP", "tokio")
    with pytest.raises(ValueError):
        Settings()
