"""`cjs demo`: the main job, end to end in one process."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any, cast

import click
import msgspec
from scipy.stats import spearmanr

from cj.continuation import advance
from cj.registration import BatchIn, InputError, append_registration, build_registration, scale_of
from events import codec
from events.names import Keys
from events.types import ComparisonCompleted, Mode, ProviderAttemptFailed, new_id
from lps.providers.mock import PROFILES, profile_from_env, quality_of
from lps.providers.registry import make_provider
from projections.batch import BatchState, completion_pct
from projections.store import load_state
from tools import common, sample
from tools.runtime import InProcess, connect
from tools.views import results_view, status_view


async def count_provider_calls(r: Any, keys: Keys, batch_id: str) -> int:
    """Provider calls = failed attempts + completed comparisons, counted from the streams."""
    calls = 0
    for stream, kind in (
        (keys.dispatches, ProviderAttemptFailed),
        (keys.callbacks, ComparisonCompleted),
    ):
        last = "-"
        while True:
            page = await r.xrange(stream, min=last, max="+", count=1000)
            if last != "-":
                page = page[1:]
            if not page:
                break
            for _, fields in page:
                try:
                    event = codec.decode(fields)
                except codec.DecodeError:
                    continue
                if isinstance(event, kind) and event.batch_id == batch_id:
                    calls += 1
            last = page[-1][0].decode()
    return calls


def spearman_true(state: BatchState) -> float | None:
    if state.scores is None:
        return None
    theta = {s.essay_id: s.theta for s in state.scores.scores}
    ids = [e.essay_id for e in state.essays if e.essay_id in theta]
    if len(ids) < 3:
        return None
    truth = {e.essay_id: quality_of(e) for e in state.essays}
    rho = spearmanr([theta[i] for i in ids], [truth[i] for i in ids]).statistic
    return round(float(rho), 4)


def _print_report(view: dict[str, Any]) -> None:
    status = view["status"]
    click.echo(
        f"\nBatch {view['batch_id']}  mode={view['mode']}  profile={view['profile']}  "
        f"status={status['status']} ({status['finalize_reason']})"
    )
    click.echo(f"{'rank':>4}  {'essay':<14} {'anchor':<6} {'theta':>7} {'se':>6}  grade")
    for row in view["results"]:
        anchor = row["anchor_grade"] or ""
        theta = "" if row["theta"] is None else f"{row['theta']:7.2f}"
        se = "" if row["se"] is None else f"{row['se']:6.2f}"
        click.echo(
            f"{row['rank'] or '':>4}  {row['essay_id']:<14} {anchor:<6} {theta:>7} {se:>6}  "
            f"{row['grade'] or '-'}"
        )
    ssr = "n/a" if view["ssr"] is None else f"{view['ssr']:.3f}"
    rho = "n/a" if view["spearman_true"] is None else f"{view['spearman_true']:.3f}"
    click.echo(
        f"\nSSR {ssr}   Spearman(theta, true quality) {rho}   "
        f"provider calls {view['provider_calls']}   wall {view['wall_s']:.2f}s"
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
@click.option(
    "--profile",
    type=click.Choice(sorted(PROFILES)),
    default=None,
    help="Mock judge profile [default: $CJS_MOCK_PROFILE or cj_generic_batch].",
)
@click.option(
    "--seed", type=int, default=7, show_default=True, help="Seed for pairs and the mock judge."
)
@click.option(
    "--essays",
    type=click.IntRange(min=2),
    default=None,
    help="Generate a sample of N essays instead of the bundled 42 (30 students, 12 anchors).",
)
@click.option(
    "--budget",
    type=click.IntRange(min=1),
    default=None,
    help="Comparison budget [default: 10 per essay].",
)
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Give up after this many seconds.",
)
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
    ranking (theta, SE, grade), SSR and the completion counters.
    """
    common.quiet_logs(as_json)
    s = common.settings()
    if "CJS_RETRY_BASE_DELAY_S" not in os.environ:
        # The mock judge's faults are simulated: back off in tens of milliseconds, not seconds.
        s = s.model_copy(update={"retry_base_delay_s": 0.02, "retry_max_delay_s": 0.2})
    try:
        mock = profile_from_env(profile)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    data = sample.load(essays)
    try:
        batch_in = BatchIn.model_validate(data)
        scale_name, grades = scale_of(batch_in)
        registered = build_registration(
            batch_in,
            scale_name,
            grades,
            mode=cast(Mode, mode),
            budget=budget,
            seed=seed,
        )
    except (InputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    async def main() -> dict[str, Any]:
        nonlocal registered
        r, where = connect(s)
        keys = common.keys_for(s)
        # A readable id that a seed reproduces (pairs derive from it), unique on a shared Redis.
        batch_id = f"demo-{mode}-s{seed}-n{len(registered.essays)}"
        if await r.exists(keys.batch(batch_id)):
            batch_id = f"{batch_id}-{new_id()[:8]}"
        registered = msgspec.structs.replace(registered, batch_id=batch_id)
        show_bar = not as_json and sys.stderr.isatty()
        if not as_json:
            click.echo(
                f"Redis: {where}; {len(registered.essays)} essays, budget {registered.denominator} "
                f"comparisons, mode {mode}, judge mock/{mock.name}",
                err=True,
            )
        started = time.perf_counter()
        await append_registration(r, keys, registered)
        runner = InProcess(r, keys, s, lambda name: make_provider(name, mock_profile=mock))
        runner.start()
        await advance(r, keys, registered.batch_id)
        try:
            state = await _wait(r, keys, registered.batch_id, runner, timeout, show_bar)
        finally:
            await runner.close()
        wall = time.perf_counter() - started
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
                    )
                }
                for row in results["essays"]
            ],
            "ssr": results["ssr"],
            "position_bias": results["position_bias"],
            "spearman_true": spearman_true(state),
            "provider_calls": await count_provider_calls(r, keys, state.batch_id),
            "wall_s": round(wall, 3),
        }
        await r.aclose()
        return view

    view = asyncio.run(main())
    if as_json:
        common.emit_json(view)
    else:
        _print_report(view)
    if view["status"]["status"] != "finalized":
        sys.exit(1)


async def _wait(
    r: Any, keys: Keys, batch_id: str, runner: InProcess, timeout: float, show_bar: bool
) -> BatchState:
    deadline = time.monotonic() + timeout
    bar = (
        click.progressbar(length=100, label="comparing", file=sys.stderr, show_pos=False)
        if show_bar
        else None
    )
    shown = 0
    try:
        while True:
            runner.check()
            state = await load_state(r, keys, batch_id)
            assert state is not None
            if bar is not None:
                pct = int(completion_pct(state))
                if pct > shown:
                    bar.update(pct - shown)
                    shown = pct
                bar.label = f"wave {state.waves} {state.accepted}/{state.denominator}"
            if state.terminal:
                if bar is not None and shown < 100:
                    bar.update(100 - shown)
                return state
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"batch {batch_id} not finalized after {timeout:.0f}s "
                    f"({state.accepted}/{state.denominator} callbacks)"
                )
            await asyncio.sleep(0.05)
    finally:
        if bar is not None:
            bar.render_finish()
