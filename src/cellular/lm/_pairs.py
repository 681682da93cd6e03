"""Sentence pairs with target similarities for fine-tuning a sentence encoder on cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cellular.index import exact_knn


@dataclass
class SentencePairs:
    """Pairs of cells ``(first[i], second[i])`` and the cosine similarity their sentence embeddings should have."""

    first: np.ndarray
    second: np.ndarray
    target: np.ndarray

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


def label_pairs(labels: np.ndarray, *, n_pairs: int, batches: np.ndarray | None = None, seed: int = 0) -> SentencePairs:
    """Supervised pairs: half of one cell type (target 1), half of two different types (target 0).

    Anchors are drawn evenly over types, so rare types are seen as often as common ones. With ``batches``, a positive
    partner comes from another batch whenever the type occurs in one, so the encoder learns to ignore batch.
    Cells labelled missing (NaN) are not used.
    """
    labels = np.asarray(labels, dtype=object)
    known = np.flatnonzero(~_is_missing(labels))
    codes_known, types = _codes(labels[known])
    if types.size < 2:
        raise ValueError(f"Supervised fine-tuning needs at least two labelled cell types, got {types.size}.")
    rng = np.random.default_rng(seed)
    n_positive = n_pairs // 2
    batch_codes = None if batches is None else _codes(np.asarray(batches, dtype=object)[known])[0]
    type_of_anchor = rng.integers(0, types.size, n_pairs)
    anchors = _draw_from(codes_known, type_of_anchor, rng)
    # Positive partners: same type, preferably another batch (a random draw among the type's cells otherwise).
    positive_type = type_of_anchor[:n_positive]
    partners_positive = _draw_from(codes_known, positive_type, rng)
    if batch_codes is not None:
        for _ in range(8):
            same_batch = batch_codes[partners_positive] == batch_codes[anchors[:n_positive]]
            if not same_batch.any():
                break
            redraw = _draw_from(codes_known, positive_type[same_batch], rng)
            partners_positive[same_batch] = redraw
    # Negative partners: a type other than the anchor's.
    shift = rng.integers(1, types.size, n_pairs - n_positive)
    partners_negative = _draw_from(codes_known, (type_of_anchor[n_positive:] + shift) % types.size, rng)
    partners = np.concatenate([partners_positive, partners_negative])
    target = np.concatenate([np.ones(n_positive), np.zeros(n_pairs - n_positive)])
    return SentencePairs(known[anchors], known[partners], target)


def _is_missing(values: np.ndarray) -> np.ndarray:
    return pd.isna(pd.Series(values)).to_numpy()


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    types, codes = np.unique(values.astype(str), return_inverse=True)
    return codes.astype(np.int64), types


def _draw_from(codes: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each wanted type code, a uniformly random position of a cell with that code."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=int(wanted.max(initial=0)) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    offsets = np.floor(rng.random(wanted.size) * counts[wanted]).astype(np.int64)
    return order[starts[wanted] + offsets]
