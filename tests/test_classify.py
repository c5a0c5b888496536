"""Classification of provider failures: the table, Retry-After parsing, scrubbing."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest

from lps.classify import (
    MAX_MESSAGE_CHARS,
    classify_response,
    classify_stop_reason,
    parse_error,
    parse_retry_after,
    scrub,
)


def body(etype: str, message: str = "m", error_code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": etype, "message": message}
    if error_code is not None:
        error["details"] = {"error_code": error_code}
    return {"type": "error", "error": error}


@pytest.mark.parametrize(
    ("status", "etype", "expected", "retryable"),
    [
        (429, "rate_limit_error", "rate_limit", True),
        (529, "overloaded_error", "overloaded", True),
        (500, "api_error", "server_error", True),
        (502, "api_error", "server_error", True),
        (503, "api_error", "server_error", True),
        (504, "timeout_error", "timeout", True),
        (408, "timeout_error", "timeout", True),
        (400, "invalid_request_error", "invalid_request", False),
        (401, "authentication_error", "authentication", False),
        (402, "billing_error", "billing", False),
        (403, "permission_error", "permission", False),
        (404, "not_found_error", "invalid_request", False),
        (413, "request_too_large", "request_too_large", False),
        (422, "invalid_request_error", "invalid_request", False),
        (409, "conflict_error", "server_error", True),
        # the body's error.type decides where the status is generic or missing
        (500, "overloaded_error", "overloaded", True),
        (529, "api_error", "overloaded", True),
        (599, "weird_error", "server_error", True),
        (418, "weird_error", "invalid_request", False),
        (None, "invalid_request_error", "invalid_request", False),
        (None, "api_error", "server_error", True),
        (None, "overloaded_error", "overloaded", True),
    ],
)
def test_status_and_body_type_table(
    status: int | None, etype: str, expected: str, retryable: bool
) -> None:
    d = classify_response(status, body(etype), {}, model="m1", correlation_id="c1")
    assert (d.error_type, d.retryable, d.status_code) == (expected, retryable, status)
    assert (d.provider, d.model, d.correlation_id) == ("anthropic", "m1", "c1")


def test_rate_limit_carries_retry_after_ms_before_retry_after() -> None:
    d = classify_response(
        429, body("rate_limit_error"), {"retry-after": "7", "retry-after-ms": "1500"}
    )
    assert d.retry_after_s == 1.5
    d = classify_response(429, body("rate_limit_error"), {"Retry-After": "7"})
    assert d.retry_after_s == 7.0


@pytest.mark.parametrize("code", ["enforced_spend_limit_reached", "contract_spend_limit_reached"])
def test_spend_limit_429_is_not_retryable(code: str) -> None:
    d = classify_response(429, body("rate_limit_error", "limit", code), {"retry-after": "30"})
    assert (d.error_type, d.retryable, d.retry_after_s) == ("rate_limit", False, None)
    assert code in d.message


def test_spend_limit_recognised_by_wording_when_no_code_and_no_retry_after() -> None:
    d = classify_response(
        429, body("rate_limit_error", "You have hit your monthly spend limit"), {}
    )
    assert not d.retryable
    # with a retry-after, the server means "wait": retryable
    d = classify_response(
        429, body("rate_limit_error", "workspace spend limit"), {"retry-after": "5"}
    )
    assert d.retryable and d.retry_after_s == 5.0


def test_ramp_limit_429_is_retryable() -> None:
    d = classify_response(
        429, body("rate_limit_error", "ramp", "ramp_limit_exceeded"), {"retry-after": "2"}
    )
    assert d.retryable and d.retry_after_s == 2.0


def test_unparseable_body_falls_back_to_status() -> None:
    d = classify_response(502, "<html>Bad gateway</html>", {})
    assert (d.error_type, d.retryable) == ("server_error", True)
    assert "Bad gateway" in d.message
    d = classify_response(400, None, {})
    assert d.error_type == "invalid_request"


def test_message_names_status_type_code_and_request_id() -> None:
    d = classify_response(
        429, body("rate_limit_error", "slow down", "x_code"), {"request-id": "req_1"}
    )
    assert d.message == "HTTP 429 rate_limit_error/x_code: slow down (request_id req_1)"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "nan"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after({"retry-after": header}, now=now) == pytest.approx(42.0)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0.0


def test_stop_reasons() -> None:
    mt = classify_stop_reason("max_tokens", model="m", correlation_id="c")
    assert mt is not None and (mt.error_type, mt.retryable) == ("max_tokens", False)
    ref = classify_stop_reason("refusal")
    assert ref is not None and (ref.error_type, ref.retryable) == ("refusal", False)
    cw = classify_stop_reason("model_context_window_exceeded")
    assert cw is not None and cw.error_type == "max_tokens"
    assert classify_stop_reason("tool_use") is None
    assert classify_stop_reason("end_turn") is None
    assert classify_stop_reason(None) is None


def test_parse_error_is_retryable() -> None:
    d = parse_error("bad input", correlation_id="c")
    assert (d.error_type, d.retryable, d.status_code) == ("parse_error", True, 200)


def test_scrub_removes_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "my-custom-key-123456")
    text = (
        "key my-custom-key-123456 and sk-ant-api03-AbC_d-9 and "
        "Authorization: Bearer abcdefghijklmnop and x-api-key: zzz-secret"
    )
    out = scrub(text, ["explicit-secret"])
    assert "my-custom-key-123456" not in out
    assert "sk-ant-api03" not in out
    assert "abcdefghijklmnop" not in out
    assert "zzz-secret" not in out
    assert scrub("explicit-secret here", ["explicit-secret"]) == "[REDACTED] here"


def test_scrub_truncates() -> None:
    assert len(scrub("x" * 5000)) == MAX_MESSAGE_CHARS


def test_classified_message_never_contains_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-value-42")
    d = classify_response(401, body("authentication_error", "invalid key sk-ant-secret-value-42"))
    assert "sk-ant-secret-value-42" not in d.message
    assert d.error_type == "authentication"


@pytest.mark.parametrize(
    ("status", "etype", "header", "retryable"),
    [
        (400, "invalid_request_error", "true", True),  # the server says retry: we retry
        (401, "authentication_error", "true", True),
        (500, "api_error", "false", False),  # the server says don't: we don't
        (529, "overloaded_error", "false", False),
        (429, "rate_limit_error", "false", False),
        (500, "api_error", "maybe", True),  # anything else: the table decides
    ],
)
def test_x_should_retry_is_obeyed_as_the_sdk_does(
    status: int, etype: str, header: str, retryable: bool
) -> None:
    d = classify_response(status, body(etype), {"X-Should-Retry": header, "retry-after": "2"})
    assert d.retryable is retryable
    assert d.retry_after_s == (2.0 if retryable else None)


def test_spend_limit_is_its_own_failure_kind() -> None:
    from events.types import failure_kind

    coded = classify_response(429, body("rate_limit_error", "cap", "enforced_spend_limit_reached"))
    worded = classify_response(429, body("rate_limit_error", "You reached your spend limit"))
    plain = classify_response(429, body("rate_limit_error", "slow down"), {"retry-after": "1"})
    assert coded.error_code == "enforced_spend_limit_reached" and worded.error_code == "spend_limit"
    assert [failure_kind(d) for d in (coded, worded, plain)] == [
        "spend_limit",
        "spend_limit",
        "rate_limit",
    ]
