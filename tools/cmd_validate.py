"""`cjs validate`: the ENG5 validation comparison of `per_request` and `serial_bundle` runs.

Either runs one configuration in each mode in this process (the demo's machinery, mock judge),
or takes two recorded runs (`cjs export` files, loaded into an embedded Redis with `cjs import`'s
code). Everything is counted from the runs' events; the projection's counters are then checked
against those counts (`counters_match_events`).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import click
import msgspec
from scipy.stats import spearmanr

from cj.pairs import slot_counts
from cj.registration import InputError, build_registration, parse_input
from cj.reporting import grade_agreement, headline
from events import codec
from events.names import Keys
from events.types import (
    BatchFailed,
    BatchFinalized,
    BatchRegistered,
    BundleDispatched,
    ComparisonCompleted,
    ComparisonFailed,
    ComparisonRequested,
    Event,
    Mode,
    ProviderAttemptFailed,
    RequestExpired,
    WaveSubmitted,
)
from lps.providers.mock import PROFILES, profile_from_env
from projections.batch import COUNTERS as BATCH_COUNTERS
from projections.batch import BatchState, entry_id_key
from projections.store import load_state
from tools import common, sample
from tools.cmd_export import collect, load, read_export
from tools.runs import mock_settings, registration_for, run_to_end, spearman_true, with_readable_id
from tools.runtime import connect

MODES = ("per_request", "serial_bundle")
# The projection's counters, less the bookkeeping one no event counts.
COUNTERS = tuple(c for c in BATCH_COUNTERS if c != "scored_wave")


@dataclass
class Run:
    label: str
    events: list[tuple[str, str, Event]]  # (stream without prefix, entry id, event), id order
    state: BatchState
    counters_source: str
    wall_s: float | None = None


def _rate(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def count_from_events(run: Run) -> dict[str, int]:
    """The batch counters computed from the events alone (independently of the projection)."""
    requested: set[str] = set()
    abandoned: set[str] = set()
    submitted = waves = 0
    by_cid: dict[str, list[tuple[tuple[int, int], Event]]] = defaultdict(list)
    total = 0
    for stream, entry_id, event in run.events:
        if isinstance(event, WaveSubmitted):
            submitted += len(event.pairs)
            waves = max(waves, event.wave)
        elif isinstance(event, ComparisonRequested):
            requested.add(event.correlation_id)
        elif isinstance(event, BatchFinalized | BatchFailed):
            abandoned.update(event.abandoned)
        elif stream == "cj:callbacks" and isinstance(event, ComparisonCompleted | ComparisonFailed):
            total += 1
            by_cid[event.correlation_id].append((entry_id_key(entry_id), event))
    completed = failed = duplicates = late = orphans = 0
    for cid, seen in by_cid.items():
        if cid not in requested:
            orphans += len(seen)
        elif cid in abandoned:
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
    }


def analyse(run: Run) -> dict[str, Any]:
    state = run.state
    anchors = {e.essay_id for e in state.essays if e.is_anchor}
    requests = {e.correlation_id: e for _, _, e in run.events if isinstance(e, ComparisonRequested)}
    callbacks = [
        (i, e)
        for s, i, e in run.events
        if s == "cj:callbacks" and isinstance(e, ComparisonCompleted | ComparisonFailed)
    ]
    attempts = [e for _, _, e in run.events if isinstance(e, ProviderAttemptFailed)]
    bundles = [e for _, _, e in run.events if isinstance(e, BundleDispatched)]
    expired = [e for _, _, e in run.events if isinstance(e, RequestExpired)]

    def provider_of(cid: str, named: str = "") -> str:
        req = requests.get(cid)
        return named or (req.provider if req else "unknown")

    # Error rates: per provider call (attempts) and per comparison (final outcomes).
    calls: Counter[str] = Counter()
    attempt_errors: dict[str, Counter[str]] = defaultdict(Counter)
    for cid_event in callbacks:
        cb = cid_event[1]
        if isinstance(cb, ComparisonCompleted):
            calls[provider_of(cb.correlation_id, cb.provider)] += 1
    for a in attempts:
        p = provider_of(a.correlation_id, a.error.provider)
        calls[p] += 1
        attempt_errors[p][a.error.error_type] += 1
    first: dict[str, tuple[tuple[int, int], Event]] = {}
    for entry_id, cb in callbacks:
        key = entry_id_key(entry_id)
        if cb.correlation_id in requests and (
            cb.correlation_id not in first or key < first[cb.correlation_id][0]
        ):
            first[cb.correlation_id] = (key, cb)
    asked: Counter[str] = Counter(provider_of(c) for c in requests)
    final_errors: dict[str, Counter[str]] = defaultdict(Counter)
    for cid, (_, outcome) in first.items():
        if isinstance(outcome, ComparisonFailed):
            final_errors[provider_of(cid, outcome.error.provider)][outcome.error.error_type] += 1
    error_rates = {
        "attempts": {
            p: {
                "calls": n,
                "errors": {
                    t: {"count": c, "rate": _rate(c, n)}
                    for t, c in sorted(attempt_errors[p].items())
                },
                "error_rate": _rate(sum(attempt_errors[p].values()), n),
            }
            for p, n in sorted(calls.items())
        },
        "comparisons": {
            p: {
                "requests": n,
                "failed": {
                    t: {"count": c, "rate": _rate(c, n)} for t, c in sorted(final_errors[p].items())
                },
                "failure_rate": _rate(sum(final_errors[p].values()), n),
            }
            for p, n in sorted(asked.items())
        },
    }

    # Positions: how often each essay was shown first (essay_a) or second, and what it won there.
    slots = slot_counts((r.essay_a.essay_id, r.essay_b.essay_id) for r in requests.values())
    per: dict[str, dict[str, int]] = {}
    for e in state.essays:
        c = slots.get(e.essay_id)
        per[e.essay_id] = {"a": c.as_a if c else 0, "b": c.as_b if c else 0}
        per[e.essay_id].update(wins_as_a=0, wins_as_b=0)
    for cid, (_, outcome) in first.items():
        if isinstance(outcome, ComparisonCompleted):
            req = requests[cid]
            if outcome.winner == "essay_a":
                per[req.essay_a.essay_id]["wins_as_a"] += 1
            else:
                per[req.essay_b.essay_id]["wins_as_b"] += 1

    def group(ids: list[str]) -> dict[str, Any]:
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

    order = [e.essay_id for e in state.essays]
    positions = {
        "anchors": group([i for i in order if i in anchors]),
        "students": group([i for i in order if i not in anchors]),
    }

    events_count = count_from_events(run)
    counters = {
        name: {"projection": getattr(state, name), "events": events_count[name]}
        for name in COUNTERS
    }
    match = (
        all(v["projection"] == v["events"] for v in counters.values())
        and events_count["submitted"] == events_count["requests_in_stream"]
    )

    completed = [cb for _, cb in callbacks if isinstance(cb, ComparisonCompleted)]
    tokens = Counter[str]()
    for cb in completed:
        for kind in (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ):
            tokens[kind] += getattr(cb.usage, kind)
    sizes = Counter(b.size for b in bundles)
    scores = state.scores
    by_id = {s.essay_id: s for s in scores.scores} if scores else {}
    return {
        "batch_id": state.batch_id,
        "mode": state.config.mode,
        "status": state.status,
        "finalize_reason": state.finalize_reason or None,
        "counters_source": run.counters_source,
        "error_rates": error_rates,
        "positions": positions,
        "counters_match_events": match,
        "counters": counters,
        "requests_in_stream": events_count["requests_in_stream"],
        "callbacks": {
            "late": events_count["late_callbacks"],
            "duplicate": events_count["duplicates"],
            "orphan": events_count["orphans"],
            "expired_requests": len(expired),
        },
        "provider_calls": len(completed) + len(attempts),
        "bundles": {
            "count": len(bundles),
            "sizes": {str(k): v for k, v in sorted(sizes.items())},
            "mean_size": round(sum(b.size for b in bundles) / len(bundles), 2) if bundles else None,
            "max_size": max(sizes) if sizes else None,
            "requests_bundled": sum(b.size for b in bundles),
        },
        "tokens": {
            **{k: tokens[k] for k in sorted(tokens)},
            "total": sum(tokens.values()),
            "per_comparison": round(sum(tokens.values()) / len(completed), 1)
            if completed
            else None,
        },
        "reliability": headline(scores),
        "ssr": scores.ssr if scores else None,
        "position_bias": scores.position_bias if scores else None,
        "spearman_true": spearman_true(state),
        "wall_s": None if run.wall_s is None else round(run.wall_s, 3),
        "essays": [
            {
                "essay_id": e.essay_id,
                "is_anchor": e.is_anchor,
                "anchor_grade": e.anchor_grade,
                "theta": by_id[e.essay_id].theta if e.essay_id in by_id else None,
                "se": by_id[e.essay_id].se if e.essay_id in by_id else None,
                "grade": by_id[e.essay_id].grade if e.essay_id in by_id else None,
                "grade_probabilities": (
                    by_id[e.essay_id].grade_probabilities if e.essay_id in by_id else {}
                ),
            }
            for e in state.essays
        ],
    }


def compare(a: dict[str, Any], b: dict[str, Any], scale: list[str]) -> dict[str, Any]:
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

    def total_rate(view: dict[str, Any]) -> float | None:
        calls = sum(p["calls"] for p in view["error_rates"]["attempts"].values())
        errors = sum(
            c["count"]
            for p in view["error_rates"]["attempts"].values()
            for c in p["errors"].values()
        )
        return _rate(errors, calls)

    return {
        "modes": [a["label"], b["label"]],
        "spearman_between_modes": rho,
        "grade_agreement": {"students": agreement(students), "all": agreement(common_ids)},
        "mean_abs_theta_diff": round(
            sum(abs(ta[i]["theta"] - tb[i]["theta"]) for i in common_ids) / len(common_ids), 4
        )
        if common_ids
        else None,
        "attempt_error_rate": {a["label"]: total_rate(a), b["label"]: total_rate(b)},
        "provider_calls": {a["label"]: a["provider_calls"], b["label"]: b["provider_calls"]},
        "tokens_total": {a["label"]: a["tokens"]["total"], b["label"]: b["tokens"]["total"]},
        "bundles": {a["label"]: a["bundles"]["count"], b["label"]: b["bundles"]["count"]},
        "counters_match_events": a["counters_match_events"] and b["counters_match_events"],
        "positions_balanced": all(
            v["positions"][g]["balanced"] for v in (a, b) for g in ("anchors", "students")
        ),
        "reliability": {a["label"]: a["reliability"], b["label"]: b["reliability"]},
        "ssr": {a["label"]: a["ssr"], b["label"]: b["ssr"]},
        "spearman_true": {a["label"]: a["spearman_true"], b["label"]: b["spearman_true"]},
    }


async def events_of(r: Any, keys: Keys, batch_id: str) -> list[tuple[str, str, Event]]:
    out = []
    for rec in await collect(r, keys, batch_id):
        out.append((rec.stream, rec.entry_id, codec.decode({"type": rec.type, "data": rec.data})))
    return out


async def run_modes(
    registered: BatchRegistered,
    modes: list[str],
    mock_name: str | None,
    seed: int,
    timeout: float,
    quiet: bool,
) -> list[Run]:
    s = mock_settings(common.settings())
    mock = profile_from_env(mock_name)
    r, where = connect(s)
    keys = common.keys_for(s)
    runs = []
    try:
        for mode in modes:
            config = msgspec.structs.replace(registered.config, mode=cast(Mode, mode))
            reg = msgspec.structs.replace(registered, config=config)
            reg = await with_readable_id(
                r, keys, reg, f"validate-{mode}-s{seed}-n{len(reg.essays)}"
            )
            if not quiet:
                click.echo(
                    f"validate: {mode} on {where}, {len(reg.essays)} essays, judge "
                    f"mock/{mock.name} ...",
                    err=True,
                )
            state, wall = await run_to_end(r, keys, s, reg, mock, timeout=timeout)
            runs.append(
                Run(mode, await events_of(r, keys, reg.batch_id), state, "live projection", wall)
            )
    finally:
        await r.aclose()
    return runs


async def load_runs(paths: list[Path]) -> list[Run]:
    """Recorded runs, each imported into its own namespace of an embedded Redis."""
    import fakeredis

    r = fakeredis.FakeAsyncRedis()
    runs = []
    try:
        for k, path in enumerate(paths):
            keys = Keys(f"run{k}:")
            per = read_export(path)
            report = await load(r, keys, per)
            batch_id = report["batches"][0]
            state = await load_state(r, keys, batch_id)
            assert state is not None
            runs.append(
                Run(
                    path.name,
                    await events_of(r, keys, batch_id),
                    state,
                    "rebuilt from the recorded events",
                )
            )
    finally:
        await r.aclose()
    return runs


def label_runs(runs: list[Run]) -> None:
    modes = [run.state.config.mode for run in runs]
    for run, mode in zip(runs, modes, strict=True):
        run.label = mode if modes.count(mode) == 1 else f"{mode}:{run.label}"


@click.command()
@click.option(
    "--input",
    "input_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Batch file (as for submit) [default: the bundled ENG5 sample].",
)
@click.option(
    "--modes", default=",".join(MODES), show_default=True, help="Comma-separated modes to run."
)
@click.option(
    "--profile",
    type=click.Choice(sorted(PROFILES)),
    default=None,
    help="Mock judge profile [default: $CJS_MOCK_PROFILE or cj_generic_batch].",
)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--essays",
    type=click.IntRange(min=2),
    default=None,
    help="Generate a sample of N essays instead of the bundled one.",
)
@click.option("--budget", type=click.IntRange(min=1), default=None)
@click.option(
    "--runs",
    "run_files",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    nargs=2,
    default=None,
    help="Compare two recorded runs (cjs export files) instead.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Write report.md and a self-contained report.html here.",
)
@click.option("--timeout", type=float, default=600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def validate(
    input_file: Path | None,
    modes: str,
    profile: str | None,
    seed: int,
    essays: int | None,
    budget: int | None,
    run_files: tuple[Path, Path] | None,
    report_dir: Path | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Run one batch in each mode (or take two recorded runs) and compare them: error rates by
    provider and error type, A/B positions of anchors and students, counters against events,
    late/duplicate/orphan callbacks, provider calls, bundles, tokens, Spearman between the modes'
    θ and grade agreement. Exits 1 when a run's counters disagree with its events."""
    common.quiet_logs(True)
    if run_files:
        runs = asyncio.run(load_runs(list(run_files)))
    else:
        wanted = [m.strip() for m in modes.split(",") if m.strip()]
        bad = [m for m in wanted if m not in MODES]
        if bad or not wanted or len(set(wanted)) != len(wanted):
            raise click.UsageError(f"--modes: choose distinct modes among {', '.join(MODES)}")
        try:
            profile_from_env(profile)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        if input_file is not None:
            try:
                batch_in, scale_name, grades = parse_input(input_file)
                registered = build_registration(
                    batch_in, scale_name, grades, budget=budget, seed=seed
                )
            except InputError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(common.EXIT_USAGE)
        else:
            registered = registration_for(
                sample.load(essays), "per_request", budget=budget, seed=seed
            )
        runs = asyncio.run(run_modes(registered, wanted, profile, seed, timeout, as_json))
    label_runs(runs)
    views = {}
    for run in runs:
        view = analyse(run)
        view["label"] = run.label
        views[run.label] = view
    labels = list(views)
    scale = runs[0].state.config.grade_scale
    comparison = compare(views[labels[0]], views[labels[1]], scale) if len(labels) >= 2 else None
    out = {
        "source": "recorded runs" if run_files else "in-process runs",
        "profile": None if run_files else profile_from_env(profile).name,
        "seed": None if run_files else seed,
        "modes": views,
        "comparison": comparison,
    }
    if report_dir is not None:
        from tools.report import write_report

        out["report"] = {k: str(v) for k, v in write_report(out, report_dir).items()}
    if as_json:
        common.emit_json(out)
    else:
        _print(out)
    if not all(v["counters_match_events"] for v in views.values()):
        sys.exit(1)


def _print(out: dict[str, Any]) -> None:
    for label, v in out["modes"].items():
        attempts = v["error_rates"]["attempts"]
        errors = (
            ", ".join(
                f"{t} {c['count']}" for p in attempts.values() for t, c in p["errors"].items()
            )
            or "none"
        )
        pos = v["positions"]
        click.echo(
            f"{label:>14}: {v['status']} ({v['finalize_reason']}), provider calls "
            f"{v['provider_calls']}, bundles {v['bundles']['count']}, "
            f"tokens {v['tokens']['total']}, "
            f"counters match events: {v['counters_match_events']}, late/dup/orphan "
            f"{v['callbacks']['late']}/{v['callbacks']['duplicate']}/{v['callbacks']['orphan']}"
        )
        click.echo(
            f"{'':>14}  errors: {errors}; A share anchors {pos['anchors']['a_share']} "
            f"students {pos['students']['a_share']}; reliability R {v['reliability']}"
        )
    c = out["comparison"]
    if c:
        g = c["grade_agreement"]["students"]
        click.echo(
            f"\nSpearman between modes {c['spearman_between_modes']}; student grades "
            f"agree {g['exact']} (predicted by their probabilities {g['predicted_exact']}; "
            f"within one {g['within_one']}, n={g['n']})"
        )
    if "report" in out:
        click.echo(f"report: {out['report']['html']}")
