"""Pair generation for comparative judgement waves (pure functions, no I/O).

`plan_wave` chooses the unordered pairs of one wave and the position of each
essay (``essay_a`` is shown first). Its rules:

* Determinism: every random choice comes from a numpy Generator seeded by a
  SHA-256 of (key, wave, seed) — the pipeline's key is the batch's content hash,
  not its (random) id; essays are handled in sorted order and the history is
  reduced to counts, so the order of ``essay_ids`` and of ``history`` does not
  matter.
* No repeats: a pair with a completed or pending request is never requested
  again. A pair whose requests all failed may be requested again, up to
  ``max_attempts_per_pair`` requests in total, unless one failed for good
  (``PairHistory.permanent``).
* Position balance (DESIGN invariant 8): over every request of the batch
  (pending, completed and failed alike) each essay's count(essay_a) −
  count(essay_b) stays in {−1, 0, 1}. Positions are assigned from the running
  balances, one pair at a time, and a pair is only accepted when it can be
  oriented without leaving that range; so the invariant holds after every
  accepted pair, hence after every wave of any size. (If the history given is
  already out of range, no essay's |balance| is ever made worse.)
* Coverage first: essays with fewer than ``min_comparisons`` comparisons
  (completed + pending) are brought up to it with random cycles through them
  (wave 1: ⌈k/2⌉ random Hamiltonian cycles, i.e. a connected graph of degree
  ≥ k); then any disconnected components of the comparison graph are linked.
* One appearance per essay: once there are scores, every wave is a matching (each
  essay at most once), so no essay is compared twice on the same stale θ.
* Adaptive fill: the rest of the wave goes, greedily, to the pair that most
  reduces the total posterior variance of the centred θ (A-optimal design).
  Σ is the inverse Fisher information of the comparisons so far at the latest
  θ (rescaled to the latest fit's SEs; the pairs still in flight then counted as
  answered, at their expected information: `_Planner._sigma`), so the gain of (i, j) is
  I·‖CΣ(e_i − e_j)‖² / (1 + I·Var(θ_i − θ_j)), with I the expected information
  of a comparison (largest for close θ) and Var(θ_i − θ_j) large for essays
  with large SE or far apart in the comparison graph; Σ is updated after every
  chosen pair. Using the graph's covariance, not each essay's SE alone, keeps
  the design from degenerating into chains of neighbours whose global order is
  poorly determined. Student–anchor pairs get a bonus (``anchor_bonus``) while
  the student has not yet met an anchor of that grade, so students are compared
  with anchors spanning their likely grades (the information term keeps those
  anchors near the student's θ). Measured against choosing pairs by their own
  expected Fisher information alone (``selector="information"``) and against
  random pairs in bench/quality.py: the A-optimal fill reaches a given Spearman
  with the fewest comparisons, so it is the default.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import msgspec
import numpy as np
import numpy.typing as npt
import scipy.linalg

from cj.graph import components

FloatArray = npt.NDArray[np.float64]
# The adaptive planner's Σ and gain matrices: double, or single above `_SINGLE_FROM` essays.
RealArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

# Gaussian stand-in for the logistic density σ'(x): peak ¼ and unit mass.
_S2 = 16.0 / (2.0 * math.pi)
# SE assumed for an essay without a score (no fit yet, or added later).
_DEFAULT_SE = 1.5
# Rows per strip of the gain matrix (its scratch: 128 × n doubles, 1 MB at n = 1,000).
_STRIP_ROWS = 128
# Candidate partners kept per essay for the adaptive greedy search.
_PARTNERS_PER_ESSAY = 24
# From this many essays the adaptive planner holds Σ and computes its gains in single
# precision (speed, issue 11: BLAS and numpy's loops do twice the numbers a cycle; at
# n = 1,000 with a 20k history plan_wave's CPU went 0.34 → 0.24 s, 0.83–0.87 of it from 200
# to 500 essays). Below, numpy's per-call overhead is the cost, not arithmetic (no gain at
# 100 essays), so small batches keep double precision and their pairs to the bit. The gains
# only rank candidates: at 1,000 essays with a 20k history (H's condition 16 with its prior)
# Σ comes out within 1e-7 of double precision's and the gains within 1.5e-6 (relative, the
# largest of 500k), far below what separates pairs worth choosing. (The tie-breaking
# jitter, 1e-9, rounds away in a single gain matrix; it still orders the candidates
# re-scored, in Python floats.) Same pairs on 120 of 120 random instances of 2 to 1,000 essays
# (bench/plan_wave.py --agree 120) and in tests/test_pairs_pinned.py's cases of 300 and
# 1,000 essays.
_SINGLE_FROM = 200


def _precision(n: int) -> type[np.floating[Any]]:
    """The float type of the adaptive planner's Σ and gains for ``n`` essays."""
    return np.float32 if n >= _SINGLE_FROM else np.float64


Selector = Literal["a_optimal", "information"]
_Candidate = tuple[float, int, int, int]  # (−gain, i, j, version of Σ it was scored on)


class PairHistory(msgspec.Struct, frozen=True):
    """A pair asked before. A Struct, not a frozen dataclass: a wave's planning makes one
    per pair of the batch, six times faster (speed, issue 11)."""

    essay_a: str
    essay_b: str
    outcome: Literal["pending", "completed", "failed"]
    winner: Literal["essay_a", "essay_b"] | None = None
    permanent: bool = False
    """A failure that asking again cannot fix (a refusal, a bad request): never re-planned."""


class IndexedHistory(Sequence[PairHistory]):
    """A history already read into the arrays `plan_wave` makes of one: each pair's essays
    as positions in ``ids`` (sorted, distinct), whether it is live (pending or completed),
    whether it is pending (asked, not answered), whether it failed for good; its
    `PairHistory`s made only when read, by ``make``. Speed
    (issue 11): CJ's decision reads the batch's pairs into integers anyway, and a plan of
    the same essays takes these arrays as they are, instead of a `PairHistory` per pair
    made, then read back by four generators (≈ 0.5 ms of a decision at 100 essays)."""

    def __init__(
        self,
        ids: list[str],
        a: IntArray,
        b: IntArray,
        live: BoolArray,
        pending: BoolArray,
        permanent: BoolArray,
        make: Callable[[], list[PairHistory]],
    ) -> None:
        self.ids, self.a, self.b, self.live, self.permanent = ids, a, b, live, permanent
        self.pending = pending
        self._make = make
        self._items: list[PairHistory] | None = None

    def items(self) -> list[PairHistory]:
        if self._items is None:
            self._items = self._make()
        return self._items

    def __len__(self) -> int:
        return len(self.a)

    def __iter__(self) -> Iterator[PairHistory]:
        return iter(self.items())

    @overload
    def __getitem__(self, k: int) -> PairHistory: ...
    @overload
    def __getitem__(self, k: slice) -> list[PairHistory]: ...
    def __getitem__(self, k: int | slice) -> PairHistory | list[PairHistory]:
        return self.items()[k]


def pair_key(a: str, b: str) -> tuple[str, str]:
    """The normalised (unordered) key of a pair."""
    return (a, b) if a <= b else (b, a)


@dataclass
class SlotCounts:
    """How often an essay was shown first (``essay_a``) and second (``essay_b``)."""

    as_a: int = 0
    as_b: int = 0

    @property
    def balance(self) -> int:
        return self.as_a - self.as_b


def slot_counts(pairs: Iterable[tuple[str, str]]) -> dict[str, SlotCounts]:
    """Slot A/B counts per essay over ordered pairs (essay_a, essay_b): the one place
    position counts are made (planning, `cjs positions`, `cjs validate`)."""
    counts: dict[str, SlotCounts] = {}
    for a, b in pairs:
        counts.setdefault(a, SlotCounts()).as_a += 1
        counts.setdefault(b, SlotCounts()).as_b += 1
    return counts


def position_balance(history: Sequence[PairHistory]) -> dict[str, int]:
    """count(essay_a) − count(essay_b) per essay over every request in ``history``."""
    return {e: c.balance for e, c in slot_counts((h.essay_a, h.essay_b) for h in history).items()}


def wave_rng(key: str, wave: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"cj-pairs\x1f{key}\x1f{wave}\x1f{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def expected_information(mu: FloatArray, var: FloatArray) -> FloatArray:
    """E[σ'(d)] for d ~ N(mu, var): the expected Fisher information of one comparison."""
    t = _S2 + var
    return 0.25 * np.sqrt(_S2 / t) * np.exp(-0.5 * mu * mu / t)


def _spd_inverse(h: FloatArray, dtype: type[np.floating[Any]]) -> RealArray | None:
    """H⁻¹ of a symmetric positive definite H (bitwise symmetric) in ``dtype`` (double or
    single), or None if H is not numerically definite; H is overwritten. Speed (issue 11):
    by Cholesky, a quarter of the time of `np.linalg.inv`'s LU at n = 1,000, on H's
    transpose (the same matrix, in the order LAPACK wants) in place: no copies of it (but
    the one into single precision)."""
    potrf, potri = scipy.linalg.get_lapack_funcs(("potrf", "potri"), dtype=dtype)
    factor, info = potrf(h.T.astype(dtype, copy=False), lower=False, overwrite_a=True)
    if info != 0:
        return None
    inv, info = potri(factor, lower=False, overwrite_c=True)
    if info != 0:
        return None
    # potri fills the upper triangle of a Fortran array: the lower one of its C
    # transpose, mirrored into the upper.
    out: RealArray = inv.T
    _mirror_upper(out.T)
    return out


def _inverse(make: Callable[[], FloatArray], dtype: type[np.floating[Any]]) -> RealArray:
    """H⁻¹ of the H ``make`` returns, in ``dtype``: by Cholesky (`_spd_inverse`), else (not
    numerically definite) by LU of a second H from ``make`` (the Cholesky overwrote the
    first)."""
    inv = _spd_inverse(make(), dtype)
    if inv is None:
        inv = np.asarray(np.linalg.inv(make()), dtype=dtype)
    return inv


def _mirror_upper(mat: RealArray) -> None:
    """mat's strict lower triangle set to the transpose of its upper one, in place. Speed
    (issue 11): block by block, only the cells written are read (a masked copy of the whole
    transpose read all n² and made two n × n masks)."""
    u = len(mat)
    rows = _STRIP_ROWS
    for r0 in range(0, u, rows):
        r1 = min(r0 + rows, u)
        mat[r1:, r0:r1] = mat[r0:r1, r1:].T
        square = mat[r0:r1, r0:r1]
        np.copyto(square, square.T, where=_strict_lower(r1 - r0))


@functools.cache
def _strict_lower(size: int) -> BoolArray:
    """The strict lower triangle of a size × size matrix, as a mask (read only). Kept:
    `np.tri` costs as much as the copy it guides at n = 100 (speed, issue 11)."""
    mask = np.tri(size, k=-1, dtype=np.bool_)
    mask.flags.writeable = False
    return mask


def _rank1_downdate(cov: RealArray, v: RealArray, c: float) -> None:
    """cov −= c·v·vᵀ in place (BLAS ?ger on the symmetric matrix's Fortran view)."""
    ger = scipy.linalg.get_blas_funcs("ger", dtype=cov.dtype)
    out = ger(-c, v, v, a=cov.T, overwrite_a=True)
    if not np.shares_memory(out, cov):  # pragma: no cover - BLAS made a copy
        cov[...] = out.T


class _Sigma:
    """Σ under rank-one downdates Σ −= c·v·vᵀ. Speed (issue 11): they are applied in blocks
    of `BLOCK` with one matrix product (one n × n pass per block instead of one per pair:
    most of a wave's planning time at n = 1,000); a column is read with the pending ones
    applied to it, the whole matrix after applying them."""

    BLOCK = 32

    def __init__(self, cov: RealArray) -> None:
        self.cov = cov
        self._v = np.empty((cov.shape[0], self.BLOCK), order="F", dtype=cov.dtype)
        self._c = np.empty(self.BLOCK)
        # The pending v's times their c, row by row: the c·v[x] a column applies, ready (the
        # same products: multiplication commutes exactly), a numpy call fewer (speed).
        self._cv = np.empty((cov.shape[0], self.BLOCK), dtype=cov.dtype)
        # ?gemm of Σ's precision for the blocks of downdates.
        self._gemm = scipy.linalg.get_blas_funcs("gemm", dtype=cov.dtype)
        self._k = 0
        self._pending = self._v[:, :0]  # the pending v's (the first k columns of _v)
        # Columns read since Σ last changed: the candidates re-scored between two downdates
        # share their essays, a third of the reads are new (speed, issue 11). The very
        # arrays `column` computed, so the same values to the bit.
        self._columns: dict[int, RealArray] = {}

    def column(self, x: int) -> RealArray:
        cached = self._columns.get(x)
        if cached is not None:
            return cached
        col = self.cov[:, x]
        k = self._k
        if k:
            # ndarray.dot: the same dgemv as `@`, with less of numpy's overhead (speed).
            col = col - self._pending.dot(self._cv[x, :k])
        self._columns[x] = col
        return col

    def downdate(self, v: RealArray, c: float) -> None:
        self._columns.clear()
        self._v[:, self._k] = v
        self._c[self._k] = c
        np.multiply(v, c, out=self._cv[:, self._k])
        self._k += 1
        self._pending = self._v[:, : self._k]
        if self._k == self.BLOCK:
            self._flush()

    def matrix(self) -> RealArray:
        self._flush()
        return self.cov

    def _flush(self) -> None:
        self._columns.clear()
        k = self._k
        if k == 1:
            _rank1_downdate(self.cov, self._v[:, 0], float(self._c[0]))
        elif k > 1:
            v = self._v[:, :k]
            # Σ is symmetric: its transpose is the Fortran-ordered array BLAS updates in place.
            out = self._gemm(
                -1.0, v * self._c[:k], v, beta=1.0, c=self.cov.T, trans_b=True, overwrite_c=True
            )
            if not np.shares_memory(out, self.cov):  # pragma: no cover - BLAS made a copy
                self.cov[...] = out.T
        self._k = 0


def _block(mat: BoolArray, index: IntArray) -> BoolArray:
    """mat[np.ix_(index, index)]."""
    return mat.take(index, axis=0).take(index, axis=1)


def _expected_information_scalar(mu: float, var: float) -> float:
    t = _S2 + var
    return 0.25 * math.sqrt(_S2 / t) * math.exp(-0.5 * mu * mu / t)


class _Candidates:
    """The adaptive search's candidates, popped in the order of a heap of (−gain, i, j,
    version of Σ it was scored on): the shortlist sorted once (version 0) and merged with
    a small heap of the re-scored ones. Speed (issue 11): that replaces heapifying tens of
    thousands of tuples and sweeping the heap of candidates of closed essays now and then;
    `any` skips those at the front of the sorted list instead. A dead candidate met first
    only ever made a live one be re-queued and popped next, so skipping it changes no
    choice."""

    def __init__(self, neg: list[float], xs: list[int], ys: list[int]) -> None:
        self.neg, self.xs, self.ys = neg, xs, ys
        self.k = 0
        self.pushed: list[_Candidate] = []

    def any(self, closed: bytearray) -> bool:
        """Whether a candidate is left (those of closed essays at the front skipped)."""
        k, xs, ys, end = self.k, self.xs, self.ys, len(self.xs)
        while k < end and (closed[xs[k]] or closed[ys[k]]):
            k += 1
        self.k = k
        return k < end or bool(self.pushed)

    def _head(self) -> _Candidate | None:
        k = self.k
        return (self.neg[k], self.xs[k], self.ys[k], 0) if k < len(self.xs) else None

    def best(self) -> float:
        """The largest gain left (after `any`): `pop`'s choice, without making its tuple."""
        k, pushed = self.k, self.pushed
        if k < len(self.xs):
            if pushed and pushed[0] < (self.neg[k], self.xs[k], self.ys[k], 0):
                return -pushed[0][0]
            return -self.neg[k]
        return -pushed[0][0]

    def pop(self) -> _Candidate:
        head = self._head()
        if self.pushed and (head is None or self.pushed[0] < head):
            return heapq.heappop(self.pushed)
        assert head is not None
        self.k += 1
        return head

    def push(self, candidate: _Candidate) -> None:
        heapq.heappush(self.pushed, candidate)


class _Work:
    """Scratch matrices reused by every round of the adaptive search. Speed
    (issue 11): a fresh n × n array costs its page faults on every use, about as much as
    the arithmetic done in it."""

    def __init__(self, n: int, dtype: type[np.floating[Any]]) -> None:
        # The gain matrix and Σ's centred columns (n × n), the strips' other scratch (rows × n).
        # Zeros, not np.empty's leftovers: `_Planner._anchor_bonus` scales whole rows and
        # columns of the gain matrix, the cells below its triangle too (leftover bits read
        # as single floats can overflow there).
        strip = min(_STRIP_ROWS, n) * n
        self.dtype = dtype
        self._flat = [np.zeros(size, dtype=dtype) for size in (n * n, n * n, strip, strip)]

    def buffer(self, k: int, rows: int, cols: int | None = None) -> RealArray:
        cols = rows if cols is None else cols
        return self._flat[k][: rows * cols].reshape(rows, cols)


def _history_arrays(
    index: Mapping[str, int], history: Sequence[PairHistory]
) -> tuple[IntArray, IntArray, BoolArray, BoolArray, BoolArray]:
    """Each pair's essays (positions by ``index``), whether it is live, whether it is
    pending, whether it failed for good. Speed (issue 11): np.fromiter per column, no list
    of tuples to convert (half the time), not a loop of numpy item writes (20k pairs: a
    tenth of a second)."""
    m = len(history)
    try:
        ha = np.fromiter((index[h.essay_a] for h in history), dtype=np.intp, count=m)
        hb = np.fromiter((index[h.essay_b] for h in history), dtype=np.intp, count=m)
    except KeyError as exc:
        raise ValueError(f"history refers to an unknown essay: {exc.args[0]!r}") from None
    live = np.fromiter((h.outcome != "failed" for h in history), dtype=np.bool_, count=m)
    pending = np.fromiter((h.outcome == "pending" for h in history), dtype=np.bool_, count=m)
    permanent = np.fromiter((h.permanent for h in history), dtype=np.bool_, count=m)
    return ha, hb, live, pending, permanent


class _Planner:
    def __init__(
        self,
        ids: list[str],
        anchors: Mapping[str, str],
        grade_scale: Sequence[str],
        history: Sequence[PairHistory],
        max_attempts_per_pair: int,
        size: int,
        rng: np.random.Generator,
        wave_cap: int | None = None,
    ) -> None:
        self.ids = ids
        self.wave_cap = wave_cap  # appearances of one essay in this wave
        self.n = n = len(ids)
        self.index = {e: i for i, e in enumerate(ids)}
        self.rng = rng
        self.size = size
        self.out: list[tuple[str, str]] = []
        # The history as arrays: as given, when a decision read them already (speed).
        if isinstance(history, IndexedHistory) and history.ids == ids:
            ha, hb, live = history.a, history.b, history.live
            pending, permanent = history.pending, history.permanent
        else:
            ha, hb, live, pending, permanent = _history_arrays(self.index, history)
        for k in np.flatnonzero(ha == hb)[:1]:
            raise ValueError(f"history pairs essay {history[int(k)].essay_a!r} with itself")
        # position_balance(history), by counting.
        self.balance = np.bincount(ha, minlength=n) - np.bincount(hb, minlength=n)
        self.count = np.bincount(ha[live], minlength=n) + np.bincount(hb[live], minlength=n)
        # Counted by bincount on flat indices, not np.add.at (ten times slower).
        # Both orientations at once: no n × n transposes.
        flat = np.concatenate((ha * n + hb, hb * n + ha))
        attempts = np.bincount(flat, minlength=n * n)
        eligible = attempts < max_attempts_per_pair
        closed = np.concatenate((live, permanent, live, permanent))
        both = np.concatenate((ha, ha, hb, hb)) * n + np.concatenate((hb, hb, ha, ha))
        eligible[both[closed]] = False
        eligible[:: n + 1] = False
        self.eligible: BoolArray = eligible.reshape(n, n)
        # The live comparisons: the history's as arrays, this wave's appended to lists (as
        # (a, b) when added; `wave_edges` may be reversed later by the balance repair).
        self.live_a: IntArray = ha[live]
        self.live_b: IntArray = hb[live]
        # The pairs in flight (asked, not answered), apart: the latest fit has not seen them.
        self.pending_a: IntArray = ha[pending]
        self.pending_b: IntArray = hb[pending]
        self.answered_a: IntArray = ha[live & ~pending]
        self.answered_b: IntArray = hb[live & ~pending]
        self.edges_a: list[int] = []
        self.edges_b: list[int] = []
        self.wave_count = np.zeros(n, dtype=np.intp)
        self.wave_edges: list[tuple[int, int]] = []  # this wave's pairs, as (a, b)
        # Anchors: grade index per essay (-1 for students) and which grades each
        # student has already met.
        grades = list(dict.fromkeys(grade_scale)) or sorted(set(anchors.values()))
        grades += sorted(set(anchors.values()) - set(grades))
        gidx = {g: i for i, g in enumerate(grades)}
        self.anchor_grade = np.full(n, -1, dtype=np.intp)
        for e, g in anchors.items():
            if e in self.index:
                self.anchor_grade[self.index[e]] = gidx[g]
        self.met_grade = np.zeros((n, max(len(grades), 1)), dtype=np.bool_)
        self.grade_of: list[int] = self.anchor_grade.tolist()  # for reads of one (speed)
        # _meet for every live pair, at once.
        ea, eb = ha[live], hb[live]
        ga, gb = self.anchor_grade[ea], self.anchor_grade[eb]
        meets = (gb >= 0) & (ga < 0)
        self.met_grade[ea[meets], gb[meets]] = True
        meets = (ga >= 0) & (gb < 0)
        self.met_grade[eb[meets], ga[meets]] = True

    # -- state -------------------------------------------------------------

    def _meet(self, x: int, y: int) -> None:
        gx, gy = self.grade_of[x], self.grade_of[y]
        if gy >= 0 and gx < 0:
            self.met_grade[x, gy] = True
        if gx >= 0 and gy < 0:
            self.met_grade[y, gx] = True

    @property
    def full(self) -> bool:
        return len(self.out) >= self.size

    def _options(self, i: int, j: int) -> tuple[bool, bool]:
        """Whether (i, j) resp. (j, i) keeps both balances in range, or at least not worse."""
        bi, bj = self.balance.item(i), self.balance.item(j)
        # b → b + 1 leaves |b + 1| ≤ 1 or brings it nearer 0 exactly when b ≤ 0; b → b − 1
        # when b ≥ 0 (a closed form of the rule, without a helper call per test).
        return bi <= 0 and bj >= 0, bj <= 0 and bi >= 0

    def can_add(self, i: int, j: int) -> bool:
        if i == j or not self.eligible[i, j]:
            return False
        cap = self.wave_cap
        if cap is not None and (self.wave_count[i] >= cap or self.wave_count[j] >= cap):
            return False
        i_first, j_first = self._options(i, j)
        return i_first or j_first

    def add(self, i: int, j: int) -> bool:
        if self.full or not self.can_add(i, j):
            return False
        return self._place(i, j)

    def _place(self, i: int, j: int) -> bool:
        """`add` of a pair that `can_add` allows, the wave not full."""
        # Oriented (a, b) to keep both balances in range (or not worse): the less extreme
        # of the two when both do, else a coin. Inline, the balances read once (speed).
        balance, count, wave_count = self.balance, self.count, self.wave_count
        bi, bj = balance.item(i), balance.item(j)
        i_first, j_first = bi <= 0 and bj >= 0, bj <= 0 and bi >= 0
        if i_first and j_first:
            ci = max(abs(bi + 1), abs(bj - 1))
            cj = max(abs(bj + 1), abs(bi - 1))
            first = ci < cj if ci != cj else self.rng.random() < 0.5
        elif i_first or j_first:
            first = i_first
        else:
            return False
        a, b, ba, bb = (i, j, bi, bj) if first else (j, i, bj, bi)
        # Counts written from item reads: half the time of numpy's scalar `+=` (speed).
        balance[a] = ba + 1
        balance[b] = bb - 1
        count[a] = count.item(a) + 1
        count[b] = count.item(b) + 1
        wave_count[a] = wave_count.item(a) + 1
        wave_count[b] = wave_count.item(b) + 1
        self.eligible[a, b] = self.eligible[b, a] = False
        self.edges_a.append(a)
        self.edges_b.append(b)
        if self.grade_of[a] >= 0 or self.grade_of[b] >= 0:  # a student–anchor pair, maybe
            self._meet(a, b)
        self.out.append((self.ids[a], self.ids[b]))
        self.wave_edges.append((a, b))
        return True

    # -- balance repair ------------------------------------------------------

    def _reverse_path_from(self, i: int, avoid: int) -> bool:
        """Make room at i (balance ±1) by reversing a directed path of this wave's pairs
        from i to an essay leaning the other way: i moves by 2, that essay by 2 the
        other way, the essays between keep their balance."""
        sign = int(self.balance[i])
        if sign == 0:
            return False
        # sign +1: follow pairs where the current essay is first (a→b); −1: the reverse.
        nxt: dict[int, list[int]] = {}
        for k, (a, b) in enumerate(self.wave_edges):
            src = a if sign > 0 else b
            nxt.setdefault(src, []).append(k)
        prev: dict[int, int] = {i: -1}
        queue = [i]
        found = -1
        while queue and found < 0:
            cur = queue.pop(0)
            for k in nxt.get(cur, []):
                a, b = self.wave_edges[k]
                other = b if sign > 0 else a
                if other in prev:
                    continue
                prev[other] = k
                if other != avoid and int(self.balance[other]) == -sign:
                    found = other
                    break
                queue.append(other)
        if found < 0:
            return False
        node = found
        while node != i:
            k = prev[node]
            a, b = self.wave_edges[k]
            self.wave_edges[k] = (b, a)
            self.out[k] = (self.ids[b], self.ids[a])
            self.balance[a] -= 2
            self.balance[b] += 2
            node = a if sign > 0 else b
        return True

    def repair_fill(self, k: int) -> None:
        """Last resort when the wave is not full: take any eligible pair, and one blocked
        only by position balance (both essays leaning the same way) after reversing a
        path of this wave's pairs; essays short of k comparisons first. Matters when few
        pairs are left (small batches near exhaustion, k close to n − 1)."""
        while not self.full:
            found = self._repair_candidates()
            if found is None:
                return
            ii, jj, noise = found
            short = (self.count[ii] < k).astype(np.float64) + (self.count[jj] < k)
            key = -short * 1e6 + self.count[ii] + self.count[jj] + noise
            done = False
            for t in np.argsort(key, kind="stable"):
                i, j = int(ii[t]), int(jj[t])
                if self.add(i, j) or (
                    (self._reverse_path_from(i, j) or self._reverse_path_from(j, i))
                    and self.add(i, j)
                ):
                    done = True
                    break
            if not done:
                return

    def _repair_candidates(self) -> tuple[IntArray, IntArray, FloatArray] | None:
        """The eligible pairs (i, j), i < j, in row order, each with its own random draw
        (one per eligible pair), or None if there is none. Speed only (issue 11): a pair
        with an essay already at this wave's cap can never be added, and reversing a path
        for it only flipped orientations back and forth (a BFS over the wave per candidate:
        2.4 s of a 2.5 s matching wave at n = 1000); such pairs are left out, found among
        the essays with room only, each with the draw it had among all."""
        upper = self.eligible & _strict_lower(self.n).T  # np.triu(eligible, 1), cached mask
        per_row = np.count_nonzero(upper, axis=1)
        total = int(per_row.sum())
        if total == 0:
            return None
        noise = self.rng.random(total)
        if self.wave_cap is None:
            ii, jj = np.nonzero(upper)
            return ii.astype(np.intp), jj.astype(np.intp), noise
        room = np.flatnonzero(self.wave_count < self.wave_cap)
        rows = upper[room]
        a, b = np.nonzero(rows[:, room])
        ii, jj = room[a], room[b]
        # A pair's draw: the eligible pairs of the rows before it, then those before it
        # in its row.
        first = np.cumsum(per_row) - per_row
        before = np.cumsum(rows[np.unique(a)], axis=1) if len(a) else rows[:0]
        at = first[ii] + before[np.searchsorted(np.unique(a), a), jj] - 1
        return ii.astype(np.intp), jj.astype(np.intp), noise[at]

    # -- coverage ------------------------------------------------------------

    def best_partner(self, i: int, closeness: FloatArray | None) -> int | None:
        """An eligible partner for i: fewest comparisons, then closest θ, then random."""
        cand = np.flatnonzero(self.eligible[i])
        if len(cand) == 0:
            return None
        bi = int(self.balance[i])
        if bi != 0:
            cand = cand[self.balance[cand] != bi]
            if len(cand) == 0:
                return None
        key = self.count[cand].astype(np.float64)
        if closeness is not None:
            key = key + 0.01 * np.abs(closeness[cand] - closeness[i])
        key = key + 1e-6 * self.rng.random(len(cand))
        return int(cand[int(np.argmin(key))])

    def cover(self, k: int, closeness: FloatArray | None) -> None:
        """Bring every essay to >= k comparisons: random cycles through those short of it."""
        for _ in range(k + 2):
            if self.full:
                return
            short = np.flatnonzero(self.count < k)
            if len(short) == 0:
                return
            order = [int(x) for x in self.rng.permutation(short)]
            before = len(self.out)
            need_one = bool(np.all(self.count[short] == k - 1))
            counts_before = self.count.copy()
            if len(order) >= 3 and not need_one:
                self._cycle(order)
            elif len(order) >= 2:
                self._matching(order)
            for i in order:  # left out of this round: pair with anyone eligible
                if self.count[i] == counts_before[i] and not self.full:
                    j = self.best_partner(i, closeness)
                    if j is not None:
                        self.add(i, j)
            if len(self.out) == before:
                return

    def _cycle(self, order: list[int]) -> None:
        start = order[0]
        current = start
        remaining = order[1:]
        while remaining and not self.full:
            nxt = None
            for pos, v in enumerate(remaining):
                if self.can_add(current, v):
                    nxt = remaining.pop(pos)
                    break
            if nxt is None:
                current = remaining.pop(0)  # dead end: restart the path from here
                continue
            self.add(current, nxt)
            current = nxt
        if current != start and not self.full:
            self.add(current, start)

    def _matching(self, order: list[int]) -> None:
        remaining = list(order)
        while len(remaining) >= 2 and not self.full:
            i = remaining.pop(0)
            for pos, v in enumerate(remaining):
                if self.can_add(i, v):
                    remaining.pop(pos)
                    self.add(i, v)
                    break

    # -- connectivity --------------------------------------------------------

    def _edges(self, answered: bool = False) -> tuple[IntArray, IntArray]:
        """Both ends of every live comparison (``answered``: but those in flight), the
        history's then this wave's, in order."""
        ha, hb = (self.answered_a, self.answered_b) if answered else (self.live_a, self.live_b)
        ea = np.concatenate((ha, np.asarray(self.edges_a, dtype=np.intp)))
        eb = np.concatenate((hb, np.asarray(self.edges_b, dtype=np.intp)))
        return ea, eb

    def connect(self, closeness: FloatArray | None) -> None:
        """Link the components of the comparison graph in a random chain."""
        k, labels = components(self.n, *self._edges())
        if k <= 1:
            return
        comps = [np.flatnonzero(labels == c) for c in self.rng.permutation(k)]
        for left, right in itertools.pairwise(comps):
            if self.full:
                return
            sub = self.eligible[np.ix_(left, right)].copy()
            bl = self.balance[left][:, None]
            br = self.balance[right][None, :]
            sub &= ~((bl == br) & (bl != 0))
            if not sub.any():
                continue
            cost = self.count[left][:, None] + self.count[right][None, :] + 0.0
            if closeness is not None:
                cost = cost + 0.01 * np.abs(closeness[left][:, None] - closeness[right][None, :])
            cost = cost + 1e-6 * self.rng.random(cost.shape)
            cost[~sub] = np.inf
            r, c = np.unravel_index(int(np.argmin(cost)), cost.shape)
            self.add(int(left[r]), int(right[c]))

    # -- adaptive ------------------------------------------------------------

    def _open_block(self, per_essay_cap: int) -> tuple[IntArray, BoolArray]:
        """The essays in pairs that may still join this wave (in order) and, between them,
        which pairs may (a symmetric mask): eligible, both under the cap, and not both
        leaning the same way (no orientation would keep balance)."""
        cap = per_essay_cap if self.wave_cap is None else min(per_essay_cap, self.wave_cap)
        # Speed (issue 11): over the essays under the cap only, not an n × n mask every round.
        under = np.flatnonzero(self.wave_count < cap)
        # Rows then columns by take: the cells np.ix_ gathers, at a third of its cost (speed).
        ok = self.eligible if len(under) == self.n else _block(self.eligible, under)
        bal = self.balance[under]
        # ok & ((bal_i != bal_j) | (bal_j == 0)), in one array (speed: no u × u temporaries).
        mask = bal[:, None] != bal[None, :]
        mask |= (bal == 0)[None, :]
        mask &= ok
        ok = mask
        some = ok.any(axis=1)
        if not some.all():
            keep = np.flatnonzero(some)
            ok, under = _block(ok, keep), under[keep]
        return under, ok

    def open_pairs(self, per_essay_cap: int) -> tuple[IntArray, IntArray]:
        """(i, j), i < j, of the pairs that may still join this wave (`_open_block`)."""
        used, ok = self._open_block(per_essay_cap)
        ii, jj = np.nonzero(np.triu(ok, 1))
        return used[ii], used[jj]

    def _anchor_bonus(self, values: RealArray, used: IntArray, anchor_bonus: float) -> None:
        """values × (1 + anchor_bonus), in place, for the student–anchor pairs of ``used``
        whose anchor grade the student has not met yet (the rest × 1, left as they are)."""
        if anchor_bonus <= 0:
            return
        grade = self.anchor_grade[used]
        students, anchors = np.flatnonzero(grade < 0), np.flatnonzero(grade >= 0)
        if len(students) == 0 or len(anchors) == 0:
            return
        new = ~self.met_grade.take(used[students], axis=0).take(grade[anchors], axis=1)
        # Each anchor's column and row scaled whole by its factors (1 for the anchors): the
        # same products, × 1 exact elsewhere, by takes and whole-row writes instead of two
        # gathers and scatters of np.ix_ blocks (speed, issue 11).
        factor = np.ones((len(used), len(anchors)))
        factor[students] = np.where(new, 1.0 + anchor_bonus, 1.0)
        cols = values.take(anchors, axis=1)
        cols *= factor
        values[:, anchors] = cols
        rows = values.take(anchors, axis=0)
        rows *= factor.T
        values[anchors] = rows

    def _anchor_factor_one(self, x: int, y: int, anchor_bonus: float) -> float:
        """`_anchor_factor` of one pair, without arrays (speed, issue 11)."""
        if anchor_bonus <= 0:
            return 1.0
        gx, gy = self.grade_of[x], self.grade_of[y]
        new = (gx < 0 <= gy and not self.met_grade[x, gy]) or (
            gy < 0 <= gx and not self.met_grade[y, gx]
        )
        return 1.0 + anchor_bonus if new else 1.0

    def _gain_matrix(
        self, cov: RealArray, theta: FloatArray, used: IntArray, jitter: FloatArray, work: _Work
    ) -> RealArray:
        """A-optimal gain (× the tie-breaking jitter) of every pair of the essays ``used``, as
        a matrix (in ``work``) whose upper triangle holds it: I·‖CΣ(e_i − e_j)‖² / (1 + I·d),
        with d = Var(θ_i − θ_j) and I the expected information of the comparison. Speed
        (issue 11): elementwise, not gathered pair by pair, over strips of rows that cover
        the upper triangle (about half the block, in scratch small enough to stay in
        cache); each operation is the one `expected_information` and the formula make,
        with the same operands, so the upper triangle holds the same values to the bit.
        ``used`` is in increasing order: only the jitter's upper triangle holds its values.
        In Σ's precision, that of ``work``."""
        u = len(used)
        full = u == self.n
        diag = cov.diagonal()[used]
        # cov[:, used] is in Fortran order: its column means and Gram are summed that way.
        sub = cov if full else cov[:, used]
        # The centred columns written in Fortran order, the order dsyrk reads (f2py copied
        # a C-ordered one into it), in scratch: no n × u array made per round (speed).
        centred = work.buffer(1, u, self.n).T
        # sub.mean(axis=0) to the bit (the sums over the count), without its wrapper.
        np.subtract(sub, np.add.reduce(sub, axis=0, keepdims=True) / len(sub), out=centred)
        # Only the upper triangle is read: a symmetric rank-k product, half a GEMM.
        syrk = scipy.linalg.get_blas_funcs("syrk", dtype=work.dtype)
        s2 = syrk(1.0, centred, trans=1, lower=0)
        s2d = s2.diagonal()
        th = theta[used].astype(work.dtype, copy=False)
        out = work.buffer(0, u)
        rows = _STRIP_ROWS
        for r0 in range(0, u, rows):
            r1 = min(r0 + rows, u)
            shape = (r1 - r0, u - r0)
            d, t, b = (work.buffer(k, shape[0], shape[1]) for k in (1, 2, 3))
            a = out[r0:r1, r0:]
            # Σ's and the jitter's cells of the strip gathered for it alone (the upper
            # triangle: half of the u × u block the rows' columns would make).
            if full:
                np.multiply(cov[r0:r1, r0:], 2.0, out=t)
                jit = jitter[r0:r1, r0:]
            else:
                cov.take(used[r0:r1], axis=0).take(used[r0:], axis=1, out=t, mode="clip")
                t *= 2.0
                jit = jitter.take(used[r0:r1], axis=0).take(used[r0:], axis=1, mode="clip")
            np.add(diag[r0:r1, None], diag[None, r0:], out=d)
            d -= t
            np.maximum(d, 1e-12, out=d)
            np.add(d, _S2, out=t)
            np.subtract(th[r0:r1, None], th[None, r0:], out=a)  # μ = θ_i − θ_j
            np.multiply(a, -0.5, out=b)
            b *= a
            b /= t
            np.exp(b, out=b)
            np.divide(_S2, t, out=t)
            np.sqrt(t, out=t)
            t *= 0.25
            t *= b  # I = ¼·√(s²/(s² + d))·exp(−μ²/(2(s² + d)))
            np.add(s2d[r0:r1, None], s2d[None, r0:], out=a)
            np.multiply(s2[r0:r1, r0:], 2.0, out=b)
            a -= b  # ‖CΣ(e_i − e_j)‖²
            a *= t
            d *= t
            d += 1.0
            a /= d
            a *= jit
        return out

    def _exact_gain(
        self, cov: _Sigma, theta: FloatArray, x: int, y: int
    ) -> tuple[float, FloatArray, float, float]:
        """The A-optimal gain of (x, y) under the current Σ, with Σ(e_x − e_y), I and
        Var(θ_x − θ_y). Python floats by `item` (the same doubles, without numpy scalars)."""
        v = cov.column(x) - cov.column(y)
        d = max(v.item(x) - v.item(y), 1e-12)  # Var(θ_x − θ_y)
        info = _expected_information_scalar(theta.item(x) - theta.item(y), d)
        # v.mean() to the bit (the sum over the count), without its Python-level wrapper:
        # a third of this function's time, a few hundred calls a wave (speed, issue 11).
        vc = v - float(np.add.reduce(v)) / len(v)
        # ndarray.dot: the ddot `@` calls (the same bits), at a third of its overhead.
        return info * float(vc.dot(vc)) / (1.0 + info * d), v, info, d

    def _shortlist(
        self, used: IntArray, ok: BoolArray, values: RealArray, work: _Work
    ) -> _Candidates:
        """Each essay's best partners (a wide but bounded candidate set), best first, among
        the open pairs ``ok`` of the essays ``used`` (values in the upper triangle)."""
        u = len(used)
        mat = values
        _mirror_upper(mat)
        np.fill_diagonal(mat, 0.0)
        np.copyto(mat, -np.inf, where=~ok)
        kk = min(_PARTNERS_PER_ESSAY, self.n - 1, u - 1)
        # The kk largest of each row (the -inf of closed pairs are dropped below).
        top = np.argpartition(mat, u - kk, axis=1)[:, u - kk :]
        rows = np.repeat(np.arange(u), kk)
        cols = top.ravel()
        keep = np.isfinite(mat[rows, cols])
        rows, cols = rows[keep], cols[keep]
        lo = np.minimum(rows, cols)
        hi = np.maximum(rows, cols)
        # The distinct pairs, in order, marked on a u × u grid: a few times faster than
        # sorting them at n = 100 (speed, issue 11).
        seen = np.zeros(u * u, dtype=np.bool_)
        seen[lo * u + hi] = True
        uniq = np.flatnonzero(seen)
        li, lj = np.divmod(uniq, u)
        neg, xs, ys = -mat[li, lj], used[li], used[lj]
        # The order a heap of (−gain, i, j) pops them in: they come sorted by (i, j).
        order = np.argsort(neg)
        ranked = neg[order]
        ties = ranked[1:] == ranked[:-1]
        if bool(ties.any()):
            order = _ties_in_index_order(order, ties)
        return _Candidates(ranked.tolist(), xs[order].tolist(), ys[order].tolist())

    def adaptive(
        self,
        theta: FloatArray,
        var: FloatArray | None,
        anchor_bonus: float,
        per_essay_cap: int,
    ) -> None:
        """Greedy A-optimal fill: each step takes the pair that most reduces the total
        posterior variance of the centred θ, Σ updated after every pair (rank one). Gains
        are computed for all open pairs, then re-ranked lazily: a popped candidate whose
        gain is stale is re-scored and pushed back unless it still leads."""
        dtype = _precision(self.n)
        cov = self._sigma(theta, var, dtype)
        jitter = self.rng.random((self.n, self.n))
        jitter *= 1e-9
        jitter += 1.0
        # Breaks exact ties, seeded: min(jitter, jitterᵀ), of which only the upper triangle is
        # read (pairs i < j), made in place strip by strip (speed: no n × n transpose).
        rows = _STRIP_ROWS
        for r0 in range(0, self.n, rows):
            r1 = min(r0 + rows, self.n)
            np.minimum(jitter[r0:r1, r0:], jitter[r0:, r0:r1].T, out=jitter[r0:r1, r0:])
        work = _Work(self.n, dtype)
        # Speed (issue 11): essays at their cap for this wave, for a cheap first test of the
        # many candidates that die (most of them, in a matching wave), which the candidate
        # list also skips when it is asked for its best. The live candidates come out in
        # the same order.
        cap = per_essay_cap if self.wave_cap is None else min(per_essay_cap, self.wave_cap)
        closed = bytearray(self.n)
        out, size, grade_of = self.out, self.size, self.grade_of
        while not self.full:
            used, ok = self._open_block(per_essay_cap)
            if len(used) == 0:
                return
            values = self._gain_matrix(cov.matrix(), theta, used, jitter, work)
            self._anchor_bonus(values, used, anchor_bonus)
            heap = self._shortlist(used, ok, values, work)
            version = added = 0
            # The v, I and Var(θ_x − θ_y) of the candidates re-queued on this Σ, for the one
            # that comes back out first (speed: no second scoring; the same arrays).
            pushed: dict[tuple[int, int], tuple[FloatArray, float, float]] = {}
            while heap.any(closed) and len(out) < size:
                _, x, y, ver = heap.pop()
                # Open essays are under both caps (closed says when one reaches them), so
                # `_open` is eligibility and an orientation (speed: no numpy scalars).
                if closed[x] or closed[y] or not self._orientable(x, y):
                    continue
                scored: tuple[FloatArray, float, float] | None = None
                if ver != version:
                    value, v, inf, d_xy = self._exact_gain(cov, theta, x, y)
                    value *= jitter.item(x, y) if x < y else jitter.item(y, x)
                    if grade_of[x] >= 0 or grade_of[y] >= 0:  # else a factor of 1 (exact)
                        value *= self._anchor_factor_one(x, y, anchor_bonus)
                    if heap.any(closed) and value < heap.best():
                        heap.push((-value, x, y, version))
                        pushed[x, y] = v, inf, d_xy
                        continue
                    scored = v, inf, d_xy  # Σ is unchanged until the downdate below
                if not self._place(x, y):
                    continue
                added += 1
                closed[x] = self.wave_count.item(x) >= cap
                closed[y] = self.wave_count.item(y) >= cap
                if scored is None:  # scored on this Σ already: its v and I again
                    scored = pushed.get((x, y)) or self._exact_gain(cov, theta, x, y)[1:]
                v, inf, d_xy = scored
                cov.downdate(v, inf / (1.0 + inf * d_xy))
                version += 1
                pushed.clear()
            if added == 0:
                return

    def _orientable(self, x: int, y: int) -> bool:
        """Whether (x, y) is eligible and can be oriented (`can_add` but for the caps)."""
        if not self.eligible.item(x, y):
            return False
        bx, by = self.balance.item(x), self.balance.item(y)
        return (bx <= 0 and by >= 0) or (by <= 0 and bx >= 0)

    def _open(self, x: int, y: int, per_essay_cap: int) -> bool:
        return (
            self.wave_count[x] < per_essay_cap
            and self.wave_count[y] < per_essay_cap
            and self.can_add(x, y)
        )

    def information(self, theta: FloatArray, var: FloatArray, per_essay_cap: int) -> None:
        """Greedy fill by the expected Fisher information of a pair alone,
        E[σ'(θ_i − θ_j)] with θ_i − θ_j ~ N(θ̂_i − θ̂_j, SE_i² + SE_j²): the closest, least
        certain pairs first (measured against ``adaptive`` in bench/quality.py)."""
        ii, jj = self.open_pairs(per_essay_cap)
        values = expected_information(theta[ii] - theta[jj], var[ii] + var[jj])
        values = values * (1.0 + 1e-9 * self.rng.random(len(ii)))
        for t in np.argsort(-values, kind="stable"):
            if self.full:
                return
            x, y = int(ii[t]), int(jj[t])
            if self._open(x, y, per_essay_cap):
                self.add(x, y)

    def _posterior_covariance(
        self, theta: FloatArray, var: FloatArray | None, dtype: type[np.floating[Any]]
    ) -> RealArray:
        """Σ = H⁻¹ at θ (in ``dtype``): Fisher information of the live comparisons plus a
        N(0, τ²) prior (a unit prior before the first fit: variances from the graph alone).
        With a fit (``var``), H is of the comparisons it saw (not those in flight: `_sigma`)."""
        if var is None:
            return _inverse(lambda: self._information(theta, 1.0, *self._edges()), dtype)
        prior = 1.0 / max(_variance(theta) + _mean(var), 1e-2)
        edges = self._edges(answered=True)
        cov = _inverse(lambda: self._information(theta, prior, *edges), dtype)
        # Keep the correlation structure of the graph but the variances of the latest
        # fit (which knows η, the fitted prior and comparisons this sketch may not).
        scale = np.sqrt(var / np.maximum(cov.diagonal(), 1e-12))
        cov *= scale[:, None]
        cov *= scale[None, :]
        return cov

    def _sigma(
        self, theta: FloatArray, var: FloatArray | None, dtype: type[np.floating[Any]]
    ) -> _Sigma:
        """The greedy's Σ (in ``dtype``): `_posterior_covariance`, then, with a fit, the pairs
        in flight counted as answered, each at its expected information I under that Σ (a
        comparison's Fisher information does not depend on its outcome): by the greedy's
        own rank-one downdates, Σ = (Σ⁻¹ + Σ_k I_k·d_k·d_kᵀ)⁻¹, d_k = e_x − e_y. Before,
        they were in Σ's graph but the rescaling to the fit's variances took them out again,
        so a wave planned while the last is still coming back (overlapping waves) could
        spend pairs on uncertainty they are about to remove (docs/statistics.md, "Pairs in
        flight", for what it changes). Nothing in flight (no overlap): Σ as before, to the
        bit."""
        cov = _Sigma(self._posterior_covariance(theta, var, dtype))
        if var is None or not len(self.pending_a):
            return cov
        x, y = self.pending_a, self.pending_b
        fitted = cov.matrix()
        diagonal = fitted.diagonal()
        d = np.maximum(diagonal[x] + diagonal[y] - 2.0 * fitted[x, y], 1e-12)
        info = expected_information(theta[x] - theta[y], d)
        for i, j, c in zip(x.tolist(), y.tolist(), info.tolist(), strict=True):
            v = cov.column(i) - cov.column(j)
            cov.downdate(v, c / (1.0 + c * max(v.item(i) - v.item(j), 1e-12)))
        return cov

    def _information(
        self, theta: FloatArray, prior: float, ea: IntArray, eb: IntArray
    ) -> FloatArray:
        """H: the Fisher information at θ of the comparisons (ea, eb), plus ``prior`` on its
        diagonal (bitwise symmetric)."""
        n = self.n
        z = theta[ea] - theta[eb]
        w = 0.25 / np.cosh(0.5 * z) ** 2  # σ'(z)
        # bincount sums each cell's weights in input order, as np.add.at did: the same H.
        flat = np.bincount(ea * n + eb, weights=-w, minlength=n * n)
        h = flat.astype(np.float64, copy=False).reshape(n, n)  # (int when there are none)
        h += h.T
        diagonal = h.reshape(-1)[:: n + 1]  # a view: no index arrays made (speed)
        np.negative(h.sum(axis=1), out=diagonal)
        diagonal += prior
        return h


def _ties_in_index_order(order: IntArray, ties: BoolArray) -> IntArray:
    """``order`` (an argsort) with each run of equal keys in increasing index order, as a
    stable argsort gives it: ``ties[k]`` says that the keys at ``order[k]`` and
    ``order[k + 1]`` are equal. Speed (issue 11): by one more quicksort, of the unique keys
    run × len + index, at a fifth of a stable sort's time; gains in single precision tie
    in most rounds of a large plan (`_SINGLE_FROM`)."""
    run = np.empty(len(order), dtype=np.int64)
    run[0] = 0
    np.cumsum(~ties, out=run[1:])
    key = run * len(order) + order
    return order[np.argsort(key)]


def _mean(x: FloatArray) -> float:
    """float(np.mean(x)) of a 1-d array, to the bit (its sum over the count), without
    numpy's Python-level wrapper (speed, issue 11)."""
    return float(np.add.reduce(x)) / len(x)


def _variance(x: FloatArray) -> float:
    """float(np.var(x)) of a 1-d float array, to the bit: the same operations as numpy's
    `_var` (the mean as above, the squared deviations summed, over the count), without its
    wrapper (speed, issue 11)."""
    dev = x - _mean(x)
    np.multiply(dev, dev, out=dev)
    return float(np.add.reduce(dev)) / len(x)


def _scores_array(
    ids: Sequence[str], scores: Mapping[str, tuple[float, float]]
) -> tuple[FloatArray, FloatArray]:
    """θ and SE² per essay from the latest fit; essays without a finite score get θ = 0
    and the largest variance of the others."""
    # Python lists made into arrays once (speed, issue 11: no numpy item writes); one pass,
    # the default variance found only when an essay needs it.
    theta: list[float] = []
    var: list[float] = []
    missing: list[int] = []
    isfinite = math.isfinite
    for k, e in enumerate(ids):
        sc = scores.get(e)
        if sc is not None and isfinite(sc[0]) and isfinite(sc[1]):
            theta.append(sc[0])
            var.append(max(sc[1] ** 2, 1e-6))
        else:
            theta.append(0.0)
            var.append(0.0)
            missing.append(k)
    if missing:
        known = [s for s in scores.values() if isfinite(s[0]) and isfinite(s[1])]
        default_var = max([s[1] ** 2 for s in known], default=_DEFAULT_SE**2)
        for k in missing:
            var[k] = default_var
    return np.array(theta, dtype=np.float64), np.array(var, dtype=np.float64)


def plan_wave(
    *,
    key: str,
    wave: int,
    seed: int,
    essay_ids: Sequence[str],
    anchors: Mapping[str, str],
    grade_scale: Sequence[str],
    history: Sequence[PairHistory],
    size: int,
    max_attempts_per_pair: int = 2,
    scores: Mapping[str, tuple[float, float]] | None = None,
    min_comparisons: int = 4,
    anchor_bonus: float = 0.5,
    per_essay_cap: int | None = None,
    selector: Selector = "a_optimal",
) -> list[tuple[str, str]]:
    """The ordered pairs (essay_a, essay_b) of one wave; see the module docstring.

    ``key`` and ``seed`` (with ``wave``) seed every random choice: the pipeline passes
    the batch's content hash, so the same input and seed plan the same waves whatever
    the batch id. ``anchors`` maps anchor essay ids to grades (anchors not in
    ``essay_ids`` are added as essays). ``scores`` maps essay ids to (θ, SE) of the
    latest fit. Returns fewer than ``size`` pairs, possibly none, when no eligible pair
    can be added without a repeat or breaking position balance.

    ``per_essay_cap`` bounds how often one essay appears in the wave. Default: once a
    wave has scores (every essay at most once: the wave is a matching); without scores
    (the first, coverage wave) no bound but for its adaptive part, about twice an
    essay's fair share. ``selector`` picks the adaptive part: "a_optimal" (the default)
    or "information" (expected Fisher information of each pair alone).
    """
    ids = sorted(set(essay_ids) | set(anchors))
    n = len(ids)
    if n < 2 or size <= 0:
        return []
    wave_cap = per_essay_cap if per_essay_cap is not None else (1 if scores else None)
    planner = _Planner(
        ids,
        anchors,
        grade_scale,
        history,
        max_attempts_per_pair,
        size,
        wave_rng(key, wave, seed),
        wave_cap,
    )
    theta, var = _scores_array(ids, scores) if scores else (np.zeros(n), np.full(n, 0.0))
    closeness = theta if scores else None
    planner.cover(min_comparisons, closeness)
    planner.connect(closeness)
    if not planner.full:
        cap = wave_cap if wave_cap is not None else max(3, 2 * math.ceil(2 * size / n))
        if scores and selector == "information":
            planner.information(theta, var, cap)
        else:
            planner.adaptive(theta, var if scores else None, anchor_bonus, cap)
    if not planner.full:
        planner.repair_fill(min_comparisons)
    return planner.out
