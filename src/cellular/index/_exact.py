"""Exact k-nearest-neighbour search in torch: chunked similarity products and a running top-k, on any device."""

from __future__ import annotations

import numpy as np
import torch

_SCORE_BLOCK_ELEMENTS = 1 << 24


def exact_knn(
    reference: torch.Tensor,
    queries: np.ndarray,
    k: int,
    *,
    metric: str,
    query_chunk: int = 2048,
    reference_squared_norms: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` reference rows nearest to each query row, by brute force.

    Parameters
    ----------
    reference
        ``(n_reference, dim)`` float32 tensor on the device to compute on. For ``metric="cosine"`` its rows must
        have unit norm.
    queries
        ``(n_queries, dim)`` array; for ``metric="cosine"`` rows of unit norm.
    k
        Neighbours per query (at most ``n_reference``).
    metric
        ``"cosine"`` (distance ``1 - cos``) or ``"euclidean"``.
    query_chunk
        Queries scored at once.
    reference_squared_norms
        ``(n_reference,)`` squared norms of ``reference`` (euclidean only); computed when ``None``.

    Returns
    -------
    ``(indices, distances)``: ``(n_queries, k)`` int64 and float32 arrays, nearest first.
    """
    n_reference = reference.shape[0]
    if not 1 <= k <= n_reference:
        raise ValueError(f"k must lie between 1 and the number of reference cells ({n_reference}), got {k}.")
    device = reference.device
    if metric == "euclidean" and reference_squared_norms is None:
        reference_squared_norms = (reference * reference).sum(dim=1)
    reference_chunk = max(k, _SCORE_BLOCK_ELEMENTS // max(1, min(query_chunk, len(queries))))
    indices = np.empty((len(queries), k), dtype=np.int64)
    distances = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), query_chunk):
        block = torch.as_tensor(np.ascontiguousarray(queries[start : start + query_chunk]), dtype=torch.float32)
        block = block.to(device)
        best_scores = best_index = None
        for ref_start in range(0, n_reference, reference_chunk):
            ref = reference[ref_start : ref_start + reference_chunk]
            # Larger score = nearer: cosine similarity, or 2 q.r - |r|^2 (= |q|^2 - euclidean^2).
            scores = block @ ref.T
            if metric == "euclidean":
                scores.mul_(2.0).sub_(reference_squared_norms[ref_start : ref_start + reference_chunk])
            top_scores, top_index = scores.topk(min(k, ref.shape[0]), dim=1)
            top_index += ref_start
            if best_scores is None:
                best_scores, best_index = top_scores, top_index
            else:
                merged_scores = torch.cat([best_scores, top_scores], dim=1)
                merged_index = torch.cat([best_index, top_index], dim=1)
                best_scores, order = merged_scores.topk(k, dim=1)
                best_index = merged_index.gather(1, order)
        if metric == "cosine":
            block_distances = (1.0 - best_scores).clamp_(min=0.0)
        else:
            query_norms = (block * block).sum(dim=1, keepdim=True)
            block_distances = (query_norms - best_scores).clamp_(min=0.0).sqrt_()
        stop = start + block.shape[0]
        indices[start:stop] = best_index.cpu().numpy()
        distances[start:stop] = block_distances.cpu().numpy()
    return indices, distances


def neighbor_distances(
    reference: torch.Tensor, queries: np.ndarray, indices: np.ndarray, *, metric: str, query_chunk: int = 8192
) -> np.ndarray:
    """Distances from each query row to the reference rows ``indices`` (same conventions as :func:`exact_knn`).

    Returns
    -------
    ``(n_queries, k)`` float32 distances, in the order of ``indices``.
    """
    distances = np.empty(indices.shape, dtype=np.float32)
    device = reference.device
    for start in range(0, len(queries), query_chunk):
        block = torch.as_tensor(np.ascontiguousarray(queries[start : start + query_chunk]), dtype=torch.float32)
        block = block.to(device)
        neighbours = reference[torch.as_tensor(indices[start : start + query_chunk], device=device)]
        if metric == "cosine":
            block_distances = (1.0 - torch.einsum("nd,nkd->nk", block, neighbours)).clamp_(min=0.0)
        else:
            block_distances = (neighbours - block[:, None, :]).square_().sum(dim=2).sqrt_()
        distances[start : start + block.shape[0]] = block_distances.cpu().numpy()
    return distances
