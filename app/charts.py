"""The charts of the dashboard's batch page and of the validation report, as Plotly figures
(`{"data": [...], "layout": {...}}`, plain JSON built from the views: no plotly import here).

plotly.js draws them in the page: the dashboard serves the `plotly.min.js` bundled in the
`plotly` package, the report inlines it, so nothing is fetched from elsewhere. Every chart has
titled axes with ticks and names its essays.
"""

from __future__ import annotations

import functools
import json
import math
from importlib import resources
from typing import Any

Figure = dict[str, Any]

STUDENT = "#2b6cb0"
ANCHOR = "#805ad5"
PALETTE = ("#2b6cb0", "#dd6b20", "#2f855a", "#9b2c2c", "#6b46c1", "#718096")
OUTCOME = {
    "completed": "#2f855a",
    "failed": "#c53030",
    "pending": "#a0aec0",
    "abandoned": "#dd6b20",
}
# Lowest grade red to highest blue (ColorBrewer RdYlBu), sampled evenly for a scale's grades.
GRADES = (
    "#d73027",
    "#f46d43",
    "#fdae61",
    "#fee090",
    "#d9d9a0",
    "#abd9e9",
    "#74add1",
    "#4575b4",
    "#313695",
)
CONFIG = {"displaylogo": False, "responsive": True}


@functools.cache
def plotly_js() -> bytes:
    """plotly.min.js as the `plotly` package ships it."""
    return resources.files("plotly").joinpath("package_data/plotly.min.js").read_bytes()


def plotly_version() -> str:
    from plotly.offline import get_plotlyjs_version

    return str(get_plotlyjs_version())


def _layout(title: str, height: int, **more: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        "height": height,
        "margin": {"l": 70, "r": 30, "t": 50, "b": 60},
        "font": {"family": "system-ui, sans-serif", "size": 12, "color": "#1a202c"},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "legend": {"orientation": "h", "y": 1.0, "yanchor": "bottom", "x": 1, "xanchor": "right"},
        "hovermode": "closest",
        **more,
    }


def _axis(title: str, **more: Any) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "showgrid": True,
        "gridcolor": "#e2e8f0",
        "zeroline": False,
        "showline": True,
        "linecolor": "#4a5568",
        "ticks": "outside",
        "automargin": True,
        **more,
    }


def _empty(title: str, message: str) -> Figure:
    return {
        "data": [],
        "layout": _layout(
            title,
            220,
            xaxis={"visible": False},
            yaxis={"visible": False},
            annotations=[
                {
                    "text": message,
                    "showarrow": False,
                    "xref": "paper",
                    "yref": "paper",
                    "x": 0.5,
                    "y": 0.5,
                    "font": {"size": 14, "color": "#4a5568"},
                }
            ],
        ),
    }


# --- one batch ------------------------------------------------------------------------------------


def caterpillar(results: dict[str, Any]) -> Figure:
    """θ ± SE per essay (a `results_view`), lowest at the bottom; anchors in purple with their
    grade; the grade boundaries as vertical lines."""
    title = "θ ± SE per essay, with the grade boundaries"
    rows = sorted(
        (e for e in results["essays"] if e["theta"] is not None),
        key=lambda e: (e["theta"], e["essay_id"]),
    )
    if not rows:
        return _empty(title, "not scored yet: scores come after the first full wave")
    order = [e["essay_id"] for e in rows]

    def trace(group: list[dict[str, Any]], name: str, colour: str, symbol: str) -> dict[str, Any]:
        return {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "x": [e["theta"] for e in group],
            "y": [e["essay_id"] for e in group],
            "error_x": {
                "type": "data",
                "array": [e["se"] for e in group],
                "visible": True,
                "color": colour,
                "thickness": 1.5,
                "width": 3,
            },
            "marker": {"color": colour, "size": 8, "symbol": symbol},
            "customdata": [
                [
                    e["se"],
                    e.get("grade") or "–",
                    e.get("anchor_grade") or "",
                    "–".join(e.get("grade_band") or []) or "–",
                ]
                for e in group
            ],
            "hovertemplate": (
                "<b>%{y}</b><br>θ %{x:.2f} ± %{customdata[0]:.2f}<br>grade %{customdata[1]}"
                " (band %{customdata[3]})<br>anchor grade %{customdata[2]}<extra></extra>"
            ),
        }

    students = [e for e in rows if not e["is_anchor"]]
    anchors = [e for e in rows if e["is_anchor"]]
    data = []
    if students:
        data.append(trace(students, "students", STUDENT, "circle"))
    if anchors:
        t = trace(anchors, "anchors (grade known)", ANCHOR, "diamond")
        t["mode"] = "markers+text"
        t["text"] = [e["anchor_grade"] or "" for e in anchors]
        t["textposition"] = "middle left"
        t["textfont"] = {"color": ANCHOR, "size": 11}
        data.append(t)
    shapes = []
    annotations = []
    for grade, x in sorted(results.get("grade_boundaries", {}).items(), key=lambda kv: kv[1]):
        shapes.append(
            {
                "type": "line",
                "x0": x,
                "x1": x,
                "yref": "paper",
                "y0": 0,
                "y1": 1,
                "line": {"color": "#718096", "width": 1, "dash": "dash"},
            }
        )
        annotations.append(
            {
                "x": x,
                "yref": "paper",
                "y": 1.0,
                "yanchor": "bottom",
                "text": f"{grade} ≥",
                "showarrow": False,
                "font": {"size": 11, "color": "#4a5568"},
            }
        )
    return {
        "data": data,
        "layout": _layout(
            title,
            max(320, 17 * len(rows) + 140),
            xaxis=_axis("θ (logits), bars ± 1 SE", zeroline=True, zerolinecolor="#a0aec0"),
            yaxis=_axis(
                "essay (by θ)",
                type="category",
                categoryorder="array",
                categoryarray=order,
                tickfont={"size": 10},
                showgrid=False,
            ),
            shapes=shapes,
            annotations=annotations,
            margin={"l": 110, "r": 30, "t": 60, "b": 60},
        ),
    }


def grade_probabilities(results: dict[str, Any]) -> Figure:
    """Per essay (ordered as the caterpillar), the probability of each grade, stacked."""
    title = "Grade probabilities per essay"
    rows = sorted(
        (e for e in results["essays"] if e["theta"] is not None and e["grade_probabilities"]),
        key=lambda e: (e["theta"], e["essay_id"]),
    )
    if not rows:
        return _empty(title, "no grade probabilities yet")
    scale = results.get("grade_scale") or sorted(
        {g for e in rows for g in e["grade_probabilities"]}
    )
    data = []
    for k, grade in enumerate(scale):
        colour = GRADES[round(k * (len(GRADES) - 1) / max(1, len(scale) - 1))]
        data.append(
            {
                "type": "bar",
                "orientation": "h",
                "name": grade,
                "x": [e["grade_probabilities"].get(grade, 0.0) for e in rows],
                "y": [e["essay_id"] for e in rows],
                "marker": {"color": colour},
                "hovertemplate": f"%{{y}}: P({grade}) = %{{x:.2f}}<extra></extra>",
            }
        )
    return {
        "data": data,
        "layout": _layout(
            title,
            max(320, 17 * len(rows) + 140),
            barmode="stack",
            xaxis=_axis("probability", range=[0, 1]),
            yaxis=_axis(
                "essay (by θ)",
                type="category",
                categoryorder="array",
                categoryarray=[e["essay_id"] for e in rows],
                tickfont={"size": 10},
                showgrid=False,
            ),
            margin={"l": 110, "r": 30, "t": 50, "b": 60},
        ),
    }


def wave_progress(waves: list[dict[str, Any]]) -> Figure:
    """Pairs per wave by outcome, stacked."""
    title = "Comparisons per wave by outcome"
    if not waves:
        return _empty(title, "no wave submitted yet")
    x = [f"wave {w['wave']}" for w in waves]
    data = [
        {
            "type": "bar",
            "name": kind,
            "x": x,
            "y": [w[kind] for w in waves],
            "marker": {"color": OUTCOME[kind]},
            "hovertemplate": f"%{{x}}: %{{y}} {kind}<extra></extra>",
        }
        for kind in OUTCOME
        if any(w[kind] for w in waves)
    ]
    return {
        "data": data,
        "layout": _layout(
            title,
            320,
            barmode="stack",
            xaxis=_axis("wave", type="category"),
            yaxis=_axis("comparisons"),
        ),
    }


def ab_balance(rows: list[dict[str, Any]], title: str = "A/B positions per essay") -> Figure:
    """Times each essay was shown as A (up) and as B (down), and A − B; anchors marked.
    `rows`: `{essay_id, is_anchor, as_a, as_b}`."""
    if not rows:
        return _empty(title, "no comparison requested yet")
    labels = [r["essay_id"] for r in rows]
    return {
        "data": [
            {
                "type": "bar",
                "name": "as essay A",
                "x": labels,
                "y": [r["as_a"] for r in rows],
                "marker": {"color": PALETTE[0]},
                "hovertemplate": "%{x}: %{y} times as A<extra></extra>",
            },
            {
                "type": "bar",
                "name": "as essay B",
                "x": labels,
                "y": [-r["as_b"] for r in rows],
                "customdata": [r["as_b"] for r in rows],
                "marker": {"color": PALETTE[1]},
                "hovertemplate": "%{x}: %{customdata} times as B<extra></extra>",
            },
            {
                "type": "scatter",
                "mode": "markers",
                "name": "A − B",
                "x": labels,
                "y": [r["as_a"] - r["as_b"] for r in rows],
                "marker": {
                    "color": [ANCHOR if r["is_anchor"] else "#1a202c" for r in rows],
                    "size": 7,
                    "symbol": "line-ew-open",
                    "line": {"width": 3},
                },
                "hovertemplate": "%{x}: A − B = %{y}<extra></extra>",
            },
        ],
        "layout": _layout(
            title + " (A − B marks: purple for anchors)",
            400,
            barmode="relative",
            xaxis=_axis(
                "essay",
                type="category",
                tickangle=-60,
                tickfont={"size": 10},
                categoryarray=labels,
                categoryorder="array",
            ),
            yaxis=_axis("times as A (up) / as B (down)", zeroline=True, zerolinecolor="#1a202c"),
        ),
    }


def reliability(rows: list[dict[str, Any]]) -> Figure:
    """The posterior reliability R at each scoring (the stopping rule's), the SSR and
    split-half reliability of the last (computed when a batch ends; at every scoring in
    batches of before), max |Δθ| on the right axis."""
    title = "Reliability over waves"
    if not rows:
        return _empty(title, "not scored yet")
    x = [r["wave"] for r in rows]
    keys = ("reliability", "ssr", "split_half")
    values = [float(r[k]) for r in rows for k in keys if r.get(k) is not None]

    def line(key: str, name: str, colour: str, axis: str = "y") -> dict[str, Any]:
        return {
            "type": "scatter",
            "mode": "lines+markers",
            "name": name,
            "x": x,
            "y": [r.get(key) for r in rows],
            "yaxis": axis,
            "line": {"color": colour},
            "hovertemplate": f"wave %{{x}}: {name} %{{y:.3f}}<extra></extra>",
        }

    return {
        "data": [
            line("reliability", "R (posterior)", PALETTE[3]),
            line("ssr", "SSR", PALETTE[0]),
            line("split_half", "split-half", PALETTE[2]),
            line("max_delta", "max |Δθ| (right axis)", PALETTE[1], "y2"),
        ],
        "layout": _layout(
            title,
            320,
            xaxis=_axis("wave", dtick=1),
            # SSR is negative while the scores are mostly noise: the axis goes down to it.
            yaxis=_axis("reliability", range=[min([0.0, *values]) - 0.02, 1.02]),
            yaxis2=_axis(
                "max |Δθ| since the previous wave",
                overlaying="y",
                side="right",
                showgrid=False,
                rangemode="tozero",
            ),
            margin={"l": 70, "r": 80, "t": 50, "b": 60},
        ),
    }


def by_error_type(
    series: dict[str, dict[str, float]], *, title: str, y_title: str, percent: bool = False
) -> Figure:
    """Grouped bars: per error type, one bar per series (a run, or the batch)."""
    types = sorted({t for values in series.values() for t in values})
    if not types:
        return _empty(title, "no errors")
    data = []
    unit = "%" if percent else ""
    for k, (name, values) in enumerate(series.items()):
        ys = [values.get(t, 0) for t in types]
        data.append(
            {
                "type": "bar",
                "name": name,
                "x": types,
                "y": [100 * y for y in ys] if percent else ys,
                "marker": {"color": PALETTE[k % len(PALETTE)]},
                "hovertemplate": f"{name} %{{x}}: %{{y:.3g}}{unit}<extra></extra>",
            }
        )
    return {
        "data": data,
        "layout": _layout(
            title,
            320,
            barmode="group",
            xaxis=_axis("error type", type="category"),
            yaxis=_axis(y_title, ticksuffix="%" if percent else "", rangemode="tozero"),
        ),
    }


def batch_figures(detail: dict[str, Any]) -> dict[str, Figure]:
    """Every chart of the batch page, from `app.batch_detail.batch_detail`."""
    positions = [
        {k: e[k] for k in ("essay_id", "is_anchor", "as_a", "as_b")}
        for e in detail["positions"]["essays"]
    ]
    return {
        "waves": wave_progress(detail["waves"]),
        "caterpillar": caterpillar(detail["results"]),
        "grades": grade_probabilities(detail["results"]),
        "balance": ab_balance(positions),
        "reliability": reliability(detail["reliability"]),
        "failures": by_error_type(
            {"failed comparisons": {k: float(v) for k, v in detail["failures"].items()}},
            title="Failed comparisons by error type",
            y_title="comparisons",
        ),
    }


# --- the validation report ------------------------------------------------------------------------


def theta_vs_theta(a: dict[str, Any], b: dict[str, Any]) -> Figure:
    """Each essay's θ in one run against the other's, with the diagonal."""
    title = f"θ: {a['label']} against {b['label']}"
    ta = {e["essay_id"]: e for e in a["essays"] if e["theta"] is not None}
    tb = {e["essay_id"]: e for e in b["essays"] if e["theta"] is not None}
    ids = sorted(set(ta) & set(tb))
    if not ids:
        return _empty(title, "no scores to compare")
    values = [ta[i]["theta"] for i in ids] + [tb[i]["theta"] for i in ids]
    lo, hi = min(values), max(values)
    data: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "equal θ",
            "x": [lo, hi],
            "y": [lo, hi],
            "line": {"color": "#a0aec0", "dash": "dash"},
            "hoverinfo": "skip",
        }
    ]
    for name, anchor, colour in (("students", False, STUDENT), ("anchors", True, ANCHOR)):
        group = [i for i in ids if bool(ta[i]["is_anchor"]) == anchor]
        if group:
            data.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": name,
                    "x": [ta[i]["theta"] for i in group],
                    "y": [tb[i]["theta"] for i in group],
                    "text": group,
                    "marker": {"color": colour, "size": 8, "opacity": 0.85},
                    "hovertemplate": "%{text}: %{x:.2f} / %{y:.2f}<extra></extra>",
                }
            )
    return {
        "data": data,
        "layout": _layout(
            title,
            520,
            width=560,
            xaxis=_axis(f"θ {a['label']} (logits)"),
            yaxis=_axis(f"θ {b['label']} (logits)", scaleanchor="x"),
        ),
    }


def validation_balance(label: str, view: dict[str, Any]) -> Figure:
    """A/B positions per essay of one validation run (`analyse(run)["positions"]`)."""
    rows = [
        {"essay_id": r["essay_id"], "is_anchor": group == "anchors", "as_a": r["a"], "as_b": r["b"]}
        for group in ("anchors", "students")
        for r in view["positions"][group]["per_essay"]
    ]
    return ab_balance(rows, title=f"{label}: A/B positions per essay")


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity made None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def to_json(figure: Any) -> str:
    """A figure (or any JSON value) as JSON that is safe inside a <script> element."""
    return json.dumps(finite(figure), ensure_ascii=False).replace("</", "<\\/")
