"""`cjs submit`, `cjs status`, `cjs results`, `cjs batches`."""

from __future__ import annotations

import asyncio
import csv
import sys
from pathlib import Path
from typing import Any, cast

import click

from app import batches as app_batches
from app import errors, settings
from app.views import results_view
from events.types import Mode
from projections.batch import BatchState
from streams.keys import Keys
from tools import common


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--mode",
    type=click.Choice(["per_request", "serial_bundle", "batch_api"]),
    default="per_request",
    show_default=True,
    help="How LPS sends the batch's requests to the provider.",
)
@click.option(
    "--provider", type=click.Choice(["mock", "anthropic"]), default="mock", show_default=True
)
@click.option(
    "--model", default=None, help="Provider model id [default: mock-judge-1 / claude-sonnet-4-6]."
)
@click.option(
    "--budget",
    type=int,
    default=None,
    help="Cap on total comparisons [default: 30 per essay, at most all pairs].",
)
@click.option(
    "--comparisons-per-essay",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Cap as comparisons per essay instead of --budget.",
)
@click.option(
    "--target-reliability",
    type=click.FloatRange(0, 1),
    default=0.8,
    show_default=True,
    help="Finalize as reliable once the posterior reliability reaches this and the ranking "
    "has stopped moving (after 10 comparisons per essay).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for pair generation (and the mock judge).",
)
@click.option(
    "--grade-scale",
    default=None,
    help="Scale name or comma-separated grades, lowest first (needed for CSV; overrides the file).",
)
@click.option(
    "--max-cost-usd",
    type=float,
    default=None,
    help="Money cap: the batch ends (reason cost_limit) before a wave would take it past this.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate and print the plan with its estimated cost; append nothing.",
)
@click.option(
    "--new",
    "force_new",
    is_flag=True,
    help="Register a new batch even when one with the same essays and settings exists.",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def submit(
    file: Path,
    mode: str,
    provider: str,
    model: str | None,
    budget: int | None,
    comparisons_per_essay: float | None,
    target_reliability: float,
    seed: int,
    grade_scale: str | None,
    max_cost_usd: float | None,
    dry_run: bool,
    force_new: bool,
    as_json: bool,
) -> None:
    """Register a batch from FILE (JSON or CSV) and submit its first wave.

    JSON: {"grade_scale"?: NAME|[grades], "essays": [{"essay_id", "text",
    "anchor_grade"?, "mock_quality"?}]}. CSV: the same columns. Bad input (and, for a
    real provider, missing credentials) exits 2 and appends nothing. The same essays with
    the same settings again give the batch already registered (its id, and "existing":
    true), unless --new. Warnings (prompt caching that cannot engage on the model) go to
    stderr.
    """
    from cj.registration import (
        Contended,
        InputError,
        build_registration,
        parse_input,
        submission_warnings,
    )
    from lps.providers.registry import credential_problems

    common.quiet_logs(as_json)
    s = settings.load()
    scale_arg: Any = grade_scale
    if grade_scale and "," in grade_scale:
        scale_arg = [g.strip() for g in grade_scale.split(",") if g.strip()]
    try:
        batch, scale_name, grades = parse_input(file, scale_arg)
        event = build_registration(
            batch,
            scale_name,
            grades,
            mode=cast(Mode, mode),
            provider=provider,
            model=model,
            budget=budget,
            comparisons_per_essay=comparisons_per_essay,
            target_reliability=target_reliability,
            seed=seed,
            max_essay_chars=s.max_essay_chars,
            max_cost_usd=max_cost_usd,
            check_credentials=not dry_run,
        )
    except InputError as exc:
        raise errors.InputError(str(exc)) from exc
    warnings = submission_warnings(event)
    if dry_run:
        _print_plan(event, scale_name, [*warnings, *credential_problems(provider)], as_json)
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    from cj.continuation import advance  # scoring (numpy, scipy): only submit needs it
    from cj.registration import register_once

    async def register(r: Any) -> tuple[str, bool]:
        keys = settings.keys_for(s)
        try:
            batch_id, new = await register_once(r, keys, event, force=force_new)
            if new:
                await advance(r, keys, batch_id)
        except Contended as exc:
            raise errors.Conflict(str(exc)) from exc
        unheld = await _replica_warning(r, keys, batch_id, s)
        if unheld:
            warnings.append(unheld)
            click.echo(f"warning: {unheld}", err=True)
        return batch_id, new

    batch_id, new = common.with_redis(s, register)
    if as_json:
        common.emit_json({"batch_id": batch_id, "existing": not new, "warnings": warnings})
        return
    if not new:
        click.echo(
            f"already submitted as {batch_id} (same essays and settings); --new registers "
            "another batch",
            err=True,
        )
    click.echo(batch_id)


async def _replica_warning(r: Any, keys: Keys, batch_id: str, s: settings.Settings) -> str | None:
    """With CJS_MIN_REPLICAS_ACK, wait for a replica to hold the batch (and its first wave)
    before it is said registered, as the workers' commits are: a failover right after the
    reply could otherwise take it with the master (bench/failover.py lost 2 batches so,
    session 18). Why the user should know, when no replica did in time; else None."""
    from streams.durability import wait_for_replicas

    acked = await wait_for_replicas(
        r, keys.for_batch(batch_id), s.min_replicas_ack, s.replica_ack_timeout_ms
    )
    if acked is None or acked >= s.min_replicas_ack:
        return None
    return (
        f"no replica acknowledged the registration within {s.replica_ack_timeout_ms} ms "
        "(CJS_REPLICA_ACK_TIMEOUT_MS): a failover now could lose the batch; "
        f"`cjs status {batch_id}` shows whether it is there"
    )


def _print_plan(event: Any, scale_name: str, warnings: list[str], as_json: bool) -> None:
    """What `submit --dry-run` shows: the plan, its estimated cost and the warnings."""
    from cj import reporting

    cfg = event.config
    plan = reporting.submit_plan(event, scale_name) | {
        "estimated_cost_per_comparison_usd": round(cfg.cost_per_comparison_usd, 6),
        "estimated_cost_usd": round(cfg.cost_per_comparison_usd * event.denominator, 4),
        "estimated_first_wave_cost_usd": round(
            cfg.cost_per_comparison_usd * min(2 * cfg.wave_size, event.denominator), 4
        ),
        "max_cost_usd": cfg.max_cost_usd,
        "warnings": warnings,
    }
    if as_json:
        common.emit_json(plan)
        return
    for key, value in plan.items():
        if key != "warnings":
            click.echo(f"{key:>34}: {value}")
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@click.command()
@click.argument("batch_id")
@click.option(
    "--watch",
    is_flag=True,
    help="Show progress until the batch is finalized or failed, then its counters "
    "(exit 1 when it failed).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between polls with --watch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def status(batch_id: str, watch: bool, interval: float, as_json: bool) -> None:
    """Completion counters of a batch (all from the projection, equal to the streams).

    --watch shows a progress bar on stderr (a line per change when stderr is no terminal)
    until the batch ends.
    """
    common.quiet_logs(as_json)
    if watch:
        _watch(batch_id, interval, bar=common.ProgressBar(lines=not sys.stderr.isatty()))
    s = settings.load()
    view = common.run(lambda: app_batches.read_status(s, batch_id))
    if as_json:
        common.emit_json(view)
    else:
        for key, value in view.items():
            if key == "orphan_correlation_ids":
                value = ", ".join(value) if value else "-"
            if key == "breakers":
                value = "; ".join(_breaker_line(b) for b in value) or "-"
            click.echo(f"{key:>23}: {value if value is not None else '-'}")
    if watch and view["status"] == "failed":
        sys.exit(errors.EXIT_FAILURE)


def _breaker_line(b: dict[str, Any]) -> str:
    return (
        f"OPEN {b['provider']}/{b['model'] or '*'} {b['reason']} "
        f"(since {b['opened_at']}, next probe in {b['next_probe_in_s']:.0f}s)"
    )


def _watch(batch_id: str, interval: float, bar: common.ProgressBar) -> BatchState:
    s = settings.load()
    keys = settings.keys_for(s)

    async def follow(r: Any) -> BatchState:
        while True:
            # An archived batch (read from its archive) has ended: one look is enough.
            state, _ = await app_batches.load_batch(r, keys, batch_id, s.archive_options)
            bar(state)
            if state.terminal:
                return state
            await asyncio.sleep(interval)

    try:
        return common.with_redis(s, follow)
    finally:
        bar.finish()


@click.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option(
    "--csv",
    "as_csv",
    is_flag=True,
    help="Print the essays as CSV (one p_<grade> column per grade; warnings on stderr).",
)
def results(batch_id: str, as_json: bool, as_csv: bool) -> None:
    """Scores, standard errors, ranks and grades of a batch.

    Each essay's grade, grade band (the shortest run of grades holding 80 % probability),
    P(grade) and a high/mid/low label; the posterior reliability R (quote this one) beside
    SSR and split-half.

    The table and the CSV carry every essay field of --json (theta, se, rank, grade, band,
    probabilities, confidence, ...) and the batch's reliabilities and position bias η;
    warnings follow the table (on stderr with --csv).
    """
    common.quiet_logs(as_json)
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    view = common.batch_view(batch_id, results_view)
    if as_json:
        common.emit_json(view)
    elif as_csv:
        _results_csv(view)
    else:
        click.echo(render_results(view))


# The essay fields shown first, in this order; any other scalar field of the view follows.
ESSAY_COLUMNS = ("rank", "essay_id", "is_anchor", "anchor_grade", "theta", "se", "grade")
# Batch-level fields the header shows itself; any other scalar field is listed as `key: value`.
SHOWN = frozenset(
    {"batch_id", "status", "wave", "comparisons", "reliability", "ssr", "split_half"}
    | {"position_bias"}
    | {"reliability_note", "connected", "grade_scale", "grade_boundaries", "warnings", "essays"}
)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _cellable(value: Any) -> bool:
    """A value one cell can show: a scalar, or a list of scalars (a grade band)."""
    return _scalar(value) or (isinstance(value, list) and all(_scalar(v) for v in value))


def _essay_columns(view: dict[str, Any]) -> list[str]:
    columns = list(ESSAY_COLUMNS)
    for row in view["essays"]:
        for key, value in row.items():
            if key not in columns and _cellable(value):
                columns.append(key)
    return columns


def _grades(view: dict[str, Any]) -> list[str]:
    grades = [str(g) for g in view.get("grade_scale") or []]
    for row in view["essays"]:
        for g in row.get("grade_probabilities") or {}:
            if g not in grades:
                grades.append(g)
    return grades


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(_cell(v, digits) for v in value)
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _batch_fields(view: dict[str, Any]) -> dict[str, Any]:
    bias = view.get("position_bias") or {}
    return {
        "ssr": view.get("ssr"),
        "split_half": view.get("split_half"),
        "position_bias": bias.get("estimate"),
        "position_bias_se": bias.get("se"),
    }


def _csv_value(value: Any) -> Any:
    """A CSV cell: lists (a grade band) as space-separated text, None as empty."""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else value


def _results_csv(view: dict[str, Any]) -> None:
    columns = _essay_columns(view)
    grades = _grades(view)
    batch = _batch_fields(view)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([*columns, *(f"p_{g}" for g in grades), *batch])
    for row in view["essays"]:
        probabilities = row.get("grade_probabilities") or {}
        writer.writerow(
            [
                *(_csv_value(row.get(c)) for c in columns),
                *("" if probabilities.get(g) is None else probabilities[g] for g in grades),
                *("" if v is None else v for v in batch.values()),
            ]
        )
    for warning in view.get("warnings") or []:
        click.echo(f"warning: {warning}", err=True)


def render_results(view: dict[str, Any]) -> str:
    """The results as a table with a header row, after the batch's figures, before its warnings."""
    lines = [
        f"batch {view['batch_id']}  status {view['status']}  wave {_cell(view['wave']) or '-'}  "
        f"comparisons {view['comparisons']}  grade scale {' '.join(_grades(view)) or '-'}"
    ]
    bias = view.get("position_bias")
    eta = "n/a" if not bias else f"{bias['estimate']:+.3f} ± {bias['se']:.3f} logits (slot A)"
    posterior = _cell(view.get("reliability"), 3) or "n/a"
    ssr = _cell(view.get("ssr"), 3) or "n/a"
    half = _cell(view.get("split_half"), 3) or "n/a"
    lines.append(
        f"reliability R {posterior}  SSR {ssr}  split-half {half}  position bias η {eta}  "
        f"connected {_yes_no(view.get('connected'))}"
    )
    for key, value in view.items():
        if key not in SHOWN and _scalar(value):
            lines.append(f"{key.replace('_', ' ')}: {_cell(value, 4) or '-'}")
    boundaries = view.get("grade_boundaries") or {}
    if boundaries:
        lines.append(
            "grade boundaries (θ): " + "  ".join(f"{g} {_cell(b)}" for g, b in boundaries.items())
        )
    columns = _essay_columns(view)
    grades = _grades(view)
    widths = {c: len(c) for c in columns}
    cells = []
    for row in view["essays"]:
        cells.append({c: _cell(row.get(c)) for c in columns})
        for c in columns:
            widths[c] = max(widths[c], len(cells[-1][c]))
    numeric = {"rank", "theta", "se"}
    head = [c.rjust(widths[c]) if c in numeric else c.ljust(widths[c]) for c in columns]
    lines += [
        "",
        "  ".join(head)
        + ("  " + " ".join(f"{'P(' + g + ')':>5}" for g in grades) if grades else ""),
    ]
    for row, shown in zip(view["essays"], cells, strict=True):
        text = "  ".join(
            shown[c].rjust(widths[c]) if c in numeric else shown[c].ljust(widths[c])
            for c in columns
        )
        probabilities = row.get("grade_probabilities") or {}
        if grades:
            text += "  " + " ".join(
                f"{'' if probabilities.get(g) is None else f'{probabilities[g]:.2f}':>5}"
                for g in grades
            )
        lines.append(text.rstrip())
    warnings = view.get("warnings") or []
    if warnings:
        lines.append("")
        lines += [f"warning: {w}" for w in warnings]
    if view.get("reliability_note"):
        lines += ["", f"note: {view['reliability_note']}"]
    return "\n".join(lines)


@click.command()
@click.option(
    "--status",
    "statuses",
    type=click.Choice(["open", *app_batches.STATUSES]),
    multiple=True,
    help="Only batches in this status (repeatable; open = registered or running).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=app_batches.LIST_LIMIT,
    show_default=True,
    help="Newest batches shown.",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def batches(statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List the batches of the namespace, newest first, with their status and progress.

    JSON: {prefix, total, counts: {status: n}, matching, batches: [{batch_id, status,
    registered_at, last_event_at, completed_at, finalize_reason, denominator, submitted,
    completed, failed, in_flight, waves, completion_pct, cost_usd, mode, provider, model}]}.
    """
    common.quiet_logs(as_json)
    s = settings.load()

    view = common.with_redis(
        s,
        lambda r: app_batches.list_view(r, settings.keys_for(s), statuses=statuses, limit=limit),
    )
    if as_json:
        common.emit_json(view)
        return
    counts = "  ".join(f"{k} {v}" for k, v in sorted(view["counts"].items())) or "none"
    click.echo(f"{view['total']} batches under prefix {view['prefix']!r}: {counts}")
    if not view["batches"]:
        return
    width = max(len("batch"), *(len(b["batch_id"]) for b in view["batches"]))
    click.echo(
        f"{'batch':<{width}}  {'status':<10} {'reason':<10} {'done':>11} {'%':>6} "
        f"{'waves':>5}  registered"
    )
    for b in view["batches"]:
        done = f"{b['completed'] + b['failed']}/{b['denominator']}"
        click.echo(
            f"{b['batch_id']:<{width}}  {b['status'] or '?':<10} {b['finalize_reason'] or '-':<10} "
            f"{done:>11} {b['completion_pct']:>6} {b['waves']:>5}  {b['registered_at'] or '-'}"
        )
    if view["matching"] > len(view["batches"]):
        click.echo(f"... {view['matching'] - len(view['batches'])} more (--limit)")
