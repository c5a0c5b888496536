"""The validation report: `report.md` and a self-contained `report.html`, from the JSON of `cjs
validate`. The HTML draws the dashboard's charts (app/charts.py) with plotly.js inlined in the
file: it opens offline and fetches nothing."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from app import charts
from app.errors import BadFile


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    """A Markdown table cell: a `|` in the text (as in |A−B|) would end the cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- charts: the dashboard's (app/charts.py), drawn by plotly.js inlined in the page -------------


def _attempt_rates(view: dict[str, Any]) -> dict[str, float]:
    """Error rate per error type over every provider call of the run (all providers)."""
    attempts = view["error_rates"]["attempts"]
    calls = sum(p["calls"] for p in attempts.values())
    counts: dict[str, int] = {}
    for p in attempts.values():
        for t, c in p["errors"].items():
            counts[t] = counts.get(t, 0) + c["count"]
    return {t: c / calls for t, c in counts.items()} if calls else {}


def figures(out: dict[str, Any]) -> list[tuple[str, charts.Figure]]:
    """The report's charts, each with its heading."""
    views = out["modes"]
    labels = list(views)
    found = [
        (
            "Provider errors by type (share of provider calls)",
            charts.by_error_type(
                {label: _attempt_rates(v) for label, v in views.items()},
                title="Provider errors by type",
                y_title="share of provider calls",
                percent=True,
            ),
        )
    ]
    for label in labels:
        found.append(
            (
                f"A/B position balance per essay: {label}",
                charts.validation_balance(label, views[label]),
            )
        )
    if len(labels) >= 2:
        found.append(
            (
                f"θ: {labels[0]} against {labels[1]}",
                charts.theta_vs_theta(views[labels[0]], views[labels[1]]),
            )
        )
    return found


# --- documents --------------------------------------------------------------------------------


ROWS = (
    ("status", lambda v: f"{v['status']} ({v['finalize_reason']})"),
    ("counters match events", lambda v: v["counters_match_events"]),
    ("provider calls", lambda v: v["provider_calls"]),
    (
        "bundles (mean size)",
        lambda v: f"{v['bundles']['count']} ({_fmt(v['bundles']['mean_size'])})",
    ),
    (
        "cost USD (per comparison)",
        lambda v: f"{v['cost']['usd']:.4f} ({_fmt(v['cost']['per_comparison_usd'])})",
    ),
    (
        "tokens per comparison: input / output / cache read / cache write",
        lambda v: " / ".join(
            _fmt((v["tokens"]["per_comparison"] or {}).get(k))
            for k in (
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            )
        ),
    ),
    (
        "late / duplicate / orphan",
        lambda v: "{late} / {duplicate} / {orphan}".format(**v["callbacks"]),
    ),
    (
        "A share: anchors / students",
        lambda v: (
            f"{_fmt(v['positions']['anchors']['a_share'])} / "
            f"{_fmt(v['positions']['students']['a_share'])}"
        ),
    ),
    (
        "max |A−B|: anchors / students",
        lambda v: (
            f"{v['positions']['anchors']['max_abs_imbalance']} / "
            f"{v['positions']['students']['max_abs_imbalance']}"
        ),
    ),
    ("SSR", lambda v: _fmt(v["ssr"])),
    ("Spearman θ vs true quality", lambda v: _fmt(v["spearman_true"])),
)


def _error_rows(views: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for label, v in views.items():
        for provider, p in v["error_rates"]["attempts"].items():
            for t, c in p["errors"].items():
                rows.append((label, provider, t, str(c["count"]), f"{100 * (c['rate'] or 0):.2f}%"))
    return rows


def markdown(out: dict[str, Any]) -> str:
    views = out["modes"]
    labels = list(views)
    lines = [
        "# ENG5 validation: " + " vs ".join(labels),
        "",
        f"Source: {out['source']}; profile {out['profile']}, seed {out['seed']}.",
        "",
        _row(["", *labels]),
        "|---|" + "---|" * len(labels),
    ]
    for name, fn in ROWS:
        lines.append(_row([name, *(fn(views[x]) for x in labels)]))
    c = out["comparison"]
    if c:
        g = c["grade_agreement"]
        lines += [
            "",
            "## Between the modes",
            "",
            f"- Spearman between the modes' θ: {_fmt(c['spearman_between_modes'])}",
            f"- Student grade agreement: {_fmt(g['students']['exact'])} exact, "
            f"{_fmt(g['students']['within_one'])} within one grade (n = {g['students']['n']})",
            f"- Mean |Δθ|: {_fmt(c['mean_abs_theta_diff'])}",
        ]
    lines += [
        "",
        "## Provider errors (per call)",
        "",
        "| run | provider | error type | count | rate |",
        "|---|---|---|---|---|",
    ]
    rows = _error_rows(views)
    lines += [_row(list(r)) for r in rows] or ["| – | – | none | 0 | 0 |"]
    lines += [
        "",
        "Charts: see report.html (error rates by type, A/B balance per essay, θ of one "
        "mode against the other).",
        "",
    ]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1a202c; background: #fff; }
table { border-collapse: collapse; margin: 12px 0; }
td, th { border: 1px solid #cbd5e0; padding: 4px 10px; text-align: left; font-size: 14px; }
th { background: #edf2f7; }
figure { margin: 16px 0; }
figcaption { font-size: 13px; color: #4a5568; }
.chart { max-width: 1100px; }
"""


def html_report(out: dict[str, Any]) -> str:
    views = out["modes"]
    labels = list(views)
    head = "".join(f"<th>{_esc(x)}</th>" for x in labels)
    body = "".join(
        "<tr><td>"
        + _esc(name)
        + "</td>"
        + "".join(f"<td>{_esc(fn(views[x]))}</td>" for x in labels)
        + "</tr>"
        for name, fn in ROWS
    )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>ENG5 validation: {_esc(' vs '.join(labels))}</title>",
        f"<style>{CSS}</style>",
        f"<script>{charts.plotly_js().decode()}</script></head><body>",
        f"<h1>ENG5 validation: {_esc(' vs '.join(labels))}</h1>",
        f"<p>Source: {_esc(out['source'])}; profile {_esc(out['profile'])}, "
        f"seed {_esc(out['seed'])}.</p>",
        f"<table><tr><th></th>{head}</tr>{body}</table>",
    ]
    c = out["comparison"]
    if c:
        g = c["grade_agreement"]["students"]
        parts.append(
            f"<h2>Between the modes</h2><p>Spearman between the modes' θ: "
            f"<b>{_esc(_fmt(c['spearman_between_modes']))}</b>; student grades agree "
            f"<b>{_esc(_fmt(g['exact']))}</b> exactly, {_esc(_fmt(g['within_one']))} "
            f"within one grade (n = {g['n']}); mean |Δθ| "
            f"{_esc(_fmt(c['mean_abs_theta_diff']))}.</p>"
        )
    rows = _error_rows(views)
    for k, (heading, figure) in enumerate(figures(out)):
        parts.append(
            f'<h2>{_esc(heading)}</h2><figure><div class="chart" id="chart{k}"></div></figure>'
            f"<script>(function (f) {{ Plotly.newPlot('chart{k}', f.data, f.layout, "
            f"{charts.to_json(charts.CONFIG)}); }})({charts.to_json(figure)});</script>"
        )
        if k == 0 and rows:
            parts.append(
                "<table><tr><th>run</th><th>provider</th><th>error type</th><th>count</th>"
                "<th>rate</th></tr>"
                + "".join(
                    "<tr>" + "".join(f"<td>{_esc(x)}</td>" for x in r) + "</tr>" for r in rows
                )
                + "</table>"
            )
    parts.append(
        "<details><summary>Full JSON</summary><pre>"
        + _esc(json.dumps(out, indent=1, default=str))
        + "</pre></details></body></html>"
    )
    return "".join(parts)


def prepare_directory(directory: Path) -> None:
    """Create the report's directory now, before the runs: BadFile when it cannot be."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadFile(f"cannot create the report directory {directory}: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK):
        raise BadFile(f"cannot write the report into {directory}: permission denied")


def write_report(out: dict[str, Any], directory: Path) -> dict[str, Path]:
    prepare_directory(directory)
    md, page = directory / "report.md", directory / "report.html"
    try:
        md.write_text(markdown(out), encoding="utf-8")
        page.write_text(html_report(out), encoding="utf-8")
    except OSError as exc:
        raise BadFile(f"cannot write the report into {directory}: {exc.strerror}") from exc
    return {"markdown": md, "html": page}
