"""``tl.tree_annotate`` and ``tl.marker_importances``: tree-model annotation and per-type markers (CellClassifier)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from cellular.data import GeneFeatures
from cellular.trees import NEGATIVES, TreeAnnotator, one_vs_rest_markers

from ._common import check_unknown_label, package_uns, write_annotation


def tree_annotate(
    adata: AnnData,
    annotator: TreeAnnotator,
    *,
    key_added: str = "tree_label",
    min_confidence: float = 0.0,
    unknown_label: str = "Unknown",
    min_gene_overlap: float = 0.5,
    copy: bool = False,
) -> AnnData | None:
    """Annotate cells with a fitted :class:`cellular.trees.TreeAnnotator` (random forest or gradient boosting).

    Parameters
    ----------
    adata
        Cells to annotate (genes matched by name; counts, or log-normalised values if the annotator was fitted on
        them).
    annotator
        A fitted :class:`~cellular.trees.TreeAnnotator`.
    key_added
        Name of the label column; the other slots are derived from it.
    min_confidence
        Cells whose calibrated probability of their best type is below this value are labelled ``unknown_label``.
    unknown_label
        Label of unassigned cells; must not be one of the annotator's types.
    min_gene_overlap
        Smallest share of the annotator's genes ``adata`` must measure (missing genes read as zero).
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes:

    ``adata.obs[key_added]``
        Categorical label over the annotator's types plus ``unknown_label``.
    ``adata.obs[key_added + '_confidence']``
        Calibrated probability of the most probable type.
    ``adata.obsm[key_added + '_probabilities']``
        ``(n_cells, n_types)`` calibrated probabilities; column order in ``uns``.
    ``adata.uns['cellular'][key_added]``
        ``params``, ``classes`` and ``counts`` (DataFrame per label: ``n_cells``, ``n_likeliest``, ``n_unknown``, as
        in :func:`cellular.tl.cellular_annotate`).
    """
    if not isinstance(annotator, TreeAnnotator):
        raise TypeError(f"annotator must be a cellular.trees.TreeAnnotator, got {type(annotator).__name__}.")
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must lie in [0, 1], got {min_confidence}.")
    unknown_label = check_unknown_label(unknown_label)
    probabilities = annotator.predict_proba(adata, min_gene_overlap=min_gene_overlap)
    classes = list(annotator.classes_)
    if unknown_label in classes:
        raise ValueError(
            f"unknown_label={unknown_label!r} is one of the annotator's types; pass another unknown_label."
        )
    if copy:
        adata = adata.copy()
    params = {
        "method": annotator.method,
        "calibration": annotator.calibration,
        "n_genes": len(annotator.features_.genes),
        "min_confidence": float(min_confidence),
        "unknown_label": unknown_label,
    }
    unknown = probabilities.max(axis=1) < min_confidence
    write_annotation(adata, key_added, probabilities, unknown, classes, unknown_label, params)
    return adata if copy else None


def marker_importances(
    adata: AnnData,
    labels_key: str,
    *,
    negatives: str = "even",
    n_top: int = 10,
    seed: int = 0,
    n_estimators: int = 100,
    max_cells: int = 1000,
    test_fraction: float = 0.25,
    n_permutation_genes: int = 30,
    n_repeats: int = 5,
    layer: str | None = None,
    log_normalized: bool = False,
    mask_var: str | None = None,
    min_cells: int = 10,
    n_jobs: int | None = None,
    key_added: str = "marker_importances",
    copy: bool = False,
) -> AnnData | None:
    """Rank the genes that define each cell type with one-vs-rest random forests (CellClassifier).

    For every type with at least ``min_cells`` cells, a random forest separates its cells (at most ``max_cells``)
    from as many cells of the other types, drawn by ``negatives``: ``"even"`` takes an equal quota from every other
    type (what a small type cannot give comes from the largest), ``"random"`` a uniform sample. A stratified
    ``test_fraction`` of these cells is held out to measure AUROC and AUPRC. Genes are ranked by the forest's
    impurity importance; the ``n_permutation_genes`` best also get a permutation importance (drop in held-out AUROC
    when the gene is shuffled, mean and spread over ``n_repeats``). Expression is log-normalised (counts scaled to
    their median library size, ``log1p``) over all genes, or those of ``mask_var``.

    Parameters
    ----------
    adata
        Labelled cells (not modified beyond ``uns``).
    labels_key
        ``obs`` column of cell types; cells with a missing label are left out.
    negatives
        ``"even"`` or ``"random"``.
    n_top
        Genes kept per type.
    seed
        Random state of the sampling, the split and the forests.
    n_estimators
        Trees per forest.
    max_cells
        Most positive cells per type.
    test_fraction
        Held-out share of each type's cells.
    n_permutation_genes, n_repeats
        Genes given a permutation importance, and shuffles per gene.
    layer, log_normalized
        Where the expression is and whether it is already log1p-normalised.
    mask_var
        Boolean ``var`` column of the genes to consider (e.g. ``"highly_variable"``); all genes when ``None``.
    min_cells
        Types with fewer cells are skipped (listed in ``params``).
    n_jobs
        Threads of each forest.
    key_added
        Key in ``adata.uns['cellular']``.
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``adata.uns['cellular'][key_added]`` with

    ``params``
        The settings, and ``skipped_types``.
    ``scores``
        DataFrame indexed by cell type: ``n_positive``, ``n_negative``, held-out ``auroc`` and ``auprc``.
    ``markers``
        DataFrame with one row per type and rank: ``cell_type``, ``rank``, ``gene``, ``impurity_importance``,
        ``permutation_importance``, ``permutation_std``, mean log-expression in the type and in its negatives, and
        ``higher_in_type`` (whether the gene marks the type by its presence rather than its absence).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}.")
    if labels_key not in adata.obs:
        raise KeyError(f"labels_key={labels_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    if n_top < 1 or n_estimators < 1 or max_cells < 2 or n_repeats < 1 or n_permutation_genes < 0:
        raise ValueError("n_top, n_estimators and n_repeats must be at least 1, max_cells at least 2.")
    genes = adata.var_names.astype(str).to_numpy()
    if mask_var is not None:
        if mask_var not in adata.var or adata.var[mask_var].dtype != bool:
            raise KeyError(f"mask_var={mask_var!r} must be a boolean column of adata.var.")
        genes = genes[adata.var[mask_var].to_numpy()]
    labels = adata.obs[labels_key]
    labelled = labels.notna().to_numpy()
    cells = adata if labelled.all() else adata[labelled]
    features = GeneFeatures.fit(cells, n_top_genes=None, layer=layer, log_normalized=log_normalized, genes=genes)
    expression = features.transform(cells, min_gene_overlap=1.0)
    values = labels.astype(str).to_numpy()[labelled]
    types, counts = np.unique(values, return_counts=True)
    kept = types[counts >= min_cells]
    if kept.size == 0 or types.size < 2:
        raise ValueError(
            f"adata.obs[{labels_key!r}] needs two or more types and at least one with {min_cells} cells (has "
            f"{dict(zip(types.tolist(), counts.tolist(), strict=True))}); lower min_cells."
        )
    results = [
        one_vs_rest_markers(
            expression,
            values,
            np.asarray(features.genes),
            cell_type,
            negatives=negatives,
            n_top=n_top,
            n_estimators=n_estimators,
            max_cells=max_cells,
            test_fraction=test_fraction,
            n_permutation_genes=min(n_permutation_genes, len(features.genes)),
            n_repeats=n_repeats,
            seed=seed,
            n_jobs=n_jobs,
        )
        for cell_type in kept
    ]
    if copy:
        adata = adata.copy()
    package_uns(adata)[key_added] = {
        "params": {
            "labels_key": labels_key,
            "negatives": negatives,
            "n_top": int(n_top),
            "seed": int(seed),
            "n_estimators": int(n_estimators),
            "max_cells": int(max_cells),
            "test_fraction": float(test_fraction),
            "n_permutation_genes": int(n_permutation_genes),
            "n_repeats": int(n_repeats),
            "n_genes": len(features.genes),
            "mask_var": mask_var,
            "min_cells": int(min_cells),
            "skipped_types": types[counts < min_cells].tolist(),
        },
        "scores": pd.DataFrame([result.scores for result in results]).set_index("cell_type"),
        "markers": pd.concat([result.markers for result in results], ignore_index=True),
    }
    return adata if copy else None
