"""`cjs positions`: position balance and the judge's slot bias for a batch."""

from __future__ import annotations

import click

from cj.positions import position_report
from tools import common


@click.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
def positions(batch_id: str, as_json: bool) -> None:
    """Per essay: times in slot A and B and wins in each; anchors vs students; how often
    slot A won, with a binomial test against 50 %; the fitted position bias η."""
    common.quiet_logs(as_json)
    report = common.batch_view(batch_id, position_report)
    if as_json:
        common.emit_json(report)
        return
    click.echo(
        f"{'essay':<20} {'anchor':<6} {'A':>4} {'B':>4} {'A-B':>4} {'won A':>6} {'won B':>6}"
    )
    for e in report["essays"]:
        click.echo(
            f"{e['essay_id']:<20} {'yes' if e['is_anchor'] else '':<6} {e['as_a']:>4} "
            f"{e['as_b']:>4} {e['balance']:>4} {e['wins_as_a']:>6} {e['wins_as_b']:>6}"
        )
    click.echo("")
    for name, g in report["groups"].items():
        click.echo(
            f"{name:<9} A {g['as_a']:>5}  B {g['as_b']:>5}  balance {g['balance']:>4}  "
            f"slot-A win share {g['slot_a_win_share']}"
        )
    bias = report["position_bias"]
    eta = "n/a" if bias is None else f"{bias['estimate']:+.3f} ± {bias['se']:.3f} logits"
    click.echo(
        f"\nslot A won {report['slot_a_wins']}/{report['comparisons']} "
        f"(share {report['slot_a_win_share']}, binomial p = {report['binomial_p_value']}); "
        f"fitted η {eta}; max |A-B| per essay {report['max_abs_balance']}"
    )
