"""`plan_wave` chooses exactly the pairs it chose before its speed-ups (issue 11): the
digests below were recorded from the planner as it was (main at d6c982e) on fixed inputs
that reach every part of it (coverage, connection, the A-optimal fill with its candidate
sweeps, the information selector, failed and pending history, anchors). A change of the
chosen pairs, or of their order or orientation, changes a digest.

The A-optimal fill with a fit counts the pairs in flight since session 12 (they
were in Σ's graph but not in its variances): the scored cases with pending pairs were
recorded again then (`CASES`), and the same cases with every pending pair answered
(`SETTLED`, nothing in flight: every plan without overlapping waves) keep the digests the
planner gave before that change."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cj.pairs import PairHistory, plan_wave

SCALE = ("F", "E", "D", "C", "B", "A")


def _history(
    ids: list[str], m: int, rng: np.random.Generator, settled: bool = False
) -> list[PairHistory]:
    n = len(ids)
    iu, ju = np.triu_indices(n, 1)
    picks = rng.choice(len(iu), size=min(m, len(iu)), replace=False)
    out = []
    for t, k in enumerate(picks):
        a, b = ids[int(iu[k])], ids[int(ju[k])]
        if t % 2:
            a, b = b, a
        roll = t % 17
        if roll == 3 and not settled:
            out.append(PairHistory(a, b, "pending"))
        elif roll == 5:
            out.append(PairHistory(a, b, "failed", permanent=t % 2 == 0))
        else:
            winner = "essay_a" if rng.random() < 0.5 else "essay_b"
            out.append(PairHistory(a, b, "completed", winner))  # type: ignore[arg-type]
    return out


def _case(
    n: int,
    m: int,
    size: int,
    *,
    wave: int,
    scored: bool,
    seed: int,
    settled: bool = False,
    **extra: object,
) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    ids = [f"s{i:04d}" for i in range(n)]
    anchors = {e: SCALE[k % len(SCALE)] for k, e in enumerate(ids[::7])}
    history = _history(ids, m, rng, settled) if m else []
    scores = (
        {e: (float(rng.normal()), float(0.2 + 0.6 * rng.random())) for e in ids} if scored else None
    )
    return plan_wave(
        key=f"pin{seed}",
        wave=wave,
        seed=seed,
        essay_ids=ids,
        anchors=anchors,
        grade_scale=SCALE,
        history=history,
        size=size,
        scores=scores,
        **extra,  # type: ignore[arg-type]
    )


CASES = {
    "first wave": (dict(n=60, m=0, size=120, wave=1, scored=False, seed=1), "71dcf04d997510e4"),
    "early waves": (dict(n=60, m=150, size=30, wave=3, scored=True, seed=2), "0bfcbb8f045f93c2"),
    "n=100 matching": (
        dict(n=100, m=1100, size=50, wave=12, scored=True, seed=3),
        "d0106d57324d9218",
    ),
    "n=300 with sweeps": (
        dict(n=300, m=6000, size=150, wave=9, scored=True, seed=4),
        "532e6fee90add295",
    ),
    "capped at two": (
        dict(n=80, m=900, size=70, wave=6, scored=True, seed=5, per_essay_cap=2),
        "779d784df677b204",
    ),
    "information": (
        dict(n=80, m=600, size=40, wave=4, scored=True, seed=6, selector="information"),
        "e8983b34ef033332",
    ),
    "nearly exhausted": (
        dict(n=24, m=250, size=40, wave=20, scored=True, seed=7),
        "4f43ff5685770132",
    ),
    # The size of issue 11's goal: 1,000 essays, a history of 20,000.
    "n=1000": (dict(n=1000, m=20000, size=500, wave=9, scored=True, seed=8), "1c4e4f04f150745a"),
}


# Recorded from the planner before the pairs in flight counted (main at 799b1ac).
SETTLED = {
    "early waves": "d7dc9ff31e7adc5c",
    "n=100 matching": "874cc611757e6e1c",
    "n=300 with sweeps": "cd46034010a7114d",
    "capped at two": "2d108373080d85dd",
    "nearly exhausted": "1433500f3dc92def",
    "n=1000": "bdd5f77501d7dddd",
}


def digest(pairs: list[tuple[str, str]]) -> str:
    return hashlib.sha256(repr(pairs).encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(CASES))
def test_plan_wave_chooses_the_pinned_pairs(name: str) -> None:
    kwargs, expected = CASES[name]
    pairs = _case(**kwargs)  # type: ignore[arg-type]
    assert pairs, name
    assert digest(pairs) == expected, (name, len(pairs))


@pytest.mark.parametrize("name", sorted(SETTLED))
def test_with_nothing_in_flight_the_pairs_are_as_before(name: str) -> None:
    kwargs, _ = CASES[name]
    pairs = _case(**kwargs, settled=True)  # type: ignore[arg-type]
    assert pairs, name
    assert digest(pairs) == SETTLED[name], (name, len(pairs))
