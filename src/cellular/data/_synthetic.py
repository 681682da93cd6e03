"""Synthetic count data with cell types and batch effects, for scale tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def synthetic_counts(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    *,
    n_types: int = 10,
    n_batches: int = 4,
    mean_library_size: float = 3_000.0,
    batch_effect: float = 0.5,
    seed: int = 0,
    chunk_size: int = 10_000,
) -> AnnData:
    """Poisson counts from type-specific expression profiles with multiplicative batch effects.

    Each type has a log-normal gene profile in which a few marker genes are up-regulated; each batch scales every
    gene by a log-normal factor of spread ``batch_effect``. The matrix is built in chunks of ``chunk_size`` cells,
    so memory stays close to the size of the sparse result.

    Returns
    -------
    AnnData with CSR float32 counts in ``X`` and ``obs['cell_type']``, ``obs['batch']`` (categorical).
    """
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=-1.0, sigma=1.5, size=n_genes)
    profiles = np.tile(base, (n_types, 1))
    n_markers = max(1, n_genes // 50)
    for t in range(n_types):
        markers = rng.choice(n_genes, n_markers, replace=False)
        profiles[t, markers] *= rng.uniform(4.0, 12.0, n_markers)
    profiles /= profiles.sum(1, keepdims=True)
    batch_scale = rng.lognormal(0.0, batch_effect, size=(n_batches, n_genes))

    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    libraries = rng.lognormal(np.log(mean_library_size), 0.4, n_cells)
    chunks = []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        rates = profiles[types[start:stop]] * batch_scale[batches[start:stop]]
        rates *= (libraries[start:stop] / rates.sum(1))[:, None]
        chunks.append(sp.csr_matrix(rng.poisson(rates).astype(np.float32)))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in types]),
            "batch": pd.Categorical([f"batch_{b}" for b in batches]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    return AnnData(X=sp.vstack(chunks, format="csr"), obs=obs, var=var)


def synthetic_embedding(
    n_cells: int,
    n_latent: int = 100,
    *,
    n_types: int = 50,
    spread: float = 0.15,
    spectrum_decay: float = 1.5,
    seed: int = 0,
    type_seed: int = 0,
    chunk_size: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm cell embeddings shaped like CELLULAR's, for index benchmarks at any scale.

    Cell types are random directions; within a type, cells scatter around it with a randomly rotated covariance
    whose eigenvalues decay as ``j ** -spectrum_decay`` and whose total standard deviation is ``spread``. The
    defaults follow embeddings measured on the PBMC data (residual spectrum close to ``j ** -1.5``, within-type
    RMS distance 0.1-0.2 on the unit sphere). Reference and query sets drawn with the same ``type_seed`` and
    different ``seed`` share their types.

    Returns
    -------
    ``(embedding, types)``: ``(n_cells, n_latent)`` float32 array with unit rows, and int64 type codes.
    """
    type_rng = np.random.default_rng(type_seed)
    centres = type_rng.standard_normal((n_types, n_latent))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    eigenvalues = np.arange(1, n_latent + 1, dtype=np.float64) ** -spectrum_decay
    scales = spread * np.sqrt(eigenvalues / eigenvalues.sum())
    rotations = np.stack([np.linalg.qr(type_rng.standard_normal((n_latent, n_latent)))[0] for _ in range(n_types)])
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    embedding = np.empty((n_cells, n_latent), dtype=np.float32)
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        block_types = types[start:stop]
        block = rng.standard_normal((stop - start, n_latent)) * scales
        for code in np.unique(block_types):  # one matrix product per type
            members = block_types == code
            block[members] = block[members] @ rotations[code].T
        block += centres[block_types]
        embedding[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return embedding, types
