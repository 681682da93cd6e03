"""``tl.cellular_map``: map query cells onto a reference atlas and transfer its labels."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from cellular.data import LabelHierarchy, check_finite_embedding
from cellular.index import ClassEvidence, ReferenceIndex
from cellular.model import CELLULAR, SAME_AS_TRAINING

from ._common import (
    ServedQuery,
    check_model,
    check_positive_int,
    check_unknown_label,
    model_record,
    package_uns,
    requested_gene_classifier_weight,
    serve_query,
    write_hierarchy_levels,
)

logger = logging.getLogger(__name__)

_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# What calibrated a query's distance p-values when the model read its held-out cells under the query's gene panel.
UNDER_THE_PANEL = "held-out cells read under the query's gene panel"


def cellular_map(
    adata: AnnData,
    model: CELLULAR | None,
    index: ReferenceIndex | None = None,
    *,
    k: int = 15,
    key_added: str = "cellular",
    levels: list[str] | None = None,
    weighting: str = "distance",
    temperature: float | None = None,
    min_probability: float = 0.5,
    unknown_label: str = "Unknown",
    hierarchy_threshold: float = 0.7,
    use_rep: str | None = None,
    batch_size: int = 4096,
    layer: str | None = SAME_AS_TRAINING,
    log_normalized: bool | None = None,
    gene_id_key: str | None = None,
    min_gene_overlap: float = 0.0,
    panel: str = "auto",
    gene_classifier_weight: float | None = None,
    progress_bar: bool = False,
    copy: bool = False,
) -> AnnData | None:
    """Map query cells onto a reference atlas: embed them, find their reference neighbours, transfer labels.

    The query needs no labels or batches; its genes are matched to the model's by name (or id), in any order,
    with missing genes served as ``panel`` says (a warning says how many) and an error below ``min_gene_overlap``.
    Each label level of the index is transferred by a distance-weighted vote of the ``k`` nearest reference cells;
    for the model's own labels the vote is averaged with the model's gene classifier (a calibrated logistic
    regression on the genes the encoder reads), which maps queries from other labs better than either alone
    (benchmarks page, "Label transfer: kNN vote and gene classifier").

    Parameters
    ----------
    adata
        Query cells.
    model
        The trained :class:`~cellular.CELLULAR` model that embedded the reference; ``None`` to map an embedding made
        elsewhere (e.g. a language-model embedding from :func:`cellular.tl.lm_embed`): then ``use_rep`` names the
        query's embedding and ``index`` holds the reference embedded the same way
        (:meth:`cellular.ReferenceIndex.from_embedding`).
    index
        The reference index (:meth:`cellular.ReferenceIndex.build`); the model's ``reference_index_`` when ``None``.
    k
        Reference neighbours per query cell.
    key_added
        Prefix of every slot written.
    levels
        Label levels to transfer; all levels of the index when ``None``.
    weighting
        ``"distance"`` (weights ``exp(-distance / temperature)``) or ``"uniform"``.
    temperature
        Kernel width of the distance weights; the index's when ``None`` (the model's learned temperature for an
        index built from the model).
    min_probability
        Cells whose largest probability is below this value are labelled ``unknown_label``.
    unknown_label
        Label of unassigned cells.
    hierarchy_threshold
        For a model with a label hierarchy: the summed vote share a label needs to be the cell's deepest confident
        label (see below).
    use_rep
        Key of ``adata.obsm`` already holding this model's embedding of ``adata``; embedded now when ``None``.
    batch_size, layer, log_normalized, gene_id_key, min_gene_overlap
        How to read and embed ``adata``, as in :meth:`~cellular.CELLULAR.get_latent_representation`.
    panel
        How a query lacking some of the model's genes is served: ``"auto"`` (the model itself when the query's genes
        carry enough of the reference's expression, with vote shares calibrated on held-out reference cells read
        under the query's gene panel; else a model refitted on the shared genes, with the reference re-indexed),
        ``"direct"`` or ``"refit"``. See the user guide, "Queries with fewer genes".
    gene_classifier_weight
        Weight of the model's gene classifier in the transferred probabilities of the model's labels level (the
        vote gets the rest); other levels are transferred by the vote alone. ``None``: 0.5 for a model with a gene
        classifier whose cell types cover the index's classes of that level, else 0. ``0``: the vote alone.
    progress_bar
        Show a progress bar while embedding the cells (on stderr).
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes, for every label level ``L``:

    ``adata.obsm['X_' + key_added]``
        ``(n_cells, n_latent)`` query embedding.
    ``adata.obs[key_added + '_' + L]``
        Transferred label: the reference classes of ``L`` plus ``unknown_label`` (categorical).
    ``adata.obs[key_added + '_' + L + '_uncertainty']``
        ``1 -`` the largest probability (weighted vote share, averaged with the gene classifier for the model's
        labels).
    ``adata.obsm[key_added + '_' + L + '_probabilities']``
        ``(n_cells, n_classes)`` vote shares (for the model's labels, averaged with the gene classifier's
        probabilities); column order in ``uns``.
    ``adata.obs[key_added + '_distance']``
        Mean distance to the ``k`` reference neighbours (``1 - cos`` for the cosine metric).
    ``adata.obs[key_added + '_distance_pvalue']``
        Conformal p-value of that distance (small: the cell lies farther from the atlas than cells of its known
        types do), calibrated on the model's held-out reference cells embedded as a query when the index was built
        with them (:meth:`~cellular.ReferenceIndex.build` does so for a model trained with its classifier stage),
        else on reference cells' distances to the rest of the reference, which flags more of a new batch's known
        cells; for a query missing some of the model's genes and served by the model itself, on the held-out cells
        read under the query's panel. ``params['distance_calibration']`` records which.
    ``adata.obsm[key_added + '_neighbor_indices']``, ``adata.obsm[key_added + '_neighbor_distances']``
        ``(n_cells, k)`` reference row numbers (order of ``index.cell_names``, also where a refitted model served
        the query) and distances, nearest first.
    ``adata.obs[key_added + '_' + L + '_' + level]``, ``adata.obs[key_added + '_' + L + '_hierarchical']``
        For the model's labels level ``L`` when the model has a label hierarchy: the labels of each hierarchy level
        from the vote shares summed up the hierarchy (one consistent top-down path), and the deepest of them with a
        summed vote share of at least ``hierarchy_threshold`` (a cell whose neighbours split between CD4 and CD8 T
        cells gets "T cell"), with its share in ``..._hierarchical_confidence``.
    ``adata.uns['cellular'][key_added + '_map']``
        ``params`` (with ``gene_classifier_weight``, the weight used); ``levels`` (per level its ``classes`` and
        ``counts``, a DataFrame of cells per label);
        ``distance_summary`` (DataFrame of quantiles of the mean neighbour distance for the query and, as
        ``reference``, for the cells the distance p-values are calibrated on).
    """
    if not 0.0 <= hierarchy_threshold <= 1.0:
        raise ValueError(f"hierarchy_threshold must lie in [0, 1], got {hierarchy_threshold}.")
    batch_size = check_positive_int("batch_size", batch_size)
    unknown_label = check_unknown_label(unknown_label)
    gene_classifier_weight = _requested_weight(model, gene_classifier_weight)
    if model is None:
        index = _check_embedding_index(adata, index, use_rep)
    else:
        index = _check_model_index(model, index)
    if copy:
        adata = adata.copy()
    if model is None:
        z = check_finite_embedding(adata.obsm[use_rep], f"adata.obsm[{use_rep!r}]", "Recompute the embedding.")
        served = ServedQuery(None, z, {"use_rep": use_rep, "panel_path": "stored"}, index)
    else:
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
            index=index,
            transfer={"k": k, "weighting": weighting, "temperature": temperature},
            gene_logits=gene_classifier_weight > 0,
            progress_bar=progress_bar,
        )
    requested_index = index
    z, index = served.z, served.index
    vote_temperatures = None if served.calibration is None else served.calibration.vote_temperatures
    reference_distances, distance_calibration = None, index.calibration_source
    if served.calibration is not None and served.calibration.neighbor_distances is not None:
        reference_distances, distance_calibration = served.calibration.neighbor_distances, UNDER_THE_PANEL
    evidence = _gene_classifier_evidence(served, index, levels, gene_classifier_weight)
    transfer = index.transfer_labels(
        z,
        k=k,
        levels=levels,
        weighting=weighting,
        temperature=temperature,
        min_probability=min_probability,
        unknown_label=unknown_label,
        vote_temperatures=vote_temperatures,
        evidence=evidence,
        distance_calibration=reference_distances,
    )

    adata.obsm[f"X_{key_added}"] = z
    level_records = {}
    for level, labels in transfer.labels.items():
        adata.obs[f"{key_added}_{level}"] = labels
        adata.obs[f"{key_added}_{level}_uncertainty"] = transfer.uncertainty[level]
        adata.obsm[f"{key_added}_{level}_probabilities"] = transfer.probabilities[level]
        level_records[level] = {
            "classes": transfer.classes[level],
            "counts": pd.DataFrame(
                {"n_cells": np.bincount(labels.codes, minlength=len(labels.categories))},
                index=pd.Index([str(c) for c in labels.categories]),
            ),
        }
    hierarchy = None if model is None else model.label_hierarchy
    finest = None if model is None else model.setup_args["labels_key"]
    if hierarchy is not None and finest in transfer.labels:
        names = hierarchy.level_names
        hierarchy = LabelHierarchy(hierarchy.parents, transfer.classes[finest])
        if hierarchy.n_levels == len(names):  # the index's types may span fewer levels than the model's
            hierarchy = LabelHierarchy(hierarchy.parents, transfer.classes[finest], names)
        prediction = hierarchy.predict(transfer.probabilities[finest], hierarchy_threshold)
        unknown = np.zeros(adata.n_obs, dtype=bool)
        level_records[finest]["hierarchy"] = write_hierarchy_levels(
            adata, f"{key_added}_{finest}", hierarchy, prediction, unknown, unknown_label
        )
    adata.obs[f"{key_added}_distance"] = transfer.mean_distance.astype(np.float32)
    adata.obs[f"{key_added}_distance_pvalue"] = transfer.distance_pvalue.astype(np.float32)
    adata.obsm[f"{key_added}_neighbor_indices"] = _rows_of(requested_index, index, transfer.indices)
    adata.obsm[f"{key_added}_neighbor_distances"] = transfer.distances
    if reference_distances is None:
        reference_distances = index.reference_mean_distances(k)
    package_uns(adata)[f"{key_added}_map"] = {
        "params": {
            "k": int(k),
            "levels": list(transfer.labels),
            "weighting": weighting,
            "temperature": float(index.temperature if temperature is None else temperature),
            "min_probability": float(min_probability),
            "unknown_label": unknown_label,
            "hierarchy_threshold": float(hierarchy_threshold),
            "metric": index.metric,
            "backend": index.backend,
            "n_reference_cells": int(index.n_cells),
            "index_fingerprint": index.model_fingerprint,
            "distance_calibration": distance_calibration,
            "vote_temperatures": dict(vote_temperatures or {}),
            "gene_classifier_weight": float(next(iter(evidence.values())).weight) if evidence else 0.0,
            **served.record,
            **({} if model is None else {"model": model_record(model)}),
        },
        "levels": level_records,
        "distance_summary": pd.DataFrame(
            {
                "query": np.quantile(transfer.mean_distance, _QUANTILES),
                "reference": np.quantile(reference_distances, _QUANTILES),
            },
            index=pd.Index([f"q{int(q * 100):02d}" for q in _QUANTILES], name="quantile"),
        ),
    }
    return adata if copy else None


def _rows_of(requested: ReferenceIndex, served: ReferenceIndex, rows: np.ndarray) -> np.ndarray:
    """Rows of the ``served`` index as rows of the ``requested`` one.

    A refitted model's index holds the requested index's cells, less any without counts over the query's genes.
    """
    if served is requested:
        return rows
    positions = pd.Index(np.asarray(requested.cell_names, dtype=str)).get_indexer(
        np.asarray(served.cell_names, dtype=str)
    )
    return positions[rows]


def _requested_weight(model: CELLULAR | None, weight: float | None) -> float:
    """The gene classifier's weight asked for: the default's when ``None``; checked."""
    if model is None:
        if weight:
            raise ValueError(
                "gene_classifier_weight needs a model: without one there is no gene classifier to average with the "
                "vote. Pass the model, or leave gene_classifier_weight unset."
            )
        return 0.0
    return requested_gene_classifier_weight(model, weight)


def _gene_classifier_evidence(
    served: ServedQuery, index: ReferenceIndex, levels: list[str] | None, weight: float
) -> dict[str, ClassEvidence] | None:
    """The serving model's gene classifier as evidence for its labels level, when asked for and usable."""
    if served.model is None or served.gene_logits is None:
        return None
    level = served.model.setup_args["labels_key"]
    if weight == 0 or level not in index.labels or (levels is not None and level not in levels):
        return None
    classes = [str(c) for c in index.labels[level].categories]
    uncovered = sorted(set(classes) - set(served.model.cell_types))
    if uncovered:
        logger.info(
            "The index's %r classes %s are not the model's cell types; %r is transferred by the vote alone.",
            level,
            uncovered[:5],
            level,
        )
        return None
    return {level: ClassEvidence(served.gene_classifier_probabilities(), served.model.cell_types, weight)}


def _check_model_index(model: CELLULAR, index: ReferenceIndex | None) -> ReferenceIndex:
    check_model(model, classifier=False)
    if index is None:
        index = getattr(model, "reference_index_", None)
        if index is None:
            raise ValueError(
                "No reference index: pass index=..., or build one with model.build_reference_index(adata_ref) "
                "(or cellular.ReferenceIndex.build(model, adata_ref))."
            )
    _check_index(index)
    if index.n_latent != model.n_latent:
        raise ValueError(
            f"The index holds a {index.n_latent}-dimensional embedding but the model embeds into {model.n_latent} "
            "dimensions; build the index with this model."
        )
    if index.model_fingerprint is None:
        raise ValueError(
            "The reference index carries no model fingerprint: it was made from an embedding "
            "(ReferenceIndex.from_embedding), so nothing shows that this model embedded the reference. Build the index "
            "with the model (model.build_reference_index(adata_ref)), or map without a model: "
            "cellular.tl.cellular_map(adata, None, index, use_rep=...)."
        )
    if index.model_fingerprint != model.fingerprint:
        raise ValueError(
            "The reference index was built with a different model (its fingerprint does not match): query and "
            "reference embeddings would not be comparable. Build the index with this model "
            "(model.build_reference_index(adata_ref)) or use the model that built it."
        )
    return index


def _check_embedding_index(adata: AnnData, index: ReferenceIndex | None, use_rep: str | None) -> ReferenceIndex:
    """Mapping without a model: the query's embedding and an index of the reference embedded the same way."""
    if index is None or use_rep is None:
        raise ValueError(
            "Without a model, pass use_rep= (the adata.obsm key of the query's embedding, e.g. 'X_cellama') and "
            "index= (the reference embedded the same way: cellular.ReferenceIndex.from_embedding(reference.obsm[...], "
            "labels))."
        )
    _check_index(index)
    if use_rep not in adata.obsm:
        raise KeyError(f"use_rep={use_rep!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}).")
    shape = adata.obsm[use_rep].shape
    if shape != (adata.n_obs, index.n_latent):
        raise ValueError(
            f"adata.obsm[{use_rep!r}] has shape {shape}, but the index holds a {index.n_latent}-dimensional "
            "embedding; embed the query and the reference with the same embedder."
        )
    return index


def _check_index(index) -> None:
    if not isinstance(index, ReferenceIndex):
        raise TypeError(f"index must be a cellular.ReferenceIndex, got {type(index).__name__}.")
    if not index.labels:
        raise ValueError("The reference index has no label levels to transfer; build it with label_keys=[...].")


def join_reference_query(
    adata: AnnData,
    index: ReferenceIndex,
    *,
    key_added: str = "cellular",
    source_key: str = "dataset",
    max_reference_cells: int | None = None,
    seed: int = 0,
) -> AnnData:
    """Reference and mapped query cells in one AnnData, for a joint UMAP or plot.

    Run :func:`cellular_map` on ``adata`` first. Expression is not copied: the result holds the joint embedding and
    labels only, so it stays small for atlases of millions of cells.

    Parameters
    ----------
    adata
        Query cells mapped with :func:`cellular_map` (``key_added`` as there).
    index
        The reference index they were mapped onto.
    key_added
        ``key_added`` of :func:`cellular_map`.
    source_key
        Name of the ``obs`` column telling reference from query cells.
    max_reference_cells
        Keep at most this many reference cells (a uniform random sample); all when ``None``.
    seed
        Seed of that sample.

    Returns
    -------
    AnnData with no genes, reference cells first, and

    ``obsm['X_' + key_added]``
        Joint embedding.
    ``obs[source_key]``
        ``"reference"`` or ``"query"`` (categorical).
    ``obs[L]`` for every transferred label level ``L``
        Reference labels for reference cells (``index.unlabeled_category`` where unlabelled), transferred labels
        for query cells.
    """
    record = adata.uns.get("cellular", {}).get(f"{key_added}_map")
    embedding_key = f"X_{key_added}"
    if record is None or embedding_key not in adata.obsm:
        raise KeyError(
            f"adata holds no mapping under key_added={key_added!r}; run cellular.tl.cellular_map(adata, model, "
            f"index, key_added={key_added!r}) first."
        )
    if adata.obsm[embedding_key].shape[1] != index.n_latent:
        raise ValueError(f"adata.obsm[{embedding_key!r}] does not match the index's {index.n_latent} dimensions.")
    mapped_onto = record["params"].get("index_fingerprint")
    if mapped_onto is not None and index.model_fingerprint is not None and mapped_onto != index.model_fingerprint:
        if record["params"].get("panel_path") == "refit":
            why = "the query lacks some of the model's genes and was mapped by a model refitted on its genes"
            how = " (model.restrict_to_genes(adata).reference_index_)"
        else:
            why, how = "it was mapped onto an index built with another model", ""
        raise ValueError(
            f"adata.obsm[{embedding_key!r}] is not in this index's embedding: {why}. Join it with the index it was "
            f"mapped onto{how}, or map it again onto this index."
        )
    reference_rows = np.arange(index.n_cells)
    if max_reference_cells is not None and max_reference_cells < index.n_cells:
        rng = np.random.default_rng(seed)
        reference_rows = np.sort(rng.choice(index.n_cells, max_reference_cells, replace=False))
    n_reference = reference_rows.size
    obs = pd.DataFrame(
        {source_key: pd.Categorical(["reference"] * n_reference + ["query"] * adata.n_obs, ["reference", "query"])},
        index=pd.Index([*index.cell_names[reference_rows], *adata.obs_names.astype(str)]),
    )
    for level in record["params"]["levels"]:
        reference_labels = pd.Series(index.labels[level][reference_rows]).astype(object)
        reference_labels = reference_labels.fillna(index.unlabeled_category).astype(str).to_numpy()
        query_labels = adata.obs[f"{key_added}_{level}"].astype(str).to_numpy()
        obs[level] = pd.Categorical(np.concatenate([reference_labels, query_labels]))
    embedding = np.vstack([index.embedding[reference_rows], np.asarray(adata.obsm[embedding_key], dtype=np.float32)])
    joint = AnnData(obs=obs, obsm={embedding_key: embedding})
    if not joint.obs_names.is_unique:
        joint.obs_names_make_unique()
    return joint
