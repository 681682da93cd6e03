"""Split-conformal p-values and false-discovery-rate control for novelty scores."""

from __future__ import annotations

import numpy as np


def conformal_pvalues(calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Split-conformal p-values of ``scores`` against scores of held-out cells of known types.

    ``p = (1 + #{calibration scores >= s}) / (n_calibration + 1)``: for a new cell exchangeable with the calibration
    cells, ``P(p <= alpha) <= alpha``, so flagging cells with ``p <= alpha`` flags at most about ``alpha`` of the cells
    of known types. Larger scores mean "more novel".

    Parameters
    ----------
    calibration_scores
        Scores of held-out reference cells.
    scores
        Scores to convert.

    Returns
    -------
    p-values in ``(0, 1]``, same shape as ``scores``.
    """
    calibration = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    if calibration.size == 0:
        raise ValueError("conformal_pvalues needs at least one calibration score.")
    scores = np.asarray(scores, dtype=np.float64)
    for name, values in (("calibration_scores", calibration), ("scores", scores)):
        if not np.isfinite(values).all():
            raise ValueError(
                f"{name} hold {int((~np.isfinite(values)).sum())} NaN or infinite values, which have no rank among "
                "the scores; remove those cells or compute their scores again."
            )
    at_least = calibration.size - np.searchsorted(calibration, scores, side="left")
    return (1.0 + at_least) / (calibration.size + 1.0)


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); reject where ``q <= alpha`` to control the FDR at ``alpha``.

    Parameters
    ----------
    pvalues
        p-values, any shape.

    Returns
    -------
    Adjusted p-values, same shape, each ``>=`` its p-value and ``<= 1``.
    """
    pvalues = np.asarray(pvalues, dtype=np.float64)
    if not ((pvalues >= 0.0) & (pvalues <= 1.0)).all():
        raise ValueError("pvalues must lie in [0, 1] (NaN included among the values that do not); remove those cells.")
    flat = pvalues.ravel()
    n = flat.size
    if n == 0:
        return pvalues.copy()
    order = np.argsort(flat)
    scaled = flat[order] * n / np.arange(1, n + 1)
    adjusted_sorted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    adjusted = np.empty(n)
    adjusted[order] = adjusted_sorted
    return adjusted.reshape(pvalues.shape)
