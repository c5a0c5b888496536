"""How long the command line takes to answer, beside a bare interpreter on the same machine.

    python bench/cli_start.py [--runs 7] [--json]

Starts its own redis-server (random port, temp dir, no persistence), registers one finished
batch there (42 essays, scored), then times in fresh processes, `--runs` times each, median
and best wall time:
* reference: `python -c pass` (the interpreter's own start, which no command can beat);
* `cjs --help` (goal ≤ 0.3 s);
* `cjs status B` and `cjs status B --json` on that server (goal ≤ 0.6 s);
* `cjs status nope` (a missing batch: the error path) and `cjs status B` with Redis
  unreachable (must fail within CJS_REDIS_CONNECT_TIMEOUT_S).

The commands run as `python -c "from tools.cli import main; main()"`, the console script's own
code, so a shell shim (pyenv) adds nothing. Wall time is the goal; CPU time (user + system
of the process) is shown beside it, since on a loaded machine wall time measures the load.
Exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CJS = [sys.executable, "-c", "from tools.cli import main; main()"]
GOALS_S = {"cjs --help": 0.3, "cjs status B": 0.6, "cjs status B --json": 0.6}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found")
    port = _free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory]
    command += ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)  # waiting for another process to listen
    proc.kill()
    sys.exit("redis-server did not start")


async def _finished_batch(url: str, prefix: str) -> str:
    """A batch run to its end, as `cjs demo` runs one."""
    from app import sample
    from app.logs import configure
    from app.runs import mock_settings, registration_for, run_to_end
    from app.settings import Settings
    from lps.providers.mock import profile_from_env
    from streams.client import connect
    from streams.keys import Keys

    configure(level="WARNING")
    r, _ = connect(url)
    settings = mock_settings(Settings.model_validate({"REDIS_URL": url, "prefix": prefix}))
    registered = registration_for(sample.load(), "per_request", budget=None, seed=7)
    state, _ = await run_to_end(
        r, Keys(prefix), settings, registered, profile_from_env("ideal"), timeout=300
    )
    await r.aclose()
    return state.batch_id


def _time(args: list[str], env: dict[str, str], runs: int, ok: set[int]) -> dict[str, float]:
    """Wall time (what a user waits) and CPU time (user + system: what the command costs,
    hardly moved by other load on the machine), median and best of `runs`."""
    walls, cpus = [], []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - started)
        cpus.append(usage.ru_utime + usage.ru_stime)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in ok:
            sys.exit(f"{args[3:]} exited {proc.returncode}: {stderr.decode()[-500:]}")
    return {
        "median_s": round(statistics.median(walls), 3),
        "best_s": round(min(walls), 3),
        "cpu_median_s": round(statistics.median(cpus), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server, url = _redis(directory)
        try:
            prefix = "bench:"
            batch = asyncio.run(_finished_batch(url, prefix))
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "REDIS_URL": url,
                "CJS_PREFIX": prefix,
            }
            down = {**env, "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"}
            cases: list[tuple[str, list[str], dict[str, str], set[int]]] = [
                ("reference: python -c pass", [sys.executable, "-c", "pass"], env, {0}),
                ("cjs --help", [*CJS, "--help"], env, {0}),
                ("cjs status B", [*CJS, "status", batch], env, {0}),
                ("cjs status B --json", [*CJS, "status", batch, "--json"], env, {0}),
                ("cjs status nope", [*CJS, "status", "nope"], env, {1}),
                ("cjs status B, Redis down", [*CJS, "status", batch], down, {3}),
            ]
            results: dict[str, Any] = {}
            for name, args, case_env, ok in cases:
                results[name] = _time(args, case_env, opts.runs, ok)
        finally:
            server.kill()
            server.wait()
    reference = results["reference: python -c pass"]["median_s"]
    missed = [name for name, goal in GOALS_S.items() if results[name]["median_s"] > goal]
    if opts.json:
        print(json.dumps({"runs": opts.runs, "results": results, "missed_goals": missed}))
    else:
        print(f"{'wall time':<28} {'median':>8} {'best':>8} {'over ref':>9} {'cpu':>8}  goal")
        for name, r in results.items():
            goal = f"≤ {GOALS_S[name]:.1f}s" if name in GOALS_S else ""
            print(
                f"{name:<28} {r['median_s']:>7.3f}s {r['best_s']:>7.3f}s "
                f"{r['median_s'] - reference:>+8.3f}s {r['cpu_median_s']:>7.3f}s  {goal}"
            )
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
