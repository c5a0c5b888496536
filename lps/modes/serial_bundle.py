"""Mode `serial_bundle`: a bundle is recorded as dispatched, then judged request by request."""

from __future__ import annotations

from lps.modes.base import ModeContext, Unit


async def run(ctx: ModeContext, unit: Unit) -> None:
    await ctx.record.dispatch(unit)
    # Each request stands alone: at shutdown those not started are handed back.
    for i, (entry, req) in enumerate(unit):
        if i and ctx.stopping():
            await ctx.release(unit[i:])
            return
        await ctx.judge(entry, req)
