"""The LPS modes as units: how the requests of a page are grouped, and how a group is judged.

`plan_units` splits a page into units; `MODES[mode]` runs one unit against a `ModeContext`
that the worker builds. A new mode is a module here with a `run(ctx, unit)` and a line
in `MODES` (and in `JUDGED_EACH` when it judges its requests one by one).
"""

from __future__ import annotations

from collections import defaultdict

from events.types import MAX_BUNDLE_SIZE, Mode
from lps.modes import batch_api, per_request, serial_bundle
from lps.modes.base import ModeContext, ModeUnit, Unit

__all__ = ["JUDGED_EACH", "MODES", "ModeContext", "ModeUnit", "Unit", "bundle_size", "plan_units"]

MODES: dict[Mode, ModeUnit] = {
    "per_request": per_request.run,
    "serial_bundle": serial_bundle.run,
    "batch_api": batch_api.run,
}
# The modes whose requests are judged one by one by the worker's `judge_one` (the retry loop,
# which waits out the cooldown); `batch_api` sends a bundle as one Message Batch.
JUDGED_EACH: frozenset[Mode] = frozenset({"per_request", "serial_bundle"})


def bundle_size(preferred: int) -> int:
    """CJ's hint, capped; an invalid hint falls back to the cap."""
    if not isinstance(preferred, int) or preferred < 1:
        return MAX_BUNDLE_SIZE
    return min(preferred, MAX_BUNDLE_SIZE)


def plan_units(items: Unit) -> list[Unit]:
    """Split a page into units of work: one per request, or bundles of the same provider,
    model and overrides for `serial_bundle` / `batch_api` requests."""
    units: list[Unit] = []
    groups: dict[tuple[str, str, str, str], Unit] = defaultdict(list)
    for entry, req in items:
        if req.mode == "per_request":
            units.append([(entry, req)])
        else:
            overrides = "&".join(f"{k}={v}" for k, v in sorted(req.overrides.items()))
            groups[(req.mode, req.provider, req.model, overrides)].append((entry, req))
    for members in groups.values():
        cap = min(bundle_size(req.preferred_bundle_size) for _, req in members)
        units.extend(members[i : i + cap] for i in range(0, len(members), cap))
    return units
