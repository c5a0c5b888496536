"""`cjs validate`: the ENG5 validation comparison of `per_request` and `serial_bundle` runs.

Either runs one configuration in each mode in this process (the demo's machinery, mock judge),
or takes two recorded runs (`cjs export` files, loaded into an embedded Redis with `cjs import`'s
code); app/validation.py reports on them.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from app import errors, sample, settings
from app.runs import batch_runs, load_runs, registration_for, run_modes
from app.validation import MODES, analyse, compare, label_runs
from cj.registration import InputError, build_registration, parse_input
from tools import common, mock_options


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
@mock_options.profile_option
@mock_options.seed_option
@mock_options.essays_option
@mock_options.budget_option
@click.option(
    "--runs",
    "run_files",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    nargs=2,
    default=None,
    help="Compare two recorded runs (cjs export files) instead.",
)
@click.option(
    "--batches",
    "batch_ids",
    nargs=2,
    default=None,
    help="Compare two batches of the namespace (live, or read from the archive) instead.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Write report.md and a self-contained report.html here.",
)
@mock_options.timeout_option
@click.option(
    "--keep",
    is_flag=True,
    help="On a shared Redis, keep the runs' namespace (CJS_PREFIX + validate-<id>:) for "
    "`cjs export`; by default it is deleted.",
)
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def validate(
    input_file: Path | None,
    modes: str,
    profile: str | None,
    seed: int,
    essays: int | None,
    budget: int | None,
    run_files: tuple[Path, Path] | None,
    batch_ids: tuple[str, str] | None,
    report_dir: Path | None,
    timeout: float,
    keep: bool,
    as_json: bool,
) -> None:
    """Run one batch in each mode (or take two recorded runs) and compare them: error rates by
    provider and error type, A/B positions of anchors and students, counters against events,
    late/duplicate/orphan callbacks, provider calls, bundles, tokens by kind, cost, Spearman
    between the modes' θ and grade agreement. Exits 1 when a run's counters disagree with its
    events.

    With REDIS_URL the runs use that server, in a namespace of their own that is deleted
    afterwards (--keep keeps it); without, an embedded Redis."""
    common.quiet_logs(True, level="ERROR")
    s = settings.load()
    if report_dir is not None:
        from app.report import prepare_directory

        prepare_directory(report_dir)  # before minutes of runs, not after
    if run_files and batch_ids:
        raise click.UsageError("choose one of --runs and --batches")
    if run_files:
        runs = asyncio.run(load_runs(list(run_files)))
        source, kept_prefix = "recorded runs", None
    elif batch_ids:
        runs = common.run(lambda: batch_runs(s, list(batch_ids)))
        source, kept_prefix = "batches", None
    else:
        wanted = [m.strip() for m in modes.split(",") if m.strip()]
        bad = [m for m in wanted if m not in MODES]
        if bad or not wanted or len(set(wanted)) != len(wanted):
            raise click.UsageError(f"--modes: choose distinct modes among {', '.join(MODES)}")
        mock_options.mock_profile(profile)
        if input_file is not None:
            try:
                batch_in, scale_name, grades = parse_input(input_file)
                registered = build_registration(
                    batch_in,
                    scale_name,
                    grades,
                    budget=budget,
                    seed=seed,
                    max_essay_chars=s.max_essay_chars,
                )
            except InputError as exc:
                raise errors.InputError(str(exc)) from exc
        else:
            registered = registration_for(
                sample.load(essays), "per_request", budget=budget, seed=seed
            )
        announce = None if as_json else _announce
        runs, source, kept_prefix = asyncio.run(
            run_modes(s, registered, wanted, profile, seed, timeout, announce, keep=keep)
        )
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
        "source": source,
        "kept_prefix": kept_prefix,
        "profile": None if run_files or batch_ids else mock_options.mock_profile(profile).name,
        "seed": None if run_files or batch_ids else seed,
        "modes": views,
        "comparison": comparison,
    }
    if report_dir is not None:
        from app.report import write_report

        out["report"] = {k: str(v) for k, v in write_report(out, report_dir).items()}
    if as_json:
        common.emit_json(out)
    else:
        _print(out)
    if not all(v["counters_match_events"] for v in views.values()):
        sys.exit(1)


def _announce(line: str) -> None:
    click.echo(line, err=True)


def _print(out: dict[str, Any]) -> None:
    click.echo(f"source: {out['source']}")
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
            f"cost ${v['cost']['usd']:.4f}, "
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
