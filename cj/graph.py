"""Connectivity of the comparison graph (essays the nodes, comparisons the edges): how many
components it has and which essay is in which. One piece for the fit (`cj.scoring`: the
count, whether θ is identified) and the planner (`cj.pairs`: the labels, to link the
components a wave may leave apart)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse
from scipy.sparse.csgraph import connected_components

IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

# Largest n whose connectivity is tested on a dense adjacency first (`connected`).
DENSE_GRAPH = 400


def components(n: int, a: IntArray, b: IntArray) -> tuple[int, IntArray]:
    """The number of connected components of the undirected graph on n nodes with edges
    (a, b), and each node's component (numbered in order of each component's first node,
    as scipy's `connected_components` numbers them)."""
    if n == 0:
        return 0, np.zeros(0, dtype=np.intp)
    if n <= DENSE_GRAPH and connected(n, a, b):
        return 1, np.zeros(n, dtype=np.intp)
    # The CSR arrays built directly (speed, issue 11: a COO matrix and its conversion cost
    # three times the search at 100 essays).
    order = np.argsort(a, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(a, minlength=n), out=indptr[1:])
    indices = np.asarray(b, dtype=np.int32)[order]
    graph = scipy.sparse.csr_matrix((np.ones(len(a)), indices, indptr), shape=(n, n))
    k, labels = connected_components(graph, directed=False)
    return int(k), labels.astype(np.intp)


def connected(n: int, a: IntArray, b: IntArray) -> bool:
    """Whether the graph of n ≥ 1 nodes and edges (a, b) is connected: breadth first over a
    dense adjacency. Speed (issue 11): at n = 100 a tenth of scipy's sparse matrix and
    `connected_components` (≈ 0.4 ms a wave), kept for the labels of a graph that is not
    connected."""
    adj = np.zeros((n, n), dtype=np.bool_)
    adj[a, b] = True
    adj[b, a] = True
    seen = np.zeros(n, dtype=np.bool_)
    seen[0] = True
    front: BoolArray = seen
    while True:
        front = np.asarray(adj[front].any(axis=0), dtype=np.bool_)
        front &= ~seen
        if not front.any():
            return bool(seen.all())
        seen |= front
