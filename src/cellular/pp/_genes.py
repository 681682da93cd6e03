"""Choice of the genes a CELLULAR model reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData


def highly_variable_genes(log_expression: sp.csr_matrix, gene_names: Sequence[str], n_top_genes: int) -> list[str]:
    """The ``n_top_genes`` most variable genes of log-normalised expression (Seurat dispersion ranking).

    Genes without any expression are never chosen. When fewer expressed genes than ``n_top_genes`` exist,
    all expressed genes are returned. The result keeps the input gene order.

    Parameters
    ----------
    log_expression
        Cells x genes log1p-normalised matrix.
    gene_names
        Names of the columns.
    n_top_genes
        How many genes to keep.
    """
    expressed = np.asarray((log_expression != 0).sum(axis=0)).reshape(-1) > 0
    names = np.asarray(gene_names)
    if expressed.sum() <= n_top_genes:
        return names[expressed].tolist()
    data = AnnData(X=log_expression[:, expressed], var=pd.DataFrame(index=pd.Index(names[expressed])))
    table = sc.pp.highly_variable_genes(data, n_top_genes=n_top_genes, flavor="seurat", inplace=False, subset=False)
    chosen = set(data.var_names[np.asarray(table["highly_variable"], dtype=bool)])
    return [name for name in names if name in chosen]
