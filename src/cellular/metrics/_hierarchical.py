"""Hierarchical precision, recall and F1 (Kiritchenko et al. 2005) for labels on a cell-type hierarchy."""

from __future__ import annotations

import numpy as np

from cellular.data import ancestors


def hierarchical_f1(true, predicted, parents: dict[str, str], *, unknown_label: str = "Unknown") -> dict[str, float]:
    """Hierarchical precision, recall and F1 of predicted labels.

    Each label is extended by its ancestors in ``parents``; precision is the share of the predicted labels' ancestor
    sets that the true sets hold, recall the share of the true sets that the predicted sets hold, summed over cells
    (micro-averaged). Predicting the parent of the true type ("T cell" for a CD8 T cell) earns partial credit, a type
    of another lineage none; ``unknown_label`` predicts nothing (lowers recall only). Labels missing from
    ``parents`` stand for themselves.

    Parameters
    ----------
    true, predicted
        One label per cell.
    parents
        ``{child: parent}``, e.g. :func:`cellular.data.lineage_map`.
    unknown_label
        The prediction that abstains.

    Returns
    -------
    ``{"precision": ..., "recall": ..., "f1": ...}``
    """
    true = np.asarray(true, dtype=str)
    predicted = np.asarray(predicted, dtype=str)
    if true.shape != predicted.shape or true.ndim != 1:
        raise ValueError(f"true and predicted must be 1-d and of one length, got {true.shape} and {predicted.shape}.")
    pairs, counts = np.unique(np.stack([true, predicted]), axis=1, return_counts=True)
    shared = in_predicted = in_true = 0
    for (label, guess), n_cells in zip(pairs.T, counts, strict=True):  # one step per distinct pair, not per cell
        expected = set(ancestors(label, parents))
        given = set() if guess == unknown_label else set(ancestors(guess, parents))
        shared += n_cells * len(expected & given)
        in_predicted += n_cells * len(given)
        in_true += n_cells * len(expected)
    precision = shared / in_predicted if in_predicted else 0.0
    recall = shared / in_true if in_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
