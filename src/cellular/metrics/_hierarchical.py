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


def consistency_penalty(node_probabilities, nodes: list[str], parents: dict[str, str]) -> np.ndarray:
    """Spoticell's hierarchical consistency penalty of each cell.

    ``sum relu(p_child - p_parent)`` over the parent -> child pairs among ``nodes``: zero when no label is more
    probable than its parent (as for probabilities summed up a hierarchy, e.g.
    :meth:`cellular.data.LabelHierarchy.node_probabilities`); positive when per-level predictions contradict each
    other, as independent per-label outputs (one sigmoid per label) can.

    Parameters
    ----------
    node_probabilities
        ``(n_cells, n_nodes)`` probability of each label.
    nodes
        The labels of the columns.
    parents
        ``{child: parent}``; pairs whose parent is not a column are skipped.

    Returns
    -------
    ``(n_cells,)`` penalties.
    """
    probabilities = np.asarray(node_probabilities, dtype=np.float64)
    column = {node: i for i, node in enumerate(nodes)}
    pairs = np.array(
        [(column[child], column[parent]) for child, parent in parents.items() if child in column and parent in column],
        dtype=np.int64,
    ).reshape(-1, 2)
    return np.maximum(probabilities[:, pairs[:, 0]] - probabilities[:, pairs[:, 1]], 0.0).sum(axis=1)
