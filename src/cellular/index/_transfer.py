"""Label transfer: a distance-weighted vote of reference neighbours, for every query cell at once."""

from __future__ import annotations

import numpy as np


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
