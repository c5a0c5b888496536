"""The mock judge's provider-side rate limit: what the API does to an organisation, not what
LPS does to itself (that is `lps.limiter`).

Like Anthropic's limits it is a token bucket per dimension, continuously refilled:
requests per minute and tokens per minute (input + output of the call, charged when it
arrives), each holding at most `burst_s` seconds of its rate ("60 RPM may be enforced as
1 request per second"). A call that finds a bucket short is answered 429 with `retry-after`
(whole seconds, as the API sends it) and the `anthropic-ratelimit-*` headers; every answer
carries those headers, so a client can learn the limit from its successful replies.

Shared by every worker on the same Redis and `CJS_PREFIX` (one hash per model, outside
every partition, updated by one Lua script on the server's clock); a mock that was not
given a Redis keeps the bucket in its own process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from streams.keys import Keys

# KEYS[1] the bucket hash. ARGV: 1 requests/min, 2 tokens/min, 3 burst seconds, 4 tokens of
# this call. Returns {allowed (0/1), requests left, tokens left, requests capacity, tokens
# capacity, now (ms), ms until the call would have been allowed}; numbers as strings (a Lua
# number returned to Redis loses its fraction).
BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local burst, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local per_ms_r, per_ms_t = rpm / 60000, tpm / 60000
local cap_r = math.max(1, rpm / 60 * burst)
local cap_t = math.max(cost, tpm / 60 * burst)
local s = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local r = tonumber(s[1]) or cap_r
local tk = tonumber(s[2]) or cap_t
local dt = math.max(0, now - (tonumber(s[3]) or now))
r = math.min(cap_r, r + dt * per_ms_r)
tk = math.min(cap_t, tk + dt * per_ms_t)
local wait = 0
if r < 1 then wait = math.max(wait, (1 - r) / per_ms_r) end
if tk < cost then wait = math.max(wait, (cost - tk) / per_ms_t) end
local ok = 0
if wait == 0 then
  ok = 1
  r = r - 1
  tk = tk - cost
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 600000)
return {ok, tostring(r), tostring(tk), tostring(cap_r), tostring(cap_t), tostring(now),
  tostring(wait)}
"""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    requests_left: float
    tokens_left: float
    requests_capacity: float
    tokens_capacity: float
    now_ms: float
    wait_ms: float
    """How long until this call would have been allowed (0 when it was)."""


def key(keys: Keys, model: str) -> str:
    return keys.shared(f"mock:ratelimit:{model}")


class LocalBucket:
    """The same bucket in this process (a mock without Redis): BUCKET_LUA's arithmetic."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self._state: dict[str, tuple[float, float, float]] = {}

    def take(self, name: str, rpm: float, tpm: float, burst_s: float, cost: float) -> Verdict:
        now = self.clock() * 1000.0
        per_ms_r, per_ms_t = rpm / 60000.0, tpm / 60000.0
        cap_r = max(1.0, rpm / 60.0 * burst_s)
        cap_t = max(cost, tpm / 60.0 * burst_s)
        r, tk, ts = self._state.get(name, (cap_r, cap_t, now))
        dt = max(0.0, now - ts)
        r = min(cap_r, r + dt * per_ms_r)
        tk = min(cap_t, tk + dt * per_ms_t)
        wait = 0.0
        if r < 1:
            wait = max(wait, (1 - r) / per_ms_r)
        if tk < cost:
            wait = max(wait, (cost - tk) / per_ms_t)
        if wait == 0:
            r, tk = r - 1, tk - cost
        self._state[name] = (r, tk, now)
        return Verdict(wait == 0, r, tk, cap_r, cap_t, now, wait)


def verdict_of(reply: list[Any]) -> Verdict:
    ok, r, tk, cap_r, cap_t, now, wait = reply
    return Verdict(
        int(ok) == 1, float(r), float(tk), float(cap_r), float(cap_t), float(now), float(wait)
    )


def _rfc3339(epoch_ms: float) -> str:
    return (
        datetime.fromtimestamp(epoch_ms / 1000.0, UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def headers(v: Verdict, rpm: float, tpm: float) -> dict[str, str]:
    """The `anthropic-ratelimit-*` headers of an answer (and `retry-after` on a 429): limits
    per minute, what is left in each bucket, and when it is full again (RFC 3339)."""
    full_r = v.now_ms + max(0.0, v.requests_capacity - v.requests_left) * 60000.0 / rpm
    full_t = v.now_ms + max(0.0, v.tokens_capacity - v.tokens_left) * 60000.0 / tpm
    out = {
        "anthropic-ratelimit-requests-limit": str(int(rpm)),
        "anthropic-ratelimit-requests-remaining": str(max(0, math.floor(v.requests_left))),
        "anthropic-ratelimit-requests-reset": _rfc3339(full_r),
        "anthropic-ratelimit-tokens-limit": str(int(tpm)),
        "anthropic-ratelimit-tokens-remaining": str(max(0, math.floor(v.tokens_left))),
        "anthropic-ratelimit-tokens-reset": _rfc3339(full_t),
    }
    if not v.allowed:
        # Whole seconds, at least one, as the API sends it.
        out["retry-after"] = str(max(1, math.ceil(v.wait_ms / 1000.0)))
    return out


def rate_limit_body(rpm: float, tpm: float) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": (
                "This request would exceed your organization's rate limit of "
                f"{int(rpm)} requests or {int(tpm)} tokens per minute (mock)."
            ),
        },
    }
