"""Approximate nearest neighbours with FAISS HNSW: compiled ahead of time, so a new process searches at once.

pynndescent compiles its search with numba in every process (about 30 s, see the benchmarks page); FAISS is a
compiled library. The index is stored as FAISS's own binary serialisation (bytes, no pickle) inside the index
folder's ``arrays.npz``.
"""

from __future__ import annotations

import contextlib
from importlib import import_module

import numpy as np

EF_CONSTRUCTION = 80
EF_SEARCH_MIN = 64
"""Search breadth of an HNSW query: at least this, and at least 4 k (recall@15 >= 0.99 at 100k cells, see the
benchmarks page)."""


def require_faiss():
    """The ``faiss`` module, or an ``ImportError`` naming the extra that installs it."""
    try:
        return import_module("faiss")
    except ImportError as error:
        raise ImportError(
            'backend="faiss" needs the faiss-cpu package: pip install "cellular-sc[faiss]" (or faiss-gpu on a GPU '
            'machine), or use backend="pynndescent" or "exact".'
        ) from error


@contextlib.contextmanager
def _single_thread(faiss):
    """HNSW insertion on several threads depends on their timing: build on one, so a build is reproducible."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def build(data: np.ndarray, n_neighbors: int) -> np.ndarray:
    """An HNSW index of ``data`` (euclidean; rows already unit length for the cosine metric), serialised.

    Parameters
    ----------
    data
        ``(n_cells, dim)`` C-contiguous float32 array.
    n_neighbors
        Graph degree of the base layer (HNSW's ``M`` is half of it).
    """
    faiss = require_faiss()
    index = faiss.IndexHNSWFlat(data.shape[1], max(4, n_neighbors // 2))
    index.hnsw.efConstruction = EF_CONSTRUCTION
    with _single_thread(faiss):
        index.add(np.ascontiguousarray(data, dtype=np.float32))
    return np.asarray(faiss.serialize_index(index), dtype=np.uint8)


def searcher(serialised: np.ndarray, n_cells: int, dim: int):
    """The FAISS index in ``serialised``, or a ``ValueError`` when it is not an HNSW index of the reference."""
    faiss = require_faiss()
    index = faiss.deserialize_index(np.ascontiguousarray(serialised, dtype=np.uint8))
    if index.ntotal != n_cells or index.d != dim or not isinstance(index, faiss.IndexHNSWFlat):
        raise ValueError(
            f"The stored FAISS index holds {index.ntotal} vectors of dimension {index.d} "
            f"({type(index).__name__}), not the reference's {n_cells} x {dim} HNSW index."
        )
    return index


def search(index, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` approximate nearest neighbours of each query row; ``-1`` where HNSW found fewer."""
    index.hnsw.efSearch = max(EF_SEARCH_MIN, 4 * k)
    _, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return indices.astype(np.int64, copy=False)


def available() -> bool:
    """Whether faiss can be imported."""
    try:
        require_faiss()
    except ImportError:
        return False
    return True
