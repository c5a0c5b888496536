"""Registered grade scales (lowest grade first) and resolution of a batch's scale spec."""

from __future__ import annotations

from collections.abc import Sequence

GRADE_SCALES: dict[str, tuple[str, ...]] = {
    "swedish_6": ("F", "E", "D", "C", "B", "A"),
    "swedish_8_anchor": ("F", "E", "D", "D+", "C", "C+", "B", "A"),
    "eng5_np_legacy_9_step": ("F+", "E-", "E+", "D-", "D+", "C-", "C+", "B", "A"),
    "eng5_np_national_9_step": ("1", "2", "3", "4", "5", "6", "7", "8", "9"),
}

DEFAULT_SCALE = "swedish_6"


def resolve_scale(spec: str | Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """Return ``(name, grades)`` for a scale name, an explicit grade list, or None (default).

    An explicit list (lowest grade first) gets the name ``"custom"``. Raises ValueError
    naming the problem: unknown scale name, empty list, empty or duplicate grades.
    """
    if spec is None:
        return DEFAULT_SCALE, GRADE_SCALES[DEFAULT_SCALE]
    if isinstance(spec, str):
        name = spec.strip()
        if name in GRADE_SCALES:
            return name, GRADE_SCALES[name]
        known = ", ".join(sorted(GRADE_SCALES))
        raise ValueError(f"unknown grade scale {spec!r}; registered scales: {known}")
    grades = tuple(spec)
    if not grades:
        raise ValueError("grade scale is empty: give at least one grade, lowest first")
    for g in grades:
        if not isinstance(g, str) or not g.strip():
            raise ValueError(f"grade scale contains an empty or non-string grade: {g!r}")
    seen: set[str] = set()
    dups: list[str] = []
    for g in grades:
        if g in seen and g not in dups:
            dups.append(g)
        seen.add(g)
    if dups:
        raise ValueError(f"grade scale has duplicate grades: {', '.join(dups)}")
    return "custom", grades
