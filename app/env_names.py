"""`CJS_*` variables in the environment that nothing reads.

pydantic-settings ignores an environment variable that names no setting, so a misspelt one
(`CJS_BLOCKMS=200`) changes nothing without a word. Workers and commands warn about each
`CJS_*` name they do not know, with the closest known name when there is one. Only names are
logged, never values (a value may be a secret).

Known: the names `Settings` reads, and those read elsewhere (`READ_ELSEWHERE`: the provider's
and the mock judge's own variables, `CJS_DEBUG`, the tests' switches).
tests/test_settings_names.py holds `READ_ELSEWHERE` equal to what the code reads.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from functools import cache

import structlog
from pydantic import AliasChoices

log = structlog.get_logger()

READ_ELSEWHERE = frozenset(
    {
        # lps/providers/anthropic.py
        "CJS_ANTHROPIC_CACHE_TTL",
        "CJS_ANTHROPIC_CONNECT_TIMEOUT_S",
        "CJS_ANTHROPIC_MAX_TOKENS",
        "CJS_ANTHROPIC_MODEL",
        "CJS_ANTHROPIC_TIMEOUT_S",
        # tools/cli.py
        "CJS_DEBUG",
        # lps/providers/mock.py
        "CJS_MOCK_LATENCY_MEDIAN_MS",
        "CJS_MOCK_LATENCY_MS",
        "CJS_MOCK_LATENCY_P99_MS",
        "CJS_MOCK_POISON_MARKER",
        "CJS_MOCK_POSITION_BIAS",
        "CJS_MOCK_PROFILE",
        "CJS_MOCK_RATE_LIMIT_RPM",
        "CJS_MOCK_RATE_LIMIT_TPM",
        "CJS_MOCK_SEED",
        # lps/prices.py
        "CJS_PRICES_FILE",
        # the test suite's switches (README)
        "CJS_REQUIRE_CHROMIUM",
        "CJS_REQUIRE_REDIS",
        "CJS_REQUIRE_TOOLS",
    }
)


def settings_names() -> dict[str, str]:
    """The `CJS_*` names `Settings` reads, each with its field's name."""
    from app.settings import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    names: dict[str, str] = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, str):
            envs = [alias]
        elif isinstance(alias, AliasChoices):
            envs = [choice for choice in alias.choices if isinstance(choice, str)]
        else:
            envs = [f"{prefix}{field_name}"]
        names.update((env.upper(), field_name) for env in envs if env.upper().startswith("CJS_"))
    return names


@cache
def known_names() -> frozenset[str]:
    return frozenset(settings_names()) | READ_ELSEWHERE


def unknown_names(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each `CJS_*` name of `environ` that nothing reads, with the known name it most likely
    meant (None when none is close), in name order."""
    known = known_names()
    out: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        if name.startswith("CJS_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            out.append((name, close[0] if close else None))
    return out


def warn_unknown(environ: Mapping[str, str] | None = None) -> None:
    """A warning (`unknown_setting`) for each `CJS_*` name of the environment nothing reads."""
    for name, close in unknown_names(os.environ if environ is None else environ):
        log.warning("unknown_setting", name=name, did_you_mean=close)
