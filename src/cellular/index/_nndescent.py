"""Approximate nearest neighbours on CPU with pynndescent (NN-descent graph + graph search)."""

from __future__ import annotations

import numpy as np

SEARCH_LEAF_SIZE = 60
"""Leaf size of the search tree that seeds each query: large leaves give good starting points and rarely leave a
search to pynndescent's random seeding."""


def build_graph(data: np.ndarray, n_neighbors: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The approximate ``n_neighbors``-nearest-neighbour graph of ``data`` (euclidean), as indices and distances.

    Parameters
    ----------
    data
        ``(n_cells, dim)`` C-contiguous float32 array.
    n_neighbors
        Graph degree; larger graphs are slower to build and search but give higher recall.
    seed
        Random state of the random-projection trees and the descent.
    """
    from pynndescent import NNDescent

    n_neighbors = min(n_neighbors, data.shape[0] - 1)
    # The public graph lists each cell as its own first neighbour, hence one more; the self column is dropped.
    index = NNDescent(data, metric="euclidean", n_neighbors=n_neighbors + 1, random_state=seed, low_memory=True)
    indices, distances = index.neighbor_graph
    return (
        np.ascontiguousarray(indices[:, 1:], dtype=np.int32),
        np.ascontiguousarray(distances[:, 1:], dtype=np.float32),
    )


def searcher_from_graph(
    data: np.ndarray, indices: np.ndarray, distances: np.ndarray, seed: int, parallel: bool = False
):
    """A pynndescent index ready to answer queries, made from a stored graph without running NN-descent again.

    Building and loading both go through this function, so a loaded index answers exactly as the built one did.
    ``parallel=True`` searches queries on all cores; pynndescent then shares one random state between threads, so
    the few searches that need random starting points can differ from run to run.
    """
    from pynndescent import NNDescent

    searcher = NNDescent(
        data,
        metric="euclidean",
        n_neighbors=indices.shape[1],
        init_graph=indices,
        init_dist=np.square(distances),  # pynndescent's internal euclidean distances are squared
        n_iters=0,
        random_state=seed,
        low_memory=True,
        parallel_batch_queries=parallel,
        search_tree_leaf_size=SEARCH_LEAF_SIZE,
    )
    # pynndescent skips its random-projection trees when given a graph; the search needs one to start from.
    searcher.tree_init = True
    searcher.prepare()
    return searcher


def search(searcher, queries: np.ndarray, k: int, epsilon: float) -> np.ndarray:
    """Indices of the ``k`` approximate nearest neighbours of each query row."""
    indices = searcher.query(queries, k=k, epsilon=epsilon, return_distances=False)
    return indices.astype(np.int64, copy=False)
