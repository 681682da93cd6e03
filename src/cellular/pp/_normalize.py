"""Normalisation used by CELLULAR: library-size scaling to a fixed target, then log1p."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from cellular.data._expression import check_expression_values, get_matrix, library_sizes, matrix_name


def normalize_log1p(
    adata: AnnData,
    *,
    target_sum: float | None = None,
    layer: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Scale each cell's counts to ``target_sum`` and take ``log1p``.

    A CELLULAR model trained on counts normalises each cell over its own genes (``model.genes``) to
    ``model.target_sum``: normalising ``adata[:, model.genes]`` with that value and embedding it with
    ``log_normalized=True`` gives the same embedding as passing the counts.

    Parameters
    ----------
    adata
        Annotated data matrix holding raw counts.
    target_sum
        Total per cell after scaling; the median library size of ``adata`` when ``None``.
    layer
        Layer holding the counts; ``adata.X`` when ``None``.
    key_added
        Layer to write the result to; overwrites the input matrix (``X`` or ``layer``) when ``None``.
    copy
        Return a normalised copy instead of writing in place.

    Returns
    -------
    The copy when ``copy=True``, else ``None``. Writes ``adata.X`` (or ``adata.layers[key_added or layer]``)
    and ``adata.uns['cellular_normalization'] = {'target_sum': ..., 'layer': ..., 'key_added': ...}``.
    """
    if copy:
        adata = adata.copy()
    where = matrix_name(layer)
    matrix = get_matrix(adata, layer)
    check_expression_values(matrix, counts=True, where=where)
    sizes = library_sizes(matrix)
    if (sizes <= 0).any():
        raise ValueError(f"{int((sizes <= 0).sum())} cells have no counts in {where}; remove them first.")
    if target_sum is None:
        target_sum = float(np.median(sizes))
    factors = (target_sum / sizes).astype(np.float32)
    if sp.issparse(matrix):
        result = sp.csr_matrix(sp.diags(factors) @ matrix.tocsr(), dtype=np.float32)
        np.log1p(result.data, out=result.data)
    else:
        result = np.log1p(np.asarray(matrix, dtype=np.float32) * factors[:, None])

    destination = key_added if key_added is not None else layer
    if destination is None:
        adata.X = result
    else:
        adata.layers[destination] = result
    adata.uns["cellular_normalization"] = {"target_sum": float(target_sum), "layer": layer, "key_added": key_added}
    return adata if copy else None
