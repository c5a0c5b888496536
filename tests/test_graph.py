"""The comparison graph's connectivity (`cj.graph`), shared by the fit and the planner: the
dense test (a speed-up of issue 11) says what scipy's `connected_components` says, and
`components` counts and labels as scipy does, on graphs connected and not."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from cj.graph import DENSE_GRAPH, components, connected


def _scipy(n: int, ea: np.ndarray, eb: np.ndarray) -> tuple[int, np.ndarray]:
    g = scipy.sparse.coo_matrix((np.ones(len(ea)), (ea, eb)), shape=(n, n)).tocsr()
    k, labels = connected_components(g, directed=False)
    return int(k), labels


@pytest.mark.parametrize("seed", range(40))
def test_connected_and_components_agree_with_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    m = int(rng.integers(0, 2 * n + 1))
    ea = rng.integers(0, n, m).astype(np.intp)
    eb = rng.integers(0, n, m).astype(np.intp)
    k, labels = _scipy(n, ea, eb)
    assert connected(n, ea, eb) == (k == 1)
    got_k, got_labels = components(n, ea, eb)
    assert got_k == k and got_labels.tolist() == labels.tolist()


def test_connected_chain_and_split() -> None:
    chain = np.arange(9, dtype=np.intp)
    assert connected(10, chain, chain + 1)
    assert not connected(10, np.delete(chain, 4), np.delete(chain, 4) + 1)
    assert not connected(3, np.array([], dtype=np.intp), np.array([], dtype=np.intp))


def test_components_of_no_node_and_above_the_dense_size() -> None:
    none = np.array([], dtype=np.intp)
    assert components(0, none, none)[0] == 0
    n = DENSE_GRAPH + 10  # scipy alone
    chain = np.arange(n - 1, dtype=np.intp)
    assert components(n, chain, chain + 1)[0] == 1
    k, labels = components(n, chain[:-5], chain[:-5] + 1)
    assert (k, labels.tolist()) == (6, [0] * (n - 5) + [1, 2, 3, 4, 5])
