"""Keeping secrets out of what is written: events, dead letters, logs and command output.

`mask_url` hides the password of a URL (`redis://user:***@host:6379/0`); every place that
shows REDIS_URL or a connection target uses it. `scrub` removes API keys and tokens from
text, case-insensitively: the Anthropic key shape, `Bearer` tokens, `x-api-key` / `api_key` /
`authorization` / `password` assignments, URL passwords, and the values of the secret
environment variables. `scrub_value` applies it to every string of a nested value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec

REDACTED = "[REDACTED]"
SECRET_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "REDIS_PASSWORD")

# scheme://user:password@host -> scheme://user:***@host (also a password without user).
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*:)([^\s@/]+)(@)")
_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&\s]*")
_PATTERNS = (
    (re.compile(r"(?i)\bsk-ant-[a-z0-9_\-]+"), REDACTED),
    (re.compile(r"(?i)(\bbearer\s+)[a-z0-9._\-~+/=]{8,}"), r"\1" + REDACTED),
    (
        re.compile(
            r"(?i)((?:x-api-key|api[_-]?key|auth[_-]?token|authorization|password|passwd|secret)"
            r"['\"]?\s*[:=]\s*['\"]?)(?!bearer\s)[^\s'\",}&]+"
        ),
        r"\1" + REDACTED,
    ),
)
# A cheap test first: most text holds none of these, and is returned as it is.
_SUSPECT = re.compile(
    r"(?i)sk-ant-|bearer|api[_-]?key|auth[_-]?token|authorization|passw|secret|://[^\s/@]*:[^\s@/]+@"
)

# Each of _SUSPECT's alternatives contains one of these (lower case): on ASCII text, where
# lower() is what (?i) means, none of them present rules the regex out without running it.
# The case-insensitive alternation costs tens of µs per event (no literal prefix to skip
# by); this test costs one lower() and a few substring searches.
_SUSPECT_PARTS = ("sk-ant-", "bearer", "api", "auth", "passw", "secret", "://")

T = TypeVar("T")


def mask_url(url: str | None) -> str:
    """`url` with its password (if any) replaced by `***`, user names kept:
    `redis://:***@host:6379/0`; a `password=` query parameter too. A password holding `@`
    or `/` is masked whole (the URL is parsed as a URL first)."""
    if not url:
        return ""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return _URL_PASSWORD.sub(r"\1***\3", url)
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:  # not parseable as a URL (a bad port): mask between // and the last @
        head, sep, tail = url.rpartition("@")
        return f"{head.split('//')[0]}//***@{tail}" if sep else url


class _EnvSecrets:
    """The secret environment variables' values (those of 6 characters or more), and the same
    in lower case, read again only when one of them changed. Every event the LPS writes asks
    (`scrub_struct`): three `os.environ.get` of unset variables (a KeyError inside the
    mapping each) cost ≈ 9 µs, this ≈ 1 µs (issue 11). What is compared is the storage
    `os.environ` reads from (its `_data`), so any change made through `os.environ`
    (monkeypatch, `os.environ[...] = ...`, `del`) is seen at the next call."""

    def __init__(self) -> None:
        self._keys = [os.environ.encodekey(name) for name in SECRET_ENV]
        self._raw: list[object] | None = None
        self.values: list[str] = []
        self.lowered: list[str] = []

    def current(self) -> list[str]:
        """The values now (read again first if the environment changed)."""
        data = getattr(os.environ, "_data", None)
        raw = list(map(data.get, self._keys)) if isinstance(data, dict) else None
        if raw is None or raw != self._raw:
            self._raw = raw
            values = [os.environ.get(name) for name in SECRET_ENV]
            self.values = [v for v in values if v and len(v) >= 6]
            self.lowered = [v.lower() for v in self.values]
        return self.values


_SECRETS = _EnvSecrets()


def _env_secrets() -> list[str]:
    return _SECRETS.current()


def _suspect(text: str, lowered: str) -> bool:
    """Whether `text` (`lowered` is text.lower()) may hold something key-shaped."""
    if text.isascii() and not any(part in lowered for part in _SUSPECT_PARTS):
        return False
    return _SUSPECT.search(text) is not None


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without credentials: the given secrets and the secret environment variables
    (whatever their case), and anything key-shaped."""
    for secret in [*secrets, *_env_secrets()]:
        if secret and secret.lower() in text.lower():
            text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)
    if not _suspect(text, text.lower()):
        return text
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def scrub_value(value: T) -> T:
    """Every string in `value` (nested dicts, lists, tuples) scrubbed."""
    if isinstance(value, str):
        return scrub(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: scrub_value(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list | tuple):
        return type(value)(scrub_value(v) for v in value)
    return value


_encoder = msgspec.json.Encoder()


def scrub_struct(event: T) -> T:
    """`event` (a msgspec Struct) with every string field scrubbed; the same object when
    nothing in it looks like a secret (the common case costs one encode and one search)."""
    raw = _encoder.encode(event).decode(errors="replace")
    lowered = raw.lower()
    _SECRETS.current()
    if not _suspect(raw, lowered) and not any(s in lowered for s in _SECRETS.lowered):
        return event
    builtins = scrub_value(msgspec.to_builtins(event))
    return msgspec.convert(builtins, type(event))
