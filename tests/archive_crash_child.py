"""The archiver as a process to kill (tests/test_archive_crash.py).

    python -m tests.archive_crash_child REDIS_URL ARCHIVE_ROOT

reads lines `PREFIX KILL_AT` on stdin; for each forks a child that runs one archive pass
(`app.retention.run_pass`, retention 0) on namespace PREFIX. With KILL_AT > 0 the child sends
itself SIGKILL when the pass reaches its KILL_AT-th step boundary; otherwise it runs to the end
(or until the test kills it from outside). Prints `pid N` when the child starts, then
`exit CODE STEPS SECONDS` (CODE negative: killed by that signal; STEPS: boundaries reached).
Forking from here keeps the imports out of every run, so a run costs milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import redis.asyncio as aioredis

from app.archive import ArchiveStore
from app.logs import configure
from app.retention import run_pass
from streams.keys import Keys


def child(url: str, root: str, prefix: str, kill_at: int, pipe_w: int) -> None:
    steps = 0

    def step(name: str) -> None:
        nonlocal steps
        steps += 1
        os.write(pipe_w, b"s")
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    async def main() -> None:
        r = aioredis.from_url(url)
        try:
            await run_pass(
                r, Keys(prefix), ArchiveStore(root), older_than_s=0, dlq_retention_s=3600, step=step
            )
        finally:
            await r.aclose()

    asyncio.run(main())


def main() -> None:
    url, root = sys.argv[1], sys.argv[2]
    configure(json_logs=True, level="ERROR")
    for line in sys.stdin:
        if not line.strip():
            continue
        prefix, kill_at = line.split()
        read_end, write_end = os.pipe()
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 0
            try:
                child(url, root, prefix, int(kill_at), write_end)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(write_end)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        steps = b""
        while chunk := os.read(read_end, 4096):
            steps += chunk
        os.close(read_end)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {code} {len(steps)} {time.perf_counter() - started:.4f}", flush=True)


if __name__ == "__main__":
    main()
