"""Turning user input into a `BatchRegistered` event, and appending it."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cj.grade_scales import resolve_scale
from cj.stopping import DEFAULT_CAP_PER_ESSAY, DEFAULT_TARGET_RELIABILITY, budget_for
from events import codec
from events.names import Keys
from events.types import BatchConfig, BatchRegistered, Essay, Mode, new_id
from projections.batch import register
from projections.store import queue_state_write

MAX_BUNDLE = 64


class InputError(ValueError):
    """Bad user input; the message names the problem."""


class EssayIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    essay_id: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1)
    anchor_grade: str | None = None
    mock_quality: float | None = None

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


def default_model(provider: str) -> str:
    if provider == "anthropic":
        from lps.providers.anthropic import DEFAULT_MODEL

        return DEFAULT_MODEL
    return "mock-judge-1"


def provider_problems(provider: str, model: str, overrides: dict[str, str]) -> list[str]:
    """What would make every comparison of the batch fail, caught before anything is appended."""
    if provider != "anthropic":
        return []
    from lps.providers.anthropic import model_problems, validate_overrides

    return [*model_problems(model), *validate_overrides(overrides)]


def default_budget(n: int) -> int:
    """The cap when none is given: DEFAULT_CAP_PER_ESSAY comparisons per essay (each
    comparison counts for two essays), never above all pairs. The stopping rule usually
    ends a batch earlier."""
    return budget_for(n, DEFAULT_CAP_PER_ESSAY)


def build_registration(
    batch: BatchIn,
    scale_name: str,
    grades: tuple[str, ...],
    *,
    mode: Mode = "per_request",
    provider: str = "mock",
    model: str | None = None,
    budget: int | None = None,
    comparisons_per_essay: float | None = None,
    target_reliability: float = DEFAULT_TARGET_RELIABILITY,
    seed: int = 0,
    batch_id: str | None = None,
) -> BatchRegistered:
    """The registration event. The budget (a cap) is ``budget`` comparisons in all, or
    ``comparisons_per_essay`` each, or the default; one of the two at most."""
    n = len(batch.essays)
    all_pairs = n * (n - 1) // 2
    if budget is not None and comparisons_per_essay is not None:
        raise InputError("give --budget or --comparisons-per-essay, not both")
    if budget is not None and budget < 1:
        raise InputError(f"--budget must be at least 1, got {budget}")
    if comparisons_per_essay is not None and not comparisons_per_essay > 0:
        raise InputError(f"--comparisons-per-essay must be > 0, got {comparisons_per_essay}")
    if not 0.0 <= target_reliability <= 1.0:
        raise InputError(f"--target-reliability must be in [0, 1], got {target_reliability}")
    if budget is not None:
        total_budget = budget
    elif comparisons_per_essay is not None:
        total_budget = budget_for(n, comparisons_per_essay)
    else:
        total_budget = default_budget(n)
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
        # Later waves are matchings (each essay once); the first is twice n (see next_wave).
        wave_size=max(1, n // 2),
        # Enough waves for the cap: 1 + (budget − 2n) / (n/2), with room for short waves.
        max_waves=max(50, 2 * (1 + math.ceil(2 * max(0, total_budget - 2 * n) / max(1, n)))),
        seed=seed,
        target_reliability=target_reliability,
        grade_scale=list(grades),
        grade_scale_name=scale_name,
        preferred_bundle_size=MAX_BUNDLE,
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


async def append_registration(r: Any, keys: Keys, event: BatchRegistered) -> None:
    """Append `BatchRegistered` and write its projection in one MULTI/EXEC."""
    async with r.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.batches, codec.encode(event))
        queue_state_write(pipe, keys, register(event), full=True)
        await pipe.execute()
