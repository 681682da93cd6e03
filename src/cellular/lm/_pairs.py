"""Sentence pairs with target similarities for fine-tuning a sentence encoder on cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cellular.index import exact_knn


@dataclass
class SentencePairs:
    """Pairs of cells ``(first[i], second[i])`` and the cosine similarity their sentence embeddings should have.

    ``block_size``: when set, consecutive blocks of that many pairs belong together in one training step (the
    distinct-type blocks of :func:`label_pairs`).
    """

    first: np.ndarray
    second: np.ndarray
    target: np.ndarray
    block_size: int | None = None

    def __post_init__(self):
        self.first = np.asarray(self.first, dtype=np.int64)
        self.second = np.asarray(self.second, dtype=np.int64)
        self.target = np.asarray(self.target, dtype=np.float32)
        if not (self.first.shape == self.second.shape == self.target.shape) or self.first.ndim != 1:
            raise ValueError("first, second and target must be 1-D arrays of one length.")

    def __len__(self) -> int:
        return self.first.size


def pca_similarity_pairs(
    pca: np.ndarray,
    *,
    n_pairs: int,
    n_neighbors: int = 10,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> SentencePairs:
    """CELLama's pairs: half with one of a cell's ``n_neighbors`` nearest cells in PCA space, half with a random cell.

    The target is the cosine similarity of the two cells' PCA vectors, and zero for cells of different ``groups``
    (e.g. different tissues given as metadata), so the encoder learns expression similarity from the sentences.
    """
    pca = np.asarray(pca, dtype=np.float32)
    n_cells = pca.shape[0]
    if n_cells < 2:
        raise ValueError("Fine-tuning needs at least two cells.")
    rng = np.random.default_rng(seed)
    n_near = n_pairs // 2
    anchors = rng.integers(0, n_cells, n_pairs)
    n_neighbors = min(n_neighbors, n_cells - 1)
    unit = pca / np.maximum(np.linalg.norm(pca, axis=1, keepdims=True), 1e-12)
    neighbors, _ = exact_knn(torch.from_numpy(unit), unit, n_neighbors + 1, metric="cosine")
    neighbors = np.asarray(neighbors)[:, 1:]
    partners = rng.integers(0, n_cells, n_pairs)
    partners[:n_near] = neighbors[anchors[:n_near], rng.integers(0, n_neighbors, n_near)]
    target = np.einsum("ij,ij->i", unit[anchors], unit[partners])
    if groups is not None:
        groups = np.asarray(groups)
        target = np.where(groups[anchors] == groups[partners], target, 0.0)
    return SentencePairs(anchors, partners, target)


def label_pairs(
    labels: np.ndarray, *, n_pairs: int, block_size: int = 8, batches: np.ndarray | None = None, seed: int = 0
) -> SentencePairs:
    """Supervised positive pairs (two cells of one type, target 1) in blocks of distinct types.

    Each consecutive block of ``block_size`` pairs (at most the number of types) holds one pair of each of as many
    different types, drawn evenly over types so rare types are seen as often as common ones; inside a block, the
    other pairs' cells are therefore cells of other types: the in-batch negatives of a ranking loss. With ``batches``,
    a partner comes from another batch whenever the type occurs in one, so the encoder learns to ignore batch.
    Cells labelled missing (NaN) are not used.
    """
    labels = np.asarray(labels, dtype=object)
    known = np.flatnonzero(~_is_missing(labels))
    codes_known, types = _codes(labels[known])
    counts = np.bincount(codes_known, minlength=types.size)
    usable = np.flatnonzero(counts >= 2)
    if usable.size < 2:
        raise ValueError(
            f"Supervised fine-tuning needs at least two cell types with two or more cells, got {usable.size}."
        )
    rng = np.random.default_rng(seed)
    block_size = int(min(block_size, usable.size))
    n_blocks = -(-n_pairs // block_size)
    # Distinct types per block: the first block_size columns of a random permutation of the usable types per row.
    keys = rng.random((n_blocks, usable.size))
    type_of_pair = usable[np.argsort(keys, axis=1)[:, :block_size]].ravel()[:n_pairs]
    anchors = _draw_from(codes_known, type_of_pair, rng)
    partners = _draw_other(codes_known, type_of_pair, anchors, rng)
    if batches is not None:
        batch_codes = _codes(np.asarray(batches, dtype=object)[known])[0]
        # Only a type found in two or more batches can pair across batches.
        type_batch = np.unique(np.stack([codes_known, batch_codes]), axis=1)
        spans_batches = np.bincount(type_batch[0], minlength=types.size) >= 2
        for _ in range(16):
            redraw = (batch_codes[partners] == batch_codes[anchors]) & spans_batches[type_of_pair]
            if not redraw.any():
                break
            partners[redraw] = _draw_other(codes_known, type_of_pair[redraw], anchors[redraw], rng)
    return SentencePairs(known[anchors], known[partners], np.ones(type_of_pair.size), block_size=block_size)


def _is_missing(values: np.ndarray) -> np.ndarray:
    return pd.isna(pd.Series(values)).to_numpy()


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    types, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), types


def _draw_other(codes: np.ndarray, wanted: np.ndarray, cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each wanted type code, a uniformly random position of a cell with that code other than ``cells``.

    Each of ``cells`` is of its wanted type, and each wanted type has two or more cells.
    """
    order = np.argsort(codes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    counts = np.bincount(codes, minlength=int(wanted.max(initial=0)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offsets = np.floor(rng.random(wanted.size) * (counts[wanted] - 1)).astype(np.int64)
    offsets += offsets >= rank[cells] - starts[wanted]
    return order[starts[wanted] + offsets]


def _draw_from(codes: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each wanted type code, a uniformly random position of a cell with that code."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=int(wanted.max(initial=0)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offsets = np.floor(rng.random(wanted.size) * counts[wanted]).astype(np.int64)
    return order[starts[wanted] + offsets]
