"""kill -9 of the archiver at every step boundary and at random instants, on a real Redis: no
event is lost, no entry a group still had pending or undelivered is trimmed, and the next pass
finishes the job (the same end state as a pass never interrupted)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.archive import ArchiveStore
from app.retention import run_pass
from events import codec
from events.streams import CJ_GROUP, STREAMS
from events.text import as_str
from projections import keys as pkeys
from streams.keys import Keys
from streams.reader import ensure_group
from tests.archive_helpers import (
    abandoned_batch,
    assert_archives_replay_to_before,
    assert_nothing_lost,
    finished_batch,
    record,
)
from tests.helpers import completed

ROOT = Path(__file__).resolve().parent.parent
RANDOM_KILLS = 8


async def _template(r: Any, keys: Keys) -> None:
    """Three finished batches (one with retries and bundles), one closed while its requests were
    out (one pending, the others undelivered), orphan callbacks of no batch, an undecodable
    entry, and old dead letters."""
    await finished_batch(r, keys, essays=6, seed=1)
    await finished_batch(r, keys, essays=6, seed=2, mode="serial_bundle", profile="flaky")
    await finished_batch(r, keys, essays=5, seed=3, profile="cj_generic_batch")
    await ensure_group(r, keys.callbacks, CJ_GROUP)
    orphans = [
        as_str(await r.xadd(keys.callbacks, codec.encode(completed("never-registered", c))))
        for c in ("o1", "o2")
    ]
    await r.xreadgroup(CJ_GROUP, "t", {keys.callbacks: ">"}, count=10)
    await r.xack(keys.callbacks, CJ_GROUP, *orphans)
    await r.xadd(keys.dispatches, {"type": b"Junk", "data": b"\xff{"})
    await abandoned_batch(r, keys)
    await r.xadd(keys.callbacks, codec.encode(completed("never-registered", "o3")))  # undelivered
    for i in range(3):
        await r.xadd(keys.dlq("cj:callbacks"), {"reason": "invalid_data"}, id=f"{1000 + i}-0")


async def _copy(r: Any, source: Keys, target: Keys) -> None:
    """Every key of a namespace (streams with their groups and pending entries) under another."""
    async for key in r.scan_iter(match=f"{source.prefix}*", count=1000):
        name = as_str(key)
        dumped = await r.dump(name)
        await r.restore(target.prefix + name[len(source.prefix) :], 0, dumped, replace=True)


async def _end_state(r: Any, keys: Keys) -> dict[str, Any]:
    streams = {n: [as_str(i) for i, _ in await r.xrange(keys.stream(n))] for n in STREAMS}
    dead = [as_str(i) for i, _ in await r.xrange(keys.dlq("cj:callbacks"))]
    archived = sorted(as_str(b) for b in await r.hkeys(pkeys.archived_index(keys)))
    return {"streams": streams, "dead_letters": dead, "archived": archived}


class Zygote:
    def __init__(self, url: str, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.archive_crash_child", url, str(root)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def run(
        self, prefix: str, kill_at: int = 0, kill_after_s: float | None = None
    ) -> tuple[int, int, float]:
        """One pass in a fresh process: (exit code, negative if killed; step boundaries
        reached; seconds)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{prefix} {kill_at}\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline().split()[1])
        if kill_after_s is not None:
            time.sleep(kill_after_s)  # a real process, killed from outside at a random instant
            with contextlib.suppress(ProcessLookupError):  # it may have ended already
                os.kill(pid, signal.SIGKILL)
        _, code, steps, seconds = self.proc.stdout.readline().split()
        return int(code), int(steps), float(seconds)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.mark.redis
async def test_kill_9_at_any_point_loses_nothing_and_the_next_pass_finishes(
    real_redis: Any, redis_server: Any, tmp_path: Path
) -> None:
    r = real_redis
    template = Keys("tpl:")
    await _template(r, template)
    rng = random.Random(13)
    zygote = Zygote(redis_server.url, tmp_path)
    try:
        # A pass never interrupted: how many step boundaries a pass has, and its end state.
        clean = Keys("clean:")
        await _copy(r, template, clean)
        code, boundaries, duration = zygote.run(clean.prefix)
        assert code == 0 and boundaries >= 15, (code, boundaries)
        reference = await _end_state(r, clean)
        assert len(reference["archived"]) == 3

        plans: list[tuple[int, float | None]] = [(k, None) for k in range(1, boundaries + 1)]
        plans += [(0, rng.uniform(0.0, duration)) for _ in range(RANDOM_KILLS)]
        killed = 0
        for run, (kill_at, after) in enumerate(plans):
            keys = Keys(f"run{run}:")
            await _copy(r, template, keys)
            before = await record(r, keys)
            root = tmp_path / f"ns-run{run}%3A"  # this namespace's part of the archive
            code, _, _ = zygote.run(keys.prefix, kill_at, after)
            killed += code == -signal.SIGKILL
            if kill_at:
                assert code == -signal.SIGKILL
            # Whatever the killed pass left, nothing is lost, nothing needed is trimmed...
            await assert_nothing_lost(r, keys, before, root)
            # ...and the next pass finishes the job.
            store = ArchiveStore(str(tmp_path))
            report = await run_pass(r, keys, store, older_than_s=0, dlq_retention_s=3600)
            assert not report.problems, report.problems
            assert await _end_state(r, keys) == reference, (kill_at, after)
            await assert_nothing_lost(r, keys, before, root)
            assert await assert_archives_replay_to_before(r, keys, before, root) == 3
        # Every boundary, and random instants of which at least some fell inside the pass.
        assert killed > boundaries, killed
    finally:
        zygote.close()
