"""Metrics a worker serves: bounded series, the durations and waits, the build, no `*_created`."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from typing import Any

from prometheus_client import REGISTRY, enable_created_metrics

from app import metrics as app_metrics
from app.settings import Settings
from app.wiring import InProcess, cj_consumer
from cj.continuation import advance
from cj.metrics import CJ_COMPLETION, show_completion
from cj.registration import append_registration
from events.types import ErrorDetail
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from lps.retry import record_attempt_failed
from projections.store import load_state
from streams.keys import Keys
from tests.helpers import registration


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def completion_series() -> set[str]:
    return {s.labels["batch_id"] for m in CJ_COMPLETION.collect() for s in m.samples if s.labels}


async def test_a_batch_leaves_durations_and_waits_and_no_completion_series(
    fake_redis: Any, keys: Keys
) -> None:
    before = {
        step: value("cj_step_duration_seconds_count", step=step)
        for step in ("apply", "score", "plan")
    }
    waits = value("stream_queue_wait_seconds_count", stream="lps:requests", group="lps")
    ended = value("cj_batch_duration_seconds_count", reason="budget")
    reg = registration(6, batch_id="metered", budget=8)
    await append_registration(fake_redis, keys, reg)
    runner = InProcess(
        fake_redis,
        keys,
        Settings(retry_base_delay_s=0.0, block_ms=20),
        lambda name: make_provider(name, mock_profile=PROFILES["ideal"]),
    )
    runner.start()
    await advance(fake_redis, keys, reg.batch_id)
    assert "metered" in completion_series()  # open: shown
    try:
        for _ in range(2000):
            runner.check()
            state = await load_state(fake_redis, keys, reg.batch_id)
            if state is not None and state.terminal:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.close()
    assert state is not None and state.finalize_reason == "budget"
    assert "metered" not in completion_series()  # ended: gone
    for step, count in before.items():
        assert value("cj_step_duration_seconds_count", step=step) > count, step
    assert value("stream_queue_wait_seconds_count", stream="lps:requests", group="lps") > waits
    assert value("cj_batch_duration_seconds_count", reason="budget") == ended + 1


async def test_the_sweep_counts_open_batches_and_drops_series_of_ended_ones(
    fake_redis: Any, keys: Keys
) -> None:
    show_completion("ended-elsewhere", 0.5)  # set by this process, ended by another
    for i in range(2):
        reg = registration(4, batch_id=f"open-{i}")
        await append_registration(fake_redis, keys, reg)
    consumer = cj_consumer(fake_redis, keys, Settings(), "sweeper")
    await consumer.start()
    await consumer.sweep()
    assert value("cj_open_batches") == 2
    assert {"open-0", "open-1"} <= completion_series()
    assert "ended-elsewhere" not in completion_series()


def test_retries_carry_the_model() -> None:
    detail = ErrorDetail(
        error_type="overloaded", retryable=True, provider="p", model="m1", message="529"
    )
    before = value("lps_retries_total", provider="p", model="m1", error_type="overloaded")
    record_attempt_failed(detail, True)
    after = value("lps_retries_total", provider="p", model="m1", error_type="overloaded")
    assert after == before + 1


def test_the_endpoint_has_the_build_the_new_gauge_and_no_created_series() -> None:
    from streams.metrics import set_pending

    set_pending("lps:requests", "lps", 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        app_metrics.serve(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]
    assert 'cjs_build_info{python="' in text and "version=" in text
    assert 'stream_pending_entries{group="lps",stream="lps:requests"} 3.0' in text
    assert 'lps_pending_entries{group="lps",stream="lps:requests"} 3.0' in text  # deprecated
    assert "_created" not in text


async def test_reconnects_count_outages_not_attempts(fake_redis: Any, keys: Keys) -> None:
    from streams.reader import GroupReader
    from streams.resilience import Backoff, wait_for_redis

    reader = GroupReader(fake_redis, keys.callbacks, "g-metrics", "c", count=1, block_ms=1)
    backoff = Backoff(base=0.001, cap=0.002)
    stop = asyncio.Event()
    before = value("redis_reconnects_total", group="g-metrics")
    for _ in range(3):  # one outage, three attempts
        await wait_for_redis(stop, backoff, ConnectionError("down"), reader, "c")
    backoff.reset()  # a success
    await wait_for_redis(stop, backoff, ConnectionError("down again"), reader, "c")
    assert value("redis_reconnects_total", group="g-metrics") == before + 2
