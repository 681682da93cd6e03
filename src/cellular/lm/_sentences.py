"""Cells written as sentences of their top-ranked genes (CELLama's input)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellular.data._backed import row_chunks

NO_GENES = "No genes are detected."
_DENSE_BLOCK = 1 << 24  # values of one dense block of cells x expressed genes (64 MB of float32)


def top_genes(
    matrix, gene_names: Sequence[str], n_genes: int, *, columns: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's ``n_genes`` most expressed genes, most expressed first.

    Ties are broken by gene name (alphabetically), so the result does not depend on the order of the columns. Only
    expressed genes (value > 0) are listed: a cell expressing fewer genes has empty names after its last one. Within a
    cell the ranking of counts, normalised counts and log-normalised values is the same (a per-cell monotone map).

    Parameters
    ----------
    matrix
        Cells x genes, sparse, dense or backed; read in blocks of cells.
    gene_names
        Names of the columns.
    n_genes
        Genes per cell.
    columns
        Positions of the genes that may be listed (e.g. the highly variable ones); all when ``None``.

    Returns
    -------
    ``(names, values)``: ``(n_cells, n_genes)`` arrays of gene names (``""`` past the expressed genes) and their
    values (``0`` there).
    """
    gene_names = np.asarray(gene_names, dtype=object)
    columns = np.arange(gene_names.size) if columns is None else np.asarray(columns, dtype=np.int64)
    # Columns in alphabetical order of their genes: a stable sort then breaks ties by name.
    alphabetical = columns[np.argsort(gene_names[columns].astype(str), kind="stable")]
    n_cells = matrix.shape[0]
    names = np.full((n_cells, n_genes), "", dtype=object)
    values = np.zeros((n_cells, n_genes), dtype=np.float32)
    chunk = max(1, min(20_000, _DENSE_BLOCK // max(1, alphabetical.size)))
    for start, stop, block in row_chunks(matrix, chunk):
        block = sp.csr_matrix(block, dtype=np.float32)[:, alphabetical]
        expressed_columns = np.flatnonzero(block.getnnz(axis=0))
        dense = block[:, expressed_columns].toarray()
        # A stable sort of the negated values keeps equal values in alphabetical order.
        order = np.argsort(-dense, axis=1, kind="stable")[:, :n_genes]
        top_values = np.take_along_axis(dense, order, axis=1)
        width = order.shape[1]
        top_names = gene_names[alphabetical][expressed_columns][order]
        top_names[top_values <= 0] = ""
        names[start:stop, :width] = top_names
        values[start:stop, :width] = np.maximum(top_values, 0)
    return names, values


def sentences_from_top_genes(
    names: np.ndarray, metadata: Mapping[str, Sequence] | None = None, *, prefix: str = "Top genes are"
) -> np.ndarray:
    """Sentences ``"<prefix> G1, G2, G3."`` plus one clause ``"<key> of this cell is <value>."`` per metadata key.

    A cell without expressed genes reads :data:`NO_GENES`; a missing metadata value drops its clause.
    """
    n_cells = names.shape[0]
    listed = names != ""
    text = np.full(n_cells, prefix, dtype=object)
    for column in range(names.shape[1]):
        separator = " " if column == 0 else ", "
        text = np.where(listed[:, column], text + separator + names[:, column], text)
    text = np.where(listed[:, 0] if names.shape[1] else np.zeros(n_cells, bool), text + ".", NO_GENES)
    for key, column_values in (metadata or {}).items():
        column_values = pd.Series(np.asarray(column_values, dtype=object))
        as_text = column_values.astype(str).to_numpy(dtype=object)
        present = (column_values.notna() & (as_text != "")).to_numpy()
        clause = f" {key} of this cell is " + as_text + "."
        text = np.where(present, text + clause, text)
    return text.astype(str)
