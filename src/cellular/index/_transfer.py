"""Label transfer: a distance-weighted vote of reference neighbours, for every query cell at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


def neighbor_weights(distances: np.ndarray, *, weighting: str, temperature: float) -> np.ndarray:
    """Vote weight of each neighbour.

    Parameters
    ----------
    distances
        ``(n_cells, k)`` distances to the neighbours.
    weighting
        ``"distance"``: ``exp(-distance / temperature)``, which for cosine distances is the soft-nearest-neighbour
        probability the CELLULAR loss trains (``exp(cos / T)``) restricted to the ``k`` neighbours;
        ``"uniform"``: every neighbour counts once.
    temperature
        Kernel width of ``"distance"`` weighting.
    """
    if weighting == "uniform":
        return np.ones_like(distances, dtype=np.float64)
    if weighting != "distance":
        raise ValueError(f"weighting must be 'distance' or 'uniform', got {weighting!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    shifted = distances - distances.min(axis=1, keepdims=True)  # cancels in the normalisation, avoids underflow
    return np.exp(-shifted.astype(np.float64) / temperature)


def vote(neighbor_codes: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-cell class probabilities from the neighbours' label codes.

    Parameters
    ----------
    neighbor_codes
        ``(n_cells, k)`` class code of each neighbour; ``-1`` for unlabelled neighbours, which do not vote.
    weights
        ``(n_cells, k)`` non-negative weights.
    n_classes
        Number of classes.

    Returns
    -------
    ``(n_cells, n_classes)`` probabilities; rows whose neighbours are all unlabelled are all zero.
    """
    n_cells = neighbor_codes.shape[0]
    voting = neighbor_codes >= 0
    rows = np.broadcast_to(np.arange(n_cells)[:, None], neighbor_codes.shape)
    flat = rows[voting] * n_classes + neighbor_codes[voting]
    totals = np.bincount(flat, weights=weights[voting], minlength=n_cells * n_classes).astype(np.float64)
    totals = totals.reshape(n_cells, n_classes)
    norms = totals.sum(axis=1, keepdims=True)
    return np.divide(totals, norms, out=np.zeros_like(totals), where=norms > 0)


def smoothed_vote_logits(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Log of vote shares smoothed by half a vote spread over the classes (finite where a class got no vote)."""
    n_classes = max(probabilities.shape[1], 1)
    return np.log(probabilities + 0.5 / (k * n_classes))


def calibrate_votes(probabilities: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Vote shares turned into calibrated probabilities: ``softmax(log(smoothed shares) / temperature)``.

    Rows without any vote stay all zero.

    Parameters
    ----------
    probabilities
        ``(n_cells, n_classes)`` vote shares of :func:`vote`.
    k
        Neighbours that voted.
    temperature
        Fitted on held-out reference cells (:func:`cellular.nn.fit_temperature` on :func:`smoothed_vote_logits`).
    """
    if probabilities.shape[0] == 0:
        return probabilities
    logits = smoothed_vote_logits(probabilities, k) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    calibrated = np.exp(logits)
    calibrated /= calibrated.sum(axis=1, keepdims=True)
    voted = probabilities.sum(axis=1, keepdims=True) > 0
    return np.where(voted, calibrated, 0.0)


@dataclass
class ClassEvidence:
    """Class probabilities from a second source (e.g. a model's gene classifier), averaged into a level's votes.

    Attributes
    ----------
    probabilities
        ``(n_cells, n_sources_classes)`` probabilities of the query cells.
    classes
        Names of the columns.
    weight
        Weight of this source in the average, in ``[0, 1]``; the vote shares get ``1 - weight``.
    """

    probabilities: np.ndarray
    classes: Sequence[str]
    weight: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"The weight of class evidence must lie in [0, 1], got {self.weight}.")

    def blended(self, votes: np.ndarray, classes: Sequence[str]) -> np.ndarray:
        """``(1 - weight) * votes + weight * probabilities``, with the probabilities taken by name for ``classes``.

        Columns of other classes are dropped and each row renormalised over ``classes``. Raises a ``ValueError``
        when the evidence does not cover every class or has another number of cells: its probabilities would then
        silently miss part of the level.
        """
        probabilities = np.asarray(self.probabilities, dtype=np.float64)
        if probabilities.shape != (votes.shape[0], len(self.classes)):
            raise ValueError(
                f"The class evidence holds a {probabilities.shape} table for {votes.shape[0]} query cells and "
                f"{len(self.classes)} classes; pass one probability per query cell and class."
            )
        if not (np.isfinite(probabilities).all() and (probabilities >= 0).all()):
            raise ValueError(
                "The class evidence holds NaN, infinite or negative probabilities; pass probabilities in [0, 1] "
                "(e.g. a softmax of finite logits)."
            )
        columns = pd.Index([str(c) for c in self.classes]).get_indexer(pd.Index([str(c) for c in classes]))
        if (columns < 0).any():
            missing = [str(c) for c, column in zip(classes, columns, strict=True) if column < 0]
            raise ValueError(
                f"The class evidence lacks {len(missing)} of the level's classes ({missing[:5]}): it cannot be "
                "averaged with the vote over them. Transfer this level by the vote alone (no evidence for it)."
            )
        aligned = probabilities[:, columns]
        totals = aligned.sum(axis=1, keepdims=True)
        aligned = np.divide(aligned, totals, out=np.full_like(aligned, 1.0 / max(len(classes), 1)), where=totals > 0)
        return (1.0 - self.weight) * votes + self.weight * aligned
