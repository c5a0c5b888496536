"""The provider catalogue: construction by name (the names are what batches carry in
`provider`), and what registration must know of a provider before a batch is accepted."""

from __future__ import annotations

from collections.abc import Mapping

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
