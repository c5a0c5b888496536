"""`cjs submit`, `cjs status`, `cjs results`."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, cast

import click

from cj import reporting
from cj.continuation import advance
from cj.registration import InputError, append_registration, build_registration, parse_input
from events.types import Mode
from tools import common
from tools.views import results_view, status_view


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
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; append nothing.")
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
    dry_run: bool,
    as_json: bool,
) -> None:
    """Register a batch from FILE (JSON or CSV) and submit its first wave.

    JSON: {"grade_scale"?: NAME|[grades], "essays": [{"essay_id", "text",
    "anchor_grade"?, "mock_quality"?}]}. CSV: the same columns. Bad input exits 2
    and appends nothing.
    """
    common.quiet_logs(as_json)
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
        )
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(common.EXIT_USAGE)
    if dry_run:
        plan = reporting.submit_plan(event, scale_name)
        if as_json:
            common.emit_json(plan)
        else:
            for key, value in plan.items():
                click.echo(f"{key:>26}: {value}")
        return
    s = common.settings()

    async def main() -> None:
        r = await common.open_redis(s)
        keys = common.keys_for(s)
        await append_registration(r, keys, event)
        await advance(r, keys, event.batch_id)
        await r.aclose()

    common.run(main)
    if as_json:
        common.emit_json({"batch_id": event.batch_id})
    else:
        click.echo(event.batch_id)


@click.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def status(batch_id: str, as_json: bool) -> None:
    """Completion counters of a batch (all from the projection, equal to the streams)."""
    common.quiet_logs(as_json)
    view = common.batch_view(batch_id, status_view)
    if as_json:
        common.emit_json(view)
        return
    for key, value in view.items():
        if key == "orphan_correlation_ids":
            value = ", ".join(value) if value else "-"
        click.echo(f"{key:>22}: {value if value is not None else '-'}")


@click.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the essays as CSV.")
def results(batch_id: str, as_json: bool, as_csv: bool) -> None:
    """Scores, standard errors and ranks of a batch; each essay's grade, grade band (the
    shortest run of grades holding 80 % probability), P(grade) and a high/mid/low label;
    the posterior reliability R (quote this one) beside SSR and split-half."""
    common.quiet_logs(as_json)
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    view = common.batch_view(batch_id, results_view)
    if as_json:
        common.emit_json(view)
        return
    columns = [
        "rank",
        "essay_id",
        "is_anchor",
        "anchor_grade",
        "theta",
        "se",
        "grade",
        "grade_band",
        "grade_confidence",
        "confidence",
    ]
    if as_csv:
        writer = csv.DictWriter(
            sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        for row in view["essays"]:
            writer.writerow({**row, "grade_band": " ".join(row["grade_band"])})
        return
    _print_results(view)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _print_results(view: dict[str, Any]) -> None:
    rel = view["reliabilities"]
    reason = f" ({view['finalize_reason']})" if view["finalize_reason"] else ""
    click.echo(
        f"batch {view['batch_id']}  status {view['status']}{reason}  wave {view['wave']}  "
        f"comparisons {view['comparisons']} ({view['comparisons_per_essay']} per essay)"
    )
    post, ssr, half = rel["posterior"], rel["ssr"], rel["split_half"]
    click.echo(
        f"reliability R {_fmt(post['value'])}"
        + (f" (n/a: {post['n_a']})" if post["n_a"] else "")
        + f"   SSR {_fmt(ssr['value'])} (inflated by adaptive pairing"
        + (f"; n/a: {ssr['n_a']}" if ssr["n_a"] else "")
        + ")   split-half "
        + (
            f"{_fmt(half['spearman_brown'])} (r {_fmt(half['r'])}, {half['splits']} splits by "
            f"{half['unit']}, deflated by adaptive pairing)"
            if half["spearman_brown"] is not None
            else f"n/a ({half['n_a']})"
        )
    )
    click.echo(
        f"{'rank':>4}  {'essay':<20} {'anchor':<6} {'theta':>7} {'se':>6}  "
        f"{'grade':<5} {'band':<7} {'P':>5}  label"
    )
    for row in view["essays"]:
        click.echo(
            f"{row['rank'] or '':>4}  {row['essay_id']:<20} {row['anchor_grade'] or '':<6} "
            f"{_fmt(row['theta']):>7} {_fmt(row['se']):>6}  {row['grade'] or '-':<5} "
            f"{reporting.band_text(row['grade_band']):<7} {_fmt(row['grade_confidence']):>5}  "
            f"{row['confidence'] or '-'}"
        )
    note = view["grade_decisions"]["note"]
    if note:
        click.echo(f"note: {note}")
