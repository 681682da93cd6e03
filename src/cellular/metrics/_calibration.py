"""Calibration metrics for predicted class probabilities."""

from __future__ import annotations

import numpy as np


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence.

    Cells are binned by their largest probability into ``n_bins`` equal-width bins over ``[0, 1]``; the error is
    the cell-weighted mean over bins of ``|accuracy - mean confidence|``.

    Parameters
    ----------
    probabilities
        ``(n_cells, n_types)`` predicted probabilities (rows sum to one).
    labels
        ``(n_cells,)`` true type codes, i.e. column indices of ``probabilities``.
    n_bins
        Number of confidence bins.

    Returns
    -------
    The error, between 0 (perfectly calibrated) and 1.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probabilities must be (n_cells, n_types) and labels (n_cells,), got {probabilities.shape} and "
            f"{labels.shape}."
        )
    if probabilities.shape[0] == 0:
        raise ValueError("expected_calibration_error needs at least one cell.")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D array of integer type codes (column indices of probabilities), got dtype "
            f"{labels.dtype} and shape {labels.shape}; convert names with e.g. pd.Categorical(names, categories=types)"
            ".codes."
        )
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValueError(
            f"labels must be column indices of probabilities, 0 to {probabilities.shape[1] - 1}; got values from "
            f"{labels.min()} to {labels.max()}. Leave out cells whose type is not a column."
        )
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / counts.sum())
