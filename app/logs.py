"""structlog set-up: JSON lines for workers, readable lines on a terminal.

Never log essay text or keys: every string of every line goes through `events.redact.scrub`
(URL passwords, API keys and tokens, whatever their case). An exception logged with
`log.exception` (or `exc_info=`) is written as its traceback text, in JSON lines too."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from app.env_names import warn_unknown
from events.redact import scrub_value


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written (not when logging was configured), so
    a replaced or closed stream (test captures, click's runner) never swallows or breaks logs."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def error_text(exc: BaseException | None) -> str:
    """An error for a log line: its class and its text (`repr` of some errors, redis's among
    them, is only `module:Class`)."""
    if exc is None:
        return ""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _scrub(_logger: object, _method: str, event_dict: structlog.typing.EventDict) -> Any:
    return scrub_value(event_dict)


def json_lines(log_format: str, *, auto: bool) -> bool:
    """Whether log lines are JSON: as CJS_LOG_FORMAT (`Settings.log_format`) says, `json` or
    `console`; `auto` leaves it to the caller's default (workers JSON, for a log shipper; a
    command JSON unless its stderr is a terminal)."""
    return auto if log_format == "auto" else log_format == "json"


def start(log_format: str, *, auto: bool, level: str = "INFO") -> None:
    """Logging of a process that starts (a worker, the dashboard, a command): JSON lines or
    not by `json_lines`, at `level`; first, whatever that level, a warning for each misspelt
    `CJS_*` setting (app/env_names.py)."""
    json_logs = json_lines(log_format, auto=auto)
    configure(json_logs=json_logs, level="WARNING")
    warn_unknown()
    configure(json_logs=json_logs, level=level)


def configure(*, json_logs: bool | None = None, level: str = "INFO") -> None:
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    # A logged exception's traceback becomes text (`exception`) before anything is written, in
    # JSON lines and on a terminal alike, so the scrubber sees it too.
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
