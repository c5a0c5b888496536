"""`cjs submit`, `cjs status`, `cjs results`."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any, cast

import click

from app import batches, errors, settings
from app.connection import open_redis
from app.views import results_view
from cj.registration import (
    InputError,
    append_registration,
    build_registration,
    parse_input,
    submission_warnings,
)
from events.types import Mode
from lps.providers.registry import credential_problems
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
    help="Total comparisons [default: 10 per essay, at most all pairs].",
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
    "--stability-threshold",
    type=click.FloatRange(min=0, min_open=True),
    default=0.05,
    show_default=True,
    help="Finalize as stable once max |Δθ| between waves is below this (after 2 waves).",
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
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def submit(
    file: Path,
    mode: str,
    provider: str,
    model: str | None,
    budget: int | None,
    seed: int,
    grade_scale: str | None,
    stability_threshold: float,
    max_cost_usd: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Register a batch from FILE (JSON or CSV) and submit its first wave.

    JSON: {"grade_scale"?: NAME|[grades], "essays": [{"essay_id", "text",
    "anchor_grade"?, "mock_quality"?}]}. CSV: the same columns. Bad input (and, for a
    real provider, missing credentials) exits 2 and appends nothing. Warnings (prompt
    caching that cannot engage on the model) go to stderr.
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
            seed=seed,
            stability_threshold=stability_threshold,
            max_cost_usd=max_cost_usd,
            check_credentials=not dry_run,
        )
    except InputError as exc:
        raise errors.InputError(str(exc)) from exc
    warnings = submission_warnings(event)
    if dry_run:
        warnings += credential_problems(provider)
        n = len(event.essays)
        per_grade: dict[str, int] = {g: 0 for g in grades}
        for e in event.essays:
            if e.anchor_grade:
                per_grade[e.anchor_grade] += 1
        cfg = event.config
        waves = 1 + max(
            0, math.ceil((event.denominator - 2 * cfg.wave_size) / max(1, cfg.wave_size))
        )
        plan = {
            "dry_run": True,
            "essays": n,
            "students": n - sum(per_grade.values()),
            "anchors_per_grade": per_grade,
            "grade_scale": scale_name,
            "total_budget": cfg.total_budget,
            "denominator": event.denominator,
            "all_pairs": n * (n - 1) // 2,
            "wave_size": cfg.wave_size,
            "max_waves_estimate": min(cfg.max_waves, waves),
            "estimated_provider_calls": event.denominator,
            "mode": cfg.mode,
            "provider": cfg.provider,
            "model": cfg.model,
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
        else:
            for key, value in plan.items():
                if key != "warnings":
                    click.echo(f"{key:>34}: {value}")
            for warning in warnings:
                click.echo(f"warning: {warning}", err=True)
        return
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    s = settings.load()

    from cj.continuation import advance  # scoring (numpy, scipy): only submit needs it

    async def main() -> None:
        r = await open_redis(s)
        keys = settings.keys_for(s)
        await append_registration(r, keys, event)
        await advance(r, keys, event.batch_id)
        await r.aclose()

    common.run(main)
    if as_json:
        common.emit_json({"batch_id": event.batch_id, "warnings": warnings})
    else:
        click.echo(event.batch_id)


@click.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def status(batch_id: str, as_json: bool) -> None:
    """Completion counters of a batch (all from the projection, equal to the streams)."""
    common.quiet_logs(as_json)
    s = settings.load()
    view = common.run(lambda: batches.read_status(s, batch_id))
    if as_json:
        common.emit_json(view)
        return
    for key, value in view.items():
        if key == "orphan_correlation_ids":
            value = ", ".join(value) if value else "-"
        if key == "breakers":
            value = (
                "; ".join(
                    f"OPEN {b['provider']}/{b['model'] or '*'} {b['reason']} "
                    f"(since {b['opened_at']}, next probe in {b['next_probe_in_s']:.0f}s)"
                    for b in value
                )
                or "-"
            )
        click.echo(f"{key:>23}: {value if value is not None else '-'}")


@click.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the essays as CSV.")
def results(batch_id: str, as_json: bool, as_csv: bool) -> None:
    """Scores, standard errors, ranks and grades of a batch."""
    common.quiet_logs(as_json)
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    view = common.batch_view(batch_id, results_view)
    if as_json:
        common.emit_json(view)
        return
    columns = ["rank", "essay_id", "is_anchor", "anchor_grade", "theta", "se", "grade"]
    if as_csv:
        writer = csv.DictWriter(
            sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(view["essays"])
        return
    per = view["cost_per_comparison_usd"]
    click.echo(
        f"batch {view['batch_id']}  status {view['status']}  wave {view['wave']}  "
        f"comparisons {view['comparisons']}  SSR {view['ssr']}  cost ${view['cost_usd']:.4f}"
        + (f" (${per:.5f} per comparison)" if per is not None else "")
    )
    for row in view["essays"]:
        theta = "" if row["theta"] is None else f"{row['theta']:7.2f}"
        se = "" if row["se"] is None else f"{row['se']:6.2f}"
        click.echo(
            f"{row['rank'] or '':>4}  {row['essay_id']:<20} {row['anchor_grade'] or '':<5} "
            f"{theta:>7} {se:>6}  {row['grade'] or '-'}"
        )
