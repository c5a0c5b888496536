"""Redis answers in bytes or str depending on the client's `decode_responses`; this reads either."""

from __future__ import annotations


def as_str(value: bytes | str) -> str:
    """Text of a Redis reply value; undecodable bytes become U+FFFD rather than an error, so a
    malformed entry can still be reported."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value
