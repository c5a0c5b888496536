"""Logs: structured JSON lines that carry batch and correlation ids, never essay text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from app.logs import configure
from app.settings import Settings
from app.wiring import InProcess
from cj.continuation import advance
from cj.registration import BatchIn, append_registration, build_registration, scale_of
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
