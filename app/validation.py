"""The validation report behind `cjs validate` (pure: no I/O): what a run's events say about
error rates, A/B positions, counters, callbacks, provider calls, bundles, tokens by kind and
cost, and how two runs compare. Everything is counted from the events; the projection's
counters are then checked against those counts (`counters_match_events`). Getting the runs
is app/runs.py's job.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import spearmanr

from app.views import results_view
from cj.pairs import slot_counts
from cj.reporting import grade_agreement, headline
from events.streams import CALLBACKS
from events.types import (
    TOKEN_KINDS,
    BatchFailed,
    BatchFinalized,
    BundleDispatched,
    Callback,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    Event,
    ProviderAttemptFailed,
    RequestExpired,
    WaveSubmitted,
    nano_usd,
)
from lps.providers.mock import quality_of
from projections.batch import COUNTERS as BATCH_COUNTERS
from projections.batch import BatchState, entry_id_key

MODES = ("per_request", "serial_bundle")
# The projection's counters, less the bookkeeping one no event counts.
COUNTERS = tuple(c for c in BATCH_COUNTERS if c != "scored_wave")
ESSAY_FIELDS = (
    "essay_id",
    "is_anchor",
    "anchor_grade",
    "theta",
    "se",
    "grade",
    "grade_probabilities",
)


@dataclass
class Run:
    label: str
    events: list[tuple[str, str, Event]]  # (stream without prefix, entry id, event), id order
    state: BatchState
    counters_source: str
    wall_s: float | None = None


def _rate(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def _shares(counts: Counter[str], total: int) -> dict[str, dict[str, Any]]:
    """Per kind, its count and its share of `total`."""
    return {kind: {"count": c, "rate": _rate(c, total)} for kind, c in sorted(counts.items())}


def label_runs(runs: list[Run]) -> None:
    """Label each run by its mode, and by mode and file where two runs share a mode."""
    modes = [run.state.config.mode for run in runs]
    for run, mode in zip(runs, modes, strict=True):
        run.label = mode if modes.count(mode) == 1 else f"{mode}:{run.label}"


def spearman_true(state: BatchState) -> float | None:
    """Spearman between the batch's θ and the essays' latent (mock) qualities."""
    if state.scores is None:
        return None
    theta = {s.essay_id: s.theta for s in state.scores.scores}
    ids = [e.essay_id for e in state.essays if e.essay_id in theta]
    if len(ids) < 3:
        return None
    truth = {e.essay_id: quality_of(e) for e in state.essays}
    rho = spearmanr([theta[i] for i in ids], [truth[i] for i in ids]).statistic
    return round(float(rho), 4)


# --- counters -----------------------------------------------------------------------------------


def count_from_events(run: Run) -> dict[str, int]:
    """The batch counters computed from the events alone (independently of the projection)."""
    requested: set[str] = set()
    abandoned: set[str] = set()
    submitted = waves = 0
    by_cid: dict[str, list[tuple[tuple[int, int], Callback]]] = defaultdict(list)
    total = 0
    for stream, entry_id, event in run.events:
        if isinstance(event, WaveSubmitted):
            submitted += len(event.pairs)
            waves = max(waves, event.wave)
        elif isinstance(event, ComparisonRequested):
            requested.add(event.correlation_id)
        elif isinstance(event, BatchFinalized | BatchFailed):
            abandoned.update(event.abandoned)
        elif stream == CALLBACKS and isinstance(event, ComparisonCompleted | ComparisonFailed):
            total += 1
            by_cid[event.correlation_id].append((entry_id_key(entry_id), event))
    completed = failed = duplicates = late = orphans = cost = 0
    for cid, seen in by_cid.items():
        if cid not in requested:
            orphans += len(seen)
            continue
        cost += sum(nano_usd(cb.cost_usd) for _, cb in seen)
        if cid in abandoned:
            late += len(seen)
        else:
            first = min(seen, key=lambda pair: pair[0])[1]
            completed += isinstance(first, ComparisonCompleted)
            failed += isinstance(first, ComparisonFailed)
            duplicates += len(seen) - 1
    answered = sum(1 for c in requested if c in by_cid and c not in abandoned)
    return {
        "submitted": submitted,
        "requests_in_stream": len(requested),
        "completed": completed,
        "failed": failed,
        "callbacks_received": total,
        "duplicates": duplicates,
        "orphans": orphans,
        "late_callbacks": late,
        "waves": waves,
        "in_flight": len(requested) - answered - len(abandoned & requested),
        "cost_nusd": cost,
    }


def _counters(run: Run, counted: dict[str, int]) -> tuple[dict[str, dict[str, int]], bool]:
    """Each counter from the projection beside its count from the events; whether all agree."""
    counters = {
        name: {"projection": getattr(run.state, name), "events": counted[name]} for name in COUNTERS
    }
    match = (
        all(v["projection"] == v["events"] for v in counters.values())
        and counted["submitted"] == counted["requests_in_stream"]
    )
    return counters, match


# --- the events of one run ----------------------------------------------------------------------


@dataclass
class RunEvents:
    """A run's events sorted by what the report counts."""

    requests: dict[str, ComparisonRequested] = field(default_factory=dict)
    callbacks: list[tuple[str, Callback]] = field(default_factory=list)  # (entry id, callback)
    attempts: list[ProviderAttemptFailed] = field(default_factory=list)
    bundles: list[BundleDispatched] = field(default_factory=list)
    expired: list[RequestExpired] = field(default_factory=list)

    @classmethod
    def of(cls, run: Run) -> RunEvents:
        out = cls()
        for stream, entry_id, event in run.events:
            if isinstance(event, ComparisonRequested):
                out.requests[event.correlation_id] = event
            elif stream == CALLBACKS and isinstance(event, ComparisonCompleted | ComparisonFailed):
                out.callbacks.append((entry_id, event))
            elif isinstance(event, ProviderAttemptFailed):
                out.attempts.append(event)
            elif isinstance(event, BundleDispatched):
                out.bundles.append(event)
            elif isinstance(event, RequestExpired):
                out.expired.append(event)
        return out

    @property
    def completed(self) -> list[ComparisonCompleted]:
        return [cb for _, cb in self.callbacks if isinstance(cb, ComparisonCompleted)]

    def outcomes(self) -> dict[str, Callback]:
        """Per requested correlation id, the callback that counts: the earliest entry."""
        first: dict[str, tuple[tuple[int, int], Callback]] = {}
        for entry_id, cb in self.callbacks:
            key = entry_id_key(entry_id)
            cid = cb.correlation_id
            if cid in self.requests and (cid not in first or key < first[cid][0]):
                first[cid] = (key, cb)
        return {cid: cb for cid, (_, cb) in first.items()}

    def provider_of(self, cid: str, named: str = "") -> str:
        req = self.requests.get(cid)
        return named or (req.provider if req else "unknown")


# --- error rates: per provider call (attempts) and per comparison (final outcomes) --------------


def error_rates(ev: RunEvents, outcomes: dict[str, Callback]) -> dict[str, Any]:
    return {"attempts": _attempt_errors(ev), "comparisons": _comparison_failures(ev, outcomes)}


def _attempt_errors(ev: RunEvents) -> dict[str, Any]:
    calls: Counter[str] = Counter()
    errors: dict[str, Counter[str]] = defaultdict(Counter)
    for cb in ev.completed:
        calls[ev.provider_of(cb.correlation_id, cb.provider)] += 1
    for a in ev.attempts:
        p = ev.provider_of(a.correlation_id, a.error.provider)
        calls[p] += 1
        errors[p][a.error.error_type] += 1
    return _per_provider(calls, errors, ("calls", "errors", "error_rate"))


def _comparison_failures(ev: RunEvents, outcomes: dict[str, Callback]) -> dict[str, Any]:
    asked: Counter[str] = Counter(ev.provider_of(c) for c in ev.requests)
    failed: dict[str, Counter[str]] = defaultdict(Counter)
    for cid, outcome in outcomes.items():
        if isinstance(outcome, ComparisonFailed):
            failed[ev.provider_of(cid, outcome.error.provider)][outcome.error.error_type] += 1
    return _per_provider(asked, failed, ("requests", "failed", "failure_rate"))


def _per_provider(
    totals: Counter[str], by_type: dict[str, Counter[str]], names: tuple[str, str, str]
) -> dict[str, Any]:
    """Per provider, under `names`: its total, each error type's share of it, and the rate
    of them all."""
    total, shares, rate = names
    return {
        p: {
            total: n,
            shares: _shares(by_type[p], n),
            rate: _rate(sum(by_type[p].values()), n),
        }
        for p, n in sorted(totals.items())
    }


# --- positions: how often each essay was shown first (essay_a) or second, and what it won there -


def positions(state: BatchState, ev: RunEvents, outcomes: dict[str, Callback]) -> dict[str, Any]:
    slots = slot_counts((q.essay_a.essay_id, q.essay_b.essay_id) for q in ev.requests.values())
    per: dict[str, dict[str, int]] = {}
    for e in state.essays:
        c = slots.get(e.essay_id)
        per[e.essay_id] = {
            "a": c.as_a if c else 0,
            "b": c.as_b if c else 0,
            "wins_as_a": 0,
            "wins_as_b": 0,
        }
    for cid, outcome in outcomes.items():
        if isinstance(outcome, ComparisonCompleted):
            req = ev.requests[cid]
            if outcome.winner == "essay_a":
                per[req.essay_a.essay_id]["wins_as_a"] += 1
            else:
                per[req.essay_b.essay_id]["wins_as_b"] += 1
    anchors = {e.essay_id for e in state.essays if e.is_anchor}
    order = [e.essay_id for e in state.essays]
    return {
        "anchors": _position_group(per, [i for i in order if i in anchors]),
        "students": _position_group(per, [i for i in order if i not in anchors]),
    }


def _position_group(per: dict[str, dict[str, int]], ids: list[str]) -> dict[str, Any]:
    a = sum(per[i]["a"] for i in ids)
    b = sum(per[i]["b"] for i in ids)
    imbalance = Counter(per[i]["a"] - per[i]["b"] for i in ids)
    worst = max((abs(k) for k in imbalance), default=0)
    return {
        "essays": len(ids),
        "as_a": a,
        "as_b": b,
        "a_share": _rate(a, a + b),
        "imbalance": {str(k): v for k, v in sorted(imbalance.items())},
        "max_abs_imbalance": worst,
        "balanced": worst <= 1,
        "win_rate_as_a": _rate(sum(per[i]["wins_as_a"] for i in ids), a),
        "win_rate_as_b": _rate(sum(per[i]["wins_as_b"] for i in ids), b),
        "per_essay": [{"essay_id": i, "a": per[i]["a"], "b": per[i]["b"]} for i in ids],
    }


# --- bundles, tokens, essays --------------------------------------------------------------------


def bundle_sizes(bundles: list[BundleDispatched]) -> dict[str, Any]:
    sizes = Counter(b.size for b in bundles)
    return {
        "count": len(bundles),
        "sizes": {str(k): v for k, v in sorted(sizes.items())},
        "mean_size": round(sum(b.size for b in bundles) / len(bundles), 2) if bundles else None,
        "max_size": max(sizes) if sizes else None,
        "requests_bundled": sum(b.size for b in bundles),
    }


def token_totals(ev: RunEvents) -> dict[str, Any]:
    """Tokens of every billed response (completed comparisons and failed attempts alike), by
    kind. Kinds are never added up: they are priced 1 : 5 : 0.1 : 1.25 (input, output, cache
    read, cache write); `cost` is the sum that means something."""
    tokens = Counter[str]({kind: 0 for kind in TOKEN_KINDS})
    for usage in [cb.usage for cb in ev.completed] + [a.usage for a in ev.attempts]:
        for kind in TOKEN_KINDS:
            tokens[kind] += getattr(usage, kind)
    n = len(ev.completed)
    return {
        "by_kind": dict(sorted(tokens.items())),
        "per_comparison": {k: round(v / n, 1) for k, v in sorted(tokens.items())} if n else None,
    }


def cost_totals(ev: RunEvents, state: BatchState) -> dict[str, Any]:
    """What the run cost: the sum over its callbacks (each carries every attempt of its
    judging), per completed comparison, and the failed attempts' share of it."""
    total = sum(nano_usd(cb.cost_usd) for _, cb in ev.callbacks if cb.correlation_id in ev.requests)
    failed_attempts = sum(nano_usd(a.cost_usd) for a in ev.attempts)
    n = len(ev.completed)
    return {
        "usd": round(total / 1e9, 6),
        "per_comparison_usd": round(total / 1e9 / n, 6) if n else None,
        "failed_attempts_usd": round(failed_attempts / 1e9, 6),
        "projection_usd": round(state.cost_usd, 6),
    }


def essay_scores(state: BatchState) -> list[dict[str, Any]]:
    """The rows of `results_view` the report uses, in the batch's essay order."""
    rows = {row["essay_id"]: row for row in results_view(state)["essays"]}
    return [{k: rows[e.essay_id][k] for k in ESSAY_FIELDS} for e in state.essays]


# --- one run, and two compared ------------------------------------------------------------------


def analyse(run: Run) -> dict[str, Any]:
    """The report on one run."""
    state = run.state
    ev = RunEvents.of(run)
    outcomes = ev.outcomes()
    counted = count_from_events(run)
    counters, match = _counters(run, counted)
    completed = ev.completed
    scores = state.scores
    return {
        "batch_id": state.batch_id,
        "mode": state.config.mode,
        "status": state.status,
        "finalize_reason": state.finalize_reason or None,
        "counters_source": run.counters_source,
        "error_rates": error_rates(ev, outcomes),
        "positions": positions(state, ev, outcomes),
        "counters_match_events": match,
        "counters": counters,
        "requests_in_stream": counted["requests_in_stream"],
        "callbacks": {
            "late": counted["late_callbacks"],
            "duplicate": counted["duplicates"],
            "orphan": counted["orphans"],
            "expired_requests": len(ev.expired),
        },
        "provider_calls": len(completed) + len(ev.attempts),
        "bundles": bundle_sizes(ev.bundles),
        "tokens": token_totals(ev),
        "cost": cost_totals(ev, state),
        "reliability": headline(scores),
        "ssr": scores.ssr if scores else None,
        "position_bias": scores.position_bias if scores else None,
        "spearman_true": spearman_true(state),
        "wall_s": None if run.wall_s is None else round(run.wall_s, 3),
        "essays": essay_scores(state),
    }


def compare(a: dict[str, Any], b: dict[str, Any], scale: list[str]) -> dict[str, Any]:
    """Two runs' reports side by side: agreement of θ and grades, and what each cost."""
    ta = {e["essay_id"]: e for e in a["essays"] if e["theta"] is not None}
    tb = {e["essay_id"]: e for e in b["essays"] if e["theta"] is not None}
    common_ids = sorted(set(ta) & set(tb))
    rho = None
    if len(common_ids) >= 3:
        value = spearmanr(
            [ta[i]["theta"] for i in common_ids], [tb[i]["theta"] for i in common_ids]
        ).statistic
        rho = round(float(value), 4)

    def agreement(ids: list[str]) -> dict[str, Any]:
        return grade_agreement(ta, tb, ids, scale)

    students = [i for i in common_ids if not ta[i]["is_anchor"]]
    la, lb = a["label"], b["label"]
    return {
        "modes": [la, lb],
        "spearman_between_modes": rho,
        "grade_agreement": {"students": agreement(students), "all": agreement(common_ids)},
        "mean_abs_theta_diff": round(
            sum(abs(ta[i]["theta"] - tb[i]["theta"]) for i in common_ids) / len(common_ids), 4
        )
        if common_ids
        else None,
        "attempt_error_rate": {la: _attempt_error_rate(a), lb: _attempt_error_rate(b)},
        "provider_calls": {la: a["provider_calls"], lb: b["provider_calls"]},
        "cost_usd": {la: a["cost"]["usd"], lb: b["cost"]["usd"]},
        "bundles": {la: a["bundles"]["count"], lb: b["bundles"]["count"]},
        "counters_match_events": a["counters_match_events"] and b["counters_match_events"],
        "positions_balanced": all(
            v["positions"][g]["balanced"] for v in (a, b) for g in ("anchors", "students")
        ),
        "reliability": {la: a["reliability"], lb: b["reliability"]},
        "ssr": {la: a["ssr"], lb: b["ssr"]},
        "spearman_true": {la: a["spearman_true"], lb: b["spearman_true"]},
    }


def _attempt_error_rate(view: dict[str, Any]) -> float | None:
    """Failed provider calls among all of a run's calls, every provider and error type."""
    attempts = view["error_rates"]["attempts"].values()
    calls = sum(p["calls"] for p in attempts)
    errors = sum(c["count"] for p in attempts for c in p["errors"].values())
    return _rate(errors, calls)
