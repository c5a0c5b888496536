"""The charts shared by the dashboard and the validation report (app/charts.py): plain Plotly
figures with titled axes that name the essays; safe to put in a page."""

from __future__ import annotations

import json
from typing import Any

from app import charts


def _essay(
    essay_id: str, theta: float | None, anchor: str | None = None, **more: Any
) -> dict[str, Any]:
    return {
        "essay_id": essay_id,
        "is_anchor": anchor is not None,
        "anchor_grade": anchor,
        "theta": theta,
        "se": None if theta is None else 0.3,
        "rank": None,
        "grade": "C" if theta is not None else None,
        "grade_probabilities": {"F": 0.2, "C": 0.8} if theta is not None else {},
        "confidence": "mid",
        **more,
    }


def test_caterpillar_orders_by_theta_marks_anchors_and_draws_the_boundaries() -> None:
    results = {
        "essays": [
            _essay("s1", 0.5, grade_band=["C", "B"]),
            _essay("a1", -1.0, "F"),
            _essay("s2", 1.5),
            _essay("s3", None),
        ],
        "grade_boundaries": {"C": 0.0, "B": 1.0},
        "grade_scale": ["F", "C", "B"],
    }
    fig = charts.caterpillar(results)
    layout = fig["layout"]
    assert layout["yaxis"]["categoryarray"] == ["a1", "s1", "s2"]  # unscored left out
    assert layout["xaxis"]["title"]["text"].startswith("θ")
    students, anchors = fig["data"]
    assert students["y"] == ["s1", "s2"] and students["error_x"]["array"] == [0.3, 0.3]
    assert students["customdata"][0][3] == "C–B"  # the grade band, where the results carry one
    assert anchors["y"] == ["a1"] and anchors["text"] == ["F"]
    assert [s["x0"] for s in layout["shapes"]] == [0.0, 1.0]
    assert [a["text"] for a in layout["annotations"]] == ["C ≥", "B ≥"]


def test_every_batch_chart_is_drawn_even_before_scores() -> None:
    detail = {
        "waves": [],
        "results": {"essays": [_essay("s1", None)], "grade_boundaries": {}, "grade_scale": []},
        "positions": {"essays": []},
        "reliability": [],
        "failures": {},
    }
    figures = charts.batch_figures(detail)
    assert set(figures) == {"waves", "caterpillar", "grades", "balance", "reliability", "failures"}
    for fig in figures.values():
        assert fig["layout"]["annotations"][0]["text"]  # says why it is empty


def test_figures_are_safe_json_inside_a_script() -> None:
    fig = charts.wave_progress(
        [{"wave": 1, "requested": 2, "completed": 1, "failed": 1, "pending": 0, "abandoned": 0}]
    )
    fig["layout"]["title"]["text"] = "</script><script>alert(1)</script>"
    fig["data"][0]["y"] = [float("nan")]
    text = charts.to_json(fig)
    assert "</script>" not in text
    back = json.loads(text)
    assert back["data"][0]["y"] == [None]
    assert back["layout"]["xaxis"]["title"]["text"] == "wave"


def test_reliability_over_waves_draws_r_at_every_scoring_and_the_end_figures_once() -> None:
    rows: list[dict[str, Any]] = [
        {"wave": 1, "reliability": 0.61, "ssr": None, "split_half": None, "max_delta": None},
        {"wave": 2, "reliability": 0.74, "ssr": None, "split_half": None, "max_delta": 0.4},
        {"wave": 3, "reliability": 0.81, "ssr": 0.9, "split_half": 0.7, "max_delta": 0.1},
    ]
    fig = charts.reliability(rows)
    lines = {trace["name"]: trace["y"] for trace in fig["data"]}
    assert lines["R (posterior)"] == [0.61, 0.74, 0.81]
    assert lines["SSR"] == [None, None, 0.9] and lines["split-half"] == [None, None, 0.7]
    assert fig["layout"]["yaxis"]["range"][0] == -0.02  # from 0: no SSR below it
