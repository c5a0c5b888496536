"""Builders shared by the tests."""

from __future__ import annotations

from typing import Any

from cj.registration import BatchIn, build_registration, scale_of
from events import codec
from events.streams import CJ_GROUP
from events.types import (
    BatchRegistered,
    ComparisonCompleted,
    ComparisonFailed,
    ErrorDetail,
    PairRequest,
    WaveSubmitted,
)
from projections.store import encode_state, read_raw
from streams.keys import Keys


def batch_in(n: int = 6, anchors: int = 2) -> BatchIn:
    grades = ["F", "E", "D", "C", "B", "A"]
    essays: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "essay_id": f"e{i}",
            "text": f"essay number {i} " * (i + 1),
            "mock_quality": (i - n / 2) / 2,
        }
        if i < anchors:
            row["anchor_grade"] = grades[min(len(grades) - 1, i * 2)]
        essays.append(row)
    return BatchIn.model_validate({"essays": essays})


def registration(
    n: int = 6,
    *,
    budget: int | None = None,
    seed: int = 1,
    mode: str = "per_request",
    batch_id: str | None = None,
    **kw: Any,
) -> BatchRegistered:
    b = batch_in(n)
    name, grades = scale_of(b)
    return build_registration(
        b,
        name,
        grades,
        budget=budget,
        seed=seed,
        mode=mode,  # type: ignore[arg-type]
        batch_id=batch_id,
        **kw,
    )


def wave(batch_id: str, number: int, pairs: list[tuple[str, str, str]]) -> WaveSubmitted:
    return WaveSubmitted(
        batch_id=batch_id, wave=number, pairs=[PairRequest(c, a, b) for c, a, b in pairs]
    )


def completed(
    batch_id: str,
    cid: str,
    winner: str = "essay_a",
    a: str = "e0",
    b: str = "e1",
    *,
    cost_usd: float = 0.0,
) -> ComparisonCompleted:
    return ComparisonCompleted(
        batch_id=batch_id,
        correlation_id=cid,
        essay_a_id=a,
        essay_b_id=b,
        winner=winner,  # type: ignore[arg-type]
        confidence=3.0,
        cost_usd=cost_usd,
    )


def failed(
    batch_id: str,
    cid: str,
    error_type: str = "server_error",
    *,
    cost_usd: float = 0.0,
    error_code: str | None = None,
) -> ComparisonFailed:
    return ComparisonFailed(
        batch_id=batch_id,
        correlation_id=cid,
        essay_a_id="e0",
        essay_b_id="e1",
        error=ErrorDetail(
            error_type=error_type,  # type: ignore[arg-type]
            retryable=False,
            message="x",
            error_code=error_code,
        ),
        cost_usd=cost_usd,
    )


async def append_and_read(r: Any, keys: Keys, events: list[Any], consumer: str = "t") -> list[str]:
    """Append callbacks to the callbacks stream and deliver them to `consumer` of the cj group."""
    ids = []
    for event in events:
        ids.append((await r.xadd(keys.callbacks, codec.encode(event))).decode())
    await r.xreadgroup(CJ_GROUP, consumer, {keys.callbacks: ">"}, count=len(events) + 10)
    return ids


async def snapshot(r: Any, keys: Keys, batch_id: str) -> dict[str, dict[str, str]]:
    raw = await read_raw(r, keys, batch_id)
    return {
        k: {
            (f.decode() if isinstance(f, bytes) else f): (v.decode() if isinstance(v, bytes) else v)
            for f, v in m.items()
        }
        for k, m in raw.items()
    }


def canonical(state: Any, keys: Keys) -> dict[str, dict[str, str]]:
    return encode_state(state, keys)
