"""A breaker for account-wide provider failures, shared by every worker through Redis.

An authentication, permission, billing or spend-limit failure (`events.types.ACCOUNT_FAILURES`,
when not retryable) is not about one request: every call fails the same way until someone
acts. The first one opens a breaker, `lps:breaker:<provider>` (or, for `permission`, which a
key may have for one model and not another, `lps:breaker:<provider>:<model>`), a hash with the
reason, the ErrorDetail that opened it, `opened_at` and `probe_at`. While it is open:

- every worker fails the requests it is about to send at once, without a call: a
  `ComparisonFailed` carrying the breaker's error (`admit` returns a rejected ticket);
- once `probe_at` has passed, one call (whichever worker claims it first: a Lua script
  moves `probe_at` on atomically) goes through as a probe. Any answer that is not an
  account failure closes the breaker; the same failure opens it for another window; a
  probe without an answer (timeout, dropped connection) leaves the next probe to the next
  window.

Until a call to a provider/model has been answered in this process, its calls go one at a
time (a per-process gate, waited for at most `gate_timeout_s`: an account failure is
answered at once, a slow first call is no reason to hold the others): a revoked key then
costs one call, not one per unit of concurrency, before the breaker opens.

Redis trouble never blocks judging: the breaker then fails open (logs, admits the call).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from events.text import as_str
from events.types import ACCOUNT_FAILURES, ErrorDetail, failure_kind
from lps import keys as lkeys
from lps.single_flight import SingleFlight
from streams.keys import Keys

log = structlog.get_logger(__name__)

Clock = Callable[[], float]

BREAKER_TTL_S = 7 * 24 * 3600
"""An open breaker nobody probes (no traffic) disappears after this long."""
MODEL_SCOPED = frozenset({"permission"})
"""Failure kinds about one model (a key may use some models and not others)."""

_error_json = msgspec.json.Encoder()
_error_decode = msgspec.json.Decoder(ErrorDetail)

# KEYS[1] breaker hash; ARGV[1] now; ARGV[2] next probe time.
# Claims the probe when it is due: moves probe_at on, returns 1; else 0 (or -1 when closed).
_CLAIM_PROBE = """
local due = redis.call('HGET', KEYS[1], 'probe_at')
if not due then return -1 end
if tonumber(due) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'probe_at', ARGV[2])
return 1
"""

# KEYS[1] breaker hash; ARGV: reason, error json, now, probe_at, ttl s, provider, model.
# Opens the breaker, or re-opens it for another window (keeping when it first opened).
_OPEN = """
redis.call('HSETNX', KEYS[1], 'opened_at', ARGV[3])
redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'error', ARGV[2], 'probe_at', ARGV[4],
  'last_failure_at', ARGV[3], 'provider', ARGV[6], 'model', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def is_account_failure(detail: ErrorDetail) -> bool:
    """Does this failure open a breaker? (Retryable ones never do: the server said to retry.)"""
    return not detail.retryable and failure_kind(detail) in ACCOUNT_FAILURES


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class BreakerState:
    provider: str
    model: str
    """"" when the breaker covers every model of the provider."""
    reason: str
    error: ErrorDetail
    opened_at: float
    probe_at: float
    failures: int

    def view(self, now: float) -> dict[str, Any]:
        """What `cjs status` and `cjs stuck` show of an open breaker."""
        return {
            "provider": self.provider,
            "model": self.model or None,
            "reason": self.reason,
            "error_type": self.error.error_type,
            "status_code": self.error.status_code,
            "message": self.error.message,
            "opened_at": _iso(self.opened_at),
            "failures": self.failures,
            "next_probe_in_s": round(max(0.0, self.probe_at - now), 3),
        }

    def rejection(self, correlation_id: str, model: str) -> ErrorDetail:
        """The failure of a request this breaker stops before any call."""
        return ErrorDetail(
            error_type=self.error.error_type,
            retryable=False,
            message=f"breaker open since {_iso(self.opened_at)} ({self.reason}): "
            f"{self.error.message}"[:500],
            provider=self.provider,
            model=model,
            correlation_id=correlation_id,
            status_code=self.error.status_code,
            error_code=self.error.error_code,
        )


def decode_state(raw: dict[Any, Any]) -> BreakerState | None:
    fields = {as_str(k): as_str(v) for k, v in raw.items()}
    try:
        return BreakerState(
            provider=fields["provider"],
            model=fields.get("model", ""),
            reason=fields["reason"],
            error=_error_decode.decode(fields["error"]),
            opened_at=float(fields["opened_at"]),
            probe_at=float(fields["probe_at"]),
            failures=int(fields.get("failures", "1")),
        )
    except (KeyError, ValueError, msgspec.DecodeError):
        return None


def _found(rows: list[Any]) -> list[BreakerState]:
    """The open breakers in the replies of `Breaker.states`'s HGETALLs."""
    return [s for s in (decode_state(row) for row in rows if row) if s is not None]


@dataclass
class Ticket:
    """Leave to make one call (or not): from `admit`, handed back to `settle` after the call."""

    provider: str
    model: str
    rejected: ErrorDetail | None = None
    """The call must not be made: fail the request with this."""
    probe: BreakerState | None = None
    """This call is the probe of that open breaker."""
    gate: asyncio.Lock | None = None


@dataclass
class Breaker:
    """The shared breaker. `redis` is a `redis.asyncio.Redis` (or fakeredis)."""

    redis: Any
    keys: Keys = field(default_factory=Keys)
    probe_after_s: float = 60.0
    """How long an open breaker rejects before it lets one probe call through."""
    clock: Clock = time.time
    fresh_s: float = 0.0
    """Reuse a read finding no breaker for this long (per provider/model), as the cooldown
    does: a breaker opened elsewhere is then seen up to `fresh_s` late."""
    gate_timeout_s: float = 2.0
    """How long a call waits for the first, unanswered call to its provider/model."""
    _proven: set[tuple[str, str]] = field(default_factory=set, repr=False)
    _gates: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict, repr=False)
    _closed_seen: dict[tuple[str, str], float] = field(default_factory=dict, repr=False)
    _flight: SingleFlight[tuple[str, str], list[BreakerState]] = field(
        default_factory=SingleFlight, repr=False
    )

    def _keys_for(self, provider: str, model: str) -> list[str]:
        return [lkeys.breaker(self.keys, provider), lkeys.breaker(self.keys, provider, model)]

    async def states(self, provider: str, model: str) -> list[BreakerState]:
        """The open breakers covering provider/model (provider-wide first). Raises on Redis
        trouble."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self._keys_for(provider, model):
                pipe.hgetall(key)
            rows = await pipe.execute()
        return _found(rows)

    def _seen_closed(self, key: tuple[str, str], now: float) -> bool:
        """Whether a read found no breaker for provider/model within `fresh_s` of `now`."""
        seen = self._closed_seen.get(key)
        return seen is not None and now - seen < self.fresh_s

    async def _open_states(self, provider: str, model: str, *, fresh: bool) -> list[BreakerState]:
        key = (provider, model)
        now = self.clock()
        if not fresh and self._seen_closed(key, now):
            return []
        if fresh or self.fresh_s <= 0:
            return await self._read(key, now)
        # Calls that miss the reusable read together share one read (issue 11).
        return await self._flight.run(key, lambda: self._read(key, now))

    async def _read(self, key: tuple[str, str], now: float) -> list[BreakerState]:
        try:
            found = await self.states(*key)
        except Exception as exc:  # fail open
            log.warning("breaker_read_failed", error_kind=type(exc).__name__)
            return []
        self._saw(key, found, now)
        return found

    def _saw(self, key: tuple[str, str], found: list[BreakerState], now: float) -> None:
        if found:
            self._closed_seen.pop(key, None)
        else:
            self._closed_seen[key] = now

    def due(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (provider, model) of `pairs` whose next call would read the breakers: none
        found within `fresh_s` (never with `fresh_s` 0: then every call reads)."""
        if self.fresh_s <= 0:
            return []
        now = self.clock()
        return [key for key in pairs if not self._seen_closed(key, now)]

    def read_in(
        self, pipe: Any, due: list[tuple[str, str]]
    ) -> Callable[[list[Any] | BaseException], None]:
        """The reads `_read` would make of the breakers of `due` (from `due`), queued on
        `pipe` and shared as `_read`'s are (`SingleFlight.along`); a failed one ends as
        `_read`'s does (logged, nothing learnt, none found). The LPS worker sends them with its
        page's answered marks: a round trip less (issue 11)."""
        learn = functools.partial(self._learn, now=self.clock())
        return self._flight.along(pipe, due, self._queue_read, learn)

    def _queue_read(self, pipe: Any, key: tuple[str, str]) -> int:
        names = self._keys_for(*key)
        for name in names:
            pipe.hgetall(name)
        return len(names)

    def _learn(
        self, key: tuple[str, str], rows: list[Any] | BaseException, now: float
    ) -> list[BreakerState]:
        if not isinstance(rows, BaseException):
            rows = next((row for row in rows if isinstance(row, BaseException)), rows)
        if isinstance(rows, BaseException):  # fail open
            log.warning("breaker_read_failed", error_kind=type(rows).__name__)
            return []
        found = _found(rows)
        self._saw(key, found, now)
        return found

    def admit_now(self, provider: str, model: str) -> Ticket | None:
        """`admit`'s answer when it needs no await, else None (then await `admit`): no
        breaker was open a moment ago and calls here are answered. What `_check` and the
        gate would decide, without their awaits nor a coroutine of its own (issue 11: most
        calls)."""
        key = (provider, model)
        if key in self._proven and self._seen_closed(key, self.clock()):
            return Ticket(provider, model)
        return None

    async def admit(self, provider: str, model: str, correlation_id: str = "") -> Ticket:
        """May a call to provider/model be made now? Waits while an unproven provider/model
        has a call in flight in this process."""
        key = (provider, model)
        fast = self.admit_now(provider, model)
        if fast is not None:
            return fast
        ticket = Ticket(provider, model)
        if await self._check(ticket, correlation_id, fresh=False):
            return ticket
        if key not in self._proven:
            gate = self._gates.setdefault(key, asyncio.Lock())
            try:
                await asyncio.wait_for(gate.acquire(), self.gate_timeout_s)
            except TimeoutError:  # the first call is slow, not refused: go ahead
                return ticket
            ticket.gate = gate
            # Whoever held the gate may have opened a breaker meanwhile.
            if key not in self._proven:
                await self._check(ticket, correlation_id, fresh=True)
            if ticket.rejected is not None or key in self._proven:
                self.release(ticket)
        return ticket

    async def _check(self, ticket: Ticket, correlation_id: str, *, fresh: bool) -> bool:
        """Decide from the open breakers; True when the ticket is decided (rejected or probe)."""
        for state in await self._open_states(ticket.provider, ticket.model, fresh=fresh):
            now = self.clock()
            if now >= state.probe_at and await self._claim_probe(state, now):
                ticket.probe = state
                continue
            ticket.rejected = state.rejection(correlation_id, ticket.model)
            # Imported where counted: reading breakers (`cjs status`) loads no prometheus_client.
            from lps.metrics import LPS_BREAKER_REJECTED

            LPS_BREAKER_REJECTED.labels(
                provider=ticket.provider, model=ticket.model, reason=state.reason
            ).inc()
            return True
        return ticket.probe is not None

    async def _claim_probe(self, state: BreakerState, now: float) -> bool:
        key = lkeys.breaker(self.keys, state.provider, state.model or None)
        try:
            claimed = await self.redis.eval(
                _CLAIM_PROBE, 1, key, repr(now), repr(now + self.probe_after_s)
            )
        except Exception as exc:  # fail open: let the call through
            log.warning("breaker_probe_claim_failed", error_kind=type(exc).__name__)
            return True
        if int(claimed) == 1:
            log.info(
                "breaker_probe", provider=state.provider, model=state.model, reason=state.reason
            )
            return True
        return int(claimed) == -1  # closed meanwhile: nothing to reject for

    def release(self, ticket: Ticket) -> None:
        """Give back the gate a ticket holds (`settle` does it; this is for a call that
        ended in an exception)."""
        if ticket.gate is not None:
            ticket.gate.release()
            ticket.gate = None

    def settled_now(self, ticket: Ticket, detail: ErrorDetail | None) -> bool:
        """Whether `settle(ticket, detail)` has nothing to do, so need not be awaited: an
        answered call (no probe, no gate) to a provider/model already proven only proves it
        again (issue 11: most calls)."""
        return (
            detail is None
            and ticket.probe is None
            and ticket.gate is None
            and (ticket.provider, ticket.model) in self._proven
        )

    async def settle(self, ticket: Ticket, detail: ErrorDetail | None) -> None:
        """After the call of `ticket`: `detail` is its failure (None: it succeeded)."""
        try:
            await self.observe(ticket.provider, ticket.model, detail, probe=ticket.probe)
        finally:
            self.release(ticket)

    async def observe(
        self,
        provider: str,
        model: str,
        detail: ErrorDetail | None,
        *,
        probe: BreakerState | None = None,
    ) -> None:
        """Learn from one provider answer: an account failure opens (or re-opens) a breaker;
        any other answer proves provider/model and closes the breaker it probed. A failure
        without an answer (timeout, connection) proves nothing."""
        key = (provider, model)
        if detail is not None and is_account_failure(detail):
            self._proven.discard(key)
            await self.open(detail, provider, model)
            return
        if (
            detail is not None
            and detail.status_code is None
            and detail.error_type
            in (
                "timeout",
                "connection",
            )
        ):
            return
        self._proven.add(key)
        if probe is not None:
            await self.close(probe.provider, probe.model or None)

    async def open(self, detail: ErrorDetail, provider: str, model: str) -> None:
        reason = failure_kind(detail)
        scoped_model = model if reason in MODEL_SCOPED else None
        now = self.clock()
        key = lkeys.breaker(self.keys, provider, scoped_model)
        try:
            await self.redis.eval(
                _OPEN,
                1,
                key,
                reason,
                _error_json.encode(detail).decode(),
                repr(now),
                repr(now + self.probe_after_s),
                str(max(BREAKER_TTL_S, math.ceil(self.probe_after_s * 2))),
                provider,
                scoped_model or "",
            )
        except Exception as exc:  # fail open
            log.warning("breaker_write_failed", error_kind=type(exc).__name__)
            return
        self._closed_seen.clear()
        from lps.metrics import LPS_BREAKER_OPENED

        LPS_BREAKER_OPENED.labels(provider=provider, model=model, reason=reason).inc()
        log.warning(
            "breaker_opened",
            provider=provider,
            model=scoped_model or "*",
            reason=reason,
            probe_in_s=round(self.probe_after_s, 1),
        )

    async def close(self, provider: str, model: str | None = None) -> None:
        try:
            await self.redis.delete(lkeys.breaker(self.keys, provider, model))
        except Exception as exc:
            log.warning("breaker_close_failed", error_kind=type(exc).__name__)
            return
        log.warning("breaker_closed", provider=provider, model=model or "*")


async def open_breakers(r: Any, keys: Keys, *, count: int = 1000) -> list[BreakerState]:
    """Every open breaker under the prefix (for `cjs stuck`)."""
    out: list[BreakerState] = []
    async for key in r.scan_iter(match=lkeys.breaker_pattern(keys), count=count):
        state = decode_state(await r.hgetall(key))
        if state is not None:
            out.append(state)
    return sorted(out, key=lambda s: (s.provider, s.model))
