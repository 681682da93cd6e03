"""Reference geometry for the centroid term: cell-type centroids per batch in PCA space."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

from cellular.data import NormalizedExpression, sequential_minibatches

MAX_PCA_CELLS = 20_000
# Cells read densely at a time when the groups' mean expression is accumulated.
TARGET_CHUNK_CELLS = 2048


def pca_centroids(
    expression: NormalizedExpression,
    labels: np.ndarray,
    batches: np.ndarray,
    n_types: int,
    n_batches: int,
    n_components: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Centroid of every (batch, cell type) group in the PCA space of the labelled cells.

    PCA is linear, so the centroid of a group's PCA scores is the projection of the group's mean expression: the
    means are accumulated over chunks of cells (streamed from disk when backed), read as the encoder reads them
    (matched to the reference's moments when the model matches batches), and only they are projected. The principal
    axes are fitted on at most 20,000 labelled cells drawn at random.

    Parameters
    ----------
    expression
        The cells' expression over the model's genes (log-normalised on reading).
    labels
        Type code per cell, ``-1`` for unlabelled cells (left out).
    batches
        Batch code per cell.
    n_types, n_batches
        Number of types and batches.
    n_components
        Number of principal components (capped by the data size).
    seed
        Seed of the cell subsample and the PCA solver.

    Returns
    -------
    ``(n_batches, n_types, n_components)`` centroids and ``(n_batches, n_types)`` presence mask.
    """
    labelled = np.flatnonzero(labels >= 0)
    rng = np.random.default_rng(seed)
    fit_cells = (
        labelled if labelled.size <= MAX_PCA_CELLS else np.sort(rng.choice(labelled, MAX_PCA_CELLS, replace=False))
    )
    n_genes = expression.matrix.shape[1]
    n_components = int(min(n_components, fit_cells.size - 1, n_genes))
    pca = PCA(n_components=max(n_components, 1), random_state=seed)
    pca.fit(expression.rows(fit_cells))

    group = batches[labelled] * n_types + labels[labelled]
    indicator = sp.csr_matrix(
        (np.ones(labelled.size, dtype=np.float64), (group, labelled)),
        shape=(n_batches * n_types, expression.n_cells),
    )
    counts = np.asarray(indicator.sum(axis=1)).reshape(-1)
    sums = np.zeros((n_batches * n_types, n_genes))
    # The values the PCA was fitted on: matched to the reference's moments when the model matches batches.
    for index in sequential_minibatches(expression.n_cells, TARGET_CHUNK_CELLS):
        sums += indicator[:, index[0] : index[-1] + 1] @ expression.rows(index)
    means = sums / np.maximum(counts, 1.0)[:, None]
    centroids = pca.transform(means).astype(np.float32)
    return centroids.reshape(n_batches, n_types, -1), (counts > 0).reshape(n_batches, n_types)
