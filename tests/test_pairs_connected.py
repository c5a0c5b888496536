"""The planner's dense connectivity test (`cj.pairs._connected`, a speed-up of issue 11)
says what scipy's `connected_components` says, on graphs connected and not."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from scipy.sparse.csgraph import connected_components

from cj.pairs import _connected


@pytest.mark.parametrize("seed", range(40))
def test_connected_agrees_with_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    m = int(rng.integers(0, 2 * n + 1))
    ea = rng.integers(0, n, m).astype(np.intp)
    eb = rng.integers(0, n, m).astype(np.intp)
    g = scipy.sparse.coo_matrix((np.ones(m), (ea, eb)), shape=(n, n)).tocsr()
    k, _ = connected_components(g, directed=False)
    assert _connected(n, ea, eb) == (k == 1)


def test_connected_chain_and_split() -> None:
    chain = np.arange(9, dtype=np.intp)
    assert _connected(10, chain, chain + 1)
    assert not _connected(10, np.delete(chain, 4), np.delete(chain, 4) + 1)
    assert not _connected(3, np.array([], dtype=np.intp), np.array([], dtype=np.intp))
