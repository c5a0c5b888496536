"""What happens when a wave is complete: score, then the next wave or the end of the batch.

`decide` is pure: given the batch state it returns the events to append (or None).
With waves overlapping (`overlap` < 1, CJS_WAVE_OVERLAP), the next wave is planned once that
share of the current wave is back, from a fit of the comparisons accepted so far and
excluding the pairs still in flight; the end of a batch (stopping rule, budget, failures)
is still decided only when every callback is in, so there is one `BatchFinalized` and the
stopping rule judges accepted comparisons only. `WaveGate` tells a consumer when to try.
`advance` runs it on one atomic read of the batch and appends its events together
with their projection writes in one MULTI/EXEC under WATCH on the batch hash, only if
no other decision was written since the read, so that of several consumers racing on
the same batch exactly one wins each step; the others see the new state and find
nothing to do. That is what makes `BatchFinalized` exactly-once.

The events of a step carry the Redis server's time in `occurred_at` (read with TIME at
the start of the step), not the worker's clock: `last_event_at` and stall detection
compare times of one clock.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import msgspec
import numpy as np
import structlog
from redis.exceptions import WatchError

from cj.grades import graded_scores
from cj.metrics import (
    CJ_BATCH_DURATION,
    CJ_FINALIZED,
    CJ_STEP_SECONDS,
    forget_completion,
    show_completion,
)
from cj.pairs import IndexedHistory, PairHistory, plan_wave
from cj.scoring import (
    Comparison,
    FloatArray,
    IntArray,
    Reliability,
    WarmStart,
    WaveScores,
    classical_ssr,
    max_abs_delta,
    rank_agreement,
    score_wave,
    split_half,
)
from cj.stopping import StopRule, is_reliable, per_essay
from events import codec
from events.clock import iso
from events.ids import id_order
from events.text import as_str
from events.types import (
    ACCOUNT_FAILURES,
    MAX_BUNDLE_SIZE,
    NANO_USD,
    BatchEvent,
    BatchFailed,
    BatchFinalized,
    BatchScored,
    ComparisonRequested,
    EssayScore,
    FinalizeReason,
    PairRequest,
    Reliabilities,
    WaveSubmitted,
    essay_reference,
)
from events.types import content_key as essays_key
from projections import keys as pkeys
from projections.batch import ABANDONED, PENDING, BatchState, apply_batch_event, failed_reason
from projections.store import (
    decode_state,
    queue_batch_event,
    queue_state_write,
    read_raw,
    with_scalars,
)
from streams.clock import time_of
from streams.keys import Keys

log = structlog.get_logger("cj.continuation")

# Failure kinds (`events.types.failure_kind`) that asking the same pair again cannot fix:
# LPS does not retry them either. Such a pair is never planned again.
PERMANENT_FAILURES = frozenset(
    {"invalid_request", "request_too_large", "refusal", "max_tokens", *ACCOUNT_FAILURES}
)


@dataclass
class Decision:
    events: list[BatchEvent] = field(default_factory=list)
    requests: list[ComparisonRequested] = field(default_factory=list)

    @property
    def terminal(self) -> BatchFinalized | BatchFailed | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, BatchFinalized | BatchFailed) else None


def comparisons_of(state: BatchState) -> list[Comparison]:
    """The accepted comparisons, ordered by content (essay_a, essay_b, winner_is_a), not by
    correlation id (random in batches of before), so a seed reproduces a run."""
    return BatchPairs(state).comparisons


def history_of(state: BatchState) -> list[PairHistory]:
    """Every pair's history, ordered by (wave, essay_a, essay_b, projection value)."""
    return BatchPairs(state).history


class BatchPairs:
    """What a decision reads of the batch's pairs, from one pass over them: the history, the
    accepted comparisons (``indexed`` for `score_wave`, when it can index them), how often a
    pair was asked, whether the last wave may have failed for an account-wide reason.

    Speed (issue 11): an essay is its rank in sorted-id order, which orders pairs as their
    ids do, so the sorts are of integers, not of tuples of strings, and the fit's arrays are
    made without `Comparison`s: ≈ 1.8 → 0.8 ms of a decision's ≈ 20 ms at 100 essays. An
    unusual state goes through the same pass (the comments below say how)."""

    def __init__(self, state: BatchState) -> None:
        self.ids = [e.essay_id for e in state.essays]
        try:
            self._read(state, self.ids, state.corr)
        except KeyError:  # an essay not of the batch, or a pair without a value (pending)
            names = [*self.ids, *(e for p in state.pairs.values() for e in p[1:])]
            self._read(state, names, dict.fromkeys(state.pairs, PENDING) | state.corr)

    def _read(self, state: BatchState, names: list[str], corr: dict[str, str]) -> None:
        self.names = sorted(set(names))
        self.rank = rank = {e: i for i, e in enumerate(self.names)}
        n = self.n = max(1, len(rank))
        pairs, last, nn = state.pairs, state.waves, n * n
        # Values without a pair (a state stored in part): `account_failure` reads them (as
        # of wave 0), and an accepted one is a KeyError where the comparisons are read.
        self.account = len(corr) > len(pairs)
        lost = (c for c, v in corr.items() if v.startswith("c ") and c not in pairs)
        self._lost = next(lost, None) if self.account else None
        # Speed (issue 11): list comprehensions over the pairs, each pair's outcome a small
        # integer (_OUTCOMES), the rest by numpy, and no `PairHistory` made unless asked
        # (`history`): the planner takes the arrays (`IndexedHistory`). A third less CPU
        # here (≈ 0.75 → 0.5 ms a decision at 100 essays), and the planner's own read of
        # the history gone. (wave, essay_a, essay_b) as one integer:
        keys = [wave * nn + rank[a] * n + rank[b] for wave, a, b in pairs.values()]
        values = [corr[cid] for cid in pairs]
        codes = [
            _PENDING
            if value == PENDING
            else (_WON_A if value.endswith("essay_a") else _WON_B)
            if value.startswith("c ")
            else _FAILED
            for value in values
        ]
        by_key = np.array(keys, dtype=np.intp)
        outcome = np.array(codes, dtype=np.int8)
        for k in np.flatnonzero(outcome == _FAILED).tolist():  # failed or abandoned
            value = values[k]
            if value.startswith("f "):
                kind = _kind(value)
                if kind in PERMANENT_FAILURES:
                    outcome[k] = _FOR_GOOD
                if keys[k] // nn == last:
                    self.account = self.account or kind in ACCOUNT_FAILURES
        by_wave = np.argsort(by_key, kind="stable")
        if np.any(np.diff(by_key[by_wave]) == 0):  # one pair twice in a wave: values order it
            order = by_wave.tolist()
            order.sort(key=lambda i: (keys[i], values[i]))
            by_wave = np.array(order, dtype=np.intp)
        pair = by_key % nn  # essay_a's rank × n + essay_b's
        ordered, told = pair[by_wave], outcome[by_wave]
        ha, hb, sorted_names = ordered // n, ordered % n, self.names
        self.history_arrays = IndexedHistory(
            sorted_names,
            ha,
            hb,
            told < _FAILED,
            told == _PENDING,
            told == _FOR_GOOD,
            lambda: _history(sorted_names, ha.tolist(), hb.tolist(), told.tolist()),
        )
        ea, eb = pair // n, pair % n
        self._unordered = np.sort(np.minimum(ea, eb) * n + np.maximum(ea, eb))
        won = outcome[(outcome == _WON_A) | (outcome == _WON_B)]
        done = 2 * pair[(outcome == _WON_A) | (outcome == _WON_B)] + (won == _WON_A)
        self._done = np.sort(done.astype(np.intp, copy=False))
        self.count = len(self._done)
        ra, rb = self._done // (2 * n), self._done // 2 % n
        self.indexed: tuple[IntArray, IntArray, FloatArray] | None = None
        position = {e: i for i, e in enumerate(self.ids)}  # as `_index_comparisons` has it
        if len(position) == len(self.names) and self._lost is None and not np.any(ra == rb):
            at = np.array([position[e] for e in self.names], dtype=np.intp)
            self.indexed = (at[ra], at[rb], (self._done & 1).astype(np.float64))
        # else `score_wave` indexes `comparisons`, and says what is wrong with them

    @property
    def history(self) -> list[PairHistory]:
        """Every pair's history, ordered by (wave, essay_a, essay_b, projection value)."""
        return self.history_arrays.items()

    @property
    def comparisons(self) -> list[Comparison]:
        """The accepted comparisons (made when asked: the batch's last scores need them)."""
        if self._lost is not None:
            raise KeyError(self._lost)
        names, n = self.names, self.n
        done = self._done.tolist()
        return [Comparison(names[k // (2 * n)], names[k // 2 % n], k % 2 == 1) for k in done]

    def asked(self, pairs: list[tuple[str, str]]) -> list[int]:
        """How often each of `pairs` was asked in the batch, in either order."""
        n = self.n
        ra = np.array([self.rank[a] for a, _ in pairs], dtype=np.intp)
        rb = np.array([self.rank[b] for _, b in pairs], dtype=np.intp)
        wanted = np.minimum(ra, rb) * n + np.maximum(ra, rb)
        upto = np.searchsorted(self._unordered, wanted, side="right")
        asked: list[int] = (upto - np.searchsorted(self._unordered, wanted)).tolist()
        return asked


# A pair's outcome in `BatchPairs._read`, and the `PairHistory` fields each stands for.
_PENDING, _WON_A, _WON_B, _FAILED, _FOR_GOOD = range(5)
_OUTCOMES: list[tuple[Any, ...]] = [
    ("pending",),
    ("completed", "essay_a"),
    ("completed", "essay_b"),
    ("failed", None, False),
    ("failed", None, True),
]


def _history(names: list[str], a: list[int], b: list[int], told: list[int]) -> list[PairHistory]:
    return [
        PairHistory(names[x], names[y], *_OUTCOMES[t]) for x, y, t in zip(a, b, told, strict=True)
    ]


def _kind(corr_value: str) -> str:
    """The failure kind of a "f <entry id> <kind>" projection value."""
    return corr_value.split(" ", 2)[-1]


def account_failure(state: BatchState, pairs: BatchPairs | None = None) -> tuple[str, str] | None:
    """(kind, message) when requests of the batch's last wave failed for an account-wide
    reason (a revoked key, billing, permission, a spend limit: the LPS breaker's reasons):
    no later wave could fare better, so the batch ends, named by it. ``pairs``: the
    decision's `BatchPairs` of the state, when taken."""
    if pairs is not None and not pairs.account:
        return None
    kinds = Counter(
        _kind(value)
        for cid, value in state.corr.items()
        if value.startswith("f ")
        and _kind(value) in ACCOUNT_FAILURES
        and state.pairs.get(cid, (0,))[0] == state.waves
    )
    if not kinds:
        return None
    kind, n = kinds.most_common(1)[0]
    return kind, (
        f"{n} comparison(s) of wave {state.waves} failed with {kind}: the provider refuses "
        "this account (see `cjs status` for the breaker); fix it, then submit again"
    )


def over_cost_cap(state: BatchState, n_requests: int) -> str | None:
    """Why a wave of `n_requests` would take the batch past its `max_cost_usd`, or None.
    A comparison is priced at what the batch's comparisons have cost on average so far, or at
    the estimate made at registration while there is none; those still in flight (a wave
    planned while the last one is out) count as spent."""
    cap = state.config.max_cost_usd
    if cap is None:
        return None
    spent = state.cost_nusd / NANO_USD
    paid = state.accepted + state.duplicates + state.late_callbacks
    per = spent / paid if paid and state.cost_nusd else state.config.cost_per_comparison_usd
    projected = spent + per * (n_requests + state.in_flight)
    if projected <= cap:
        return None
    out = f" and {state.in_flight} in flight" if state.in_flight else ""
    return (
        f"${spent:.4f} spent{out}; the next wave of {n_requests} comparisons at ${per:.5f} each "
        f"would bring it to ${projected:.4f}, past the cap of ${cap:.4f}"
    )


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or math.isinf(value) or math.isnan(value) else round(value, digits)


def content_key(state: BatchState) -> str:
    """The batch's content key (`events.types.content_key`): what its random draws derive from."""
    return essays_key(state.essays, state.config.grade_scale)


# What a batch's last scores alone carry (each wave's scores carry what the stopping rule
# and the planner read: θ, SE, the posterior reliability), and why the others have none.
SPLIT_HALF_LATER = "computed when the batch ends"
SSR_LATER = SPLIT_HALF_LATER


def _reliabilities(
    ids: list[str], pairs: BatchPairs, wave: WaveScores, seed: int, final: bool
) -> Reliabilities:
    fit, posterior = wave.fit, wave.posterior
    base = Reliabilities(
        posterior=_r(posterior.value),
        posterior_na=posterior.reason,
        ssr_na=SSR_LATER,
        split_half_na=SPLIT_HALF_LATER,
    )
    if not final:
        return base
    # As the scores record them: `final_scores` starts from those.
    full = {e: (round(fit.theta[e], 6), round(fit.se[e], 6)) for e in ids}
    return _at_the_end(base, ids, pairs.comparisons, seed, full, wave.classical)


def _at_the_end(
    base: Reliabilities,
    ids: list[str],
    comparisons: list[Comparison],
    seed: int,
    full: dict[str, tuple[float, float]],
    classical: Reliability | None = None,
) -> Reliabilities:
    """`base` with the classical SSR (``classical``, or computed) and the split-half."""
    # Once, for the batch's last scores, not every wave (issue 11: the SSR's near-ML refit
    # was a seventh of a wave's decision, and nothing decides on it). The split-half's 20
    # refits of each half are MAP fits from the full fit's θ and τ (`full`), all solved
    # together (`cj.scoring._Halves`): a tenth of the variational refits' CPU.
    ssr = classical if classical is not None else classical_ssr(ids, comparisons)
    halves = split_half(ids, comparisons, seed=seed, full=full)
    return msgspec.structs.replace(
        base,
        ssr=_r(ssr.value),
        ssr_na=ssr.reason,
        split_half_r=_r(halves.r),
        split_half=_r(halves.spearman_brown),
        split_half_splits=halves.splits,
        split_half_unit=halves.unit,
        split_half_na=halves.reason,
    )


def final_scores(
    state: BatchState, scored: BatchScored, pairs: BatchPairs | None = None
) -> BatchScored:
    """`score(state, final=True)` from `scored`, the batch's last `score(state)`: the classical
    SSR and the split-half reliability added and graded, without fitting again (speed,
    issue 11); ``pairs``: the decision's `BatchPairs` of the state, when taken."""
    assert scored.reliability is not None, "score() always says how reliable it is"
    ids = [e.essay_id for e in state.essays]
    # θ and SE as recorded (rounded to 6 digits): what `score(state, final=True)` gives too.
    full = {s.essay_id: (s.theta, s.se) for s in scored.scores}
    pairs = pairs if pairs is not None else BatchPairs(state)
    reliability = _at_the_end(scored.reliability, ids, pairs.comparisons, state.config.seed, full)
    scored = msgspec.structs.replace(
        scored, reliability=reliability, ssr=reliability.ssr, split_half=reliability.split_half
    )
    return graded_scores(scored, state.essays, state.config.grade_scale, final=True)


@CJ_STEP_SECONDS.labels("score").time()
def score(
    state: BatchState, *, final: bool = False, pairs: BatchPairs | None = None
) -> BatchScored:
    """Fit BT on the accepted comparisons and say how reliable the fit is.
    ``final``: the batch's last scores, with the classical SSR and the split-half
    reliability, graded (`cj.grades.graded_scores`: grades, bands, warnings). Earlier waves'
    scores carry θ, SE and the posterior reliability alone: what the next wave and the
    stopping rule need; grading every wave made them most of a live batch's bytes (and of
    its scoring time). ``pairs``: the decision's `BatchPairs` of the state, when taken."""
    pairs = pairs if pairs is not None else BatchPairs(state)
    ids = pairs.ids
    indexed = pairs.indexed
    wave = score_wave(
        ids,
        pairs.comparisons if indexed is None else (),
        classical=final,
        indexed=indexed,
        warm=warm_start(state),
    )
    fit = wave.fit
    order = sorted(ids, key=lambda i: (-fit.theta[i], i))
    previous = {s.essay_id: s.theta for s in state.scores.scores} if state.scores else {}
    reliability = _reliabilities(ids, pairs, wave, state.config.seed, final)
    scored = BatchScored(
        batch_id=state.batch_id,
        wave=state.waves,
        scores=[
            EssayScore(essay_id=i, theta=round(fit.theta[i], 6), se=round(fit.se[i], 6))
            for i in order
        ],
        max_delta=_r(max_abs_delta(previous, fit.theta)),
        ssr=reliability.ssr,
        position_bias=_r(fit.eta),
        position_bias_se=_r(fit.eta_se),
        connected=fit.connected,
        comparisons=pairs.count,
        components=fit.components,
        split_half=reliability.split_half,
        reliability=reliability,
        rank_stability=_r(rank_agreement(previous, fit.theta)) if previous else None,
        graded=False,
    )
    if final:
        return graded_scores(scored, state.essays, state.config.grade_scale, final=True)
    return scored


def warm_start(state: BatchState) -> WarmStart | None:
    """Where the wave's fit starts: the batch's last recorded scores (θ, SE as rounded,
    η), a function of the state (design invariant 8: no cache of the process's), when they
    are of the same essays (`cj.scoring._warm` checks). Issue 11: the fit's search of the
    mode of log λ then takes 2.7 rounds instead of 6.2, each an n×n inverse (17.3 inverses a
    fit instead of 21.3 at 100 essays); θ and SE move within the fit's tolerance on log λ
    (bench/fit_warm.py)."""
    last = state.scores
    if last is None or not last.scores:
        return None
    return WarmStart(
        theta={s.essay_id: s.theta for s in last.scores},
        se={s.essay_id: s.se for s in last.scores},
        eta=last.position_bias,
        eta_se=last.position_bias_se,
    )


def _finish(state: BatchState, reason: FinalizeReason) -> BatchFinalized:
    abandoned = sorted((c for c, v in state.corr.items() if v == PENDING), key=id_order)
    return BatchFinalized(batch_id=state.batch_id, reason=reason, abandoned=abandoned)


@CJ_STEP_SECONDS.labels("plan").time()
def next_wave(
    state: BatchState, fit: BatchScored | None = None, pairs: BatchPairs | None = None
) -> tuple[WaveSubmitted, list[ComparisonRequested]] | None:
    """The next wave, planned on `fit` (the scores just computed; else the last recorded);
    ``pairs``: the decision's `BatchPairs` of the state, when taken."""
    cfg = state.config
    remaining = state.denominator - state.submitted
    if remaining <= 0:
        return None
    wave = state.waves + 1
    # The first wave lays a connected graph, four comparisons per essay; later waves are
    # matchings (each essay at most once) chosen on the latest scores.
    size = min(2 * len(state.essays) if wave == 1 else cfg.wave_size, remaining)
    latest = fit or state.scores
    scores = {s.essay_id: (s.theta, s.se) for s in latest.scores} if latest else None
    anchors = {e.essay_id: e.anchor_grade for e in state.essays if e.is_anchor and e.anchor_grade}
    key = content_key(state)
    pairs = pairs if pairs is not None else BatchPairs(state)
    planned = plan_wave(
        key=key,
        wave=wave,
        seed=cfg.seed,
        essay_ids=[e.essay_id for e in state.essays],
        anchors=anchors,
        grade_scale=cfg.grade_scale,
        history=pairs.history_arrays,
        size=size,
        max_attempts_per_pair=cfg.max_attempts_per_pair,
        scores=scores,
    )
    if not planned:
        return None
    # Requests name essays by id; LPS reads them as registered with the batch.
    used = {essay_id for pair in planned for essay_id in pair}
    essays = {e.essay_id: essay_reference(e) for e in state.essays if e.essay_id in used}
    ids = numbered_ids(state, len(planned))
    requested = [PairRequest(cid, a, b) for cid, (a, b) in zip(ids, planned, strict=True)]
    bundle = max(1, min(len(requested), MAX_BUNDLE_SIZE))
    asked = pairs.asked(planned)
    requests = [
        ComparisonRequested(
            batch_id=state.batch_id,
            correlation_id=p.correlation_id,
            wave=wave,
            essay_a=essays[p.essay_a],
            essay_b=essays[p.essay_b],
            mode=cfg.mode,
            provider=cfg.provider,
            model=cfg.model,
            preferred_bundle_size=bundle,
            overrides=cfg.overrides,
            seed=cfg.seed,
            prompt_version=cfg.prompt_version,
            content_key=key,
            occurrence=occurrence,
        )
        for p, occurrence in zip(requested, asked, strict=True)
    ]
    return WaveSubmitted(batch_id=state.batch_id, wave=wave, pairs=requested), requests


def numbered_ids(state: BatchState, n: int) -> list[str]:
    """The correlation ids of the next `n` pairs of the batch: the k-th pair it ever planned is
    `str(k)` (a retried pair gets the next number, as any new pair). Written about five times
    per comparison (request, callback, wave, the projection's and LPS's hashes), such ids take
    a byte or three where Redis keeps a hash field or stream value that reads as an integer
    (listpacks), instead of a random id's 16 characters (issue 13).

    Numbered from `submitted`, which only a decision changes and `_write` compares under WATCH:
    a wave numbered on a state is written on that state's pairs or not at all (another wave
    written meanwhile changes `submitted`, and voids it), so no two waves share an id. A
    number already taken (a batch whose ids were random until an upgrade cannot have one; a
    defence only) is passed over.

    So is a number a callback named before it was asked for (an orphan: forged, or another
    system's): asked for now, replay would accept that callback, since it folds the callbacks
    after every wave, where live counted it an orphan. Never asked for, it stays an orphan on
    both. `_write` voids a wave when an orphan came in after the state it was numbered on."""
    taken, seen = state.pairs, state.orphan_ids
    out: list[str] = []
    k = max(state.submitted, len(taken))
    while len(out) < n:
        k += 1
        if str(k) not in taken and str(k) not in seen:
            out.append(str(k))
    return out


def too_many_failures(state: BatchState) -> str | None:
    """Why the batch cannot be scored for its failures (more of its accepted callbacks failed
    than its `max_failure_ratio` allows), or None when they are within the limit."""
    limit = state.config.max_failure_ratio
    if state.accepted and state.failed / state.accepted > limit:
        return f"{state.failed} of {state.accepted} comparisons failed (limit {limit:.0%})"
    return None


def stop_reason(state: BatchState, scored: BatchScored) -> FinalizeReason | None:
    """``reliable`` when the stopping rule holds, ``budget`` when the cap is reached."""
    cfg = state.config
    rule = StopRule(cfg.target_reliability, cfg.rank_stability, cfg.min_comparisons_per_essay)
    reliability = scored.reliability.posterior if scored.reliability else None
    if is_reliable(
        rule, reliability, scored.rank_stability, per_essay(scored.comparisons, len(state.essays))
    ):
        return "reliable"
    if state.submitted >= state.denominator or state.waves >= cfg.max_waves:
        return "budget"
    return None


def current_wave(state: BatchState) -> tuple[int, int]:
    """(size, requests still in flight) of the batch's last wave."""
    size = out = 0
    for cid, (wave, _, _) in state.pairs.items():
        if wave == state.waves:
            size += 1
            out += state.corr.get(cid) == PENDING
    return size, out


def overlap_threshold(state: BatchState, overlap: float) -> int:
    """Requests of the current wave still in flight at or below which the next wave is
    planned: (1 − overlap) of its size, rounded down (0: only when all are back). Older
    waves' stragglers do not count: they hold no decision up."""
    if overlap >= 1.0 or state.waves == 0:
        return 0
    return _out_at(overlap, current_wave(state)[0])


def _out_at(overlap: float, size: int) -> int:
    # 1 − 0.8 is 0.19999…: without the epsilon a fifth of 40 would be 7.
    return int((1.0 - overlap) * size + 1e-9)


def decide(state: BatchState, overlap: float = 1.0) -> Decision | None:
    """The next step of a batch, or None when there is none yet: the batch's step once all
    its callbacks are in; with `overlap` < 1 also the next wave once that share of the
    current wave is back (`early_wave`)."""
    if state.terminal:
        return None
    if state.in_flight > 0:
        if overlap >= 1.0:
            return None
        size, out = current_wave(state)  # one pass over the pairs: `overlap_threshold`'s rule
        if out > _out_at(overlap, size):
            return None
        return early_wave(state)
    pairs = BatchPairs(state)  # once for the decision (issue 11)
    decision = _decide(state, pairs)
    if isinstance(decision.terminal, BatchFinalized):
        # The batch's last scores carry what is too costly for every wave.
        for k, event in enumerate(decision.events):
            if isinstance(event, BatchScored):
                decision.events[k] = final_scores(state, event, pairs)
    return decision


def early_wave(state: BatchState) -> Decision | None:
    """The next wave while the end of the current one is still out: scored on the accepted
    comparisons, planned on that fit without the pairs in flight. Anything that would end
    the batch instead (the stopping rule, the budget, failures, the money cap, no pair
    left) is left to the decision taken when every callback is in: None."""
    if state.waves <= state.scored_wave or state.completed == 0:
        return None
    pairs = BatchPairs(state)  # once for the decision (issue 11)
    if account_failure(state, pairs) is not None or too_many_failures(state) is not None:
        return None
    scored = score(state, pairs=pairs)
    if stop_reason(state, scored) is not None:
        return None
    wave = next_wave(state, scored, pairs)
    if wave is None:
        return None
    submitted, requests = wave
    if over_cost_cap(state, len(requests)) is not None:
        return None
    return Decision(events=[scored, submitted], requests=requests)


def _decide(state: BatchState, pairs: BatchPairs) -> Decision:
    decision = Decision()
    scored: BatchScored | None = None
    if state.waves > state.scored_wave:
        scored = score(state, pairs=pairs)
        decision.events.append(scored)
        account = account_failure(state, pairs)
        if account is not None:
            kind, message = account
            decision.events.append(_end(state, cast(FinalizeReason, kind), message))
            return decision
        failures = too_many_failures(state)
        if failures:
            decision.events.append(
                BatchFailed(batch_id=state.batch_id, reason="too_many_failures", message=failures)
            )
            return decision
        if state.completed == 0:
            decision.events.append(
                BatchFailed(
                    batch_id=state.batch_id,
                    reason="no_comparisons",
                    message="no comparison succeeded",
                )
            )
            return decision
        reason = stop_reason(state, scored)
        if reason is not None:
            decision.events.append(_finish(state, reason))
            return decision
    wave = next_wave(state, scored, pairs)
    if wave is None:
        if state.completed == 0:
            decision.events.append(
                BatchFailed(
                    batch_id=state.batch_id, reason="no_pairs", message="no pair could be formed"
                )
            )
        else:
            reason_left: FinalizeReason = (
                "budget" if state.submitted >= state.denominator else "all_pairs"
            )
            decision.events.append(_finish(state, reason_left))
        return decision
    submitted, requests = wave
    over = over_cost_cap(state, len(requests))
    if over is not None:
        decision.events.append(_end(state, "cost_limit", over))
        return decision
    decision.events.append(submitted)
    decision.requests = requests
    return decision


def _end(state: BatchState, reason: FinalizeReason, message: str) -> BatchFinalized | BatchFailed:
    """Stop the batch for `reason`: finalized when it has comparisons to score, else failed."""
    if state.completed:
        return _finish(state, reason)
    return BatchFailed(batch_id=state.batch_id, reason=reason, message=message)


def queue_decision(pipe: Any, keys: Keys, state: BatchState, decision: Decision) -> BatchState:
    """Buffer the decision's appends and projection writes (inside MULTI), in the batch's
    partition."""
    keys = keys.for_batch(state.batch_id)
    touched: list[str] = []
    queue_requests(pipe, keys.requests, decision.requests)
    for event in decision.events:
        queue_batch_event(pipe, keys, event)
        state = apply_batch_event(state, event)
        if isinstance(event, WaveSubmitted):
            touched.extend(p.correlation_id for p in event.pairs)
        elif isinstance(event, BatchFinalized | BatchFailed):
            touched.extend(c for c in event.abandoned if state.corr.get(c) == ABANDONED)
    queue_state_write(pipe, keys, state, full=False, corr_ids=touched)
    return state


# Append requests in order, each as `XADD stream * field value ...` would (speed, issue 11: an
# XADD each in a decision's MULTI cost ≈ 50 µs of client CPU a request, mostly redis-py reading
# and parsing one reply each; one script call for all costs ≈ 22 µs, for ≈ 4 µs more of Redis's).
# KEYS: 1 the stream; ARGV: for each request, the count of its field names and values, then them.
_XADD_ALL_LUA = """
local i, last = 1, #ARGV
while i <= last do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 0
"""


def queue_requests(pipe: Any, stream: str, requests: list[ComparisonRequested]) -> None:
    """Buffer the append of `requests` to `stream` (inside MULTI): the same entries, in the
    same order, as an XADD each."""
    if not requests:
        return
    args: list[Any] = []
    for request in requests:
        fields = codec.encode(request)
        args.append(2 * len(fields))
        for item in fields.items():
            args += item
    pipe.eval(_XADD_ALL_LUA, 1, stream, *args)


Decider = Callable[[BatchState], "Decision | None"]


def stamped(decision: Decision, occurred_at: str) -> Decision:
    """The decision with every event's `occurred_at` set to `occurred_at` (the server's now)."""
    return Decision(
        events=[msgspec.structs.replace(e, occurred_at=occurred_at) for e in decision.events],
        requests=[msgspec.structs.replace(q, occurred_at=occurred_at) for q in decision.requests],
    )


class WaveGate:
    """When a CJ consumer asks for a batch's next step (`wants`), with the decider to take it
    (`decide`): after the callback that brings a batch's in-flight requests to 0, as ever,
    and with overlapping waves also at `overlap_threshold`. The threshold of each batch is
    learnt from the states this consumer decides on (a batch it has not seen yet is tried
    once to learn it); one where the early wave was declined (the batch is ending) waits
    for 0. What is learnt only says when to try: `decide` itself is the rule, so a stale
    threshold costs a load or a later wave, never a wrong step."""

    def __init__(self, overlap: float = 1.0) -> None:
        if not 0.0 < overlap <= 1.0:
            raise ValueError(f"wave overlap must be in (0, 1], got {overlap}")
        self.overlap = overlap
        self._at: dict[str, int] = {}

    def wants(self, batch_id: str, left: int) -> bool:
        """Whether a callback that left `left` requests of the batch in flight (all waves) is
        worth an `advance`: at most the older waves' stragglers (as last seen: they only
        come back) and the current wave's threshold."""
        if left <= 0:
            return True
        if self.overlap >= 1.0:
            return False
        at = self._at.get(batch_id)
        return at is None or left <= at

    def decide(self, state: BatchState) -> Decision | None:
        decision = decide(state, self.overlap)
        if self.overlap < 1.0:
            self._learn(state, decision)
        return decision

    def _learn(self, state: BatchState, decision: Decision | None) -> None:
        batch_id = state.batch_id
        if state.terminal or (decision is not None and decision.terminal is not None):
            self._at.pop(batch_id, None)
            return
        events = decision.events if decision is not None else []
        submitted = next((e for e in events if isinstance(e, WaveSubmitted)), None)
        if submitted is not None:
            self._at[batch_id] = state.in_flight + _out_at(self.overlap, len(submitted.pairs))
            return
        size, out = current_wave(state)
        threshold = _out_at(self.overlap, size)
        if state.in_flight > 0 and out <= threshold:
            self._at[batch_id] = 0  # declined: the batch ends when all are back
        else:
            self._at[batch_id] = state.in_flight - out + threshold


async def advance(
    r: Any, keys: Keys, batch_id: str, *, decider: Decider = decide, max_tries: int = 50
) -> Decision | None:
    """Take the batch's next step if it has one; safe to call from any number of consumers.

    `decider` (pure) says what the step is: `decide` for the normal flow, another for
    forced ends (stalled batches). It decides on one atomic read of the batch; the decision
    is written (`_write`) only if no other decision was written since, so that of several
    consumers racing on the same batch exactly one takes each step. Its events carry the
    server's time."""
    keys = keys.for_batch(batch_id)
    for _ in range(max_tries):
        raw = await read_raw(r, keys, batch_id, atomic=True)
        state = decode_state(raw, keys, batch_id)
        # Scoring is CPU work: keep the event loop (and the LPS work beside it) responsive.
        decision = await asyncio.to_thread(decider, state) if state is not None else None
        if state is None or decision is None:
            return None
        written = await _write(r, keys, state, raw[pkeys.batch(keys, batch_id)], decision)
        if written is not None:
            _report(*written)
            return written[1]
    log.warning("advance_gave_up", batch_id=batch_id, tries=max_tries)
    return None


# The batch hash's fields only a decision changes (callbacks change the counters and times).
DECIDED = ("status", "waves", "scored_wave", "submitted", "finalize_reason", "completed_at")

# The batch hash as it is now, and the server's time (TIME's reply), read under WATCH before
# a decision is written. Speed (issue 11): the time was a round trip of its own; a script
# because a cluster's pipeline refuses TIME, a command without a key, inside WATCH.
# KEYS: 1 the batch hash.
_NOW_LUA = """
return {redis.call('HGETALL', KEYS[1]), redis.call('TIME')}
"""


async def _write(
    r: Any,
    keys: Keys,
    state: BatchState,
    read: dict[bytes | str, bytes | str],
    decision: Decision,
    max_tries: int = 50,
) -> tuple[BatchState, Decision] | None:
    """Append the decision, its events stamped with the server's time, with its projection
    writes in one MULTI/EXEC under WATCH on the batch hash, as read again at that moment; the
    state written and the decision as stamped, or None (decide again) when another decision
    was written since `state` was read (`read`: its batch hash).

    Callbacks applied since do not void a next wave (speed, issue 11: at zero latency one
    in ten decisions was taken again for them): it is written on top of their counts (the
    projection commutes, projections/batch.py), and its pairs are new: numbered from the
    `submitted` it was decided on (`numbered_ids`), one of the fields compared, unless an
    orphan applied since named one of them (`_numbers_seen`). A batch's end is written only on
    the very state it was decided on: it names the requests still in flight, and callbacks
    change which those are."""
    batch_key = pkeys.batch(keys, state.batch_id)
    strict = decision.terminal is not None
    async with r.pipeline(transaction=True) as pipe:
        for _ in range(max_tries):
            try:
                await pipe.watch(batch_key)
                flat, moment = await pipe.eval(_NOW_LUA, 1, batch_key)
                now = dict(zip(flat[::2], flat[1::2], strict=True))
                changed = now != read  # mostly not: nothing to decode then
                if changed and (
                    strict
                    or _decided(now) != _decided(read)
                    or (
                        _orphans(now) != _orphans(read)
                        and await _numbers_seen(pipe, keys, state.batch_id, decision)
                    )
                ):
                    await pipe.unwatch()
                    return None
                pipe.multi()
                timed = stamped(decision, iso(time_of(moment)))
                # The scalars as read again: those of `state` when nothing changed them.
                base = with_scalars(state, now if changed else None)
                written = queue_decision(pipe, keys, base, timed)
                await pipe.execute()
                return written, timed
            except WatchError:  # written meanwhile: look again
                continue
    return None


def _orphans(batch_hash: dict[bytes | str, bytes | str]) -> bytes | str | None:
    return batch_hash.get(b"orphans", batch_hash.get("orphans"))


async def _numbers_seen(pipe: Any, keys: Keys, batch_id: str, decision: Decision) -> bool:
    """Whether an orphan that came in after the decision's state was read named one of the
    ids its wave numbered (`numbered_ids` passes over those it knew): then it is decided
    again. Read under WATCH of the batch hash, whose orphan count a later one changes."""
    ids = [
        p.correlation_id for e in decision.events if isinstance(e, WaveSubmitted) for p in e.pairs
    ]
    if not ids:
        return False
    seen = await pipe.hmget(pkeys.batch_orphans(keys, batch_id), ids)
    return any(v is not None for v in seen)


def _decided(batch_hash: dict[bytes | str, bytes | str]) -> dict[str, str] | None:
    """The fields of the batch hash a decision changes; None when there is no batch hash."""
    if not batch_hash:
        return None
    fields = {as_str(k): as_str(v) for k, v in batch_hash.items()}
    return {name: fields.get(name, "") for name in DECIDED}


def _report(state: BatchState, decision: Decision) -> None:
    terminal = decision.terminal
    if terminal is None:
        show_completion(
            state.batch_id, state.accepted / state.denominator if state.denominator else 0.0
        )
    else:
        forget_completion(state.batch_id)
        reason = (
            terminal.reason if isinstance(terminal, BatchFinalized) else failed_reason(terminal)
        )
        duration = _seconds_between(state.registered_at, state.completed_at)
        if duration is not None:
            CJ_BATCH_DURATION.labels(reason).observe(duration)
    for event in decision.events:
        if isinstance(event, WaveSubmitted):
            log.info(
                "wave_submitted", batch_id=state.batch_id, wave=event.wave, pairs=len(event.pairs)
            )
        elif isinstance(event, BatchScored):
            log.info(
                "batch_scored",
                batch_id=state.batch_id,
                wave=event.wave,
                reliability=event.reliability.posterior if event.reliability else None,
                rank_stability=event.rank_stability,
                comparisons=event.comparisons,
            )
    if isinstance(terminal, BatchFinalized):
        CJ_FINALIZED.labels(terminal.reason).inc()
        log.info(
            "batch_finalized",
            batch_id=state.batch_id,
            reason=terminal.reason,
            completed=state.completed,
            failed=state.failed,
            abandoned=len(terminal.abandoned),
        )
    elif isinstance(terminal, BatchFailed):
        CJ_FINALIZED.labels(failed_reason(terminal)).inc()
        log.warning(
            "batch_failed",
            batch_id=state.batch_id,
            reason=terminal.reason,
            message=terminal.message,
        )


def _seconds_between(start: str, end: str) -> float | None:
    try:
        return max(
            0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        )
    except (TypeError, ValueError):
        return None
