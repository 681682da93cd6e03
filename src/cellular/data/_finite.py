"""Refusing NaN and infinite values in embeddings and weights: they would otherwise give one label to every cell."""

from __future__ import annotations

import numpy as np


def check_finite_embedding(values, what: str, fix: str) -> np.ndarray:
    """``values`` as a C-contiguous float32 ``(cells, dimensions)`` array, or a ``ValueError`` naming ``what``.

    Parameters
    ----------
    values
        The embedding (array-like).
    what
        Where it came from, for the message (e.g. ``"adata.obsm['X_cellular']"``).
    fix
        What the user should do, appended to the message.
    """
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array (cells x dimensions), got shape {array.shape}.")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(
            f"{what} has NaN or infinite values in {rows.size} of {array.shape[0]} cells (first rows: "
            f"{rows[:5].tolist()}); kNN votes and novelty scores on them would be meaningless. {fix}"
        )
    return array
