"""The conjugate gradients of large fits (`cj.scoring._jacobi_cg`, issue 11): the very
numbers scipy's `cg` gives with the same Jacobi preconditioner, step for step, on systems
like the fits' negative Hessians (a comparison graph's weighted Laplacian plus a prior)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

from cj.scoring import _jacobi_cg


def _hessian(n: int, seed: int) -> tuple[scipy.sparse.csr_matrix, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(n, 20 * n))
    a, b = rng.integers(0, n, m), rng.integers(0, n, m)
    a, b = a[a != b], b[a != b]
    w = rng.uniform(0.05, 0.25, len(a))  # σ'(θ_a − θ_b)
    off = scipy.sparse.coo_matrix(
        (np.concatenate([-w, -w]), (np.concatenate([a, b]), np.concatenate([b, a]))),
        shape=(n, n),
    ).tocsr()
    diag = -np.asarray(off.sum(axis=1)).ravel() + rng.uniform(0.01, 1.0, n)
    return (off + scipy.sparse.diags(diag)).tocsr(), diag, rng.normal(size=n)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rtol", [1e-12, 1e-6])  # the Newton steps' and `settle`'s
def test_jacobi_cg_is_scipys_cg_to_the_bit(seed: int, rtol: float) -> None:
    n = [5, 40, 401, 1000][seed % 4]
    h, diag, g = _hessian(n, seed)
    expected, info = scipy.sparse.linalg.cg(
        h, g, M=scipy.sparse.diags(1.0 / diag), rtol=rtol, atol=0.0, maxiter=10 * n
    )
    assert info == 0
    got = _jacobi_cg(h, 1.0 / diag, g, rtol)
    assert np.array_equal(got, expected)
    assert np.linalg.norm(h @ got - g) < rtol * np.linalg.norm(g) * 1.0001


def test_a_zero_right_hand_side_gives_zero() -> None:
    h, diag, g = _hessian(20, 0)
    assert not _jacobi_cg(h, 1.0 / diag, np.zeros_like(g), 1e-12).any()
