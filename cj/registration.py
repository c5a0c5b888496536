"""Turning user input into a `BatchRegistered` event, and appending it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cj.grade_scales import resolve_scale
from events import codec
from events.clock import iso
from events.ids import essay_id_problem, event_id_problem, key_id_problem
from events.types import MAX_BUNDLE_SIZE, BatchConfig, BatchRegistered, Essay, Mode, new_id
from lps.providers.registry import default_model, provider_problems
from projections.batch import register
from projections.store import queue_state_write
from streams.clock import server_time
from streams.keys import Keys


class InputError(ValueError):
    """Bad user input; the message names the problem."""


class EssayIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    essay_id: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1)
    anchor_grade: str | None = None
    mock_quality: float | None = None

    @field_validator("essay_id")
    @classmethod
    def _grammar(cls, v: str) -> str:
        problem = essay_id_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("anchor_grade", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("mock_quality", mode="before")
    @classmethod
    def _blank_quality(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grade_scale: str | list[str] | None = None
    essays: list[EssayIn]

    @model_validator(mode="after")
    def _check(self) -> BatchIn:
        if len(self.essays) < 2:
            raise ValueError(f"a batch needs at least 2 essays, got {len(self.essays)}")
        seen: set[str] = set()
        for essay in self.essays:
            if essay.essay_id in seen:
                raise ValueError(f"duplicate essay_id {essay.essay_id!r}")
            seen.add(essay.essay_id)
        return self


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def parse_input(path: Path, grade_scale: str | None = None) -> tuple[BatchIn, str, tuple[str, ...]]:
    """Read and validate a JSON or CSV batch file. Raises InputError naming the problem."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    try:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(io.StringIO(raw)))
            data: Any = {"essays": rows}
        else:
            data = json.loads(raw)
    except (json.JSONDecodeError, csv.Error) as exc:
        raise InputError(f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    if isinstance(data, dict) and grade_scale is not None:
        data = {**data, "grade_scale": grade_scale}
    try:
        batch = BatchIn.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"{path}: {_pydantic_message(exc)}") from exc
    return (batch, *scale_of(batch))


def scale_of(batch: BatchIn) -> tuple[str, tuple[str, ...]]:
    try:
        name, grades = resolve_scale(batch.grade_scale)
    except ValueError as exc:
        raise InputError(f"grade_scale: {exc}") from exc
    for essay in batch.essays:
        if essay.anchor_grade is not None and essay.anchor_grade not in grades:
            raise InputError(
                f"essay {essay.essay_id!r}: unknown grade {essay.anchor_grade!r} "
                f"(scale {name}: {' '.join(grades)})"
            )
    return name, grades


def default_budget(n: int) -> int:
    """Enough for adaptive CJ to settle: about 10 comparisons per essay, never above all pairs."""
    return min(n * (n - 1) // 2, 10 * n)


def build_registration(
    batch: BatchIn,
    scale_name: str,
    grades: tuple[str, ...],
    *,
    mode: Mode = "per_request",
    provider: str = "mock",
    model: str | None = None,
    budget: int | None = None,
    seed: int = 0,
    stability_threshold: float = 0.05,
    min_waves: int = 2,
    batch_id: str | None = None,
) -> BatchRegistered:
    n = len(batch.essays)
    all_pairs = n * (n - 1) // 2
    if batch_id is not None and (problem := key_id_problem("batch_id", batch_id)):
        raise InputError(problem)
    if budget is not None and budget < 1:
        raise InputError(f"--budget must be at least 1, got {budget}")
    total_budget = budget if budget is not None else default_budget(n)
    essays = [
        Essay(
            essay_id=e.essay_id,
            text=e.text,
            is_anchor=e.anchor_grade is not None,
            anchor_grade=e.anchor_grade,
            mock_quality=e.mock_quality,
        )
        for e in batch.essays
    ]
    config = BatchConfig(
        mode=mode,
        provider=provider,
        model=model or default_model(provider),
        total_budget=total_budget,
        wave_size=n,
        min_waves=min_waves,
        stability_threshold=stability_threshold,
        seed=seed,
        grade_scale=list(grades),
        grade_scale_name=scale_name,
        preferred_bundle_size=MAX_BUNDLE_SIZE,
    )
    problems = provider_problems(provider, config.model, config.overrides)
    if problems:
        raise InputError("; ".join(problems))
    return BatchRegistered(
        batch_id=batch_id or new_id(),
        essays=essays,
        config=config,
        denominator=min(total_budget, all_pairs),
    )


async def append_registration(r: Any, keys: Keys, event: BatchRegistered) -> BatchRegistered:
    """Append `BatchRegistered` and write its projection in one MULTI/EXEC; returns the event
    as appended, stamped with the Redis server's time (the clock of stall detection)."""
    problem = event_id_problem(event)
    if problem:
        raise InputError(problem)
    event = msgspec.structs.replace(event, occurred_at=iso(await server_time(r)))
    async with r.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.batches, codec.encode(event))
        queue_state_write(pipe, keys, register(event), full=True)
        await pipe.execute()
    return event
