"""Rows of an expression matrix that may live on disk (a backed AnnData), read in chunks or by index."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anndata
import h5py
import numpy as np
import scipy.sparse as sp
from anndata.abc import CSCDataset, CSRDataset

# Cells per chunk when a backed matrix is streamed (about 100 MB of a 3,000-gene, 10 %-dense float32 CSR block).
ROW_CHUNK = 20_000


def is_backed(matrix) -> bool:
    """Whether ``matrix`` is read from disk (``read_h5ad(..., backed="r")``) rather than held in memory."""
    from ._collection import CollectionMatrix

    return isinstance(matrix, CSRDataset | CSCDataset | h5py.Dataset | CollectionMatrix)


def check_row_readable(matrix, where: str) -> None:
    """A clear error for a backed matrix whose rows cannot be read without loading it all (CSC on disk)."""
    if isinstance(matrix, CSCDataset):
        raise ValueError(
            f"{where} is stored on disk column by column (CSC), so cells cannot be read without loading the whole "
            "matrix. Rewrite the file with a CSR matrix (e.g. adata = anndata.read_h5ad(path); "
            "adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path)), or load it into memory."
        )


def row_chunks(matrix, chunk_size: int | None = None) -> Iterator[tuple[int, int, sp.csr_matrix | np.ndarray]]:
    """``(start, stop, rows)`` for consecutive blocks of rows (:data:`ROW_CHUNK` by default), read one at a time."""
    n_rows = matrix.shape[0]
    chunk_size = chunk_size or ROW_CHUNK
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        yield start, stop, _in_memory(matrix[start:stop])


def read_rows(matrix, index: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """Rows ``index`` (any order, repeats allowed) of an in-memory or backed matrix, in that order.

    A backed matrix is read once per distinct row, in increasing order (what HDF5 reads cheaply); a contiguous
    range is read as one slice.
    """
    index = np.asarray(index)
    if not is_backed(matrix):
        return matrix[index]
    if index.size and index[-1] - index[0] + 1 == index.size and np.all(np.diff(index) == 1):
        return _in_memory(matrix[int(index[0]) : int(index[-1]) + 1])
    distinct, inverse = np.unique(index, return_inverse=True)
    rows = _in_memory(matrix[distinct])
    return rows if distinct.size == index.size and np.array_equal(distinct, index) else rows[inverse]


def write_rows_backed(adata: anndata.AnnData, rows: np.ndarray, path: str | Path) -> anndata.AnnData:
    """The cells ``rows`` (a boolean mask) of a backed ``adata`` written to ``path`` and opened backed.

    ``X`` is copied :data:`ROW_CHUNK` cells at a time, so memory stays at one chunk (anndata's
    ``copy(filename=...)`` holds the whole subset while writing); every other slot is subset as anndata does.
    """
    rows = np.asarray(rows, dtype=bool)
    view = adata[rows]
    shell = anndata.AnnData(
        obs=view.obs,
        var=view.var,
        uns=dict(view.uns),
        obsm=dict(view.obsm),
        varm=dict(view.varm),
        layers=dict(view.layers),
        obsp=dict(view.obsp),
        varp=dict(view.varp),
    )
    shell.write_h5ad(path)
    matrix = adata.X
    if matrix is None:
        return anndata.read_h5ad(path, backed="r")
    n_rows, n_genes = int(rows.sum()), matrix.shape[1]
    with h5py.File(path, "r+") as file:
        if isinstance(matrix, h5py.Dataset):
            target = file.create_dataset("X", shape=(n_rows, n_genes), dtype=matrix.dtype)
            target.attrs["encoding-type"], target.attrs["encoding-version"] = "array", "0.2.0"
        else:
            from anndata.io import sparse_dataset, write_elem

            write_elem(file, "X", sp.csr_matrix((0, n_genes), dtype=matrix.dtype))
            target = sparse_dataset(file["X"])
        written = 0
        for start, stop, block in row_chunks(matrix):
            block = block[rows[start:stop]]
            if isinstance(matrix, h5py.Dataset):
                target[written : written + block.shape[0]] = block
            elif block.shape[0]:
                target.append(sp.csr_matrix(block))
            written += block.shape[0]
    return anndata.read_h5ad(path, backed="r")


def _in_memory(block) -> sp.csr_matrix | np.ndarray:
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return np.asarray(block)
