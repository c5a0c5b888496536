"""Provider construction by name; the names are what batches carry in `provider`."""

from __future__ import annotations

from lps.providers.base import Provider
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
