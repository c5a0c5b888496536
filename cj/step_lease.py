"""One CJ consumer at a time decides a batch's next step; the others leave it a note.

At zero latency a wave's callbacks come back in one burst, applied by several consumers at
once, and each whose callbacks bring the batch to its threshold asks for the next step: they
all scored and planned the same step, and `advance` wrote one and voided the others (issue 11:
about one decision in seven). Now whoever asks first holds the batch's step lease while it
advances; one that finds it held leaves a note and goes on, and the holder, before letting
go, advances again when there is a note, on a state that holds the noter's callbacks (they
were applied before the note was left): no step is lost.

The lease only saves work. `advance` alone keeps each step exactly-once, so a lease that
outlives its holder (dead or paused: it expires after `TTL_MS`) delays a step until the
holder's note is handled or the consumers' sweep takes it, and never makes a wrong one. A
holder whose release a Redis fault stopped (a failover) takes its own lease back at its next
step instead of waiting for it to expire (bench/failover.py: a batch's later waves came
10 s apart after a failover).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from streams.keys import Keys

# Longer than a decision takes (seconds for a 1,000-essay batch), short beside the sweep
# that recovers the step of a holder that died.
TTL_MS = 10_000

# KEYS: 1 the lease, 2 the note; ARGV: 1 holder, 2 ttl ms. 1: held by the caller now. A
# lease already in the caller's name is its own, left by a step whose release a Redis fault
# stopped (a consumer runs one step at a time): taken back, not waited out.
_CLAIM_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 0
"""

# 1: a note was left meanwhile; it is taken, and the caller holds the lease to advance again.
_RELEASE_LUA = """
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_keys(keys: Keys, batch_id: str) -> list[str]:
    """The batch's lease and note, in its partition (one slot with its projection)."""
    lease = keys.for_batch(batch_id).key(f"cj:step:{batch_id}")
    return [lease, f"{lease}:again"]


class StepLease:
    def __init__(self, r: Any, keys: Keys, holder: str) -> None:
        self.keys = keys
        self.holder = holder
        self._claim = r.register_script(_CLAIM_LUA)
        self._release = r.register_script(_RELEASE_LUA)

    async def run(self, batch_id: str, step: Callable[[], Awaitable[bool]]) -> bool:
        """Run `step` (the batch's advance) under the lease, again for every note left
        meanwhile; False without running it when another consumer holds the lease."""
        names = lease_keys(self.keys, batch_id)
        args = [self.holder, TTL_MS]
        if not await self._claim(keys=names, args=args):
            return False
        took = False
        again = True
        while again:
            try:
                took = await step() or took
            except BaseException:
                # The step's error stays the caller's: a release failing too (Redis down) must
                # not replace it, a cancellation least of all (the consumer's loop took the
                # release's ConnectionError for an outage and went on, never cancelled). The
                # lease then expires, or this holder takes it back at its next step.
                with contextlib.suppress(Exception):
                    await self._release(keys=names, args=args)
                raise
            again = bool(await self._release(keys=names, args=args))
        return took
