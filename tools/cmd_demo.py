"""`cjs demo`: the main job, end to end in one process."""

from __future__ import annotations

import sys
from typing import Any

import click

from app import loop as event_loop
from app import sample, settings
from app.connection import open_checked
from app.runs import (
    count_provider_calls,
    mock_settings,
    registration_for,
    run_to_end,
    with_readable_id,
)
from app.validation import spearman_true
from app.views import results_view, status_view
from cj.reporting import band_text
from tools import common, mock_options


def _print_report(view: dict[str, Any]) -> None:
    status = view["status"]
    click.echo(
        f"\nBatch {view['batch_id']}  mode={view['mode']}  profile={view['profile']}  "
        f"status={status['status']} ({status['finalize_reason']})"
    )
    click.echo(f"{'rank':>4}  {'essay':<14} {'anchor':<6} {'theta':>7} {'se':>6}  grade band    P")
    for row in view["results"]:
        anchor = row["anchor_grade"] or ""
        theta = "" if row["theta"] is None else f"{row['theta']:7.2f}"
        se = "" if row["se"] is None else f"{row['se']:6.2f}"
        p = "" if row["grade_confidence"] is None else f"{row['grade_confidence']:.2f}"
        click.echo(
            f"{row['rank'] or '':>4}  {row['essay_id']:<14} {anchor:<6} {theta:>7} {se:>6}  "
            f"{row['grade'] or '-':<5} {band_text(row['grade_band']):<7} {p:>4}"
        )
    rel = "n/a" if view["reliability"] is None else f"{view['reliability']:.3f}"
    rho = "n/a" if view["spearman_true"] is None else f"{view['spearman_true']:.3f}"
    click.echo(
        f"\nreliability R {rel}   Spearman(theta, true quality) {rho}   "
        f"provider calls {view['provider_calls']} "
        f"({view['provider_calls'] - view['status']['completed']} failed attempts)   "
        f"wall {view['wall_s']:.2f}s"
    )
    bias = view["position_bias"]
    eta = "n/a" if bias is None else f"{bias['estimate']:+.3f} ± {bias['se']:.3f} logits (slot A)"
    half = "n/a" if view["split_half"] is None else f"{view['split_half']:.3f}"
    click.echo(f"position bias η {eta}   split-half reliability {half}")
    low = [w for w in view["warnings"] if w.startswith("low confidence:")]
    for warning in view["warnings"]:
        if warning not in low:
            click.echo(f"warning: {warning}")
    if low:
        names = ", ".join(w.split()[2] for w in low[:6]) + (" ..." if len(low) > 6 else "")
        click.echo(
            f"warning: {len(low)} essays have a top grade probability below 0.5 ({names}); "
            "--json lists each one"
        )
    click.echo(
        "counters: submitted {submitted}/{denominator}  completed {completed}  failed {failed}  "
        "completion {completion_pct}%  duplicates {duplicates}  orphans {orphans}  "
        "late {late_callbacks}  waves {waves}".format(**status)
    )


@click.command()
@click.option(
    "--mode",
    type=click.Choice(["per_request", "serial_bundle"]),
    default="per_request",
    show_default=True,
    help="How LPS sends requests to the judge.",
)
@mock_options.profile_option
@mock_options.seed_option
@mock_options.essays_option
@mock_options.budget_option
@mock_options.timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def demo(
    mode: str,
    profile: str | None,
    seed: int,
    essays: int | None,
    budget: int | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Run a bundled ENG5-like batch through CJ and the mock judge until it is finalized.

    Uses REDIS_URL when set, otherwise an embedded in-process Redis. Prints the
    ranking (theta, SE, grade, grade band), the reliability R and the completion counters.
    """
    common.quiet_logs(as_json, level="ERROR")
    s = mock_settings(settings.load())
    mock = mock_options.mock_profile(profile)
    registered = registration_for(sample.load(essays), mode, budget=budget, seed=seed)

    async def main() -> dict[str, Any]:
        nonlocal registered
        r, where = await open_checked(s, need_server=False)
        keys = settings.keys_for(s)
        registered = await with_readable_id(
            r, keys, registered, f"demo-{mode}-s{seed}-n{len(registered.essays)}"
        )
        bar = common.ProgressBar() if not as_json and sys.stderr.isatty() else None
        if not as_json:
            click.echo(
                f"Redis: {where}; {len(registered.essays)} essays, budget {registered.denominator} "
                f"comparisons, mode {mode}, judge mock/{mock.name}",
                err=True,
            )
        try:
            state, wall = await run_to_end(
                r, keys, s, registered, mock, timeout=timeout, progress=bar
            )
        finally:
            if bar is not None:
                bar.finish()
        results = results_view(state)
        view = {
            "batch_id": state.batch_id,
            "mode": mode,
            "profile": mock.name,
            "status": status_view(state),
            "results": [
                {
                    k: row[k]
                    for k in (
                        "essay_id",
                        "is_anchor",
                        "anchor_grade",
                        "theta",
                        "se",
                        "rank",
                        "grade",
                        "grade_band",
                        "grade_confidence",
                    )
                }
                for row in results["essays"]
            ],
            "reliability": results["reliability"],
            "ssr": results["ssr"],
            "position_bias": results["position_bias"],
            "split_half": results["split_half"],
            "warnings": results["warnings"],
            "spearman_true": spearman_true(state),
            "provider_calls": await count_provider_calls(r, keys, state.batch_id),
            "wall_s": round(wall, 3),
        }
        await r.aclose()
        return view

    view = event_loop.run(main(), s.event_loop)
    if as_json:
        common.emit_json(view)
    else:
        _print_report(view)
    if view["status"]["status"] != "finalized":
        sys.exit(1)
