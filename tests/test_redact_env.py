"""The secret environment variables `scrub_struct` and `scrub` mask are read again whenever
they change (events/redact.py keeps them between calls, issue 11)."""

from __future__ import annotations

import os

import pytest

from events.redact import REDACTED, scrub, scrub_struct
from events.types import ErrorDetail


def _detail(message: str) -> ErrorDetail:
    return ErrorDetail(error_type="server_error", retryable=True, message=message)


def test_a_changed_secret_is_masked_at_the_next_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    plain = _detail("echoed Zq7-first-value and Zq7-second-value")
    assert scrub_struct(plain) is plain  # nothing secret yet: the same object

    monkeypatch.setenv("ANTHROPIC_API_KEY", "Zq7-first-value")
    assert scrub_struct(plain).message == f"echoed {REDACTED} and Zq7-second-value"

    os.environ["ANTHROPIC_API_KEY"] = "zq7-SECOND-value"  # another value, any case
    assert scrub_struct(plain).message == f"echoed Zq7-first-value and {REDACTED}"
    assert scrub("zq7-second-VALUE") == REDACTED

    del os.environ["ANTHROPIC_API_KEY"]
    assert scrub_struct(plain) is plain


@pytest.mark.parametrize("name", ["ANTHROPIC_AUTH_TOKEN", "REDIS_PASSWORD"])
def test_every_secret_variable_counts(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    detail = _detail("password was Hunter2-long")
    monkeypatch.setenv(name, "Hunter2-long")
    assert "Hunter2-long" not in scrub_struct(detail).message
    monkeypatch.setenv(name, "short")  # under 6 characters: not treated as a secret
    assert scrub("a short story") == "a short story"
