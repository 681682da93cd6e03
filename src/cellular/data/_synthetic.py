"""Synthetic count data with cell types and batch effects, for scale tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def _type_profiles(
    rng: np.random.Generator, n_genes: int, n_types: int, n_batches: int, batch_effect: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-type gene profiles (log-normal with up-regulated markers, rows sum to one) and per-batch gene scales."""
    base = rng.lognormal(mean=-1.0, sigma=1.5, size=n_genes)
    profiles = np.tile(base, (n_types, 1))
    n_markers = max(1, n_genes // 50)
    for t in range(n_types):
        markers = rng.choice(n_genes, n_markers, replace=False)
        profiles[t, markers] *= rng.uniform(4.0, 12.0, n_markers)
    profiles /= profiles.sum(1, keepdims=True)
    return profiles, rng.lognormal(0.0, batch_effect, size=(n_batches, n_genes))


def _poisson_counts(rng, profiles, batch_scale, types, batches, libraries) -> sp.csr_matrix:
    """Poisson counts of cells of the given types, batches and expected library sizes."""
    rates = profiles[types] * batch_scale[batches]
    rates *= (libraries / rates.sum(1))[:, None]
    return sp.csr_matrix(rng.poisson(rates).astype(np.float32))


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
    profiles, batch_scale = _type_profiles(rng, n_genes, n_types, n_batches, batch_effect)

    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    libraries = rng.lognormal(np.log(mean_library_size), 0.4, n_cells)
    chunks = []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        cells = slice(start, stop)
        chunks.append(_poisson_counts(rng, profiles, batch_scale, types[cells], batches[cells], libraries[cells]))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in types]),
            "batch": pd.Categorical([f"batch_{b}" for b in batches]),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    return AnnData(X=sp.vstack(chunks, format="csr"), obs=obs, var=var)


def write_synthetic_h5ad(
    path,
    n_cells: int,
    n_genes: int = 3_000,
    *,
    n_types: int = 20,
    n_batches: int = 8,
    mean_library_size: float = 600.0,
    batch_effect: float = 0.5,
    seed: int = 0,
    cell_seed: int = 0,
    chunk_size: int = 20_000,
) -> None:
    """Write synthetic counts straight to an h5ad file, ``chunk_size`` cells at a time (CSR ``X``).

    The cells follow :func:`synthetic_counts` (type profiles and batch effects from ``seed``); the cells themselves
    are drawn from ``cell_seed`` and the chunk number, so files written with the same ``seed`` and different
    ``cell_seed`` share their types and batches (a reference and a query) without sharing cells. Memory stays at
    one chunk whatever ``n_cells`` is.
    """
    import h5py
    from anndata.io import write_elem

    profiles, batch_scale = _type_profiles(np.random.default_rng(seed), n_genes, n_types, n_batches, batch_effect)

    types_all = np.empty(n_cells, dtype=np.int64)
    batches_all = np.empty(n_cells, dtype=np.int64)
    with h5py.File(path, "w") as file:
        file.attrs["encoding-type"] = "anndata"
        file.attrs["encoding-version"] = "0.1.0"
        group = file.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = (n_cells, n_genes)
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 14,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 14,))
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        stored = 0
        for number, start in enumerate(range(0, n_cells, chunk_size)):
            stop = min(start + chunk_size, n_cells)
            cell_rng = np.random.default_rng([cell_seed, number])
            types = cell_rng.integers(0, n_types, stop - start)
            batches = cell_rng.integers(0, n_batches, stop - start)
            libraries = cell_rng.lognormal(np.log(mean_library_size), 0.4, stop - start)
            block = _poisson_counts(cell_rng, profiles, batch_scale, types, batches, libraries)
            data.resize((stored + block.nnz,))
            indices.resize((stored + block.nnz,))
            data[stored:] = block.data
            indices[stored:] = block.indices
            indptr[start + 1 : stop + 1] = stored + block.indptr[1:]
            stored += block.nnz
            types_all[start:stop], batches_all[start:stop] = types, batches
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(types_all, [f"type_{t}" for t in range(n_types)]),
                "batch": pd.Categorical.from_codes(batches_all, [f"batch_{b}" for b in range(n_batches)]),
            },
            index=[f"cell_{cell_seed}_{i}" for i in range(n_cells)],
        )
        write_elem(file, "obs", obs)
        write_elem(file, "var", pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)]))
        for name in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
            write_elem(file, name, {})


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
