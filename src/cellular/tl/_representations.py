"""``tl.cell_type_representations``: one vector per cell type and the distances between types."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from cellular.model import CELLULAR, SAME_AS_TRAINING
from cellular.model import cell_type_representations as _representations

from ._common import check_model, check_positive_int, model_record, package_uns, serve_query

DISTANCE_METRICS = ("cosine", "euclidean")


def cell_type_representations(
    adata: AnnData,
    model: CELLULAR,
    *,
    labels_key: str | None = None,
    method: str = "centroid",
    metric: str = "cosine",
    key_added: str = "cellular_representations",
    max_medoid_cells: int = 5000,
    use_rep: str | None = None,
    batch_size: int = 4096,
    layer: str | None = SAME_AS_TRAINING,
    log_normalized: bool | None = None,
    gene_id_key: str | None = None,
    min_gene_overlap: float = 0.5,
    copy: bool = False,
) -> AnnData | None:
    """Store a representation vector per cell type and the pairwise distances between types.

    Parameters
    ----------
    adata
        Labelled cells (e.g. the reference, or a query annotated by :func:`cellular.tl.cellular_annotate` with
        ``labels_key="cellular_label"``).
    model
        A trained :class:`~cellular.CELLULAR` model.
    labels_key
        Column of ``adata.obs`` with the types; the model's ``labels_key`` when ``None``. Missing values and the
        model's unlabelled category (``"Unknown"``) are left out.
    method
        ``"centroid"``, ``"median"`` or ``"medoid"``, see :meth:`~cellular.CELLULAR.get_cell_type_representations`.
    metric
        Distance between representations: ``"cosine"`` (the geometry the CELLULAR loss trains) or
        ``"euclidean"``.
    key_added
        Key in ``adata.uns['cellular']``.
    max_medoid_cells
        Largest number of cells per type searched for the medoid.
    use_rep
        Key of ``adata.obsm`` holding this model's embedding of ``adata``; the cells are embedded now when
        ``None``.
    batch_size, layer, log_normalized, gene_id_key, min_gene_overlap
        How to read and embed ``adata``, as in :meth:`~cellular.CELLULAR.get_latent_representation`.
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``adata.uns['cellular'][key_added]`` with

    ``representations``
        DataFrame, types x latent dimensions.
    ``distances``
        ``(n_types, n_types)`` array of distances under ``metric``, types in the order of ``representations``' rows
        (an array, not a table: type names such as ``"Megakaryocyte/Platelet"`` cannot be keys of an h5ad file).
    ``n_cells``
        DataFrame of cells per type.
    ``params``
        ``labels_key``, ``method``, ``metric`` and the model.
    """
    if metric not in DISTANCE_METRICS:
        raise ValueError(f"metric must be one of {DISTANCE_METRICS}, got {metric!r}.")
    check_model(model, classifier=False)
    batch_size = check_positive_int("batch_size", batch_size)
    max_medoid_cells = check_positive_int("max_medoid_cells", max_medoid_cells)
    labels = model.representation_labels(adata, labels_key)
    if copy:
        adata = adata.copy()
    served = serve_query(
        adata,
        model,
        use_rep=use_rep,
        batch_size=batch_size,
        layer=layer,
        log_normalized=log_normalized,
        gene_id_key=gene_id_key,
        min_gene_overlap=min_gene_overlap,
        panel="direct",
    )
    z, read_record = served.z, served.record
    table = _representations(z, labels, method, max_medoid_cells=max_medoid_cells)
    vectors = table.to_numpy(dtype=np.float64)
    if metric == "cosine":
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
        np.fill_diagonal(distances, 0.0)
    else:
        distances = np.sqrt(np.maximum(((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(-1), 0.0))
    counts = pd.Series(labels).value_counts()
    package_uns(adata)[key_added] = {
        "representations": table,
        "distances": distances,
        "n_cells": pd.DataFrame({"n_cells": [int(counts[name]) for name in table.index]}, index=table.index),
        "params": {
            "labels_key": model.setup_args["labels_key"] if labels_key is None else labels_key,
            "method": method,
            "metric": metric,
            "max_medoid_cells": int(max_medoid_cells),
            **read_record,
            "model": model_record(model),
        },
    }
    return adata if copy else None
