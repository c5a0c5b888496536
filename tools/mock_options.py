"""The options of the commands that run batches in this process against the mock judge
(`cjs demo`, `cjs validate`), and the reading of its profile: declared once, so both read
them alike."""

from __future__ import annotations

import click

from lps.providers.mock import PROFILES, MockProfile, profile_from_env

profile_option = click.option(
    "--profile",
    type=click.Choice(sorted(PROFILES)),
    default=None,
    help="Mock judge profile [default: $CJS_MOCK_PROFILE or cj_generic_batch].",
)
seed_option = click.option(
    "--seed", type=int, default=7, show_default=True, help="Seed for pairs and the mock judge."
)
essays_option = click.option(
    "--essays",
    type=click.IntRange(min=2),
    default=None,
    help="Generate a sample of N essays instead of the bundled 42 (30 students, 12 anchors).",
)
budget_option = click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=None,
    help="Comparison budget [default: 10 per essay].",
)
timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Give up on a run after this many seconds.",
)


def mock_profile(name: str | None) -> MockProfile:
    """The profile `--profile` names (or CJS_MOCK_PROFILE's), as a usage error if unknown."""
    try:
        return profile_from_env(name)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
