"""Where the gene-grid encoder places each gene: alphabetical, or co-expressed genes side by side."""

from __future__ import annotations

import math

import numpy as np

GENE_LAYOUTS = ("coexpression", "alphabetical")
LAYOUT_SAMPLE_CELLS = 5000
LAYOUT_NEIGHBOURS = 10


def grid_side(n_genes: int) -> int:
    """Side of the smallest square grid with a cell for each of ``n_genes`` genes."""
    return max(2, math.ceil(math.sqrt(n_genes)))


def gene_grid_layout(
    genes: list[str],
    method: str = "coexpression",
    expression: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Grid cell of each gene on the smallest square grid that holds them (row-major cell numbers).

    Parameters
    ----------
    genes
        The genes, in the encoder's input order.
    method
        ``"alphabetical"`` (Spoticell's layout: genes in name order, row by row) or ``"coexpression"``: genes
        embedded in 2D by a spectral embedding of their correlation graph (each gene linked to its 10 most
        correlated genes), then rasterised (sorted into rows by the first coordinate, each row by the second), so
        grid neighbours are co-expressed and convolutions see related genes together.
    expression
        ``(n_cells, n_genes)`` normalised expression of a sample of cells, columns in ``genes`` order; needed by
        ``"coexpression"``.
    seed
        Seed of the spectral embedding's eigensolver.

    Returns
    -------
    ``(n_genes,)`` int64 array of distinct grid cells.
    """
    if method not in GENE_LAYOUTS:
        raise ValueError(f"gene_layout must be one of {GENE_LAYOUTS}, got {method!r}.")
    n_genes = len(genes)
    side = grid_side(n_genes)
    if method == "alphabetical":
        order = np.argsort(np.asarray(genes, dtype=object), kind="stable")
        positions = np.empty(n_genes, dtype=np.int64)
        positions[order] = np.arange(n_genes)
        return positions
    if expression is None or expression.shape[1] != n_genes:
        shape = None if expression is None else tuple(expression.shape)
        raise ValueError(
            f"The co-expression layout needs a (cells x genes) expression sample with one column per gene "
            f"({n_genes} genes), got {shape}. Pass expression=... with the genes' normalised values, or "
            "method='alphabetical'."
        )
    coordinates = _spectral_coordinates(np.asarray(expression, dtype=np.float64), seed)
    rows = np.argsort(coordinates[:, 0], kind="stable")
    positions = np.empty(n_genes, dtype=np.int64)
    for row, start in enumerate(range(0, n_genes, side)):
        members = rows[start : start + side]
        members = members[np.argsort(coordinates[members, 1], kind="stable")]
        positions[members] = row * side + np.arange(members.size)
    return positions


def _spectral_coordinates(expression: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import spectral_embedding

    n_genes = expression.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.corrcoef(expression, rowvar=False)
    correlation = np.nan_to_num(correlation, nan=0.0)
    np.fill_diagonal(correlation, -np.inf)
    k = min(LAYOUT_NEIGHBOURS, n_genes - 1)
    nearest = np.argpartition(-correlation, k - 1, axis=1)[:, :k]
    affinity = np.zeros((n_genes, n_genes))
    rows = np.repeat(np.arange(n_genes), k)
    affinity[rows, nearest.ravel()] = np.clip(correlation[rows, nearest.ravel()], 0.0, None)
    affinity = np.maximum(affinity, affinity.T)
    # A weak link between every pair keeps the graph connected (genes without correlated partners exist).
    affinity += 1e-3
    np.fill_diagonal(affinity, 0.0)
    return spectral_embedding(affinity, n_components=2, drop_first=True, random_state=seed)


def grid_neighbour_correlation(positions: np.ndarray, expression: np.ndarray) -> float:
    """Mean correlation of the genes in horizontally or vertically adjacent grid cells (a layout's locality)."""
    n_genes = positions.size
    side = grid_side(n_genes)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.nan_to_num(np.corrcoef(np.asarray(expression, dtype=np.float64), rowvar=False))
    gene_at = np.full(side * side, -1)
    gene_at[positions] = np.arange(n_genes)
    grid = gene_at.reshape(side, side)
    pairs = np.concatenate(
        [np.stack([grid[:, :-1].ravel(), grid[:, 1:].ravel()], 1), np.stack([grid[:-1].ravel(), grid[1:].ravel()], 1)]
    )
    pairs = pairs[(pairs >= 0).all(axis=1)]
    return float(correlation[pairs[:, 0], pairs[:, 1]].mean())
