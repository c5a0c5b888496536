"""Logs: structured JSON lines that carry batch and correlation ids, never essay text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.logs import configure
from app.settings import Settings
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import BatchIn, append_registration, build_registration, scale_of
from events.types import ErrorDetail
from lps.breaker import Breaker
from lps.cooldown import Cooldown
from lps.providers.mock import PROFILES
from lps.providers.registry import make_provider
from projections.store import load_state
from streams.keys import Keys


async def test_worker_logs_are_json_with_ids_and_without_essay_text(
    fake_redis: Any, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = [f"Secret essay body {i} quokka-{i}-marmalade " * 3 for i in range(8)]
    batch = BatchIn.model_validate(
        {"essays": [{"essay_id": f"e{i}", "text": t} for i, t in enumerate(texts)]}
    )
    reg = build_registration(batch, *scale_of(batch), budget=20, batch_id="logged")
    configure(json_logs=True, level="INFO")
    try:
        await append_registration(fake_redis, keys, reg)
        flaky = PROFILES["flaky"]
        runner = InProcess(
            fake_redis,
            keys,
            Settings(retry_base_delay_s=0.0, cooldown_rate_limit_s=0, cooldown_overloaded_s=0),
            lambda name: make_provider(
                name, mock_profile=type(flaky)("flaky", latency_ms=0.0, faults=flaky.faults)
            ),
        )
        runner.start()
        await advance(fake_redis, keys, reg.batch_id)
        for _ in range(1000):
            state = await load_state(fake_redis, keys, reg.batch_id)
            assert state is not None
            if state.terminal:
                break
            await asyncio.sleep(0.01)
        await runner.close()
        runner.check()
        state = await load_state(fake_redis, keys, reg.batch_id)
        assert state is not None and state.terminal, "the batch ran to its end"
    finally:
        configure(json_logs=None, level="WARNING")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    events = {r["event"] for r in records}
    assert {"wave_submitted", "batch_scored", "provider_attempt_failed"} <= events
    for record in records:
        if record["event"] in ("wave_submitted", "batch_scored", "provider_attempt_failed"):
            assert record["batch_id"] == "logged"
        if record["event"] == "provider_attempt_failed":
            assert record["correlation_id"] and record["error_type"]
    text = "\n".join(lines)
    for essay_text in texts:
        assert "quokka" not in text and essay_text[:20] not in text


@pytest.mark.parametrize(
    ("log_format", "tty", "json_lines"),
    [
        ("auto", False, True),  # off a terminal: JSON, as before
        ("auto", True, False),  # a command on a terminal: readable
        ("json", True, True),
        ("console", False, False),
    ],
)
def test_cjs_log_format_chooses_how_a_command_logs(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    log_format: str,
    tty: bool,
    json_lines: bool,
) -> None:
    import structlog

    from tools.common import quiet_logs

    monkeypatch.setenv("CJS_LOG_FORMAT", log_format)
    monkeypatch.setattr("sys.stderr.isatty", lambda: tty)
    try:
        quiet_logs(False)
        structlog.get_logger().warning("format_probe", batch_id="b1")
    finally:
        configure(json_logs=None, level="WARNING")
    [line] = [x for x in capsys.readouterr().err.splitlines() if "format_probe" in x]
    if json_lines:
        assert json.loads(line)["batch_id"] == "b1"
    else:
        assert not line.startswith("{") and "batch_id=b1" in line


def test_a_bad_cjs_log_format_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.errors import ConfigError
    from app.settings import load

    monkeypatch.setenv("CJS_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="CJS_LOG_FORMAT='xml'"):
        load()


async def test_breaker_and_fail_open_lines_are_structured_json(
    fake_redis: Any, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    """The breaker's openings and closings, and the shared state's reads that fail open (Redis
    down), are JSON lines with their fields, as every other line of a worker: they went
    through the standard library's logging, unconfigured, as bare text (and unscrubbed)."""
    detail = ErrorDetail(
        error_type="authentication",
        retryable=False,
        message="HTTP 401 authentication_error: invalid x-api-key",
        provider="anthropic",
        model="m",
        status_code=401,
    )
    dead = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    configure(json_logs=True, level="INFO")
    try:
        breaker = Breaker(fake_redis, keys, probe_after_s=10.0)
        await breaker.open(detail, "anthropic", "m")
        await breaker.close("anthropic")
        assert (
            await Breaker(dead, keys, gate_timeout_s=0.1).admit("anthropic", "m")
        ).rejected is None
        assert await Cooldown(dead, keys).remaining("anthropic", "m") == 0.0
    finally:
        configure(json_logs=None, level="WARNING")
        await dead.aclose()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    by_event = {r["event"]: r for r in records}
    opened = by_event["breaker_opened"]
    assert (opened["provider"], opened["model"]) == ("anthropic", "*")
    assert opened["reason"] == "authentication"
    assert opened["probe_in_s"] == 10.0 and opened["level"] == "warning"
    assert by_event["breaker_closed"]["provider"] == "anthropic"
    for event in ("breaker_read_failed", "cooldown_read_failed"):
        assert by_event[event]["error_kind"] == "ConnectionError"
