"""What the benches that time code against another revision share: a module of the project
as it was at a git revision, and plan_wave's standard input."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def module_at(rev: str, path: str) -> ModuleType:
    """`path` (e.g. cj/scoring.py) as of `rev`, imported as a module of its own; it may
    import only what is installed (numpy, scipy), not other project modules of that revision."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True
    ).stdout
    name = f"{Path(path).stem}_at_{rev.replace('/', '_').replace('.', '_')}"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_bytes(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tree_at(rev: str, dest: Path) -> None:
    """The whole project as of `rev` written into `dest` (`git archive`), for benches that run
    another revision's code in a process of its own."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def plan_wave_inputs(pairs: ModuleType, n: int, history_size: int) -> dict[str, Any]:
    """plan_wave's input for n essays: a random history of completed pairs, balanced, and
    random scores (every bench that times the planner uses this one)."""
    rng = np.random.default_rng(7)
    ids = [f"E{i:04d}" for i in range(n)]
    anchors = {e: "FEDCBA"[k % 6] for k, e in enumerate(ids[::6])}
    iu, ju = np.triu_indices(n, 1)
    picks = rng.choice(len(iu), size=min(history_size, len(iu)), replace=False)
    history = []
    for t, k in enumerate(picks):
        a, b = ids[int(iu[k])], ids[int(ju[k])]
        if t % 2:
            a, b = b, a
        history.append(pairs.PairHistory(a, b, "completed", "essay_a"))
    scores = {e: (float(rng.normal()), float(0.3 + 0.2 * rng.random())) for e in ids}
    return {
        "key": "bench",
        "wave": 9,
        "seed": 1,
        "essay_ids": ids,
        "anchors": anchors,
        "grade_scale": "FEDCBA",
        "history": history,
        "scores": scores,
    }
