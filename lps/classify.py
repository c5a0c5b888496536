"""Provider failures → `ErrorDetail`, by HTTP status and the body's `error.type`.

Never by SDK exception class: the SDK maps statuses to classes, but the class
hierarchy (and which statuses it knows) changes between SDK versions, while the
wire format (status, `error.type`, `error.details.error_code`, `retry-after-ms` /
`retry-after`) is the API's contract. Only failures that have no HTTP response
(timeouts, refused or dropped connections) are told apart by the exception.

The server's `x-should-retry: true|false` header, when present, decides whether an error
is retryable, as it does in the SDK's own retry logic (`_should_retry`).

Every message that leaves this module is scrubbed of credentials and truncated.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict, Unpack

import anthropic

from events import redact
from events.types import SPEND_LIMIT_CODES, ErrorDetail, ErrorType

MAX_MESSAGE_CHARS = 500

# A 429 whose `error.details.error_code` is in SPEND_LIMIT_CODES (the monthly tier cap, a
# contract cap) is not fixed by waiting soon: retrying only burns attempts.
_SPEND_LIMIT_WORDS = re.compile(r"spend(ing)?[ _-]limit|usage limit", re.IGNORECASE)

# Statuses whose meaning does not depend on the body.
_BY_STATUS: dict[int, tuple[ErrorType, bool]] = {
    400: ("invalid_request", False),
    401: ("authentication", False),
    402: ("billing", False),
    403: ("permission", False),
    404: ("invalid_request", False),
    408: ("timeout", True),
    409: ("server_error", True),
    413: ("request_too_large", False),
    422: ("invalid_request", False),
    500: ("server_error", True),
    502: ("server_error", True),
    503: ("server_error", True),
    504: ("timeout", True),
}

# `error.type` of the body, for statuses not in the table above (or absent: batch results).
_BY_BODY_TYPE: dict[str, tuple[ErrorType, bool]] = {
    "invalid_request_error": ("invalid_request", False),
    "not_found_error": ("invalid_request", False),
    "authentication_error": ("authentication", False),
    "permission_error": ("permission", False),
    "billing_error": ("billing", False),
    "request_too_large": ("request_too_large", False),
    "timeout_error": ("timeout", True),
    "api_error": ("server_error", True),
    "conflict_error": ("server_error", True),
}

# Stop reasons that end a comparison without a usable tool call.
_BY_STOP_REASON: dict[str, tuple[ErrorType, bool]] = {
    "max_tokens": ("max_tokens", False),
    "model_context_window_exceeded": ("max_tokens", False),
    "refusal": ("refusal", False),
}


class Origin(TypedDict, total=False):
    """Where an error came from, named in its ErrorDetail (by default the provider
    `anthropic`, no model, no request), and the secrets its message must not show."""

    provider: str
    model: str
    correlation_id: str
    secrets: Iterable[str]


def _origin(where: Origin) -> tuple[dict[str, Any], Iterable[str]]:
    """The ErrorDetail fields naming where an error came from, and the secrets to scrub."""
    named = {
        "provider": where.get("provider", "anthropic"),
        "model": where.get("model", ""),
        "correlation_id": where.get("correlation_id", ""),
    }
    return named, where.get("secrets", ())


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without credentials (given secrets, env keys, anything key-shaped, whatever
    the case; see `events.redact`), truncated."""
    text = redact.scrub(text, secrets)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `retry-after` (s or HTTP date).

    None when absent or unreadable; never negative.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(raw)
    if parsed is None:
        return None
    when = float(email.utils.mktime_tz(parsed))
    return max(0.0, when - (time.time() if now is None else now))


def _body_error(body: object) -> tuple[str | None, str | None, str | None]:
    """(error.type, error.message, error.details.error_code) of an Anthropic error body."""
    if not isinstance(body, Mapping):
        return None, (body if isinstance(body, str) and body else None), None
    error = body.get("error")
    if not isinstance(error, Mapping):
        return None, None, None
    etype = error.get("type")
    message = error.get("message")
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, Mapping) else None
    return (
        etype if isinstance(etype, str) else None,
        message if isinstance(message, str) else None,
        code if isinstance(code, str) else None,
    )


def classify_response(
    status: int | None,
    body: object,
    headers: Mapping[str, str] | None = None,
    **where: Unpack[Origin],
) -> ErrorDetail:
    """Classify an error response (or an errored batch result, where `status` is None)."""
    origin, secrets = _origin(where)
    headers = headers or {}
    etype, api_message, error_code = _body_error(body)
    retry_after = parse_retry_after(headers)

    error_type: ErrorType
    retryable: bool
    if status == 529 or etype == "overloaded_error":
        error_type, retryable = "overloaded", True
    elif status == 429 or etype == "rate_limit_error":
        error_type = "rate_limit"
        spend_limit = error_code in SPEND_LIMIT_CODES
        if (
            error_code is None
            and retry_after is None
            and bool(api_message and _SPEND_LIMIT_WORDS.search(api_message))
        ):
            spend_limit, error_code = True, "spend_limit"
        retryable = not spend_limit
        if spend_limit:
            retry_after = None
    elif status is not None and status in _BY_STATUS:
        error_type, retryable = _BY_STATUS[status]
    elif etype is not None and etype in _BY_BODY_TYPE:
        error_type, retryable = _BY_BODY_TYPE[etype]
    elif status is not None and status >= 500:
        error_type, retryable = "server_error", True
    elif status is not None and status >= 400:
        error_type, retryable = "invalid_request", False
    else:
        error_type, retryable = "server_error", True
    should_retry = {k.lower(): v for k, v in headers.items()}.get("x-should-retry")
    if should_retry in ("true", "false"):  # the server's word wins, as in the SDK
        retryable = should_retry == "true"

    head = f"HTTP {status}" if status is not None else "batch item errored"
    if etype:
        head += f" {etype}"
    if error_code:
        head += f"/{error_code}"
    text = f"{head}: {api_message}" if api_message else head
    request_id = {k.lower(): v for k, v in headers.items()}.get("request-id")
    if request_id:
        text += f" (request_id {request_id})"
    return ErrorDetail(
        error_type=error_type,
        retryable=retryable,
        message=scrub(text, secrets),
        status_code=status,
        retry_after_s=retry_after if retryable else None,
        error_code=error_code,
        **origin,
    )


def unexpected_error(exc: BaseException, **where: Unpack[Origin]) -> ErrorDetail:
    """Any other failure of an SDK call (an `AnthropicError` that is no API error, such as an
    ended batch without `results_url`; a body the SDK cannot read): retryable, named by its
    class, so that it is counted and retried like a server error and never ends a worker."""
    origin, secrets = _origin(where)
    return ErrorDetail(
        error_type="server_error",
        retryable=True,
        message=scrub(f"{type(exc).__name__}: {exc}", secrets),
        **origin,
    )


def classify_any(exc: BaseException, **where: Unpack[Origin]) -> ErrorDetail:
    """`classify_exception` for API errors, `unexpected_error` for anything else."""
    if isinstance(exc, anthropic.APIError):
        return classify_exception(exc, **where)
    return unexpected_error(exc, **where)


def classify_exception(exc: BaseException, **where: Unpack[Origin]) -> ErrorDetail:
    """Classify an exception raised by an SDK call; TypeError for a non-API exception."""
    if isinstance(exc, anthropic.APIStatusError):
        return classify_response(exc.status_code, exc.body, dict(exc.response.headers), **where)
    common, secrets = _origin(where)
    if isinstance(exc, anthropic.APIResponseValidationError):
        return ErrorDetail(
            error_type="parse_error",
            retryable=True,
            message=scrub(f"HTTP {exc.status_code}: response did not match the schema", secrets),
            status_code=exc.status_code,
            **common,
        )
    if isinstance(exc, anthropic.APITimeoutError):
        return ErrorDetail(
            error_type="timeout",
            retryable=True,
            message="request timed out (no response within the client timeout)",
            **common,
        )
    if isinstance(exc, anthropic.APIConnectionError):
        cause = exc.__cause__
        why = f": {type(cause).__name__}" if cause is not None else ""
        return ErrorDetail(
            error_type="connection",
            retryable=True,
            message=scrub(f"connection error{why}", secrets),
            **common,
        )
    raise TypeError(f"not a provider API error: {type(exc).__name__}") from exc


def classify_stop_reason(stop_reason: str | None, **where: Unpack[Origin]) -> ErrorDetail | None:
    """ErrorDetail for a stop reason leaving no usable answer (max_tokens, refusal), else None."""
    if stop_reason is None or stop_reason not in _BY_STOP_REASON:
        return None
    error_type, retryable = _BY_STOP_REASON[stop_reason]
    return ErrorDetail(
        error_type=error_type,
        retryable=retryable,
        message=f"stop_reason={stop_reason}",
        status_code=200,
        **_origin(where)[0],
    )


def parse_error(
    message: str, *, status_code: int | None = 200, **where: Unpack[Origin]
) -> ErrorDetail:
    """The answer arrived but is not a valid `record_comparison` call.

    Retryable: a forced tool call that came out malformed is a sampling accident, and
    the attempt bound keeps it from looping.
    """
    origin, secrets = _origin(where)
    return ErrorDetail(
        error_type="parse_error",
        retryable=True,
        message=scrub(message, secrets),
        status_code=status_code,
        **origin,
    )
