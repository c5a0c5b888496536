"""Runtime settings from the environment (`CJS_*`, `REDIS_URL`), validated by pydantic."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from app.errors import ConfigError
from app.loop import LoopKind
from streams.keys import Keys

if TYPE_CHECKING:  # streams.dlq brings logging and metrics: not on every command's path
    from streams.dlq import DeadLetterPolicy


class Settings(BaseSettings):
    # forbid: a keyword that names no field (`Settings(redis_url=...)`, whose field reads only
    # its alias REDIS_URL) is refused, not dropped. The environment is read by field names
    # only, so an unknown CJS_* variable is not refused here: app/env_names.py warns of it.
    model_config = SettingsConfigDict(env_prefix="CJS_", extra="forbid")

    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    prefix: str = ""
    # Partitions of the key space (fixed at deploy time; 1 keeps the single-node layout).
    partitions: int = Field(default=1, ge=1, le=1024)
    # REDIS_URL names any node of a Redis Cluster (redis-py's RedisCluster is used).
    redis_cluster: bool = False
    # Commits acknowledging a request or applying a callback wait (WAIT) for this many
    # replicas (0 or 1) at most CJS_REPLICA_ACK_TIMEOUT_MS.
    min_replicas_ack: int = Field(default=0, ge=0, le=1)
    replica_ack_timeout_ms: int = Field(default=1000, ge=1)
    # The partitions this worker reads ("" = all; e.g. "0-3,8"): spread partitions over
    # worker processes; a partition no worker reads waits for one.
    worker_partitions: str = ""
    processing_timeout_s: float = Field(default=120.0, gt=0)
    max_deliveries: int = Field(default=3, ge=1)
    batch_idle_timeout_s: float = Field(default=900.0, gt=0)
    # A batch's next wave is planned once this share of its current wave is back, from the
    # fit so far (1.0: only when all are back, the waves one after the other).
    wave_overlap: float = Field(default=0.8, gt=0, le=1)
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
    # The provider's limits per minute (the organisation's), which the shared limiter paces
    # every worker's calls at (lps/limiter.py); 0 = learned from the replies' headers.
    lps_rate_limit_rpm: float = Field(default=0.0, ge=0)
    lps_rate_limit_tpm: float = Field(default=0.0, ge=0)
    # Tokens (input + output) a call is expected to use until replies tell.
    lps_tokens_per_call: float = Field(default=1000.0, gt=0)
    # Calls one LPS worker may have in flight at most, however much the limiter allows
    # (each may hold a Redis connection: stay below the client's pool of 100).
    lps_max_concurrency: int = Field(default=64, ge=1)
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
    # Log lines on stderr (app/logs.py): `json`, `console` (readable), or `auto`: JSON from
    # workers and the dashboard, readable from a command on a terminal.
    log_format: Literal["auto", "json", "console"] = "auto"
    # The event loop of `cjs worker` and `cjs demo` (app/loop.py): uvloop, or asyncio's own.
    event_loop: LoopKind = "uvloop"
    # Allows actions in `cjs dashboard` (read-only without it); never shown in a repr or log.
    dashboard_token: SecretStr | None = None
    # Bounded memory (app/retention.py): finished batches are archived this long after their
    # end, then trimmed from the streams; dead letters are kept this long.
    retention_s: float = Field(default=86400.0, ge=0)
    archive_url: str = "archive"
    # fsspec storage options of the archive store, as JSON (e.g. {"endpoint_url": ...}).
    archive_options: dict[str, Any] = Field(default_factory=dict)
    archive_interval_s: float = Field(default=300.0, gt=0)


def consumer_name(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def load() -> Settings:
    """The settings from the environment; a bad value is a ConfigError naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ConfigError(f"bad environment setting: {problems}") from exc
    except SettingsError as exc:  # a JSON setting (CJS_ARCHIVE_OPTIONS) that is not JSON
        raise ConfigError(f"bad environment setting: {exc}: the value must be JSON") from exc


def _problem(error: Any) -> str:
    """One pydantic error as `VARIABLE=value: what is wrong`, the way the user set it."""
    name = str(error["loc"][0]) if error["loc"] else ""
    field = Settings.model_fields.get(name)
    alias = field.validation_alias if field is not None else None
    variable = alias if isinstance(alias, str) else f"CJS_{name.upper()}"
    return f"{variable}={error.get('input')!r}: {error['msg']}"


def dead_letter_policy(settings: Settings) -> DeadLetterPolicy:
    from streams.dlq import DeadLetterPolicy

    return DeadLetterPolicy(
        max_entry_bytes=settings.dlq_max_entry_bytes,
        maxlen=settings.dlq_maxlen,
        # Age is the archiver's (app/retention.py): it writes old letters to the archive
        # before trimming them; a trim when a letter is written would lose them unarchived.
        retention_s=0,
    )


def keys_for(settings: Settings, prefix: str | None = None) -> Keys:
    """The key namespace (every partition): CJS_PREFIX unless `prefix` overrides it. A
    prefix with a hash tag would put every partition in one slot: a ConfigError."""
    prefix = settings.prefix if prefix is None else prefix
    if (settings.partitions > 1 or settings.redis_cluster) and "{" in prefix:
        raise ConfigError(
            f"CJS_PREFIX={prefix!r} holds a hash tag: with CJS_PARTITIONS or "
            "CJS_REDIS_CLUSTER the partitions carry their own ({p<k>})"
        )
    return Keys(prefix, partitions=settings.partitions, tagged=settings.redis_cluster)


def worker_partitions(settings: Settings, keys: Keys) -> list[Keys]:
    """The partitions this worker reads: CJS_WORKER_PARTITIONS ("0-3,8"), else all."""
    spec = settings.worker_partitions.strip()
    if not spec:
        return keys.all_partitions()
    chosen: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            chosen.update(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise ConfigError(f"CJS_WORKER_PARTITIONS={spec!r}: {exc}") from exc
    bad = sorted(p for p in chosen if not 0 <= p < settings.partitions)
    if bad:
        raise ConfigError(
            f"CJS_WORKER_PARTITIONS={spec!r}: no partition {bad[0]} "
            f"(CJS_PARTITIONS={settings.partitions})"
        )
    return [keys.for_partition(p) for p in sorted(chosen)]
