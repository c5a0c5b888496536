"""events/clock.py `time_problem` in whole microseconds (issue 11) gives the answers of its
former datetime arithmetic: boundaries of `MAX_AHEAD_S`, offsets, random times."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from events.clock import EARLIEST, MAX_AHEAD_S, entry_time, iso, parse, time_problem


def reference(occurred_at: str, entry_id: str) -> str | None:
    """`time_problem` as it was (session 8)."""
    moment = parse(occurred_at)
    if moment is None:
        return f"occurred_at {occurred_at[:40]!r} is not an ISO-8601 time"
    if moment < EARLIEST:
        return f"occurred_at {occurred_at[:40]} is before {EARLIEST.year}"
    appended = entry_time(entry_id)
    if (moment - appended).total_seconds() > MAX_AHEAD_S:
        return (
            f"occurred_at {occurred_at[:40]} is more than {MAX_AHEAD_S / 3600:.0f} h after the "
            f"entry was appended ({iso(appended)})"
        )
    return None


def _cases() -> list[tuple[str, str]]:
    rng = random.Random(11)
    ahead = timedelta(seconds=MAX_AHEAD_S)
    one_us = timedelta(microseconds=1)
    out = [("", "1-0"), ("soon", "1700000000000-0"), ("1999-12-31T23:59:59Z", "1-0")]
    for _ in range(400):
        ms = rng.choice([rng.randrange(10**13), rng.randrange(946_684_800_000, 2 * 10**12)])
        appended = entry_time(f"{ms}-0")
        for delta in (
            ahead,
            ahead + one_us,
            ahead - one_us,
            ahead + timedelta(milliseconds=1),
            -ahead,
            timedelta(0),
            timedelta(microseconds=rng.randrange(-(10**12), 10**12)),
        ):
            try:
                moment = appended + delta
            except OverflowError:
                continue
            out.append((iso(moment), f"{ms}-{rng.randrange(3)}"))
            # Another offset, naive (UTC), seconds only: the forms parse() reads.
            offset = timezone(timedelta(minutes=rng.randrange(-14 * 60, 14 * 60 + 1)))
            local = moment.astimezone(offset)
            out.append((local.isoformat(), f"{ms}-0"))
            out.append((moment.replace(tzinfo=None).isoformat(timespec="seconds"), f"{ms}-0"))
    return out


def test_time_problem_answers_as_the_datetime_arithmetic_did() -> None:
    cases = _cases()
    assert len(cases) > 6000
    assert [time_problem(a, e) for a, e in cases] == [reference(a, e) for a, e in cases]
    assert any(time_problem(a, e) for a, e in cases) and any(
        time_problem(a, e) is None for a, e in cases
    )


def test_an_entry_time_beyond_datetime_raises_as_before() -> None:
    last_ms = (datetime.max.replace(tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        milliseconds=1
    )
    assert time_problem("2020-01-01T00:00:00Z", f"{last_ms}-0") is None
    for call in (time_problem, reference):
        with pytest.raises(OverflowError):
            call("2020-01-01T00:00:00Z", f"{last_ms + 1}-0")
