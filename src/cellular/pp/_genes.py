"""Choice of the genes a CELLULAR model reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellular.data import NormalizedExpression

N_MEAN_BINS = 20


def gene_moments(log_expression: sp.csr_matrix | NormalizedExpression) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per gene: mean and variance (``n - 1`` denominator) of ``expm1`` of the values, and the expressing cells.

    One pass over the cells, in chunks (streamed from disk for backed expression).

    Parameters
    ----------
    log_expression
        Cells x genes log1p-normalised matrix, or the model-side expression reader.
    """
    if isinstance(log_expression, NormalizedExpression):
        blocks = (block for _, _, block in log_expression.normalized_chunks())
        n_cells = log_expression.n_cells
    else:
        blocks = (sp.csr_matrix(log_expression),)
        n_cells = log_expression.shape[0]
    sums = squares = expressing = None
    for block in blocks:
        linear = block.copy()
        linear.data = np.expm1(linear.data)
        block_sums = np.asarray(linear.sum(axis=0), dtype=np.float64).reshape(-1)
        linear.data = linear.data.astype(np.float64) ** 2
        block_squares = np.asarray(linear.sum(axis=0)).reshape(-1)
        block_expressing = np.bincount(block.indices[block.data != 0], minlength=block.shape[1])
        if sums is None:
            sums, squares, expressing = block_sums, block_squares, block_expressing
        else:
            sums, squares, expressing = sums + block_sums, squares + block_squares, expressing + block_expressing
    mean = sums / n_cells
    variance = np.maximum(squares / n_cells - mean**2, 0.0)
    if n_cells > 1:
        variance *= n_cells / (n_cells - 1)
    return mean, variance, expressing


def highly_variable_genes(
    log_expression: sp.csr_matrix | NormalizedExpression, gene_names: Sequence[str], n_top_genes: int
) -> list[str]:
    """The ``n_top_genes`` most variable genes of log-normalised expression (Seurat dispersion ranking).

    The ranking of ``scanpy.pp.highly_variable_genes(flavor="seurat")`` (log dispersion of ``expm1`` of the
    values, normalised within 20 bins of log mean expression), computed from per-gene moments so that data on disk
    is read once in chunks. Genes without any expression are never chosen. When fewer expressed genes than
    ``n_top_genes`` exist, all expressed genes are returned. The result keeps the input gene order.

    Parameters
    ----------
    log_expression
        Cells x genes log1p-normalised matrix, or the model-side expression reader (possibly backed).
    gene_names
        Names of the columns.
    n_top_genes
        How many genes to keep.
    """
    mean, variance, expressing = gene_moments(log_expression)
    names = np.asarray(gene_names)
    expressed = expressing > 0
    if expressed.sum() <= n_top_genes:
        return names[expressed].tolist()
    mean, variance = mean[expressed], variance[expressed]
    mean = np.where(mean == 0, 1e-12, mean)
    dispersion = variance / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    log_mean = np.log1p(mean)
    frame = pd.DataFrame({"dispersion": dispersion, "bin": pd.cut(log_mean, bins=N_MEAN_BINS)})
    stats = frame.groupby("bin", observed=True)["dispersion"].agg(["mean", "std"])
    # A bin holding a single gene has no spread: that gene's normalised dispersion is 1 (Seurat, scanpy).
    single = stats["std"].isna()
    stats.loc[single, "std"] = stats.loc[single, "mean"]
    stats.loc[single, "mean"] = 0.0
    per_gene = stats.loc[frame["bin"]]
    normalised = (dispersion - per_gene["mean"].to_numpy()) / per_gene["std"].to_numpy()
    ranked = np.sort(normalised[~np.isnan(normalised)])[::-1]
    cut_off = ranked[min(n_top_genes, ranked.size) - 1]
    chosen = set(names[expressed][np.nan_to_num(normalised, nan=-np.inf) >= cut_off])
    return [name for name in names if name in chosen]
