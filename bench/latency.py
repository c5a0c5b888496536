"""Time to result under provider latency and rate limits, CPU per comparison, and the
redis-benchmark XADD reference, in one run against a redis-server of its own.

    python bench/latency.py [--scale 10] [--rpm 600] [--workers 4] [--batches 10]
                            [--essays 100] [--only cpu|latency] [--pin] [--json]

1. Reference: `redis-benchmark -c 50 -n N XADD s * f v` (50 clients, no pipelining) on the
   same server, the rate the end-to-end figure is compared with: run before and after the
   zero-latency run, their mean taken (one run of 50,000 moved by up to 17 % between two
   runs on an idle machine; both are in `xadd_reference_runs`).
2. Zero latency: `--workers` processes (each a CJ consumer and an LPS worker), `--batches`
   batches of `--essays` essays at once, the mock judge answering at once. Comparisons per
   second end to end, and CPU per comparison from the processes' own CPU times (their
   getrusage over the run) and Redis's (`INFO cpu`, used_cpu_user + used_cpu_sys).
   `--pin`: each process on a core of its own (CPU 1, 2, ...), Redis and this script on
   CPU 0, for this run alone (it needs `--workers` + 1 cores; on two, `--workers 1` gives
   what one process does with a core to itself).
3. The `realistic` mock profile (lognormal latency, median 1.5 s, p99 12 s; a provider-side
   limit of `--rpm` requests per minute shared by every worker through Redis, answering 429
   with retry-after and anthropic-ratelimit-* headers), with the shared limiter configured
   to the same limit (CJS_LPS_RATE_LIMIT_RPM): one batch, then `--batches` at once, with
   overlapping waves (CJS_WAVE_OVERLAP=0.8) and without (1.0). Printed per run: wall time
   against the bound (comparisons ÷ limit + one median latency) and, for one batch, its
   critical path (per wave, the time until the share it waits for is back, its calls
   granted at the limit: the overlap share, or all without overlap); the share of calls
   answered 429 (overall, and at steady state: the middle 80 % of the run); calls per
   comparison; waves.

Time is scaled by `--scale` so that the run takes minutes, not an hour: latencies divided
by it, the rate limit multiplied by it (the mock's Retry-After stays in whole seconds, as
the API sends it, so a 429 costs relatively more here than at scale 1). Wall times are
printed as measured and in real-time equivalent (× scale). Ratios do not depend on it.

`CJS_BENCH_PROFILE=DIR`: each worker process profiles its event loop's thread over the run
(cProfile on thread CPU time, so that waiting for a core does not count) into DIR/w0, w1,
...; read them with pstats. The profiler's own cost inflates the figures printed.

The essays' latent qualities are N(0, 1) (as a judge sees a real class), so the stopping
rule ends a batch after roughly 10–20 comparisons per essay.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import math
import multiprocessing as mp
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import redis.asyncio as aioredis

import tools  # noqa: F401  (first: one BLAS thread per process)
from app import loop as event_loop
from app.heap import freeze_startup
from app.logs import configure
from app.settings import Settings
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import BatchIn, append_registration, build_registration, scale_of
from events import codec
from events.types import ComparisonCompleted, ProviderAttemptFailed, WaveSubmitted
from lps.providers.mock import MockProfile, profile_from_env
from lps.providers.registry import make_provider
from projections import keys as pkeys
from projections.store import load_state
from streams.client import connect
from streams.keys import Keys
from tests.redis_server import RedisServer

XADD = ("XADD", "bench:xadd", "*", "f", "v")


# --- worker processes -----------------------------------------------------------------------


def _worker(
    url: str,
    prefix: str,
    env: dict[str, str],
    options: dict[str, Any],
    stop: str,
    out: str,
    core: int | None = None,
) -> None:
    if core is not None:  # before any thread starts: they inherit it
        os.sched_setaffinity(0, {core})
    os.environ.update(env)
    configure(json_logs=True, level="ERROR")
    # As `cjs worker` does: the provider SDK (which classifies the mock's 429s too) loads now,
    # not in the middle of the first wave.
    import lps.message_batches  # noqa: F401

    async def main() -> dict[str, float]:
        r, _ = connect(url)  # the client `cjs worker` makes
        settings = Settings(block_ms=100, reaper_interval_s=30, **options)
        runner = InProcess(
            r,
            Keys(prefix),
            settings,
            lambda name: make_provider(name, mock_profile=profile_from_env()),
            cj_consumers=1,
            lps_workers=1,
            concurrency=16,
        )
        runner.start()
        freeze_startup()  # as `cjs worker` does
        Path(out + ".ready").touch()
        profile = (
            cProfile.Profile(time.thread_time) if os.environ.get("CJS_BENCH_PROFILE") else None
        )
        begin, threads = process_cpu_s(), thread_cpu_s()
        if profile is not None:
            profile.enable()  # the event loop's thread only (the decisions: bench/decide.py)
        while not os.path.exists(stop):
            await asyncio.sleep(0.05)
        if profile is not None:
            profile.disable()
            profile.dump_stats(os.path.join(os.environ["CJS_BENCH_PROFILE"], Path(out).name))
        used = process_cpu_s() - begin
        split = {f"{k}_cpu_s": v - threads[k] for k, v in thread_cpu_s().items()}
        await runner.close()
        await r.aclose()
        return {"cpu_s": used, **split, **_steps()}

    # On the loop `cjs worker` runs on (CJS_EVENT_LOOP).
    Path(out).write_text(json.dumps(event_loop.run(main(), Settings().event_loop)))


def _steps() -> dict[str, float]:
    """This process's CJ step times (cj_step_duration_seconds: apply, score, plan), summed
    in seconds, and their counts."""
    from prometheus_client import REGISTRY

    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name != "cj_step_duration_seconds":
            continue
        for sample in metric.samples:
            step = sample.labels.get("step", "")
            if sample.name.endswith("_sum"):
                out[f"{step}_s"] = out.get(f"{step}_s", 0.0) + sample.value
            elif sample.name.endswith("_count"):
                out[f"{step}_n"] = out.get(f"{step}_n", 0.0) + sample.value
    return out


def _machine_idle() -> tuple[int, int]:
    """Idle and total jiffies of the whole machine (/proc/stat; zeros where there is none):
    whether the run's processes wait, or the machine (shared, 2 cores) has nothing left."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    return ticks[3] + ticks[4], sum(ticks)


def process_cpu_s() -> float:
    """This process's CPU seconds (user + system) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu_s() -> dict[str, float]:
    """This process's CPU seconds so far, split into its main thread's (the event loop: the
    LPS worker, applying callbacks, reading and writing states) and its other threads'
    (CJ's decisions, `asyncio.to_thread`), from /proc/self/task (Linux; {} elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"loop": 0.0, "decide": 0.0}
    try:
        tasks = os.listdir("/proc/self/task")
        for tid in tasks:
            with open(f"/proc/self/task/{tid}/stat") as f:
                # After the command's closing parenthesis: utime and stime are the 12th and
                # 13th fields (14th and 15th of the whole line).
                fields = f.read().rsplit(")", 1)[1].split()
            used = (int(fields[11]) + int(fields[12])) / tick
            out["loop" if int(tid) == os.getpid() else "decide"] += used
    except OSError:
        return {}
    return out


@dataclass
class Run:
    label: str
    overlap: float
    batches: int
    comparisons: int
    wall_s: float
    ends_s: list[float]
    waves: list[int]
    wave_sizes: list[list[int]]
    calls: int
    rate_limited: int
    steady_calls: int
    steady_rate_limited: int
    worker_cpu_s: float
    process_cpu_s: list[float]
    machine_idle: float
    redis_cpu_s: float
    decision_ms: float
    steps: dict[str, float]
    thread_cpu_s: dict[str, float]  # summed over the processes, by thread (thread_cpu_s)
    commands: dict[str, tuple[int, int]]


def _essays(n: int, seed: int) -> BatchIn:
    rng = np.random.default_rng(seed)
    grades = ["F", "E", "D", "C", "B", "A"]
    q = rng.normal(0.0, 1.0, n)
    cut = np.quantile(q, [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    rows: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "essay_id": f"s{seed}-e{i:03d}",
            "text": f"essay {i} of batch {seed}. " * 20,
            "mock_quality": float(q[i]),
        }
        if i % 8 == 0:  # 13 anchors of 100, every grade
            row["anchor_grade"] = grades[int(np.searchsorted(cut, q[i]))]
        rows.append(row)
    return BatchIn.model_validate({"essays": rows})


async def redis_cpu_s(r: Any) -> float:
    """The Redis server's CPU seconds (user + system) so far, from `INFO cpu`."""
    info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _commandstats(r: Any) -> dict[str, tuple[int, int]]:
    """Calls and microseconds per command (INFO commandstats; EVALSHA's include its
    scripts' commands, which are also counted on their own)."""
    info = await r.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for k, v in info.items()
        if k.startswith("cmdstat_")
    }


async def _submit_and_wait(
    url: str, keys: Keys, batches: int, essays: int, seed: int
) -> tuple[list[str], list[float], float, float, dict[str, tuple[int, int]]]:
    r = aioredis.from_url(url)
    regs = []
    for b in range(batches):
        batch = _essays(essays, seed + b)
        name, grades = scale_of(batch)
        reg = build_registration(batch, name, grades, seed=seed + b, batch_id=f"lat-{b}")
        regs.append(reg)
    cpu0 = await redis_cpu_s(r)
    stats0 = await _commandstats(r)
    started = time.perf_counter()
    for reg in regs:
        await append_registration(r, keys, reg)
        await advance(r, keys, reg.batch_id)
    ends: dict[str, float] = {}
    while len(ends) < len(regs):
        # The status alone: loading whole batch states 50 times a second made a large share
        # of the Redis CPU measured (the bench's, not the pipeline's).
        for reg in regs:
            if reg.batch_id in ends:
                continue
            status = await r.hget(pkeys.batch(keys.for_batch(reg.batch_id), reg.batch_id), "status")
            if status in (b"finalized", b"failed"):
                ends[reg.batch_id] = time.perf_counter() - started
        await asyncio.sleep(0.02)
    wall = max(ends.values())
    cpu = await redis_cpu_s(r) - cpu0
    stats = {
        name: (calls - stats0.get(name, (0, 0))[0], usec - stats0.get(name, (0, 0))[1])
        for name, (calls, usec) in (await _commandstats(r)).items()
    }
    await r.aclose()
    ids = [reg.batch_id for reg in regs]
    return ids, [ends[reg.batch_id] for reg in regs], wall, cpu, stats


async def _count(url: str, keys: Keys, ids: list[str], t0: float, t1: float) -> dict[str, Any]:
    """Comparisons, waves, calls and 429s from the streams; steady state: calls between t0
    and t1 (epoch seconds)."""
    r = aioredis.from_url(url)
    comparisons = 0
    waves: list[int] = []
    sizes: list[list[int]] = []
    for batch_id in ids:
        state = await load_state(r, keys, batch_id)
        assert state is not None and state.terminal, batch_id
        comparisons += state.accepted
        waves.append(state.waves)
    per_batch: dict[str, list[int]] = {b: [] for b in ids}
    # Entry times (ms) of each batch's waves and callbacks: how long CJ took from the last
    # callback it had to the next wave (apply, load, score, plan, append).
    wave_ms: dict[str, list[int]] = {b: [] for b in ids}
    callback_ms: dict[str, list[int]] = {b: [] for b in ids}
    calls = limited = steady = steady_limited = 0
    for stream in (keys.batches, keys.dispatches, keys.callbacks):
        last = "-"
        while True:
            # A client without decode_responses: ids and fields are bytes.
            page = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                await r.xrange(stream, min=last, max="+", count=2000),
            )
            if last != "-":
                page = page[1:]
            if not page:
                break
            for entry_id, fields in page:
                try:
                    event = codec.decode(fields, entry_id.decode())
                except codec.DecodeError:
                    continue
                ms = int(entry_id.split(b"-")[0])
                if isinstance(event, WaveSubmitted) and event.batch_id in per_batch:
                    per_batch[event.batch_id].append(len(event.pairs))
                    wave_ms[event.batch_id].append(ms)
                if isinstance(event, ComparisonCompleted) and event.batch_id in per_batch:
                    callback_ms[event.batch_id].append(ms)
                if not isinstance(event, ProviderAttemptFailed | ComparisonCompleted):
                    continue
                hit = isinstance(event, ProviderAttemptFailed) and (
                    event.error.error_type == "rate_limit"
                )
                at = datetime.fromisoformat(event.occurred_at).timestamp()
                calls += 1
                limited += hit
                if t0 <= at <= t1:
                    steady += 1
                    steady_limited += hit
            last = page[-1][0].decode()
    sizes = [per_batch[b] for b in ids]
    gaps = []
    for b in ids:
        backs = sorted(callback_ms[b])
        for at in wave_ms[b][1:]:
            before = [t for t in backs if t <= at]
            if before:
                gaps.append(at - before[-1])
    await r.aclose()
    return {
        "comparisons": comparisons,
        "waves": waves,
        "sizes": sizes,
        "calls": calls,
        "limited": limited,
        "steady": steady,
        "steady_limited": steady_limited,
        "decision_ms": statistics.median(gaps) if gaps else 0.0,
    }


def run(
    url: str,
    label: str,
    *,
    workers: int,
    batches: int,
    essays: int,
    overlap: float,
    env: dict[str, str],
    options: dict[str, Any],
    seed: int = 11,
    pin: bool = False,
) -> Run:
    keys = Keys(f"lat{uuid.uuid4().hex[:6]}:")
    tmp = tempfile.mkdtemp()
    stop = os.path.join(tmp, "stop")
    outs = [os.path.join(tmp, f"w{i}") for i in range(workers)]
    ctx = mp.get_context("spawn")
    opts = {**options, "wave_overlap": overlap}
    procs = [
        ctx.Process(
            target=_worker,
            args=(url, keys.prefix, env, opts, stop, outs[i], i + 1 if pin else None),
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    while not all(os.path.exists(o + ".ready") for o in outs):  # imported and started
        time.sleep(0.1)  # waiting for other processes: nothing to await here
    time.sleep(1.0)  # their consumer groups made, their first reads blocking
    epoch0 = time.time()
    idle0, total0 = _machine_idle()
    ids, ends, wall, redis_cpu, commands = asyncio.run(
        _submit_and_wait(url, keys, batches, essays, seed)
    )
    idle1, total1 = _machine_idle()
    Path(stop).touch()
    for p in procs:
        p.join(60)
    results = [json.loads(Path(o).read_text()) for o in outs if os.path.exists(o)]
    cpu = sum(x["cpu_s"] for x in results)
    sums = {k: sum(x.get(k, 0.0) for x in results) for k in results[0] if k != "cpu_s"}
    steps = {k: v for k, v in sums.items() if not k.endswith("_cpu_s")}
    threads = {k[: -len("_cpu_s")]: v for k, v in sums.items() if k.endswith("_cpu_s")}
    counts = asyncio.run(_count(url, keys, ids, epoch0 + 0.1 * wall, epoch0 + 0.9 * wall))
    shutil.rmtree(tmp, ignore_errors=True)
    return Run(
        label=label,
        overlap=overlap,
        batches=batches,
        comparisons=counts["comparisons"],
        wall_s=wall,
        ends_s=ends,
        waves=counts["waves"],
        wave_sizes=counts["sizes"],
        calls=counts["calls"],
        rate_limited=counts["limited"],
        steady_calls=counts["steady"],
        steady_rate_limited=counts["steady_limited"],
        worker_cpu_s=cpu,
        process_cpu_s=[x["cpu_s"] for x in results],
        machine_idle=(idle1 - idle0) / max(1, total1 - total0),
        redis_cpu_s=redis_cpu,
        decision_ms=counts["decision_ms"],
        steps=steps,
        thread_cpu_s=threads,
        commands=commands,
    )


# --- the reference --------------------------------------------------------------------------


def _pin_to_core_0(server: RedisServer) -> None:
    """Redis (all its threads) and this process on CPU 0, for `--pin`."""
    assert server.proc is not None
    subprocess.run(["taskset", "-a", "-cp", "0", str(server.proc.pid)], check=True, stdout=-3)
    os.sched_setaffinity(0, {0})


def _unpin(server: RedisServer) -> None:
    assert server.proc is not None
    every = f"0-{(os.cpu_count() or 1) - 1}"
    subprocess.run(["taskset", "-a", "-cp", every, str(server.proc.pid)], check=True, stdout=-3)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def xadd_reference(port: int, n: int) -> float:
    """redis-benchmark's plain XADD rate: 50 clients, no pipelining."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("redis-benchmark not found")
    out = subprocess.run(
        [binary, "-p", str(port), "-c", "50", "-n", str(n), "-P", "1", "--csv", *XADD],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # "test","rps",...: the first number of the last line is requests per second.
    line = [ln for ln in out.splitlines() if ln.strip()][-1]
    return float(re.findall(r'"([0-9.]+)"', line)[0])


# --- the bound --------------------------------------------------------------------------------


def critical_path(
    profile: MockProfile, sizes: list[int], overlap: float, rpm: float, samples: int = 300
) -> float:
    """Seconds a batch cannot go below at this limit, whatever CJ does: per wave, the time
    until the share it waits for is back (the overlap share; without overlap all of it),
    its m calls granted one per 60/rpm seconds and each taking a lognormal latency
    (Monte Carlo mean). The decisions between waves take no time here."""
    sigma = math.log(profile.latency_p99_ms / profile.latency_median_ms) / 2.3263478740408408
    median = profile.latency_median_ms / 1000.0
    rng = np.random.default_rng(5)
    total = 0.0
    for m in sizes:
        grants = np.arange(m) * 60.0 / rpm
        back = np.sort(grants + median * np.exp(sigma * rng.standard_normal((samples, m))), axis=1)
        k = max(1, math.ceil(overlap * m)) if overlap < 1.0 else m
        total += float(back[:, k - 1].mean())
    return total


def _row(r: Run, profile: MockProfile, rpm: float, scale: float, single: bool) -> dict[str, Any]:
    median = profile.latency_median_ms / 1000.0
    bound = r.comparisons / (rpm / 60.0) + median
    path = max(critical_path(profile, s, r.overlap, rpm) for s in r.wave_sizes) if single else 0.0
    target = max(2.0 * bound, path) if single else 1.25 * bound
    return {
        "run": r.label,
        "scale": scale,
        "limit_rpm": rpm,
        "latency_median_s": median,
        "latency_p99_s": profile.latency_p99_ms / 1000.0,
        "overlap": r.overlap,
        "batches": r.batches,
        "comparisons": r.comparisons,
        "wall_s": round(r.wall_s, 2),
        "wall_real_equivalent_s": round(r.wall_s * scale, 1),
        "bound_s": round(bound, 2),
        "wall_over_bound": round(r.wall_s / bound, 3),
        "critical_path_s": round(path, 2) if single else None,
        "goal_s": round(target, 2),
        "goal_met": r.wall_s <= target,
        "calls": r.calls,
        "calls_per_comparison": round(r.calls / max(1, r.comparisons), 3),
        "rate_limited_share": round(r.rate_limited / max(1, r.calls), 4),
        "steady_rate_limited_share": round(r.steady_rate_limited / max(1, r.steady_calls), 4),
        "waves": r.waves,
        "comparisons_per_s": round(r.comparisons / r.wall_s, 1),
        "decision_ms_median": r.decision_ms,
    }


def scaled(k: float, rpm: float) -> tuple[MockProfile, dict[str, str]]:
    """The realistic profile with time scaled by k, and the environment that sets it."""
    base = profile_from_env("realistic")
    profile = MockProfile(
        "realistic",
        latency_median_ms=base.latency_median_ms / k,
        latency_p99_ms=base.latency_p99_ms / k,
        rate_limit_rpm=rpm * k,
    )
    env = {
        "CJS_MOCK_PROFILE": "realistic",
        "CJS_MOCK_LATENCY_MEDIAN_MS": repr(profile.latency_median_ms),
        "CJS_MOCK_LATENCY_P99_MS": repr(profile.latency_p99_ms),
        "CJS_MOCK_RATE_LIMIT_RPM": repr(profile.rate_limit_rpm),
    }
    return profile, env


def main() -> None:
    configure(json_logs=False, level="WARNING")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=10.0, help="time scale of the ten-batch runs")
    ap.add_argument("--single-scale", type=float, default=2.0, help="... of the one-batch runs")
    ap.add_argument("--rpm", type=float, default=600.0, help="the limit, before scaling")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--essays", type=int, default=100)
    ap.add_argument("--xadd-requests", type=int, default=200_000)
    ap.add_argument("--only", choices=["cpu", "latency"], default=None)
    ap.add_argument(
        "--zero-overlap", type=float, default=0.8, help="CJS_WAVE_OVERLAP of the zero-latency run"
    )
    ap.add_argument("--overlaps", default="0.8,1.0", help="CJS_WAVE_OVERLAP values to run")
    ap.add_argument("--sizes", default="", help="batches at once to run (default: 1 and --batches)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="zero-latency run with each worker process on a core of its own (CPU 1, 2, ...), "
        "Redis and this script on CPU 0: needs --workers + 1 cores",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    if args.pin and args.workers + 1 > cores:
        ap.error(f"--pin needs --workers + 1 cores; this machine has {cores}")

    server = RedisServer(Path(tempfile.mkdtemp()))
    server.start(aof=False)
    report: dict[str, Any] = {"redis": "redis-server (local, no persistence)"}
    try:
        if args.only in (None, "cpu"):
            before = xadd_reference(server.port, args.xadd_requests)
            if args.pin:
                _pin_to_core_0(server)
            zero = run(
                server.url,
                "zero latency",
                workers=args.workers,
                batches=args.batches,
                essays=args.essays,
                overlap=args.zero_overlap,
                env={"CJS_MOCK_PROFILE": "cj_generic_batch", "CJS_MOCK_LATENCY_MS": "0"},
                options={},
                pin=args.pin,
            )
            if args.pin:
                _unpin(server)
            after = xadd_reference(server.port, args.xadd_requests)
            report["xadd_reference_runs"] = [before, after]
            report["xadd_reference_per_s"] = round((before + after) / 2, 1)
            rate = zero.comparisons / zero.wall_s
            per = (zero.worker_cpu_s + zero.redis_cpu_s) / zero.comparisons
            workers_ms = 1000 * zero.worker_cpu_s / zero.comparisons
            redis_ms = 1000 * zero.redis_cpu_s / zero.comparisons
            report["zero_latency"] = {
                "workers": args.workers,
                "pinned": args.pin,
                "batches": args.batches,
                "overlap": args.zero_overlap,
                "comparisons": zero.comparisons,
                "wall_s": round(zero.wall_s, 2),
                "comparisons_per_s": round(rate, 1),
                "share_of_xadd_rate": round(rate / report["xadd_reference_per_s"], 4),
                # What the 5 % goal asks of the CPU: every core busy, workers and Redis
                # together may spend this much a comparison at 5 % of this XADD rate.
                "cpu_ms_per_comparison_for_5_percent": round(
                    1000 * (os.cpu_count() or 1) / (0.05 * report["xadd_reference_per_s"]), 3
                ),
                "cpu_ms_per_comparison": round(1000 * per, 3),
                "worker_cpu_ms_per_comparison": round(workers_ms, 3),
                "redis_cpu_ms_per_comparison": round(redis_ms, 3),
                # The workers' share by thread (Linux): the event loop's, and the decisions'.
                "thread_cpu_ms_per_comparison": {
                    k: round(1000 * v / zero.comparisons, 3) for k, v in zero.thread_cpu_s.items()
                },
                "waves": zero.waves,
                # Each process's CPU seconds and Redis's over the wall time (1.0: a core kept
                # busy), and when each batch ended: where the run waits rather than works.
                "process_cpu_utilisation": [round(c / zero.wall_s, 3) for c in zero.process_cpu_s],
                "redis_cpu_utilisation": round(zero.redis_cpu_s / zero.wall_s, 3),
                "machine_idle_share": round(zero.machine_idle, 3),
                "batch_ends_s": [round(t, 2) for t in zero.ends_s],
                # Wall time of the CJ steps (BT fit and scores, planning, applying pages of
                # callbacks), summed over the processes: where the workers' time goes.
                "cj_steps_ms_per_comparison": {
                    k[:-2]: round(1000 * v / zero.comparisons, 3)
                    for k, v in zero.steps.items()
                    if k.endswith("_s")
                },
                "cj_steps_count": {k[:-2]: v for k, v in zero.steps.items() if k.endswith("_n")},
                # Redis commands per comparison (scripts' own commands counted inside them
                # too), and their server time: what the Redis share is made of.
                "redis_commands_per_comparison": {
                    name: round(calls / zero.comparisons, 2)
                    for name, (calls, _) in sorted(zero.commands.items(), key=lambda x: -x[1][0])
                    if calls / zero.comparisons >= 0.05
                },
                "redis_usec_per_comparison": {
                    name: round(usec / zero.comparisons, 1)
                    for name, (_, usec) in sorted(zero.commands.items(), key=lambda x: -x[1][1])
                    if usec / zero.comparisons >= 1
                },
            }
        if args.only in (None, "latency"):
            rows = []
            sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [1, args.batches]
            for overlap in (float(x) for x in args.overlaps.split(",")):
                for batches in sizes:
                    # One batch at a milder scale: CJ's own time per wave does not scale
                    # with the latencies, and would weigh ten times too much at 10.
                    k = args.single_scale if batches == 1 else args.scale
                    profile, env = scaled(k, args.rpm)
                    label = f"{batches} batch{'es' if batches > 1 else ''}, overlap {overlap}"
                    r = run(
                        server.url,
                        label,
                        workers=args.workers,
                        batches=batches,
                        essays=args.essays,
                        overlap=overlap,
                        env=env,
                        options={"lps_rate_limit_rpm": profile.rate_limit_rpm},
                    )
                    rows.append(_row(r, profile, profile.rate_limit_rpm, k, single=batches == 1))
            report["realistic"] = {
                "limit_rpm_real": args.rpm,
                "workers": args.workers,
                "runs": rows,
            }
    finally:
        server.stop()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    _print(report)


def _print(report: dict[str, Any]) -> None:
    print(report["redis"])
    if "zero_latency" in report:
        z = report["zero_latency"]
        print(
            f"redis-benchmark XADD (50 clients, no pipelining): "
            f"{report['xadd_reference_per_s']:,.0f}/s (mean of "
            + " and ".join(f"{x:,.0f}" for x in report["xadd_reference_runs"])
            + ", before and after)"
        )
        pinned = ", each on a core of its own (Redis on another)" if z["pinned"] else ""
        print(
            f"zero latency, {z['workers']} processes{pinned}, {z['batches']} batches: "
            f"{z['comparisons_per_s']:,.0f} comparisons/s ({z['comparisons']} in {z['wall_s']} s) "
            f"= {100 * z['share_of_xadd_rate']:.2f} % of the XADD rate (goal >= 5 %)"
        )
        print(
            f"CPU per comparison: {z['cpu_ms_per_comparison']} ms (workers "
            f"{z['worker_cpu_ms_per_comparison']} ms + Redis {z['redis_cpu_ms_per_comparison']} ms;"
            " goal <= 0.5 ms)"
        )
        print(
            f"  5 % of this XADD rate with all {os.cpu_count()} cores busy: <= "
            f"{z['cpu_ms_per_comparison_for_5_percent']} ms of CPU per comparison"
        )
        if z["thread_cpu_ms_per_comparison"]:
            print(f"  of which by thread (ms): {z['thread_cpu_ms_per_comparison']}")
        print(
            f"  of which CJ steps (wall, per comparison, ms): {z['cj_steps_ms_per_comparison']} "
            f"(counts {z['cj_steps_count']})"
        )
        print(
            f"  CPU / wall per process: {z['process_cpu_utilisation']}, Redis "
            f"{z['redis_cpu_utilisation']}; machine idle {100 * z['machine_idle_share']:.1f} %; "
            f"batches ended at {z['batch_ends_s']} s"
        )
        print(f"  Redis commands per comparison: {z['redis_commands_per_comparison']}")
        print(f"  Redis µs per comparison: {z['redis_usec_per_comparison']}")
    if "realistic" in report:
        rl = report["realistic"]
        print(
            f"\nrealistic profile (lognormal latency, median 1.5 s, p99 12 s; limit "
            f"{rl['limit_rpm_real']:,.0f}/min), time scaled by the run's scale: latencies divided "
            f"by it, the limit multiplied; {rl['workers']} worker processes, the limiter "
            "configured to the limit. (real): wall time x scale"
        )
        head = (
            f"{'run':<26} {'scale':>5} {'comps':>6} {'wall s':>7} {'(real)':>7} {'bound s':>8} "
            f"{'wall/bound':>10} {'crit s':>7} {'goal':>5} {'429 %':>6} {'steady':>6} "
            f"{'calls/c':>7} {'waves':>9} {'decide ms':>9}"
        )
        print(head)
        for row in rl["runs"]:
            crit = f"{row['critical_path_s']:.1f}" if row["critical_path_s"] is not None else "-"
            waves = row["waves"]
            wv = str(waves[0]) if len(waves) == 1 else f"{min(waves)}-{max(waves)}"
            print(
                f"{row['run']:<26} {row['scale']:>5g} {row['comparisons']:>6} "
                f"{row['wall_s']:>7.1f} "
                f"{row['wall_real_equivalent_s']:>7.0f} {row['bound_s']:>8.1f} "
                f"{row['wall_over_bound']:>10.2f} {crit:>7} "
                f"{'met' if row['goal_met'] else 'no':>5} "
                f"{100 * row['rate_limited_share']:>6.2f} "
                f"{100 * row['steady_rate_limited_share']:>6.2f} "
                f"{row['calls_per_comparison']:>7.3f} {wv:>9} {row['decision_ms_median']:>9.0f}"
            )
        print(
            "goal: ten batches <= 1.25 x bound; one batch <= max(2 x bound, critical path); "
            "429 share <= 2 % at steady state (the middle 80 % of a run); decide ms: median time "
            "from the last callback CJ had to the next wave"
        )


if __name__ == "__main__":
    main()
