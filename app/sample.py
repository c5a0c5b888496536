"""The bundled ENG5-like sample: synthetic student essays and graded anchors with latent qualities.

The texts are generated, not real student work: richer vocabulary and longer
essays for higher latent quality, so a text-only judge would rank them too.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from typing import Any

GRADES = ("F", "E", "D", "C", "B", "A")

_TOPICS = (
    "a journey that changed me",
    "why we should protect the oceans",
    "my favourite place",
    "a day without phones",
    "the importance of friendship",
    "learning from mistakes",
)
_PLAIN = (
    "good",
    "nice",
    "big",
    "thing",
    "stuff",
    "very",
    "really",
    "went",
    "got",
    "like",
    "fun",
    "bad",
)
_RICH = (
    "remarkable",
    "consequently",
    "nevertheless",
    "perspective",
    "vivid",
    "subtle",
    "profound",
    "illuminating",
    "resilience",
    "ambivalent",
    "meticulous",
    "therefore",
    "ultimately",
    "curiosity",
    "tension",
    "reflection",
    "juxtaposed",
    "nuanced",
    "compelling",
    "deliberate",
    "evocative",
)
_GLUE = ("the", "and", "I", "it", "was", "to", "of", "in", "we", "that", "my", "a", "with", "for")


def _text(rng: random.Random, quality: float, topic: str) -> str:
    # Quality drives length and vocabulary variety.
    n_words = max(40, int(170 * (1.5**quality) + rng.gauss(0, 12)))
    rich_share = min(0.45, max(0.0, 0.12 + 0.09 * quality))
    words = []
    for _ in range(n_words):
        roll = rng.random()
        pool = _RICH if roll < rich_share else (_PLAIN if roll < rich_share + 0.25 else _GLUE)
        words.append(rng.choice(pool))
    sentences, i = [], 0
    while i < len(words):
        step = rng.randint(8, 16)
        chunk = words[i : i + step]
        sentences.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) + ".")
        i += step
    return f"{topic.capitalize()}. " + " ".join(sentences)


def generate(
    n_students: int = 30, anchors_per_grade: int = 2, seed: int = 20260101
) -> dict[str, Any]:
    rng = random.Random(seed)
    essays: list[dict[str, Any]] = []
    for g, grade in enumerate(GRADES):
        for k in range(anchors_per_grade):
            q = round(-2.0 + 0.8 * g + rng.uniform(-0.15, 0.15), 3)
            essays.append(
                {
                    "essay_id": f"ANCHOR-{grade}-{k + 1}",
                    "anchor_grade": grade,
                    "mock_quality": q,
                    "text": _text(rng, q, rng.choice(_TOPICS)),
                }
            )
    for s in range(n_students):
        q = round(max(-2.5, min(2.5, rng.gauss(0.0, 0.9))), 3)
        essays.append(
            {
                "essay_id": f"STU-{s + 1:03d}",
                "mock_quality": q,
                "text": _text(rng, q, rng.choice(_TOPICS)),
            }
        )
    return {"grade_scale": "swedish_6", "essays": essays}


def load(n_essays: int | None = None) -> dict[str, Any]:
    """The shipped sample, or a generated one with `n_essays` essays in all."""
    if n_essays is None:
        text = resources.files("app").joinpath("data/eng5_sample.json").read_text()
        data: dict[str, Any] = json.loads(text)
        return data
    if n_essays < 2:
        raise ValueError("--essays must be at least 2")
    per_grade = 1 if n_essays < 24 else 2
    anchors = min(len(GRADES) * per_grade, n_essays // 3)
    data = generate(n_students=n_essays - anchors, anchors_per_grade=per_grade)
    anchor_rows = [e for e in data["essays"] if "anchor_grade" in e]
    keep = anchor_rows[:: max(1, len(anchor_rows) // anchors)][:anchors] if anchors else []
    data["essays"] = keep + [e for e in data["essays"] if "anchor_grade" not in e]
    return data


if __name__ == "__main__":
    print(json.dumps(generate(), indent=1))
