"""Mode `per_request`: one provider call per request, each unit a single request."""

from __future__ import annotations

from lps.modes.base import ModeContext, Unit


async def run(ctx: ModeContext, unit: Unit) -> None:
    for entry, req in unit:
        await ctx.judge(entry, req)
