"""Runtime settings from the environment (`CJS_*`, `REDIS_URL`), validated by pydantic."""

from __future__ import annotations

import os
import socket
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.errors import ConfigError
from streams.dlq import DeadLetterPolicy
from streams.keys import Keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CJS_", extra="ignore")

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    prefix: str = ""
    processing_timeout_s: float = Field(default=120.0, gt=0)
    max_deliveries: int = Field(default=3, ge=1)
    batch_idle_timeout_s: float = Field(default=900.0, gt=0)
    reaper_interval_s: float = Field(default=10.0, gt=0)
    dead_consumer_after_s: float = Field(default=3600.0, gt=0)
    retry_max_attempts: int = Field(default=4, ge=1)
    retry_base_delay_s: float = Field(default=0.5, ge=0)
    retry_max_delay_s: float = Field(default=20.0, ge=0)
    retry_max_after_s: float = Field(default=60.0, ge=0)
    # No retry whose delay would take the time one comparison spent waiting past this.
    retry_max_total_delay_s: float = Field(default=180.0, ge=0)
    # A 429 / 529 without Retry-After pauses every worker's calls to that model this long.
    cooldown_rate_limit_s: float = Field(default=5.0, ge=0)
    cooldown_overloaded_s: float = Field(default=2.0, ge=0)
    # How often a worker asks whether a Message Batch (mode batch_api) has ended.
    batch_poll_s: float = Field(default=30.0, gt=0)
    # An open provider breaker (revoked key, billing) lets one probe call through this often.
    breaker_probe_s: float = Field(default=60.0, gt=0)
    read_count: int = Field(default=64, ge=1)
    block_ms: int = Field(default=1000, ge=1)
    # Retries of one Redis command by the client before the worker loop backs off itself.
    redis_retries: int = Field(default=8, ge=0)
    # A TCP connect (and, for a command line, the first answer) taking longer is a failure:
    # an unreachable Redis is reported at once rather than after the retries.
    redis_connect_timeout_s: float = Field(default=2.0, gt=0)
    # Longest essay text accepted at submit, in characters (both essays go into one prompt).
    max_essay_chars: int = Field(default=50_000, ge=1)
    # Dead letters: the most bytes of an entry's fields a letter copies (the rest is cut,
    # with the size and SHA-256 kept), how many letters a stream keeps, and for how long.
    dlq_max_entry_bytes: int = Field(default=4096, ge=64)
    dlq_maxlen: int = Field(default=100_000, ge=1)
    dlq_retention_s: float = Field(default=30 * 24 * 3600.0, ge=0)
    log_format: str = "auto"
    # Allows actions in `cjs dashboard` (read-only without it); never shown in a repr or log.
    dashboard_token: SecretStr | None = None


def consumer_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def load() -> Settings:
    """The settings from the environment; a bad value is a ConfigError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ConfigError(f"bad environment setting: {problems}") from exc


def _problem(error: Any) -> str:
    """One pydantic error as `VARIABLE=value: what is wrong`, the way the user set it."""
    name = str(error["loc"][0]) if error["loc"] else ""
    field = Settings.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    variable = alias if isinstance(alias, str) else f"CJS_{name.upper()}"
    return f"{variable}={error.get('input')!r}: {error['msg']}"


def dead_letter_policy(settings: Settings) -> DeadLetterPolicy:
    return DeadLetterPolicy(
        max_entry_bytes=settings.dlq_max_entry_bytes,
        maxlen=settings.dlq_maxlen,
        retention_s=settings.dlq_retention_s,
    )


def keys_for(settings: Settings, prefix: str | None = None) -> Keys:
    """The key namespace: CJS_PREFIX unless `prefix` overrides it."""
    return Keys(settings.prefix if prefix is None else prefix)
