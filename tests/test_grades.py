"""Grade projection from anchors, and grade scales."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cj.grade_scales import DEFAULT_SCALE, GRADE_SCALES, resolve_scale
from cj.grades import isotonic_increasing, project_grades

SCALE = ("F", "E", "D", "C", "B", "A")


# --- scales ---------------------------------------------------------------------


def test_resolve_scale() -> None:
    assert resolve_scale(None) == (DEFAULT_SCALE, GRADE_SCALES[DEFAULT_SCALE])
    assert resolve_scale("swedish_8_anchor")[1] == ("F", "E", "D", "D+", "C", "C+", "B", "A")
    assert resolve_scale(["1", "2", "3"]) == ("custom", ("1", "2", "3"))
    assert resolve_scale(("F", "E", "D", "C", "B", "A")) == ("custom", SCALE)
    with pytest.raises(ValueError, match="unknown grade scale 'nope'"):
        resolve_scale("nope")
    with pytest.raises(ValueError, match="duplicate grades: B"):
        resolve_scale(["A", "B", "B"])
    with pytest.raises(ValueError, match="empty"):
        resolve_scale([])
    with pytest.raises(ValueError, match="empty"):
        resolve_scale(["A", ""])
    for name, grades in GRADE_SCALES.items():
        assert len(set(grades)) == len(grades), name


# --- isotonic ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10), min_size=1, max_size=10),
    step=st.floats(0, 1),
    data=st.data(),
)
def test_isotonic_is_increasing_and_weighted_mean_preserving(
    values: list[float], step: float, data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.floats(0.1, 5), min_size=len(values), max_size=len(values)))
    out = isotonic_increasing(values, weights, step)
    assert len(out) == len(values)
    for x, y in itertools.pairwise(out):
        assert y - x >= step - 1e-9
    # PAVA on shifted values keeps the weighted mean of the shifted values.
    w = np.array(weights)
    shift = np.arange(len(values)) * step
    assert np.dot(w, np.array(out) - shift) == pytest.approx(
        np.dot(w, np.array(values) - shift), abs=1e-6
    )
    if all(b - a >= step for a, b in itertools.pairwise(values)):
        assert out == pytest.approx(values)


# --- projection -------------------------------------------------------------------


def make_batch(
    n: int = 120, noise: float = 0.3, seed: int = 0, anchor_every: int = 6
) -> tuple[dict[str, float], dict[str, float], dict[str, str], dict[str, str]]:
    rng = np.random.default_rng(seed)
    ids = [f"e{i}" for i in range(n)]
    q = rng.normal(0, 2, n)
    cuts = np.quantile(q, [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    true = {ids[i]: SCALE[int(np.searchsorted(cuts, q[i]))] for i in range(n)}
    anchors = {e: true[e] for e in ids[::anchor_every]}
    theta = {ids[i]: float(q[i] + rng.normal(0, noise)) for i in range(n)}
    se = {e: noise for e in ids}
    return theta, se, anchors, true


def test_projects_grades_accurately_with_probabilities() -> None:
    theta, se, anchors, true = make_batch()
    proj = project_grades(theta, se, anchors, SCALE)
    assert set(proj.assignments) == set(theta)  # students and anchors
    students = [e for e in theta if e not in anchors]
    acc = np.mean([proj.assignments[e].grade == true[e] for e in students])
    near = np.mean(
        [
            abs(SCALE.index(proj.assignments[e].grade or "F") - SCALE.index(true[e])) <= 1
            for e in students
        ]
    )
    assert acc > 0.6
    assert near > 0.97
    means = [proj.grade_means[g] for g in SCALE]
    assert all(b > a for a, b in itertools.pairwise(means))
    assert list(proj.boundaries) == list(SCALE[1:])
    for i, g in enumerate(SCALE[1:], start=1):
        assert means[i - 1] < proj.boundaries[g] < means[i]
    for a in proj.assignments.values():
        assert set(a.probabilities) == set(SCALE)
        assert sum(a.probabilities.values()) == pytest.approx(1.0)
        assert a.grade == max(a.probabilities, key=lambda g: a.probabilities[g])
    # Most likely grade is the one whose boundaries contain θ.
    bounds = [proj.boundaries[g] for g in SCALE[1:]]
    for e, t in theta.items():
        assert proj.assignments[e].grade == SCALE[int(np.searchsorted(bounds, t))]


def test_no_anchors_gives_no_grades_and_a_warning() -> None:
    theta, se, _, _ = make_batch(n=20)
    proj = project_grades(theta, se, {}, SCALE)
    assert all(a.grade is None and a.confidence == "low" for a in proj.assignments.values())
    assert all(set(a.probabilities) == set(SCALE) for a in proj.assignments.values())
    assert proj.boundaries == {} and proj.grade_means == {}
    assert any("no anchors" in w for w in proj.warnings)


def test_one_anchor_per_grade() -> None:
    theta = {f"a{i}": float(i) for i in range(6)}
    anchors = {f"a{i}": SCALE[i] for i in range(6)}
    theta.update({"s_low": -0.2, "s_mid": 2.45, "s_high": 5.5, "s_c": 3.1})
    se = {e: 0.2 for e in theta}
    proj = project_grades(theta, se, anchors, SCALE)
    g = {e: a.grade for e, a in proj.assignments.items()}
    assert g["s_low"] == "F" and g["s_high"] == "A" and g["s_c"] == "C"
    assert g["s_mid"] in ("D", "C")
    assert [g[f"a{i}"] for i in range(6)] == list(SCALE)
    assert not any("out of order" in w for w in proj.warnings)
    assert not any("no anchor" in w for w in proj.warnings)


def test_out_of_order_anchors_warn_and_means_stay_monotone() -> None:
    theta = {"f": -3.0, "e": -1.5, "d1": 1.2, "c1": 0.0, "b": 1.5, "a": 3.0, "s": 0.6}
    anchors = {"f": "F", "e": "E", "d1": "D", "c1": "C", "b": "B", "a": "A"}
    se = {k: 0.3 for k in theta}
    proj = project_grades(theta, se, anchors, SCALE)
    assert any("out of order" in w and "d1" in w and "c1" in w for w in proj.warnings)
    means = [proj.grade_means[g] for g in SCALE]
    assert all(b > a for a, b in itertools.pairwise(means))


def test_missing_grade_is_interpolated_and_warned() -> None:
    theta = {"f": -4.0, "e": -2.5, "c": 0.5, "b": 2.0, "a": 3.5, "s": -1.0}
    anchors = {"f": "F", "e": "E", "c": "C", "b": "B", "a": "A"}
    se = {k: 0.2 for k in theta}
    proj = project_grades(theta, se, anchors, SCALE)
    assert any("grade D has no anchor" in w for w in proj.warnings)
    assert proj.grade_means["E"] < proj.grade_means["D"] < proj.grade_means["C"]
    assert proj.assignments["s"].grade == "D"


def test_anchors_of_one_grade_use_default_step() -> None:
    theta = {"c1": 0.0, "c2": 0.2, "hi": 3.0, "lo": -3.0}
    anchors = {"c1": "C", "c2": "C"}
    se = {k: 0.3 for k in theta}
    proj = project_grades(theta, se, anchors, SCALE)
    assert any("only one grade" in w for w in proj.warnings)
    assert proj.assignments["c1"].grade == "C"
    assert SCALE.index(proj.assignments["hi"].grade or "F") > SCALE.index("C")
    assert SCALE.index(proj.assignments["lo"].grade or "A") < SCALE.index("C")


def test_confidence_labels_and_low_confidence_warning() -> None:
    theta = {f"a{i}": 2.0 * i for i in range(6)}
    anchors = {f"a{i}": SCALE[i] for i in range(6)}
    theta.update({"sure": 6.0, "edge": 5.0, "vague": 6.0})
    se = {e: 0.1 for e in theta}
    se["vague"] = 5.0
    proj = project_grades(theta, se, anchors, SCALE, confidence_threshold=0.5)
    assert proj.assignments["sure"].confidence in ("high", "mid")
    assert proj.assignments["sure"].probabilities["C"] > 0.6
    assert proj.assignments["vague"].confidence == "low"
    assert proj.assignments["edge"].confidence == "low"  # on the D/C boundary
    assert any("low confidence: edge" in w for w in proj.warnings)
    assert not any("low confidence: a" in w for w in proj.warnings)  # anchors are not warned


def test_unknown_anchor_grade_and_unscored_anchor_warn() -> None:
    theta = {"x": 0.0, "y": 1.0}
    proj = project_grades(theta, {"x": 0.1, "y": 0.1}, {"x": "Z", "ghost": "C"}, SCALE)
    assert any("not on the scale" in w for w in proj.warnings)
    assert any("ghost" in w and "no score" in w for w in proj.warnings)
    assert all(a.grade is None for a in proj.assignments.values())
