"""``tl.novel_types``: per-cell novel cell-type detection with calibrated p-values."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
from anndata import AnnData

from cellular.data import read_expression
from cellular.data._sampling import rows_per_group
from cellular.metrics import benjamini_hochberg
from cellular.model import CELLULAR, SAME_AS_TRAINING

from ._common import (
    ServedQuery,
    check_alpha,
    check_model,
    check_positive_int,
    model_record,
    package_uns,
    serve_query,
)

logger = logging.getLogger(__name__)

# The original CELLULAR package called a dataset "likely to hold a novel type" below this value.
CELLULAR_RULE_THRESHOLD = 0.25


def novelty_flags(
    served: ServedQuery, index: pd.Index, probabilities: np.ndarray, alpha: float, fdr: bool
) -> tuple[pd.DataFrame, np.ndarray]:
    """Novelty table of :meth:`~cellular.CELLULAR.get_novelty_scores` plus ``qvalue``, and the flags at ``alpha``."""
    frame = served.model.novelty_scores_from_embedding(
        served.z, probabilities, index, served.novelty_reference, served.hidden
    )
    frame["qvalue"] = benjamini_hochberg(frame["pvalue"].to_numpy())
    flags = (frame["qvalue"] if fdr else frame["pvalue"]).to_numpy() <= alpha
    return frame, flags


def novel_types(
    adata: AnnData,
    model: CELLULAR,
    *,
    alpha: float = 0.05,
    fdr: bool = False,
    key_added: str = "cellular_novel",
    group: bool = False,
    resolution: float = 0.5,
    min_group_size: int = 10,
    n_markers: int = 10,
    use_rep: str | None = None,
    batch_size: int = 4096,
    layer: str | None = SAME_AS_TRAINING,
    log_normalized: bool | None = None,
    gene_id_key: str | None = None,
    min_gene_overlap: float = 0.0,
    panel: str = "auto",
    progress_bar: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Flag cells that belong to none of the model's reference cell types.

    Every cell gets a novelty score (distance to the nearest reference type prototype in the embedding, scaled by
    that type's spread, plus classifier uncertainty and distances to the nearest training cells in the encoder's
    hidden layer and input genes; see :meth:`~cellular.CELLULAR.get_novelty_scores`) and a
    split-conformal p-value computed against reference cells held out of training. Flagging ``pvalue <= alpha``
    flags about ``alpha`` of the cells of known types when the query is like the reference (a strong batch effect
    raises that rate); ``fdr=True`` instead flags cells whose Benjamini–Hochberg q-value is at most ``alpha``,
    bounding the expected fraction of known-type cells among the flagged ones.

    Parameters
    ----------
    adata
        Query cells (genes matched by name; no labels or batches needed).
    model
        A :class:`~cellular.CELLULAR` model with a trained classifier head.
    alpha
        Level in ``(0, 1)``.
    fdr
        Control the false discovery rate across the query instead of the per-cell false-novel rate.
    key_added
        Prefix of the ``obs`` columns and key in ``adata.uns['cellular']``.
    group
        Cluster the flagged cells (Leiden on their embedding) into candidate new types and rank their marker genes
        against the unflagged cells (Wilcoxon test on the query's log-normalised expression, all its genes; at most
        5,000 cells of each group and of the unflagged cells, a fixed random sample, are read, so a large or backed
        query is never loaded whole).
    resolution
        Leiden resolution for ``group=True``.
    min_group_size
        Fewest flagged cells for which ``group=True`` clusters; fewer flagged cells form one group.
    n_markers
        Marker genes listed per candidate group.
    use_rep
        Key of ``adata.obsm`` holding this model's embedding of ``adata``; the cells are embedded now when
        ``None``.
    batch_size, layer, log_normalized, gene_id_key, min_gene_overlap
        How to read and embed ``adata``, as in :meth:`~cellular.CELLULAR.get_latent_representation`.
    panel
        How a query lacking some of the model's genes is served, as in :func:`cellular.tl.cellular_annotate`.
    progress_bar
        Show a progress bar while embedding the cells (on stderr).
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes:

    ``adata.obs[key_added]``
        Whether the cell is flagged as novel (bool).
    ``adata.obs[key_added + '_score']``
        Novelty score (larger is more novel).
    ``adata.obs[key_added + '_pvalue']``, ``adata.obs[key_added + '_qvalue']``
        Conformal p-value and its Benjamini–Hochberg adjustment across ``adata``.
    ``adata.obs[key_added + '_nearest_type']``
        Reference type whose prototype is nearest.
    ``adata.obs[key_added + '_group']``
        With ``group=True``: candidate new type of each flagged cell (``novel_0``, ...), missing elsewhere.
    ``adata.uns['cellular'][key_added]``
        ``params`` and ``summary``: cell counts, the score threshold at ``alpha``, flagged cells per nearest type
        (DataFrame), the calibration set, ``score_weights`` (the weight of each part of the score; 0 for a part the
        model leaves out), and ``cellular_rule``: the original CELLULAR dataset-level verdict (smallest max
        class probability, rescaled so that a uniform guess is 0 and certainty 1, below 0.25 means "likely a
        novel type"); with ``group=True`` also ``groups`` (size, most common nearest type, marker genes).
    """
    alpha = check_alpha(alpha)
    check_model(model, classifier=True)
    batch_size = check_positive_int("batch_size", batch_size)
    n_markers = check_positive_int("n_markers", n_markers)
    min_group_size = check_positive_int("min_group_size", min_group_size)
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
        panel=panel,
        novelty=True,
        progress_bar=progress_bar,
    )
    probabilities = served.probabilities()
    frame, flags = novelty_flags(served, adata.obs_names, probabilities, alpha, fdr)

    adata.obs[key_added] = flags
    adata.obs[f"{key_added}_score"] = frame["score"].to_numpy()
    adata.obs[f"{key_added}_pvalue"] = frame["pvalue"].to_numpy()
    adata.obs[f"{key_added}_qvalue"] = frame["qvalue"].to_numpy()
    adata.obs[f"{key_added}_nearest_type"] = frame["nearest_type"].to_numpy()

    reference = served.novelty_reference
    n_types = probabilities.shape[1]
    rescaled = (probabilities.max(axis=1) - 1.0 / n_types) / (1.0 - 1.0 / n_types)
    smallest = float(rescaled.min()) if rescaled.size else float("nan")
    if fdr:  # the smallest flagged score; none is flagged above an infinite one
        threshold = float(frame["score"][flags].min()) if flags.any() else float("inf")
    else:
        threshold = reference.score_threshold(alpha)
    nearest_flagged = frame["nearest_type"][flags].value_counts()
    summary = {
        "n_cells": int(adata.n_obs),
        "n_novel": int(flags.sum()),
        "fraction_novel": float(flags.mean()) if flags.size else 0.0,
        "alpha": alpha,
        "fdr": bool(fdr),
        "score_threshold": threshold,
        "novel_per_nearest_type": pd.DataFrame(
            {"n_novel": nearest_flagged.to_numpy(dtype=np.int64)}, index=nearest_flagged.index.astype(str)
        ),
        "calibration_source": reference.calibration_source,
        "n_calibration_cells": int(reference.calibration_scores.size),
        "score_weights": reference.score_weights(),
        "cellular_rule": {
            "min_normalized_max_probability": smallest,
            "threshold": CELLULAR_RULE_THRESHOLD,
            "novel_type_suspected": bool(smallest < CELLULAR_RULE_THRESHOLD),
        },
    }
    record = {
        "params": {
            "alpha": alpha,
            "fdr": bool(fdr),
            "group": bool(group),
            "resolution": float(resolution),
            "min_group_size": int(min_group_size),
            "n_markers": int(n_markers),
            **served.record,
            "model": model_record(model),
        },
        "summary": summary,
    }
    if group:
        groups, record["groups"] = _candidate_groups(
            adata, served.model, served.z, flags, frame, resolution, min_group_size, n_markers, layer, log_normalized
        )
        adata.obs[f"{key_added}_group"] = groups
    package_uns(adata)[key_added] = record
    return adata if copy else None


MARKER_CELLS_PER_GROUP = 5_000
"""Markers of a group are ranked on at most this many of its cells and of the known cells (a fixed random sample):
the ranking reads only those rows, so its memory is bounded whatever the size of the query."""


def _candidate_groups(adata, model, z, flags, frame, resolution, min_group_size, n_markers, layer, log_normalized):
    import scanpy as sc

    names = np.full(adata.n_obs, None, dtype=object)
    flagged = np.flatnonzero(flags)
    if flagged.size == 0:
        return pd.Categorical(names), {}
    if flagged.size < max(min_group_size, 3):
        clusters = np.zeros(flagged.size, dtype=int)
    else:
        cells = ad.AnnData(obsm={"X_cellular": z[flagged]}, obs=pd.DataFrame(index=adata.obs_names[flagged]))
        sc.pp.neighbors(cells, n_neighbors=min(15, flagged.size - 1), use_rep="X_cellular", random_state=0)
        sc.tl.leiden(cells, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=0)
        clusters = cells.obs["leiden"].astype(int).to_numpy()
    names[flagged] = [f"novel_{c}" for c in clusters]
    categories = [f"novel_{c}" for c in np.unique(clusters)]
    groups = pd.Categorical(names, categories=categories)

    if layer == SAME_AS_TRAINING:
        layer = model.setup_args["layer"]
    if log_normalized is None:
        log_normalized = model.setup_args["log_normalized"]
    genes = [str(g) for g in adata.var_names]
    expression, _ = read_expression(
        adata, genes, layer=layer, log_normalized=log_normalized, target_sum=model.target_sum or 1e4
    )
    labels = pd.Categorical(np.where(flags, names, "known"), categories=[*categories, "known"])
    rows = rows_per_group(labels.codes, MARKER_CELLS_PER_GROUP)
    markers_data = ad.AnnData(
        X=expression.normalized_rows(rows), obs=pd.DataFrame({"group": labels[rows]}, index=adata.obs_names[rows])
    )
    markers_data.var_names = genes
    reference = "known" if (~flags).any() else "rest"
    testable = [c for c in categories if (labels == c).sum() >= 2]
    if reference == "rest" and len(categories) < 2:
        # Every cell flagged and one group: there is nothing to compare it with, so it gets no markers.
        logger.warning(
            "Every cell is flagged as novel and forms one group, so it has no other cells to rank marker genes "
            "against; its markers are left empty. Annotate it together with cells of known types to get markers."
        )
        testable = []
    summary = {}
    if testable:
        sc.tl.rank_genes_groups(markers_data, "group", groups=testable, reference=reference, method="wilcoxon")
        ranked = markers_data.uns["rank_genes_groups"]["names"]
    for category in categories:
        members = labels == category
        summary[category] = {
            "n_cells": int(members.sum()),
            "nearest_type": str(frame["nearest_type"][members].mode().iloc[0]),
            "markers": [str(g) for g in ranked[category][:n_markers]] if category in testable else [],
        }
    return groups, summary
