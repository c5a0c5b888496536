"""What a provider call costs: a price table per provider and model, and the cost of a usage.

Prices are USD per million tokens (MTok), per kind of token:

- `input`: input after the last cache breakpoint (`TokenUsage.input_tokens`);
- `output`;
- `cache_write_5m` / `cache_write_1h`: prompt-cache writes with that TTL
  (`cache_creation_input_tokens`; the response's `cache_creation` breakdown, when present,
  says which TTL each token was written with, else the TTL the request asked for);
- `cache_read`: prompt-cache hits (`cache_read_input_tokens`);
- `batch_discount`: the share of the price a Message Batches item pays (0.5: half price,
  on every kind);
- `min_cacheable_tokens`: the model's minimum cacheable prompt length; a shorter prefix is
  never cached and every call pays full input (None: not known).

The shipped table is Anthropic's list price for the current models (platform.claude.com
pricing and model pages, checked 2026-11); `CJS_PRICES_FILE` names a JSON file that
overrides or extends it:

    {"anthropic": {"claude-sonnet-4-6": {"input": 3, "output": 15, "cache_read": 0.3},
                   "my-proxy-model": {"input": 1, "output": 5}}}

A model entry given in the file replaces the listed fields of the shipped entry; a new
model needs `input` and `output`, the rest default to Anthropic's multipliers (cache
writes 1.25x / 2x input, cache reads 0.1x input, batch 0.5). A provider with no table
(the mock judge) costs nothing. Haiku 5.5 costs more for prompts over 100k tokens; the
table holds the short-prompt band (comparisons are a few thousand tokens).

Costs are computed in integer nano-dollars, so that sums are exact whatever their order;
events carry them as `cost_usd` (`events.types.nano_usd` converts back).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from events.types import NANO_USD, TokenUsage

PRICES_FILE_ENV = "CJS_PRICES_FILE"
FREE_PROVIDERS = frozenset({"mock"})
"""Providers whose calls cost nothing (their tokens are still counted, in their own series)."""

_DATE_SUFFIX = re.compile(r"-\d{8}$")


class PriceError(ValueError):
    """The price file cannot be read or says something impossible."""


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of each kind; see the module docstring."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    batch_discount: float = 0.5
    min_cacheable_tokens: int | None = None

    @classmethod
    def standard(
        cls,
        input: float,
        output: float,
        *,
        cache_read: float | None = None,
        min_cacheable_tokens: int | None = None,
    ) -> ModelPrice:
        """Anthropic's usual shape: cache writes 1.25x (5 min) and 2x (1 h) the input price,
        cache reads 0.1x unless said otherwise, batches at half price."""
        return cls(
            input=input,
            output=output,
            cache_write_5m=input * 1.25,
            cache_write_1h=input * 2,
            cache_read=input / 10 if cache_read is None else cache_read,
            min_cacheable_tokens=min_cacheable_tokens,
        )


_P = ModelPrice.standard
# Anthropic list prices, USD per MTok (short-prompt band where a model has two).
ANTHROPIC_PRICES: dict[str, ModelPrice] = {
    "claude-fable-5-2": _P(8, 40, cache_read=0.20),
    "claude-mythos-5-2": _P(8, 40, cache_read=0.20),
    "claude-fable-5-1": _P(10, 50, cache_read=0.25, min_cacheable_tokens=512),
    "claude-mythos-5-1": _P(10, 50, cache_read=0.25, min_cacheable_tokens=512),
    "claude-fable-5": _P(10, 50, min_cacheable_tokens=512),
    "claude-mythos-5": _P(10, 50, min_cacheable_tokens=512),
    "claude-opus-5-5": _P(4, 20, cache_read=0.20),
    "claude-opus-5": _P(5, 25, min_cacheable_tokens=512),
    "claude-opus-4-8": _P(5, 25, min_cacheable_tokens=1024),
    "claude-opus-4-7": _P(5, 25, min_cacheable_tokens=2048),
    "claude-opus-4-6": _P(5, 25, min_cacheable_tokens=4096),
    "claude-opus-4-5": _P(5, 25, min_cacheable_tokens=4096),
    "claude-opus-4-1": _P(15, 75, min_cacheable_tokens=1024),
    "claude-opus-4": _P(15, 75, min_cacheable_tokens=1024),
    "claude-sonnet-5-5": _P(2, 10, cache_read=0.10),
    "claude-sonnet-5": _P(2, 10, min_cacheable_tokens=1024),
    "claude-sonnet-4-6": _P(3, 15, min_cacheable_tokens=1024),
    "claude-sonnet-4-5": _P(3, 15, min_cacheable_tokens=1024),
    "claude-sonnet-4": _P(3, 15, min_cacheable_tokens=1024),
    "claude-haiku-5-5": _P(0.10, 0.50, cache_read=0.01),
    "claude-haiku-4-5": _P(1, 5, min_cacheable_tokens=4096),
    "claude-haiku-3-5": _P(0.80, 4, min_cacheable_tokens=2048),
}
SHIPPED: dict[str, dict[str, ModelPrice]] = {"anthropic": ANTHROPIC_PRICES}

_FIELDS = {f.name for f in fields(ModelPrice)}


def _per_token_nano(price_per_mtok: float) -> Decimal:
    # USD per 1e6 tokens -> nano-USD per token: x * 1e9 / 1e6.
    return Decimal(repr(price_per_mtok)) * (NANO_USD // 1_000_000)


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, Mapping[str, ModelPrice]]

    def price(self, provider: str, model: str) -> ModelPrice | None:
        """The model's price (a dated id falls back to its alias), None when unknown."""
        table = self.prices.get(provider)
        if table is None:
            return None
        found = table.get(model)
        if found is None:
            found = table.get(_DATE_SUFFIX.sub("", model))
        return found

    def known(self, provider: str, model: str) -> bool:
        return provider in FREE_PROVIDERS or self.price(provider, model) is not None

    def cost_by_kind(
        self,
        provider: str,
        model: str,
        usage: TokenUsage,
        *,
        batch: bool = False,
        cache_ttl: str = "5m",
        cache_write_1h_tokens: int | None = None,
    ) -> dict[str, int]:
        """Nano-dollars of one response's `usage` per kind of token (the `TokenUsage` field
        names); empty for a free or unknown provider/model.

        `cache_write_1h_tokens`: how many of the cache writes were at the 1 h TTL, when the
        response says; otherwise they all count at `cache_ttl`."""
        price = self.price(provider, model)
        if price is None:
            return {}
        written = usage.cache_creation_input_tokens
        if cache_write_1h_tokens is None:
            long_ttl = written if cache_ttl == "1h" else 0
        else:
            long_ttl = min(written, max(0, cache_write_1h_tokens))
        share = Decimal(repr(price.batch_discount)) if batch else Decimal(1)
        exact = {
            "input_tokens": usage.input_tokens * _per_token_nano(price.input),
            "output_tokens": usage.output_tokens * _per_token_nano(price.output),
            "cache_read_input_tokens": usage.cache_read_input_tokens
            * _per_token_nano(price.cache_read),
            "cache_creation_input_tokens": (written - long_ttl)
            * _per_token_nano(price.cache_write_5m)
            + long_ttl * _per_token_nano(price.cache_write_1h),
        }
        return {
            kind: int((value * share).to_integral_value(rounding=ROUND_HALF_EVEN))
            for kind, value in exact.items()
        }

    def cost_nano(self, provider: str, model: str, usage: TokenUsage, **kw: Any) -> int:
        """Nano-dollars of one response's `usage` (0 for a free or unknown provider/model)."""
        return sum(self.cost_by_kind(provider, model, usage, **kw).values())

    def cost_usd(self, provider: str, model: str, usage: TokenUsage, **kw: Any) -> float:
        return self.cost_nano(provider, model, usage, **kw) / NANO_USD


def _model_price(provider: str, model: str, raw: object, base: ModelPrice | None) -> ModelPrice:
    where = f"{provider}/{model}"
    if not isinstance(raw, Mapping):
        raise PriceError(f"{where}: expected an object of prices, got {type(raw).__name__}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise PriceError(
            f"{where}: unknown price fields {sorted(unknown)}; known: {sorted(_FIELDS)}"
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "min_cacheable_tokens":
            if value is not None and (not isinstance(value, int) or value < 0):
                raise PriceError(f"{where}: min_cacheable_tokens must be a whole number")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise PriceError(f"{where}: {name} must be a number >= 0, got {value!r}")
        values[name] = value
    if base is not None:
        return replace(base, **values)
    if "input" not in values or "output" not in values:
        raise PriceError(f"{where}: a new model needs at least 'input' and 'output'")
    standard = ModelPrice.standard(float(values["input"]), float(values["output"]))
    return replace(standard, **values)


def parse_prices(doc: object, base: Mapping[str, Mapping[str, ModelPrice]]) -> PriceTable:
    """`base` with the overrides of a price document (see the module docstring)."""
    if not isinstance(doc, Mapping):
        raise PriceError("the price file must hold a JSON object {provider: {model: prices}}")
    merged = {provider: dict(models) for provider, models in base.items()}
    for provider, models in doc.items():
        if not isinstance(models, Mapping):
            raise PriceError(f"{provider}: expected an object of models")
        table = merged.setdefault(str(provider), {})
        for model, raw in models.items():
            table[str(model)] = _model_price(str(provider), str(model), raw, table.get(str(model)))
    return PriceTable(merged)


@lru_cache(maxsize=8)
def _load(path: str | None) -> PriceTable:
    if not path:
        return PriceTable(SHIPPED)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PriceError(f"{PRICES_FILE_ENV}={path}: {exc}") from None
    return parse_prices(doc, SHIPPED)


def price_table(env: Mapping[str, str] | None = None) -> PriceTable:
    """The shipped table, with `CJS_PRICES_FILE` applied (read once per path)."""
    env = os.environ if env is None else env
    return _load(env.get(PRICES_FILE_ENV) or None)


EXPECTED_OUTPUT_TOKENS = 150
"""A `record_comparison` call with a justification of two to four sentences (estimates only)."""


@dataclass(frozen=True)
class CostEstimate:
    """What comparisons of one batch are expected to cost (before any call)."""

    per_comparison_usd: float
    prefix_tokens: int
    pair_tokens: int
    output_tokens: int
    cached: bool
    """The prefix reaches the model's minimum cacheable length (or the minimum is unknown)."""
    priced: bool
    """False when the model has no price: the estimate is 0 and a money cap cannot hold."""


def estimate(
    table: PriceTable,
    provider: str,
    model: str,
    *,
    prefix_tokens: int,
    pair_tokens: int,
    comparisons: int,
    batch: bool = False,
    cache_ttl: str = "5m",
) -> CostEstimate:
    """Expected cost per comparison over `comparisons` calls: the pair and the answer at full
    price; the prefix written to the cache once and read after, or (below the model's
    minimum cacheable length) paid as plain input every time. Retries are not included."""
    price = table.price(provider, model)
    minimum = price.min_cacheable_tokens if price is not None else None
    cached = minimum is None or prefix_tokens >= minimum
    n = max(1, comparisons)
    if price is None:
        return CostEstimate(
            0.0,
            prefix_tokens,
            pair_tokens,
            EXPECTED_OUTPUT_TOKENS,
            cached,
            provider in FREE_PROVIDERS,
        )
    every = TokenUsage(input_tokens=pair_tokens, output_tokens=EXPECTED_OUTPUT_TOKENS)
    total = n * table.cost_nano(provider, model, every, batch=batch, cache_ttl=cache_ttl)
    if cached:
        write = TokenUsage(cache_creation_input_tokens=prefix_tokens)
        read = TokenUsage(cache_read_input_tokens=prefix_tokens)
        total += table.cost_nano(provider, model, write, batch=batch, cache_ttl=cache_ttl)
        total += (n - 1) * table.cost_nano(provider, model, read, batch=batch)
    else:
        plain = TokenUsage(input_tokens=prefix_tokens)
        total += n * table.cost_nano(provider, model, plain, batch=batch)
    return CostEstimate(
        total / n / NANO_USD, prefix_tokens, pair_tokens, EXPECTED_OUTPUT_TOKENS, cached, True
    )
