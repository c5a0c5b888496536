"""Judgement quality of adaptive waves vs random balanced pairs vs all pairs, on the mock judge.

    python bench/quality.py [--seeds 20] [--seeds-300 20] [--sizes 30,100,300] [--json]

Simulation (the mock judge's formula, `lps.providers.mock.win_probability` when it
imports): every essay has a latent quality q = spread · N(0, 1); a comparison
(a, b) is won by a with probability σ(q_a − (q_b + ε) + bias), ε ~ N(0, noise²)
per call (defaults: spread 1, noise 0.5, bias 0.3, the mock's cj_generic_batch
profile). Every 6th essay is an anchor whose grade is its q's sextile in the batch
(swedish_6); the students' true grades are the same sextiles.

Strategies, per batch:
* adaptive: `plan_wave` wave 1 (min_comparisons = 4, i.e. 2n pairs), then waves
  of ``--wave-frac`` · n pairs with a BT refit between waves, until the budget
  (``--budget`` of all pairs) is spent; the share at which max |Δθ| first fell
  below the stability threshold is reported too.
* random: uniformly random distinct pairs, as many as adaptive used, positions
  from running balances.
* all: every pair once (a balanced round-robin).
Reported (mean over seeds): Spearman(θ, q) over all essays, grade accuracy over
students (and within one grade), |η − bias|, the share of the n(n−1)/2 pairs used,
and for adaptive the SSR and split-half reliability.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Threaded OpenBLAS is erratic on a small shared machine (numpy's and scipy's
    # copies contend); one thread is faster and steadier for these sizes.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cj.grades import project_grades
from cj.pairs import PairHistory, plan_wave
from cj.scoring import Comparison, FitResult, fit_bt, max_abs_delta, split_half, ssr

SCALE = ("F", "E", "D", "C", "B", "A")

WinProb = Callable[[float, float, float], float]


def _fallback_win_probability(q_a: float, q_b: float, position_bias: float) -> float:
    return 1.0 / (1.0 + math.exp(-(q_a - q_b + position_bias)))


def load_win_probability() -> tuple[WinProb, str]:
    try:
        from lps.providers.mock import win_probability
    except Exception:  # the mock judge may not exist yet
        return _fallback_win_probability, "bench formula σ(q_a − q_b + bias)"
    return win_probability, "lps.providers.mock.win_probability"


@dataclass
class Batch:
    ids: list[str]
    q: dict[str, float]
    anchors: dict[str, str]
    truth: dict[str, str]
    rng: np.random.Generator
    bias: float
    noise: float
    win_probability: WinProb

    def judge(self, a: str, b: str) -> bool:
        eps = float(self.rng.normal(0.0, self.noise)) if self.noise > 0 else 0.0
        p = self.win_probability(self.q[a], self.q[b] + eps, self.bias)
        return bool(self.rng.random() < p)


def make_batch(n: int, seed: int, spread: float, bias: float, noise: float, wp: WinProb) -> Batch:
    rng = np.random.default_rng(10_000 + seed)
    ids = [f"E{i:04d}" for i in range(n)]
    qs = rng.normal(0.0, spread, n)
    cuts = np.quantile(qs, [k / 6 for k in range(1, 6)])
    truth = {e: SCALE[int(np.searchsorted(cuts, qs[i]))] for i, e in enumerate(ids)}
    anchors = {e: truth[e] for e in ids[::6]}
    return Batch(
        ids, dict(zip(ids, qs.tolist(), strict=True)), anchors, truth, rng, bias, noise, wp
    )


@dataclass
class Outcome:
    spearman: float
    grade_acc: float
    grade_adj: float
    eta_err: float
    share: float
    comparisons: int
    ssr: float | None = None
    split_half: float | None = None
    stable_share: float | None = None
    waves: int = 0
    seconds: float = 0.0


def evaluate(batch: Batch, comps: list[Comparison], fit: FitResult | None = None) -> Outcome:
    n = len(batch.ids)
    fit = fit or fit_bt(batch.ids, comps)
    theta = np.array([fit.theta[e] for e in batch.ids])
    q = np.array([batch.q[e] for e in batch.ids])
    rho = float(spearmanr(theta, q).statistic)
    proj = project_grades(fit.theta, fit.se, batch.anchors, SCALE)
    students = [e for e in batch.ids if e not in batch.anchors]
    hits = [proj.assignments[e].grade == batch.truth[e] for e in students]
    adj = [
        abs(SCALE.index(proj.assignments[e].grade or "F") - SCALE.index(batch.truth[e])) <= 1
        for e in students
    ]
    eta = fit.eta if fit.eta is not None else 0.0
    return Outcome(
        spearman=rho,
        grade_acc=float(np.mean(hits)),
        grade_adj=float(np.mean(adj)),
        eta_err=abs(eta - batch.bias),
        share=len(comps) / (n * (n - 1) / 2),
        comparisons=len(comps),
    )


def run_adaptive(
    batch: Batch,
    budget_share: float,
    wave_frac: float,
    stability: float,
    seed: int,
    k: int = 4,
    anchor_bonus: float = 0.5,
) -> tuple[Outcome, list[Comparison]]:
    t0 = time.perf_counter()
    n = len(batch.ids)
    budget = int(budget_share * n * (n - 1) / 2)
    history: list[PairHistory] = []
    comps: list[Comparison] = []
    scores: dict[str, tuple[float, float]] | None = None
    previous: dict[str, float] = {}
    stable_share: float | None = None
    fit: FitResult | None = None
    wave = 0
    while len(history) < budget:
        wave += 1
        # Wave 1 is the coverage wave (4 comparisons each: 2n pairs); then adaptive waves.
        step = math.ceil(k * n / 2) if wave == 1 else max(1, int(wave_frac * n))
        size = min(budget - len(history), step)
        pairs = plan_wave(
            batch_id=f"bench-{n}-{seed}",
            wave=wave,
            seed=seed,
            essay_ids=batch.ids,
            anchors=batch.anchors,
            grade_scale=SCALE,
            history=history,
            size=size,
            scores=scores,
            min_comparisons=k,
            anchor_bonus=anchor_bonus,
        )
        if not pairs:
            break
        for a, b in pairs:
            win = batch.judge(a, b)
            history.append(PairHistory(a, b, "completed", "essay_a" if win else "essay_b"))
            comps.append(Comparison(a, b, win))
        fit = fit_bt(batch.ids, comps)
        scores = {e: (fit.theta[e], fit.se[e]) for e in batch.ids}
        if stable_share is None and wave >= 2 and max_abs_delta(previous, fit.theta) < stability:
            stable_share = len(comps) / (n * (n - 1) / 2)
        previous = fit.theta
    out = evaluate(batch, comps, fit)
    if fit is not None:
        out.ssr = ssr(fit.theta, fit.se)
        out.split_half = split_half(batch.ids, comps, seed=seed).spearman_brown
    out.stable_share = stable_share
    out.waves = wave
    out.seconds = time.perf_counter() - t0
    return out, comps


def orient(pairs: Sequence[tuple[str, str]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Positions from running balances (both orders tried), as the pipeline would."""
    bal: dict[str, int] = {}
    out = []
    for x, y in pairs:
        bx, by = bal.get(x, 0), bal.get(y, 0)
        if bx > by or (bx == by and rng.random() < 0.5):
            x, y = y, x
        bal[x] = bal.get(x, 0) + 1
        bal[y] = bal.get(y, 0) - 1
        out.append((x, y))
    return out


def run_random(batch: Batch, count: int) -> Outcome:
    n = len(batch.ids)
    total = n * (n - 1) // 2
    picks = batch.rng.choice(total, size=min(count, total), replace=False)
    iu, ju = np.triu_indices(n, 1)
    pairs = [(batch.ids[int(iu[k])], batch.ids[int(ju[k])]) for k in picks]
    comps = [Comparison(a, b, batch.judge(a, b)) for a, b in orient(pairs, batch.rng)]
    return evaluate(batch, comps)


def run_all(batch: Batch) -> Outcome:
    n = len(batch.ids)
    order = [batch.ids[int(k)] for k in batch.rng.permutation(n)]
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            d = j - i
            # Circulant tournament: out-degree (n−1)/2 each (±½ when n is even).
            forward = d < n - d or (d == n - d and i < n // 2)
            pairs.append((order[i], order[j]) if forward else (order[j], order[i]))
    comps = [Comparison(a, b, batch.judge(a, b)) for a, b in pairs]
    return evaluate(batch, comps)


@dataclass
class Row:
    n: int
    strategy: str
    seeds: int
    metrics: dict[str, float | None] = field(default_factory=dict)


def mean_of(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(n: int, strategy: str, outs: list[Outcome]) -> Row:
    keys = [
        "spearman", "grade_acc", "grade_adj", "eta_err", "share", "comparisons",
        "ssr", "split_half", "stable_share", "waves", "seconds",
    ]  # fmt: skip
    metrics = {k: mean_of([getattr(o, k) for o in outs]) for k in keys}
    metrics["spearman_sd"] = float(np.std([o.spearman for o in outs]))
    metrics["stable_runs"] = float(sum(o.stable_share is not None for o in outs))
    return Row(n, strategy, len(outs), metrics)


def ceiling(n: int, comparisons: float, args: argparse.Namespace) -> float:
    """Rough upper bound on corr(θ̂, q) for any design with this many comparisons: every
    comparison at P = ½ (Fisher information ¼), the judge noise folded into the logistic
    scale (σ ∗ N(0, noise²) ≈ σ(x / √(1 + π·noise²/8))), reliability = v / (v + 1/info)."""
    scale = math.sqrt(1.0 + math.pi * args.noise**2 / 8.0)
    v = (args.spread / scale) ** 2
    info = 0.25 * 2.0 * comparisons / n
    return math.sqrt(v / (v + 1.0 / info))


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="30,100,300")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--seeds-300", type=int, default=20, help="seeds for n >= 300 (runtime)")
    ap.add_argument("--budget", type=float, default=0.15, help="adaptive budget, share of pairs")
    ap.add_argument("--wave-frac", type=float, default=0.5, help="later wave size / n")
    ap.add_argument("--stability", type=float, default=0.05)
    ap.add_argument("--k", type=int, default=4, help="min_comparisons (wave 1: k·n/2 pairs)")
    ap.add_argument("--anchor-bonus", type=float, default=0.5, help="plan_wave anchor_bonus")
    ap.add_argument("--spread", type=float, default=1.0, help="SD of latent quality q")
    ap.add_argument("--noise", type=float, default=0.5, help="judge noise SD per call")
    ap.add_argument("--bias", type=float, default=0.3, help="true position bias")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    wp, source = load_win_probability()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows: list[Row] = []
    t0 = time.perf_counter()
    for n in sizes:
        seeds = args.seeds if n < 300 else min(args.seeds, args.seeds_300)
        res: dict[str, list[Outcome]] = {"adaptive": [], "random": [], "all": []}

        for seed in range(seeds):
            batch = make_batch(n, seed, args.spread, args.bias, args.noise, wp)
            adaptive, comps = run_adaptive(
                batch, args.budget, args.wave_frac, args.stability, seed, args.k, args.anchor_bonus
            )
            res["adaptive"].append(adaptive)
            res["random"].append(run_random(batch, len(comps)))
            res["all"].append(run_all(batch))

        for strategy, outs in res.items():
            rows.append(summarise(n, strategy, outs))
        if not args.json:
            print(
                f"  n={n}: {seeds} seeds done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr
            )

    if args.json:
        print(
            json.dumps(
                {
                    "judge": source,
                    "settings": vars(args),
                    "rows": [asdict(r) for r in rows],
                },
                indent=1,
            )
        )
        return 0

    print(
        f"judge: {source}; q ~ N(0, {args.spread}²), noise {args.noise}, bias {args.bias}; "
        f"adaptive budget {args.budget:.0%} of pairs, waves of {args.wave_frac}·n"
    )
    head = (
        f"{'n':>4} {'strategy':<9} {'seeds':>5} {'spearman':>9} {'±sd':>6} {'grade':>6} "
        f"{'±1 grd':>6} {'|η−b|':>6} {'share':>6} {'cmp':>6} {'SSR':>6} {'split':>6} "
        f"{'stable@':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r.metrics
        stable = fmt(m["stable_share"], ".1%") if r.strategy == "adaptive" else ""
        print(
            f"{r.n:>4} {r.strategy:<9} {r.seeds:>5} {fmt(m['spearman'], '9.4f')} "
            f"{fmt(m['spearman_sd'], '6.3f')} {fmt(m['grade_acc'], '6.3f')} "
            f"{fmt(m['grade_adj'], '6.3f')} {fmt(m['eta_err'], '6.3f')} "
            f"{fmt(m['share'], '6.1%')} {fmt(m['comparisons'], '6.0f')} "
            f"{fmt(m['ssr'], '6.3f')} {fmt(m['split_half'], '6.3f')} {stable:>8}"
        )
    for n in sizes:
        by = {r.strategy: r.metrics for r in rows if r.n == n}
        a, al = by["adaptive"]["spearman"], by["all"]["spearman"]
        rnd = by["random"]["spearman"]
        if a is not None and al is not None and rnd is not None:
            print(
                f"n={n}: adaptive − all = {a - al:+.4f} Spearman, adaptive − random = "
                f"{a - rnd:+.4f}, adaptive uses {fmt(by['adaptive']['share'], '.1%')} of pairs"
            )
        cmp = by["adaptive"]["comparisons"]
        if cmp:
            bound = ceiling(n, cmp, args)
            print(f"       ceiling for any design with {cmp:.0f} comparisons ≈ {bound:.3f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
