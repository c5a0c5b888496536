"""Event types: the public vocabulary of every stream.

Every event is a msgspec Struct; the class name is the `type` field of the
stream entry and the encoded struct is its `data` field, or for the per-comparison
events its fields each a stream field (see `codec`).
Fields are only ever added with defaults, so older entries keep decoding.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal, TypeVar, get_args

import msgspec

from events.ids import request_key

SCHEMA_VERSION = 1

Mode = Literal["per_request", "serial_bundle", "batch_api"]
Winner = Literal["essay_a", "essay_b"]
# "stable" (max |Δθ| under a threshold) is no longer decided; old events keep it.
FinalizeReason = Literal[
    "reliable",
    "stable",
    "budget",
    "all_pairs",
    "failed",
    "stalled",
    # The batch's money cap (`BatchConfig.max_cost_usd`) would be passed by the next wave.
    "cost_limit",
    # An account-wide provider error (the LPS breaker's reasons, see ACCOUNT_FAILURES).
    "authentication",
    "permission",
    "billing",
    "spend_limit",
]

MAX_BUNDLE_SIZE = 64
"""The most requests in one bundle (judged in sequence, or sent as one Message Batch): CJ's
`preferred_bundle_size` hint never asks for more, and LPS caps whatever hint it gets to it."""

ErrorType = Literal[
    "rate_limit",
    "overloaded",
    "server_error",
    "timeout",
    "connection",
    "max_tokens",
    "invalid_request",
    "authentication",
    "permission",
    "billing",
    "request_too_large",
    "refusal",
    "parse_error",
    "expired",
]

ERROR_TYPES: tuple[str, ...] = get_args(ErrorType)

# `error.details.error_code` values of a 429 that mean an organisation spend cap, not a rate:
# nothing resumes by waiting. "spend_limit" is ours, for a cap told only by the message.
SPEND_LIMIT_CODES = frozenset(
    {"enforced_spend_limit_reached", "contract_spend_limit_reached", "spend_limit"}
)

# Failures of the account, not of one request: every call to the provider (or, for
# `permission`, to the model) fails the same way until someone acts. They open the LPS
# breaker and end a batch with their name as its reason.
ACCOUNT_FAILURES = frozenset({"authentication", "permission", "billing", "spend_limit"})


def now_iso() -> str:
    """UTC time with fixed microsecond width, so that timestamps compare as strings."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    """A random id: 80 bits as 16 characters of lowercase base32 (letters and 2-7, within the
    id grammar of events/ids.py), for batch, event, bundle and intent ids: uuid4 hex took twice
    the room for 122 bits nobody needed. Ids written before (32 hex) stay valid. (80 bits: ten
    billion ids collide with a chance of 4e-5.) Correlation ids are no longer random: they are
    numbered per batch (cj/continuation.py `numbered_ids`), written about five times per
    comparison; those of batches of before (random, of this form) stay valid."""
    return base64.b32encode(os.urandom(10)).decode().lower()


class Essay(msgspec.Struct, frozen=True, omit_defaults=True):
    """An essay as registered (anchors with `is_anchor` and their grade).

    In a `ComparisonRequested` an essay is a reference, its id alone (`essay_reference`): the
    text, anchor flag, grade and mock quality are those of the batch's `BatchRegistered`, and
    the request's `content_key` is the hash of all of them (`content_key`). Requests written
    before carry more and all decode: references of the first version also have the anchor
    fields, the mock quality and `sha256`, the hash of the text; older requests embed the
    text."""

    essay_id: str
    text: str = ""
    is_anchor: bool = False
    anchor_grade: str | None = None
    mock_quality: float | None = None
    sha256: str = ""

    @property
    def is_reference(self) -> bool:
        # Registration refuses empty texts: an essay without one names the registered essay.
        return not self.text


def text_sha256(text: str) -> str:
    """The hash by which first-version references name an essay's text (sha256 of its UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def essay_reference(essay: Essay) -> Essay:
    """The essay as a request carries it: its id. Everything else is registered once per batch
    (in `BatchRegistered`); repeating it in every request, hashes included, made the requests
    the largest entries of a live batch."""
    return Essay(essay_id=essay.essay_id)


def content_key(essays: Sequence[Essay], grade_scale: Sequence[str]) -> str:
    """SHA-256 of what a batch is about — its essays as registered (texts, anchors) and grade
    scale — not of its random id; its first 64 bits. With the seed, what the planner (and the
    mock judge) draw from, so the same input submitted twice with the same seed gives the same
    waves and judgements; and the hash LPS checks the batch's essay store against."""
    body = msgspec.json.encode([sorted(essays, key=lambda e: e.essay_id), list(grade_scale)])
    return hashlib.sha256(body).hexdigest()[:16]


class BatchConfig(msgspec.Struct, frozen=True, omit_defaults=True):
    mode: Mode = "per_request"
    provider: str = "mock"
    model: str = "mock-judge-1"
    total_budget: int = 0
    wave_size: int = 0
    min_waves: int = 2
    max_waves: int = 50
    stability_threshold: float = 0.05  # the old "stable" rule's; no longer used
    max_attempts_per_pair: int = 2
    max_failure_ratio: float = 0.5
    seed: int = 0
    grade_scale: list[str] = msgspec.field(default_factory=list)
    grade_scale_name: str = "swedish_6"
    preferred_bundle_size: int = MAX_BUNDLE_SIZE
    overrides: dict[str, str] = msgspec.field(default_factory=dict)
    prompt_version: str = "v1"
    max_cost_usd: float | None = None
    """Money cap: no wave is submitted whose estimated cost would take the batch past it."""
    cost_per_comparison_usd: float = 0.0
    """Estimated at registration; the cap uses it until the batch has costs of its own."""
    # The stopping rule (cj/stopping.py): posterior reliability and rank stability after
    # a minimum of comparisons per essay; the budget is the cap.
    target_reliability: float = 0.8
    rank_stability: float = 0.99
    min_comparisons_per_essay: float = 10.0


class ErrorDetail(msgspec.Struct, frozen=True, omit_defaults=True):
    error_type: ErrorType
    retryable: bool
    message: str
    provider: str = ""
    model: str = ""
    correlation_id: str = ""
    status_code: int | None = None
    retry_after_s: float | None = None
    error_code: str | None = None
    """The body's `error.details.error_code` (e.g. `enforced_spend_limit_reached`), if any."""


def failure_kind(error: ErrorDetail) -> str:
    """What a failure is about: its error type, or `spend_limit` for a rate limit that is an
    organisation's spend cap (a 429 that no waiting fixes)."""
    if (
        error.error_type == "rate_limit"
        and not error.retryable
        and error.error_code in SPEND_LIMIT_CODES
    ):
        return "spend_limit"
    return error.error_type


class TokenUsage(msgspec.Struct, frozen=True, omit_defaults=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


TOKEN_KINDS: tuple[str, ...] = TokenUsage.__struct_fields__
"""The kinds of token a `TokenUsage` counts, by field name (`input_tokens`: uncached input)."""

NANO_USD = 1_000_000_000
"""Costs are summed in integer nano-dollars (exact and order-free); events carry `cost_usd`."""


def nano_usd(cost_usd: float) -> int:
    """A `cost_usd` of an event in integer nano-dollars."""
    return round(cost_usd * NANO_USD)


class PairRequest(msgspec.Struct, frozen=True):
    """One pair of a wave, as recorded on `WaveSubmitted`."""

    correlation_id: str
    essay_a: str
    essay_b: str


class EssayScore(msgspec.Struct, frozen=True, omit_defaults=True):
    essay_id: str
    theta: float
    se: float
    rank: int = 0
    grade: str | None = None
    # Probability of every grade of the scale, and a high/mid/low label.
    grade_probabilities: dict[str, float] = msgspec.field(default_factory=dict)
    confidence: str | None = None
    # Shortest run of adjacent grades holding >= 80 %, lowest first; P(grade).
    grade_band: list[str] = msgspec.field(default_factory=list)
    grade_confidence: float | None = None


class Reliabilities(msgspec.Struct, frozen=True, omit_defaults=True):
    """The reliabilities of one fit; a None value comes with the reason (``*_na``)."""

    posterior: float | None = None  # var θ̂ / (var θ̂ + mean SE²): the headline
    posterior_na: str = ""
    ssr: float | None = None  # classical SSR on a near-ML fit: inflated by adaptive pairing
    ssr_na: str = ""
    split_half_r: float | None = None  # mean r over splits: deflated by adaptive pairing
    split_half: float | None = None  # its Spearman–Brown value
    split_half_splits: int = 0
    split_half_unit: str = ""  # "comparison" or "judge"
    split_half_na: str = ""  # also why it is absent (it is computed when a batch ends)


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    event_id: str = msgspec.field(default_factory=new_id)
    occurred_at: str = msgspec.field(default_factory=now_iso)
    schema_version: int = SCHEMA_VERSION


class EntryStamped(Event, frozen=True, kw_only=True):
    """An event written once per comparison (a request, a callback): its stream entry's id is
    its id and its time (ids are the server's, #16), so neither is written: the codec leaves
    them out and fills them in from the entry id when it decodes (`codec.with_entry_time`).
    They were 90 B of every request and callback. Entries written before carry both and decode
    as they were; an event built in memory has both empty until it is read back."""

    event_id: str = ""
    occurred_at: str = ""


E = TypeVar("E", bound=msgspec.Struct)


@cache
def _value_defaults(cls: type[msgspec.Struct]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (f.name, f.default)
        for f in msgspec.structs.fields(cls)
        if f.default is not msgspec.NODEFAULT and f.default is not None
    )


def with_defaults_omitted(event: E) -> E:
    """`event` with every field that equals its default holding the default object itself.

    msgspec's `omit_defaults` tells a default by identity, not equality: a `0.0` computed at run
    time, or a model name read from a config, is written although it equals the default. Every
    entry would carry e.g. `"latency_ms":0.0` and the default model; this leaves them out (the
    decoder gives the same values back). Top-level fields only: nested structs' defaults are
    empty strings, small integers, None and empty collections, which msgspec already omits."""
    changes: dict[str, Any] = {}
    for name, default in _value_defaults(type(event)):
        value = getattr(event, name)
        if value is not default and type(value) is type(default) and value == default:
            changes[name] = default
    return msgspec.structs.replace(event, **changes) if changes else event


# --- cj:batches -------------------------------------------------------------


class BatchRegistered(Event, frozen=True, kw_only=True):
    batch_id: str
    essays: list[Essay]
    config: BatchConfig
    denominator: int


class WaveSubmitted(Event, frozen=True, kw_only=True):
    batch_id: str
    wave: int
    pairs: list[PairRequest] = msgspec.field(default_factory=list)
    # How `pairs` are written (events.codec): `[correlation id, essay a, essay b]` each, without
    # the three names repeated per pair; decoded into `pairs`, so that no reader sees them.
    # Entries written before carry `pairs`.
    pair_rows: list[tuple[str, str, str]] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pair_rows:
            rows = [PairRequest(*row) for row in self.pair_rows]
            msgspec.structs.force_setattr(self, "pairs", [*self.pairs, *rows])
            msgspec.structs.force_setattr(self, "pair_rows", [])


class BatchScored(Event, frozen=True, kw_only=True):
    batch_id: str
    wave: int
    scores: list[EssayScore] = msgspec.field(default_factory=list)
    max_delta: float | None = None
    ssr: float | None = None
    position_bias: float | None = None
    position_bias_se: float | None = None
    connected: bool = True
    comparisons: int = 0
    components: int = 1
    # Split-half reliability (Spearman–Brown). `ssr` and `split_half` are also in
    # `reliability`, whose `posterior` is the headline (events before it: MAP-based SSR).
    split_half: float | None = None
    grade_boundaries: dict[str, float] = msgspec.field(default_factory=dict)
    warnings: list[str] = msgspec.field(default_factory=list)
    reliability: Reliabilities | None = None
    rank_stability: float | None = None  # Spearman's ρ of θ with the previous wave's
    # Share of students with a one-grade band, and the note when that is under half.
    single_grade_share: float | None = None
    grade_support: str = ""
    # False: scores of a wave before the batch's last, written with θ and SE alone; their
    # ranks, grades, boundaries and warnings follow from those (`cj.grades.graded_scores`,
    # what readers that show them call). Every score before this field was graded.
    graded: bool = True
    # How scores of θ and SE alone are written (events.codec): `[essay id, theta, se]` each;
    # decoded into `scores`, so that no reader sees them. Entries written before carry `scores`.
    score_rows: list[tuple[str, float, float]] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.score_rows:
            rows = [EssayScore(essay_id=e, theta=t, se=se) for e, t, se in self.score_rows]
            msgspec.structs.force_setattr(self, "scores", [*self.scores, *rows])
            msgspec.structs.force_setattr(self, "score_rows", [])


class BatchFinalized(Event, frozen=True, kw_only=True):
    batch_id: str
    reason: FinalizeReason
    # Requests still in flight at a forced finalization: their callbacks are late.
    abandoned: list[str] = msgspec.field(default_factory=list)


class BatchFailed(Event, frozen=True, kw_only=True):
    batch_id: str
    reason: str
    message: str = ""
    abandoned: list[str] = msgspec.field(default_factory=list)


# --- lps:requests -----------------------------------------------------------


class ComparisonRequested(EntryStamped, frozen=True, kw_only=True):
    batch_id: str
    correlation_id: str
    wave: int
    essay_a: Essay
    essay_b: Essay
    mode: Mode = "per_request"
    provider: str = "mock"
    model: str = "mock-judge-1"
    preferred_bundle_size: int = MAX_BUNDLE_SIZE
    overrides: dict[str, str] = msgspec.field(default_factory=dict)
    seed: int = 0
    prompt_version: str = "v1"
    # What a seeded judge may draw from, instead of the batch and correlation ids:
    # the batch's content hash and how many requests of this pair came before.
    content_key: str = ""
    occurrence: int = 0

    @property
    def key(self) -> str:
        """What names this request among every batch's (`events.ids.request_key`: correlation
        ids are numbered per batch)."""
        return request_key(self.batch_id, self.correlation_id)


# --- lps:dispatches ---------------------------------------------------------


class BundleDispatched(Event, frozen=True, kw_only=True):
    bundle_id: str
    mode: Mode
    provider: str
    model: str
    consumer: str
    correlation_ids: list[str]
    batch_ids: list[str]
    size: int
    provider_batch_id: str | None = None


class ProviderAttemptFailed(Event, frozen=True, kw_only=True):
    batch_id: str
    correlation_id: str
    attempt: int
    error: ErrorDetail
    will_retry: bool
    delay_s: float = 0.0
    prompt_sha256: str = ""
    # A billed failure (an HTTP 200 that ended in max_tokens, refusal or a parse error) has
    # usage and a cost; an error without a response has neither.
    usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    cost_usd: float = 0.0


class RequestExpired(Event, frozen=True, kw_only=True):
    batch_id: str
    correlation_id: str
    entry_id: str
    consumer: str
    deliveries: int
    idle_s: float


# --- cj:callbacks -----------------------------------------------------------


class ComparisonCompleted(EntryStamped, frozen=True, kw_only=True):
    batch_id: str
    correlation_id: str
    essay_a_id: str
    essay_b_id: str
    winner: Winner
    confidence: float
    justification: str = ""
    provider: str = ""
    model: str = ""
    latency_ms: float = 0.0
    usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    prompt_sha256: str = ""
    attempts: int = 1
    source_service: str = "lps"
    cost_usd: float = 0.0
    """What every attempt of this judging cost (failed attempts included); `usage` is the
    last attempt's."""


class ComparisonFailed(EntryStamped, frozen=True, kw_only=True):
    batch_id: str
    correlation_id: str
    essay_a_id: str
    essay_b_id: str
    error: ErrorDetail
    attempts: int = 1
    source_service: str = "lps"
    prompt_sha256: str = ""
    usage: TokenUsage = msgspec.field(default_factory=TokenUsage)
    """The last attempt's usage, when it was billed (an HTTP 200 that was no usable answer)."""
    cost_usd: float = 0.0
    """What every attempt of this judging cost."""


Callback = ComparisonCompleted | ComparisonFailed
BatchEvent = BatchRegistered | WaveSubmitted | BatchScored | BatchFinalized | BatchFailed

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        BatchRegistered,
        WaveSubmitted,
        BatchScored,
        BatchFinalized,
        BatchFailed,
        ComparisonRequested,
        BundleDispatched,
        ProviderAttemptFailed,
        RequestExpired,
        ComparisonCompleted,
        ComparisonFailed,
    )
}
