"""The validation report: `report.md` and a self-contained `report.html` (inline SVG, no scripts,
no external assets), from the JSON of `cjs validate`."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

PALETTE = ("#2b6cb0", "#dd6b20", "#2f855a", "#9b2c2c")
ANCHOR = "#805ad5"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# --- charts -----------------------------------------------------------------------------------


def _attempt_rates(view: dict[str, Any]) -> dict[str, float]:
    """Error rate per error type over every provider call of the run (all providers)."""
    attempts = view["error_rates"]["attempts"]
    calls = sum(p["calls"] for p in attempts.values())
    counts: dict[str, int] = {}
    for p in attempts.values():
        for t, c in p["errors"].items():
            counts[t] = counts.get(t, 0) + c["count"]
    return {t: c / calls for t, c in counts.items()} if calls else {}


def error_chart(views: dict[str, Any], width: int = 760, height: int = 300) -> str:
    rates = {label: _attempt_rates(v) for label, v in views.items()}
    types = sorted({t for r in rates.values() for t in r})
    left, bottom, top = 60, 50, 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="error rates by type">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    if not types:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
            'font-size="16" fill="#444">no provider errors in any run</text></svg>'
        )
        return "".join(out)
    peak = max(max(r.values(), default=0.0) for r in rates.values()) or 1.0
    plot_w, plot_h = width - left - 20, height - top - bottom
    group_w = plot_w / len(types)
    bar_w = group_w * 0.8 / max(1, len(rates))
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="#333"/>'
    )
    for k in range(5):
        y = top + plot_h - plot_h * k / 4
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
            'stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{100 * peak * k / 4:.1f}%</text>"
        )
    for i, t in enumerate(types):
        x0 = left + i * group_w + group_w * 0.1
        for j, (label, r) in enumerate(rates.items()):
            h = plot_h * r.get(t, 0.0) / peak
            x = x0 + j * bar_w
            out.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
                f'height="{h:.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                f"<title>{_esc(label)} {_esc(t)}: {100 * r.get(t, 0.0):.2f}%</title></rect>"
            )
        out.append(
            f'<text x="{left + (i + 0.5) * group_w:.1f}" y="{top + plot_h + 16}" '
            f'text-anchor="middle" font-size="12">{_esc(t)}</text>'
        )
    out.append(_legend(list(rates), left, height - 14))
    out.append("</svg>")
    return "".join(out)


def _legend(labels: list[str], x: float, y: float) -> str:
    parts = []
    for j, label in enumerate(labels):
        parts.append(
            f'<rect x="{x + j * 170}" y="{y - 10}" width="12" height="12" '
            f'fill="{PALETTE[j % len(PALETTE)]}"/>'
            f'<text x="{x + j * 170 + 18}" y="{y}" font-size="12">{_esc(label)}</text>'
        )
    return "".join(parts)


def balance_chart(label: str, view: dict[str, Any], width: int = 1100, height: int = 220) -> str:
    """A − B per essay (how often shown first minus second), anchors in purple."""
    rows = [(r, True) for r in view["positions"]["anchors"]["per_essay"]] + [
        (r, False) for r in view["positions"]["students"]["per_essay"]
    ]
    left, top, bottom = 50, 24, 30
    plot_w, plot_h = width - left - 10, height - top - bottom
    peak = max([abs(r["a"] - r["b"]) for r, _ in rows] + [2])
    mid = top + plot_h / 2
    step = plot_w / max(1, len(rows))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="A/B balance {_esc(label)}">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="14" font-size="13" font-weight="bold">{_esc(label)}: '
        "times as essay A minus times as essay B</text>",
    ]
    for v in (-peak, 0, peak):
        y = mid - (plot_h / 2) * v / peak
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
            f'stroke="{"#333" if v == 0 else "#ddd"}"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{v}</text>'
        )
    for k, (r, anchor) in enumerate(rows):
        d = r["a"] - r["b"]
        h = (plot_h / 2) * abs(d) / peak
        y = mid - h if d > 0 else mid
        colour = ANCHOR if anchor else PALETTE[0]
        out.append(
            f'<rect x="{left + k * step + 1:.1f}" y="{y:.1f}" width="{max(1.0, step - 2):.1f}" '
            f'height="{max(h, 1.5):.1f}" fill="{colour}"><title>{_esc(r["essay_id"])}: '
            f"A {r['a']}, B {r['b']}</title></rect>"
        )
    out.append(
        f'<rect x="{left}" y="{height - 16}" width="12" height="12" fill="{ANCHOR}"/>'
        f'<text x="{left + 18}" y="{height - 6}" font-size="12">anchors</text>'
        f'<rect x="{left + 100}" y="{height - 16}" width="12" height="12" fill="{PALETTE[0]}"/>'
        f'<text x="{left + 118}" y="{height - 6}" font-size="12">students</text>'
    )
    out.append("</svg>")
    return "".join(out)


def theta_chart(a: dict[str, Any], b: dict[str, Any], size: int = 520) -> str:
    ta = {e["essay_id"]: e for e in a["essays"] if e["theta"] is not None}
    tb = {e["essay_id"]: e for e in b["essays"] if e["theta"] is not None}
    ids = sorted(set(ta) & set(tb))
    pad = 56
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
        f'viewBox="0 0 {size} {size}" role="img" aria-label="theta of one mode against the other">',
        f'<rect width="{size}" height="{size}" fill="#ffffff"/>',
    ]
    if not ids:
        out.append('<text x="20" y="40" font-size="14">no scores to compare</text></svg>')
        return "".join(out)
    values = [ta[i]["theta"] for i in ids] + [tb[i]["theta"] for i in ids]
    lo, hi = float(min(values)), float(max(values))
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def sx(v: float) -> float:
        return pad + (size - 2 * pad) * (v - lo) / (hi - lo)

    def sy(v: float) -> float:
        return size - pad - (size - 2 * pad) * (v - lo) / (hi - lo)

    out.append(
        f'<rect x="{pad}" y="{pad}" width="{size - 2 * pad}" height="{size - 2 * pad}" '
        'fill="none" stroke="#333"/>'
        f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" '
        'stroke="#aaa" stroke-dasharray="4 4"/>'
    )
    for i in ids:
        colour = ANCHOR if ta[i]["is_anchor"] else PALETTE[0]
        out.append(
            f'<circle cx="{sx(ta[i]["theta"]):.1f}" cy="{sy(tb[i]["theta"]):.1f}" r="5" '
            f'fill="{colour}" fill-opacity="0.8"><title>{_esc(i)}: '
            f"{ta[i]['theta']:.2f} / {tb[i]['theta']:.2f}</title></circle>"
        )
    out.append(
        f'<text x="{size / 2}" y="{size - 16}" text-anchor="middle" font-size="13">'
        f"θ {_esc(a['label'])}</text>"
        f'<text x="16" y="{size / 2}" text-anchor="middle" font-size="13" '
        f'transform="rotate(-90 16 {size / 2})">θ {_esc(b["label"])}</text>'
        f'<text x="{pad}" y="{pad - 12}" font-size="12">{lo:.1f} … {hi:.1f} on both axes; '
        "purple: anchors</text></svg>"
    )
    return "".join(out)


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
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name, fn in ROWS:
        lines.append(f"| {name} | " + " | ".join(str(fn(views[x])) for x in labels) + " |")
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
    lines += [f"| {' | '.join(r)} |" for r in rows] or ["| – | – | none | 0 | 0 |"]
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
        f"<style>{CSS}</style></head><body>",
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
    parts.append(
        "<h2>Provider errors by type (share of provider calls)</h2><figure>"
        + error_chart(views)
        + "</figure>"
    )
    rows = _error_rows(views)
    if rows:
        parts.append(
            "<table><tr><th>run</th><th>provider</th><th>error type</th><th>count</th>"
            "<th>rate</th></tr>"
            + "".join("<tr>" + "".join(f"<td>{_esc(x)}</td>" for x in r) + "</tr>" for r in rows)
            + "</table>"
        )
    parts.append("<h2>A/B position balance per essay</h2>")
    for label in labels:
        parts.append("<figure>" + balance_chart(label, views[label]) + "</figure>")
    if len(labels) >= 2:
        parts.append(
            f"<h2>θ: {_esc(labels[0])} against {_esc(labels[1])}</h2><figure>"
            + theta_chart(views[labels[0]], views[labels[1]])
            + "</figure>"
        )
    parts.append(
        "<details><summary>Full JSON</summary><pre>"
        + _esc(json.dumps(out, indent=1, default=str))
        + "</pre></details></body></html>"
    )
    return "".join(parts)


def write_report(out: dict[str, Any], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    md, page = directory / "report.md", directory / "report.html"
    md.write_text(markdown(out), encoding="utf-8")
    page.write_text(html_report(out), encoding="utf-8")
    return {"markdown": md, "html": page}
