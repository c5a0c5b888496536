"""The provider catalogue: construction by name (the names are what batches carry in
`provider`), and what registration must know of a provider before a batch is accepted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lps.prices import CostEstimate, estimate, price_table
from lps.providers.base import Provider
from lps.providers.mock import DEFAULT_MODEL as MOCK_DEFAULT_MODEL
from lps.providers.mock import MockProfile, MockProvider

PROVIDERS = ("mock", "anthropic")


def make_provider(
    name: str, *, mock_profile: MockProfile | None = None, mock_seed: int | None = None
) -> Provider:
    if name == "mock":
        return MockProvider(mock_profile, mock_seed)
    if name == "anthropic":
        from lps.providers.anthropic import AnthropicProvider  # the SDK loads only when used

        return AnthropicProvider.from_env()
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")


def default_model(provider: str) -> str:
    """The model of a batch registered for `provider` without one."""
    if provider == "anthropic":
        from lps.providers.anthropic import DEFAULT_MODEL

        return DEFAULT_MODEL
    return MOCK_DEFAULT_MODEL


def provider_problems(provider: str, model: str, overrides: Mapping[str, str]) -> list[str]:
    """What would make every comparison of a batch fail, caught before anything is appended."""
    if provider != "anthropic":
        return []
    from lps.providers.anthropic import model_problems, validate_overrides

    return [*model_problems(model), *validate_overrides(overrides)]


def credential_problems(provider: str) -> list[str]:
    """Why the provider could not make a single call from here (no credentials), so that a
    batch is refused at submit instead of failing every comparison later."""
    if provider != "anthropic":
        return []
    from lps.providers.anthropic import credential_problems as anthropic_credentials

    return anthropic_credentials()


def cost_estimate(
    provider: str,
    model: str,
    essay_texts: Sequence[str],
    *,
    comparisons: int,
    batch: bool,
    cache_ttl: str = "5m",
    prompt_version: str = "v1",
) -> CostEstimate:
    """The expected cost per comparison of a batch of these essays (price table and prompt
    sizes; an average pair of the batch's essays)."""
    from lps.prompt import PromptError, pair_tokens, static_prefix_tokens  # loads the SDK types

    mean = sum(len(t) for t in essay_texts) / max(1, len(essay_texts))
    sample = "x" * int(mean)
    try:
        prefix = static_prefix_tokens(prompt_version)
    except PromptError:
        prefix = 0
    return estimate(
        price_table(),
        provider,
        model,
        prefix_tokens=prefix,
        pair_tokens=pair_tokens(sample, sample),
        comparisons=comparisons,
        batch=batch,
        cache_ttl=cache_ttl,
    )


def cache_warnings(provider: str, model: str, prompt_version: str = "v1") -> list[str]:
    """Warnings (not errors) about prompt caching: a static prefix shorter than the model's
    minimum cacheable length is never cached, and every call pays it in full."""
    if provider != "anthropic":
        return []
    from lps.prompt import PromptError, static_prefix_tokens

    price = price_table().price(provider, model)
    minimum = price.min_cacheable_tokens if price is not None else None
    try:
        prefix = static_prefix_tokens(prompt_version)
    except PromptError:
        return []
    if minimum is None or prefix >= minimum:
        return []
    return [
        f"prompt caching will not engage on {model}: the static prompt prefix is about "
        f"{prefix} tokens, below the model's minimum cacheable length of {minimum}; every call "
        "pays the full input price (choose another model, or expect lps_prompt_cache_hit_ratio 0)"
    ]


def price_warnings(provider: str, model: str) -> list[str]:
    """A model the price table does not know costs 0 in every report: say so."""
    if price_table().known(provider, model):
        return []
    return [f"no price for {provider}/{model}: its cost shows as 0 (add it with CJS_PRICES_FILE)"]
