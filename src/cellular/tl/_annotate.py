"""``tl.cellular_annotate``: calibrated cell-type labels from a CELLULAR model."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from cellular.index import ClassEvidence
from cellular.model import CELLULAR, SAME_AS_TRAINING

from ._common import (
    check_alpha,
    check_model,
    check_positive_int,
    check_unknown_label,
    model_record,
    package_uns,
    requested_gene_classifier_weight,
    serve_query,
    write_annotation,
    write_hierarchy_levels,
)
from ._novel import novelty_flags


def cellular_annotate(
    adata: AnnData,
    model: CELLULAR,
    *,
    key_added: str = "cellular_label",
    novel_as_unknown: bool = True,
    alpha: float = 0.05,
    fdr: bool = False,
    min_confidence: float = 0.0,
    unknown_label: str = "Unknown",
    hierarchy_threshold: float = 0.7,
    gene_classifier_weight: float | None = None,
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
    """Annotate cells with the model's calibrated classifiers.

    Each cell gets the reference type of highest calibrated probability, that probability as its confidence, and
    the full probability vector. The probabilities are the classifier head's (on the embedding) averaged with the
    gene classifier's (a logistic regression on the encoder's inputs), each calibrated on held-out reference cells
    (under the query's gene panel when it lacks genes). Cells that :func:`cellular.tl.novel_types` would flag at
    ``alpha`` (and cells below ``min_confidence``) are labelled ``unknown_label`` instead, so a type absent from the
    reference is not forced onto its nearest neighbour.

    Parameters
    ----------
    adata
        Cells to annotate (genes matched by name; no labels or batches needed).
    model
        A :class:`~cellular.CELLULAR` model with a trained classifier head.
    key_added
        Name of the label column; the other slots are derived from it.
    novel_as_unknown
        Label cells flagged as novel ``unknown_label``.
    alpha, fdr
        Novelty level and whether it controls the false discovery rate, as in :func:`cellular.tl.novel_types`.
    min_confidence
        Also label ``unknown_label`` every cell whose confidence is below this value.
    unknown_label
        Label of cells left unassigned; must not be one of the model's types.
    hierarchy_threshold
        For a model with a label hierarchy (``setup_anndata(..., labels_key=[...])`` or ``label_hierarchy=...``):
        the probability a label needs to be the cell's deepest confident label. A cell whose type is uncertain
        between two subtypes gets their parent ("T cell" rather than a wrong "CD8 T cell"). Above 0.5, so two
        siblings cannot both pass.
    gene_classifier_weight
        Weight of the model's gene classifier in the average with the head, in ``[0, 1]``; 0: the head alone.
        ``None``: 0.5 when the model has a gene classifier, else 0.
    use_rep
        Key of ``adata.obsm`` holding this model's embedding of ``adata``; the cells are embedded now when
        ``None``.
    batch_size, layer, log_normalized, gene_id_key, min_gene_overlap
        How to read and embed ``adata``, as in :meth:`~cellular.CELLULAR.get_latent_representation`.
    panel
        How a query lacking some of the model's genes is served: ``"auto"`` (the model itself, calibrated under the
        query's gene panel, when the query's genes carry enough of the reference's expression; else a model refitted
        on the shared genes), ``"direct"`` or ``"refit"``. See the user guide, "Queries with fewer genes".
    progress_bar
        Show a progress bar while embedding the cells (on stderr).
    copy
        Work on and return a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes:

    ``adata.obs[key_added]``
        Categorical label over the model's types plus ``unknown_label``.
    ``adata.obs[key_added + '_confidence']``
        Calibrated probability of the cell's type: the most probable type, or with a label hierarchy the type its
        top-down path ends at (also for cells labelled ``unknown_label``); ``min_confidence`` applies to it.
    ``adata.obsm[key_added + '_probabilities']``
        ``(n_cells, n_types)`` calibrated probabilities (the average above); column order in ``uns``.
    ``adata.uns['cellular'][key_added]``
        ``params`` (with ``gene_classifier_weight``, the weight used), ``classes`` (the probability columns) and
        ``counts`` (DataFrame per label: ``n_cells`` labelled so, ``n_likeliest`` whose type it is before cells are
        labelled ``unknown_label`` (the likeliest type; with a hierarchy, the path's type),
        ``n_unknown`` of those labelled ``unknown_label``; a warning names the types that lose most of their cells
        so); with a hierarchy also ``hierarchy`` (its ``levels`` and ``parents``).

    With a label hierarchy, the labels at every level follow one top-down path (the likeliest root, then its
    likeliest child, ...), so they never contradict the hierarchy; ``adata.obs[key_added]`` is the path's type and
    also written are:

    ``adata.obs[key_added + '_' + level]`` for each level name
        The path's label at that level.
    ``adata.obs[key_added + '_hierarchical']``
        The deepest label of the path with probability at least ``hierarchy_threshold`` (``unknown_label`` when not
        even the root is).
    ``adata.obs[key_added + '_hierarchical_confidence']``
        Its probability (the summed probability of the types below it).
    """
    if novel_as_unknown:
        alpha = check_alpha(alpha)
    for name, value in (("min_confidence", min_confidence), ("hierarchy_threshold", hierarchy_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}.")
    check_model(model, classifier=True)
    batch_size = check_positive_int("batch_size", batch_size)
    unknown_label = check_unknown_label(unknown_label)
    gene_classifier_weight = requested_gene_classifier_weight(model, gene_classifier_weight)
    classes = list(model.cell_types)
    if unknown_label in classes:
        raise ValueError(
            f"unknown_label={unknown_label!r} is one of the model's cell types; pass another unknown_label."
        )
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
        novelty=novel_as_unknown,
        gene_logits=gene_classifier_weight > 0,
        progress_bar=progress_bar,
    )
    head = served.probabilities()
    probabilities = head
    if gene_classifier_weight > 0:  # a refit on the query's genes keeps the model's gene classifier settings
        genes = ClassEvidence(served.gene_classifier_probabilities(), classes, gene_classifier_weight)
        probabilities = genes.blended(head, classes)
    hierarchy = model.label_hierarchy
    prediction = None if hierarchy is None else hierarchy.predict(probabilities, hierarchy_threshold)
    # The confidence written: of the likeliest type, or with a hierarchy of the type its top-down path ends at.
    predicted = probabilities.argmax(axis=1) if prediction is None else prediction.finest
    unknown = probabilities[np.arange(len(predicted)), predicted] < min_confidence
    if novel_as_unknown:
        # The novelty score's uncertainty part is the head's: its p-values were calibrated on the head's.
        _, flags = novelty_flags(served, adata.obs_names, head, alpha, fdr)
        unknown |= flags
    params = {
        "novel_as_unknown": bool(novel_as_unknown),
        "alpha": float(alpha),
        "fdr": bool(fdr),
        "min_confidence": float(min_confidence),
        "unknown_label": unknown_label,
        "calibration_temperature": float(served.classifier_temperature),
        "gene_classifier_weight": float(gene_classifier_weight),
        **served.record,
        "model": model_record(model),
    }
    if hierarchy is None:
        write_annotation(adata, key_added, probabilities, unknown, classes, unknown_label, params)
        return adata if copy else None
    params["hierarchy_threshold"] = float(hierarchy_threshold)
    record = write_hierarchy_levels(adata, key_added, hierarchy, prediction, unknown, unknown_label)
    write_annotation(
        adata, key_added, probabilities, unknown, classes, unknown_label, params, predicted=prediction.finest
    )
    package_uns(adata)[key_added]["hierarchy"] = record
    return adata if copy else None
