"""LPS planning: bundle sizes and grouping."""

from __future__ import annotations

from typing import Any

from events.consumer import Entry
from events.types import ComparisonRequested, Essay
from lps.worker import SERIAL_BUNDLE_MAX_REQUESTS_PER_CALL, bundle_size, plan_units


def _req(
    i: int, mode: str = "serial_bundle", model: str = "m", pref: int = 64, **kw: Any
) -> ComparisonRequested:
    return ComparisonRequested(
        batch_id="b",
        correlation_id=f"c{i}",
        wave=1,
        essay_a=Essay("a", "x"),
        essay_b=Essay("b", "y"),
        mode=mode,
        model=model,  # type: ignore[arg-type]
        preferred_bundle_size=pref,
        **kw,
    )


def test_bundle_size_caps_and_falls_back() -> None:
    assert bundle_size(10) == 10
    assert bundle_size(500) == SERIAL_BUNDLE_MAX_REQUESTS_PER_CALL == 64
    assert bundle_size(0) == 64 and bundle_size(-3) == 64


def test_units_group_by_provider_model_and_overrides_and_respect_the_hint() -> None:
    items = [(Entry(f"{i}-0", {}), _req(i, pref=3)) for i in range(7)]
    items += [(Entry(f"{i}-1", {}), _req(i, model="other")) for i in range(2)]
    items += [(Entry(f"{i}-2", {}), _req(i, overrides={"temperature": "0"})) for i in range(2)]
    items += [(Entry(f"{i}-3", {}), _req(i, mode="per_request")) for i in range(3)]
    units = plan_units(items)
    sizes = sorted(len(u) for u in units)
    assert sizes == [1, 1, 1, 1, 2, 2, 3, 3]
    for unit in units:
        keys = {(r.mode, r.model, tuple(sorted(r.overrides.items()))) for _, r in unit}
        assert len(keys) == 1
    assert sum(len(u) for u in units) == len(items)
