"""Spearman(θ̂, q) and the posterior reliability of bench/quality.py's adaptive design (the
pipeline's waves and refits) with every refit warm-started from the wave before's scores
(`cj.scoring.WarmStart`, θ and SE rounded to 6 places as `BatchScored` records them) and
with every refit cold, batch by batch on the same seeds: the paired differences at
c = 6, 10, 16, 24, 36 comparisons per essay, mean ± SE, and the fits' CPU.

    python bench/quality_warm.py [--seeds 30] [--n 100] [--first-seed 0]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402

from cj import scoring  # noqa: E402

CS = (6, 10, 16, 24, 36)


class Fitter:
    """`fit_bt` at its defaults, warm-started (``warm``) from the last fit it made."""

    def __init__(self, warm: bool) -> None:
        self.warm, self.cpu = warm, 0.0
        self.last: scoring.WarmStart | None = None

    def __call__(self, ids: Sequence[str], comps: Sequence[scoring.Comparison]) -> Any:
        start = self.last if self.warm else None
        t0 = time.process_time()
        fit = scoring._fit(
            ids,
            comps,
            fit_position=True,
            prior=scoring._PRIOR,
            prior_mode="empirical",
            max_iter=scoring._MAX_ITER,
            tol=scoring._TOL,
            integrate=True,
            warm=start,
        )
        self.cpu += time.process_time() - t0
        self.last = scoring.WarmStart(
            theta={e: round(t, 6) for e, t in fit.theta.items()},
            se={e: round(s, 6) for e, s in fit.se.items()},
            eta=None if fit.eta is None else round(fit.eta, 6),
            eta_se=None if fit.eta_se is None else round(fit.eta_se, 6),
        )
        return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=0)
    args = ap.parse_args()
    got: dict[str, dict[int, list[tuple[float, float]]]] = {"warm": {}, "cold": {}}
    cpu = {"warm": 0.0, "cold": 0.0}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in ("warm", "cold") if seed % 2 else ("cold", "warm"):
            fitter = Fitter(name == "warm")
            quality.fit_bt = fitter  # type: ignore[assignment,attr-defined]
            batch = quality.make_batch(args.n, seed, 1.0, 0.4, 0.5)
            records, _ = quality.run_waves(batch, max(CS))
            cpu[name] += fitter.cpu
            # Waves that lose a pair land between whole c: interpolated on the records.
            cs = [r.c for r in records]
            spear = [r.spearman for r in records]
            rel = [math.nan if r.reliability is None else r.reliability for r in records]
            for c in CS:
                point = (float(np.interp(c, cs, spear)), float(np.interp(c, cs, rel)))
                got[name].setdefault(c, []).append(point)
        print(f"  seed {seed}", file=sys.stderr, flush=True)
    print(f"{args.seeds} batches of {args.n}, adaptive design; warm − cold, mean ± SE")
    print("  c    Spearman cold   warm − cold            R cold   warm − cold")
    for c in CS:
        w, k = np.array(got["warm"][c]), np.array(got["cold"][c])
        d = w - k
        se = d.std(axis=0, ddof=1) / math.sqrt(len(d))
        print(
            f"  {c:>2}   {k[:, 0].mean():.4f}   {d[:, 0].mean():+.5f} ± {se[0]:.5f}"
            f"    {k[:, 1].mean():.4f}   {d[:, 1].mean():+.5f} ± {se[1]:.5f}"
        )
    print(f"  fits' CPU s: cold {cpu['cold']:.2f}  warm {cpu['warm']:.2f}")


if __name__ == "__main__":
    main()
