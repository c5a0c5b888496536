"""Turning user input into a `BatchRegistered` event, and appending it."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from redis.exceptions import WatchError

from cj.grade_scales import resolve_scale
from cj.stopping import DEFAULT_CAP_PER_ESSAY, DEFAULT_TARGET_RELIABILITY, budget_for
from events.clock import iso
from events.ids import essay_id_problem, event_id_problem, key_id_problem
from events.text import as_str
from events.types import MAX_BUNDLE_SIZE, BatchConfig, BatchRegistered, Essay, Mode, new_id
from lps.providers.registry import (
    cache_warnings,
    cost_estimate,
    credential_problems,
    default_model,
    price_warnings,
    provider_problems,
)
from projections import keys as pkeys
from projections.batch import register
from projections.store import queue_registration, queue_state_write
from streams.clock import server_time
from streams.durability import is_cluster
from streams.keys import Keys, partition_of

# Longest essay text accepted by default, in characters: both essays of a pair go into one
# prompt, and an essay is carried in every request naming it.
MAX_ESSAY_CHARS = 50_000


class InputError(ValueError):
    """Bad user input; the message names the problem."""


class Contended(Exception):
    """Other submissions kept writing while this one tried to register."""


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
        # utf-8-sig: files saved by Excel and Notepad start with a byte order mark.
        raw = path.read_text(encoding="utf-8-sig")
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
    """The cap when none is given: DEFAULT_CAP_PER_ESSAY comparisons per essay (each
    comparison counts for two essays), never above all pairs. The stopping rule usually
    ends a batch earlier."""
    return budget_for(n, DEFAULT_CAP_PER_ESSAY)


def _checked_cap(
    batch: BatchIn,
    budget: int | None,
    comparisons_per_essay: float | None,
    target_reliability: float,
    max_essay_chars: int,
    max_cost_usd: float | None,
) -> int:
    """The batch's cap on comparisons, once the options that bound it are checked;
    InputError naming the first that cannot be."""
    n = len(batch.essays)
    if budget is not None and comparisons_per_essay is not None:
        raise InputError("give --budget or --comparisons-per-essay, not both")
    if budget is not None and budget < 1:
        raise InputError(f"--budget must be at least 1, got {budget}")
    too_long = [e for e in batch.essays if len(e.text) > max_essay_chars]
    if too_long:
        first = too_long[0]
        more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
        raise InputError(
            f"essay {first.essay_id!r} is {len(first.text):,} characters long{more}; the limit "
            f"is {max_essay_chars:,} (CJS_MAX_ESSAY_CHARS)"
        )
    if max_cost_usd is not None and not max_cost_usd > 0:
        raise InputError(f"--max-cost-usd must be more than 0, got {max_cost_usd}")
    if comparisons_per_essay is not None and not comparisons_per_essay > 0:
        raise InputError(f"--comparisons-per-essay must be > 0, got {comparisons_per_essay}")
    if not 0.0 <= target_reliability <= 1.0:
        raise InputError(f"--target-reliability must be in [0, 1], got {target_reliability}")
    if budget is not None:
        return budget
    if comparisons_per_essay is not None:
        return budget_for(n, comparisons_per_essay)
    return default_budget(n)


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
    max_essay_chars: int = MAX_ESSAY_CHARS,
    max_cost_usd: float | None = None,
    check_credentials: bool = True,
) -> BatchRegistered:
    """The registration of a batch; InputError when it could not run as asked. Provider
    credentials are checked unless `check_credentials` is False (a dry run). The budget (a
    cap) is ``budget`` comparisons in all, or ``comparisons_per_essay`` each, or the default;
    one of the two at most."""
    n = len(batch.essays)
    all_pairs = n * (n - 1) // 2
    if batch_id is not None and (problem := key_id_problem("batch_id", batch_id)):
        raise InputError(problem)
    total_budget = _checked_cap(
        batch, budget, comparisons_per_essay, target_reliability, max_essay_chars, max_cost_usd
    )
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
        preferred_bundle_size=MAX_BUNDLE_SIZE,
        max_cost_usd=max_cost_usd,
    )
    problems = provider_problems(provider, config.model, config.overrides)
    if check_credentials:
        problems += credential_problems(provider)
    if problems:
        raise InputError("; ".join(problems))
    denominator = min(total_budget, all_pairs)
    try:
        estimate = cost_estimate(
            provider,
            config.model,
            [e.text for e in essays],
            comparisons=denominator,
            batch=mode == "batch_api",
            cache_ttl=config.overrides.get("cache_ttl", "5m"),
            prompt_version=config.prompt_version,
        )
    except ValueError as exc:  # a bad CJS_PRICES_FILE
        raise InputError(f"price table: {exc}") from exc
    config = msgspec.structs.replace(
        config, cost_per_comparison_usd=round(estimate.per_comparison_usd, 9)
    )
    if max_cost_usd is not None:
        if not estimate.priced:
            raise InputError(
                f"--max-cost-usd: no price for {provider}/{config.model}, so the cap cannot be "
                "kept; add the model to the price table (CJS_PRICES_FILE)"
            )
        first_wave = min(2 * config.wave_size, denominator) * estimate.per_comparison_usd
        if first_wave > max_cost_usd:
            raise InputError(
                f"--max-cost-usd {max_cost_usd:g}: the first wave alone is estimated at "
                f"${first_wave:.4f}"
            )
    return BatchRegistered(
        batch_id=batch_id or new_id(),
        essays=essays,
        config=config,
        denominator=denominator,
    )


def submission_warnings(event: BatchRegistered) -> list[str]:
    """What will not stop the batch but the user should know: prompt caching that cannot
    engage on the chosen model, a model without a price (its cost shows as 0)."""
    cfg = event.config
    return [
        *cache_warnings(cfg.provider, cfg.model, cfg.prompt_version),
        *price_warnings(cfg.provider, cfg.model),
    ]


async def _stamped(r: Any, event: BatchRegistered) -> BatchRegistered:
    """`event` checked (its ids' grammar) and stamped with the Redis server's time (the clock
    of stall detection); InputError naming the problem."""
    problem = event_id_problem(event)
    if problem:
        raise InputError(problem)
    return msgspec.structs.replace(event, occurred_at=iso(await server_time(r)))


async def append_registration(r: Any, keys: Keys, event: BatchRegistered) -> BatchRegistered:
    """Append `BatchRegistered` (with its range hints) and write its projection in one
    MULTI/EXEC (in the batch's partition); returns the event as appended, stamped with the
    Redis server's time (the clock of stall detection)."""
    event = await _stamped(r, event)
    keys = keys.for_batch(event.batch_id)
    async with r.pipeline(transaction=True) as pipe:
        queue_registration(pipe, keys, event)
        queue_state_write(pipe, keys, register(event), full=True)
        await pipe.execute()
    return event


def submissions(keys: Keys) -> str:
    """Hash: content digest -> id of the batch registered with that content (submit's
    idempotency). Not a projection: nothing rebuilds it; without it a submission registers anew."""
    return keys.key("cj:submitted")


def content_digest(event: BatchRegistered) -> str:
    """What makes two submissions the same batch: the essays and the whole config (mode,
    provider, model, budget, seed, scale, thresholds ...), not the ids or the time."""
    body = msgspec.json.encode({"essays": event.essays, "config": event.config})
    return hashlib.sha256(body).hexdigest()


# How long a submission waits for another one registering the same content (its claim in the
# lookup names a batch not registered yet) before it takes the claim over (the other died).
CLAIM_WAIT_S = 5.0


async def least_loaded(r: Any, keys: Keys) -> Keys:
    """The partition holding the fewest batches (its index: registered, not yet archived) on
    the Redis Cluster master holding the fewest, one of the least at random: batches spread
    evenly over the masters, and so do keys and work (a batch's partition is otherwise the
    hash of an id: 30 batches over 16 partitions put twice as many on one master as on
    another). On one node, the partition holding the fewest."""
    parts = keys.whole.all_partitions()
    async with r.pipeline(transaction=False) as pipe:
        for part in parts:
            pipe.hlen(pkeys.batch_index(part))
        held = [int(n) for n in await pipe.execute()]
    on_node: dict[str, list[int]] = {}
    for k, part in enumerate(parts):
        node = r.get_node_from_key(part.batches).name if is_cluster(r) else ""
        on_node.setdefault(node, []).append(k)
    lightest = min(sum(held[k] for k in ks) for ks in on_node.values())
    candidates = [k for ks in on_node.values() if sum(held[k] for k in ks) == lightest for k in ks]
    fewest = min(held[k] for k in candidates)
    return parts[random.choice([k for k in candidates if held[k] == fewest])]


def in_partition(event: BatchRegistered, part: Keys) -> BatchRegistered:
    """`event` with a new id of partition `part` (its own id when it is of `part` already)."""
    while part.partition_of(event.batch_id) != part.partition:
        event = msgspec.structs.replace(event, batch_id=new_id())
    return event


async def register_once(
    r: Any, keys: Keys, event: BatchRegistered, *, force: bool = False, max_tries: int = 20
) -> tuple[str, bool]:
    """Register `event` unless a batch with the same content is registered (then its id is
    returned instead); with `force`, register it anyway. Returns (batch id, registered now).
    Concurrent identical submissions register one batch: the lookup is WATCHed. The lookup
    lives in the partition of the content digest.

    With one partition the lookup and the registration are one transaction. With several the
    batch goes to the least loaded partition (`least_loaded`, its id chosen to be of it), and
    two steps make it once: the submission claims the digest in the lookup (WATCH, MULTI),
    then registers the batch in its own partition; another submission of the same content
    finding a claim whose batch is not registered yet waits for it (CLAIM_WAIT_S) before it
    claims the digest itself. Like `append_registration`, the event is checked and stamped
    with the server's time."""
    event = await _stamped(r, event)
    digest = content_digest(event)
    home = keys.for_partition(partition_of(digest, keys.partitions))
    if keys.partitions > 1:
        return await _claim_and_register(r, keys, home, digest, event, force, max_tries)
    keys = home
    event = in_partition(event, keys)
    index = submissions(keys)
    async with r.pipeline(transaction=True) as pipe:
        for _ in range(max_tries):
            try:
                await pipe.watch(index)
                existing = None if force else await pipe.hget(index, digest)
                if existing is not None:
                    batch_id = as_str(existing)
                    if await pipe.exists(pkeys.batch(keys, batch_id)):
                        await pipe.unwatch()
                        return batch_id, False
                pipe.multi()
                queue_registration(pipe, keys, event)
                queue_state_write(pipe, keys, register(event), full=True)
                pipe.hset(index, digest, event.batch_id)
                await pipe.execute()
                return event.batch_id, True
            except WatchError:
                continue
    raise Contended(f"{index} kept changing during {max_tries} attempts; submit again")


async def _claim_and_register(
    r: Any,
    keys: Keys,
    home: Keys,
    digest: str,
    event: BatchRegistered,
    force: bool,
    max_tries: int,
) -> tuple[str, bool]:
    index = submissions(home)
    waited_until: float | None = None
    for _ in range(max_tries):
        claimed = None if force else await r.hget(index, digest)
        if claimed is not None:
            if await r.exists(pkeys.batch(keys, as_str(claimed))):
                return as_str(claimed), False
            # Claimed by a submission registering it now (or that died before it could).
            waited_until = waited_until or time.monotonic() + CLAIM_WAIT_S
            while time.monotonic() < waited_until:
                await asyncio.sleep(0.05)
                if await r.exists(pkeys.batch(keys, as_str(claimed))):
                    return as_str(claimed), False
        event = in_partition(event, await least_loaded(r, keys))
        async with r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(index)
                now = None if force else await pipe.hget(index, digest)
                if now != claimed:  # another submission claimed it meanwhile: look again
                    await pipe.unwatch()
                    continue
                pipe.multi()
                pipe.hset(index, digest, event.batch_id)
                await pipe.execute()
            except WatchError:
                continue
        await append_registration(r, keys, event)
        return event.batch_id, True
    raise Contended(f"{index} kept changing during {max_tries} attempts; submit again")
