"""Helpers shared by the ``tl`` functions."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import pandas as pd
from anndata import AnnData

from cellular.data import HierarchicalPrediction, LabelHierarchy, align_genes, check_finite_embedding
from cellular.index import ReferenceIndex
from cellular.model import CELLULAR, PanelCalibration

logger = logging.getLogger(__name__)

PANEL_PATHS = ("auto", "direct", "refit")
# The rule of panel="auto", measured by benchmarks/panel_robustness.py (docs/usage.md, "Queries with fewer genes"):
# a query whose genes carry at least DIRECT_PREFERRED_SHARE of the reference's expression is served by the model
# itself; below that a model refitted on the shared genes maps better, and is used when the training data is
# attached; without it a mask-aware model serves the query directly down to DIRECT_MIN_SHARE, and below that
# (or for a model trained without panel masking) the query is refused with the fix.
DIRECT_PREFERRED_SHARE = 0.9
DIRECT_MIN_SHARE = 0.4
# The gene classifier's share of the label probabilities, averaged with the kNN vote (tl.cellular_map) or with the
# classifier head (tl.cellular_annotate): equal weights beat the vote alone and the head alone on every map pair of
# the field benchmark (benchmarks/annotation_blends.py).
DEFAULT_GENE_CLASSIFIER_WEIGHT = 0.5


@dataclass
class ServedQuery:
    """How a query was served: the model (and index) that read it, its embedding and its panel calibration."""

    model: CELLULAR
    z: np.ndarray
    record: dict
    index: ReferenceIndex | None = None
    calibration: PanelCalibration | None = None
    hidden: np.ndarray | None = None
    gene_logits: np.ndarray | None = None

    @property
    def classifier_temperature(self) -> float:
        if self.calibration is not None and self.calibration.classifier_temperature is not None:
            return self.calibration.classifier_temperature
        return self.model.calibration_temperature_

    @property
    def novelty_reference(self):
        if self.calibration is not None and self.calibration.novelty_reference is not None:
            return self.calibration.novelty_reference
        return self.model.novelty_reference_

    def probabilities(self) -> np.ndarray:
        """Calibrated classifier probabilities of the query cells."""
        return self.model.probabilities_from_embedding(self.z, temperature=self.classifier_temperature)

    def gene_classifier_probabilities(self) -> np.ndarray:
        """Calibrated gene-classifier probabilities of the query cells (under the query's panel when calibrated)."""
        temperature = None if self.calibration is None else self.calibration.gene_classifier_temperature
        return self.model.gene_classifier_probabilities_from_logits(self.gene_logits, temperature)


def requested_gene_classifier_weight(model: CELLULAR, weight: float | None) -> float:
    """The gene classifier's weight asked for: the default's when ``None`` (0 for a model without one); checked."""
    if weight is None:
        return DEFAULT_GENE_CLASSIFIER_WEIGHT if model.has_gene_classifier else 0.0
    if isinstance(weight, bool) or not (isinstance(weight, int | float) and 0.0 <= weight <= 1.0):
        raise ValueError(f"gene_classifier_weight must be a number in [0, 1], got {weight!r}.")
    if weight > 0:
        model.require_gene_classifier()
    return float(weight)


def serve_query(
    adata: AnnData,
    model: CELLULAR,
    *,
    use_rep: str | None,
    batch_size: int,
    layer,
    log_normalized: bool | None,
    gene_id_key: str | None,
    min_gene_overlap: float,
    panel: str = "auto",
    index: ReferenceIndex | None = None,
    transfer: dict | None = None,
    novelty: bool = False,
    gene_logits: bool = False,
    progress_bar: bool = False,
) -> ServedQuery:
    """Embed a query with the model, or with a model refitted on its genes, and calibrate for its gene panel.

    ``panel="auto"`` follows the rule above :data:`DIRECT_PREFERRED_SHARE`; ``"direct"`` and ``"refit"`` force one
    path (a refit is :meth:`~cellular.CELLULAR.restrict_to_genes`, cached on the model). A directly served query that
    lacks genes is calibrated under its panel (:meth:`~cellular.CELLULAR.calibrate_for_panel`). ``novelty=True``
    also keeps the cells' projections into the novelty score's spaces, ``gene_logits=True`` the gene classifier's
    logits (when the serving model has one).
    """
    if panel not in PANEL_PATHS:
        raise ValueError(f"panel must be one of {PANEL_PATHS}, got {panel!r}.")
    reading = {
        "batch_size": batch_size,
        "layer": layer,
        "log_normalized": log_normalized,
        "gene_id_key": gene_id_key,
        "progress_bar": progress_bar,
    }
    z = None if use_rep is None else _stored_embedding(adata, model, use_rep)
    alignment = align_genes(
        adata, model.gene_names_for(gene_id_key), gene_id_key=gene_id_key, min_gene_overlap=min_gene_overlap
    )
    present = alignment.present
    share = model.expression_share(present)
    record = {
        "use_rep": use_rep,
        "n_genes_matched": int(alignment.n_matched),
        "n_model_genes": len(model.genes),
        "expression_share": share,
    }
    path = panel
    if panel == "auto":
        path = _auto_path(model, present, share, alignment.n_matched)
    if z is not None:
        return _stored_query(model, adata, z, record, path, present, index, transfer, reading, novelty, gene_logits)
    record["panel_path"] = path
    if path == "refit" and not present.all():
        if index is not None:
            _check_reindexable(model, index)
        model.check_query_values(adata, layer=layer, log_normalized=log_normalized)
        served_model = model.restrict_to_genes(adata, gene_id_key=gene_id_key, progress_bar=progress_bar)
        _warn_missing(alignment, share, path)
        served_index = None if index is None else _restricted_index(served_model, model, index)
        embedded = served_model.embed_query(adata, **reading, with_gene_logits=gene_logits)
        record["n_refit_genes"] = len(served_model.genes)
        return ServedQuery(
            served_model, embedded.z, record, served_index, hidden=embedded.hidden, gene_logits=embedded.gene_logits
        )
    embedded = model.embed_query(adata, min_gene_overlap=min_gene_overlap, **reading, with_gene_logits=gene_logits)
    _warn_missing(alignment, share, path)
    calibration = _panel_calibration(model, present, index, transfer, record)
    return ServedQuery(model, embedded.z, record, index, calibration, embedded.hidden, embedded.gene_logits)


def _stored_query(model, adata, z, record, path, present, index, transfer, reading, novelty, gene_logits):
    """A query served by an embedding stored in ``obsm``: calibrated for its panel as a direct embedding is.

    A query that the rule serves with a refitted model cannot be served by the model's own stored embedding.
    """
    use_rep = record["use_rep"]
    if path == "refit" and not present.all():
        raise ValueError(
            f"The query measures {record['n_genes_matched']} of the model's {record['n_model_genes']} genes, "
            f"carrying {record['expression_share']:.0%} of the reference's expression: it is served by a model "
            f"refitted on its genes, which adata.obsm[{use_rep!r}] (the model's own embedding) is not. Pass "
            "use_rep=None to embed the cells with the refitted model, or panel='direct' to use the stored embedding."
        )
    record["panel_path"] = "stored"
    hidden = logits = None
    if novelty or gene_logits:
        embedded = model.embed_query(
            adata, min_gene_overlap=0.0, **reading, with_hidden=novelty, with_gene_logits=gene_logits
        )
        hidden, logits = embedded.hidden, embedded.gene_logits
    calibration = _panel_calibration(model, present, index, transfer, record)
    return ServedQuery(model, z, record, index, calibration, hidden, logits)


def _panel_calibration(model, present, index, transfer, record):
    """The model's calibration under the query's gene panel, recorded in ``record``.

    ``None`` when the query measures every model gene, or when the model cannot calibrate.
    """
    if present.all():
        return None
    calibration = model.calibrate_for_panel(present, index=index, **(transfer or {}))
    record["panel_calibrated"] = calibration is not None
    if calibration is not None:
        record["panel_calibration"] = dict(calibration.summary)
    return calibration


def _warn_missing(alignment, share: float, path: str) -> None:
    if alignment.missing:
        logger.warning(
            "%d of %d model genes are missing from the data (first missing: %s); the genes present carry %.0f%% of "
            "the reference's expression. Serving the query %s.",
            len(alignment.missing),
            alignment.n_genes,
            alignment.missing[:5],
            100 * share,
            "with a model refitted on the shared genes" if path == "refit" else "with the model itself",
        )


def refit_preferred(present: np.ndarray, share: float) -> bool:
    """Whether ``panel="auto"`` refits for a query lacking model genes (training data attached permitting).

    ``present`` marks the model genes the query has; ``share`` is the reference's expression they carry.
    """
    return not present.all() and share < DIRECT_PREFERRED_SHARE


def _auto_path(model: CELLULAR, present: np.ndarray, share: float, n_matched: int) -> str:
    if not refit_preferred(present, share):
        return "direct"
    if model.adata is not None:
        return "refit"
    if model.module.mask_aware and share >= DIRECT_MIN_SHARE:
        logger.warning(
            "The query's genes carry %.0f%% of the reference's expression; a model refitted on them would map it "
            "better. Attach the training data (CELLULAR.load(path, adata=reference) or --reference) to refit.",
            100 * share,
        )
        return "direct"
    floor = f"{DIRECT_MIN_SHARE:.0%}" if model.module.mask_aware else "100% (it was trained without panel masking)"
    raise ValueError(
        f"The query measures {n_matched} of the model's {len(model.genes)} genes, carrying {share:.0%} of the "
        f"reference's expression; without its training data this model serves queries down to {floor}. Attach the "
        "training data so the model is refitted on the shared genes (CELLULAR.load(path, adata=reference), or "
        "--reference on the command line), or pass panel='direct' to use the model as it is."
    )


def _check_reindexable(model: CELLULAR, index: ReferenceIndex) -> None:
    """A refitted model can re-index only the model's training data, with the index's label levels."""
    reference = model.adata
    same_cells = (
        reference is not None
        and index.n_cells == reference.n_obs
        and np.array_equal(np.asarray(index.cell_names, dtype=str), np.asarray(reference.obs_names, dtype=str))
    )
    if not same_cells or any(level not in reference.obs for level in index.label_levels):
        raise ValueError(
            "The query lacks too many of the model's genes to use the model directly, and its refit on the shared "
            "genes can only re-index the model's training data, but the reference index holds other cells or label "
            "levels. Build the index on the training data, or pass panel='direct'."
        )


def _restricted_index(restricted: CELLULAR, model: CELLULAR, index: ReferenceIndex) -> ReferenceIndex:
    """The reference index rebuilt with a refitted model, with ``index``'s label levels and search settings.

    Built once and kept by the refitted model, and built again when a later query asks for other levels or settings.
    """
    kept = restricted.reference_index_
    settings = (index.label_levels, index.unlabeled_category, index.backend, index.metric)
    if kept is None or (kept.label_levels, kept.unlabeled_category, kept.backend, kept.metric) != settings:
        restricted.build_reference_index(
            restricted.adata,  # the model's training data, less cells without counts over a narrow panel
            label_keys=index.label_levels,
            unlabeled_category=index.unlabeled_category,
            backend=index.backend,
            metric=index.metric,
        )
    return restricted.reference_index_


def _stored_embedding(adata: AnnData, model: CELLULAR, use_rep: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise KeyError(
            f"use_rep={use_rep!r} is not in adata.obsm (keys: {list(adata.obsm.keys())}); run "
            "cellular.tl.cellular_embed first or pass use_rep=None to embed the cells now."
        )
    z = check_finite_embedding(
        adata.obsm[use_rep], f"adata.obsm[{use_rep!r}]", "Pass use_rep=None to embed the cells with the model now."
    )
    if z.shape != (adata.n_obs, model.n_latent):
        raise ValueError(
            f"adata.obsm[{use_rep!r}] has shape {z.shape}, but the model embeds into {model.n_latent} dimensions; "
            "it was not made by this model. Pass use_rep=None to embed the cells now."
        )
    return z


def check_model(model: CELLULAR, *, classifier: bool) -> None:
    """A clear error unless ``model`` is a trained CELLULAR model (with its classifier head when needed)."""
    if not isinstance(model, CELLULAR):
        raise TypeError(f"model must be a trained cellular.CELLULAR, got {type(model).__name__}.")
    if classifier:
        model.require_classifier()
    else:
        model.require_trained()


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or a clear error when it is not a level in ``(0, 1)``."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1 (e.g. 0.05), got {alpha}.")
    return alpha


def check_positive_int(name: str, value) -> int:
    """``value`` as an int, or a clear error when it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def check_unknown_label(unknown_label) -> str:
    """``unknown_label``, or a clear error when it is not a non-empty string."""
    if not isinstance(unknown_label, str) or not unknown_label:
        raise ValueError(f"unknown_label must be a non-empty string (e.g. 'Unknown'), got {unknown_label!r}.")
    return unknown_label


def package_uns(adata: AnnData) -> dict:
    """The package's ``adata.uns['cellular']`` dictionary, created when missing."""
    uns = adata.uns.get("cellular")
    if uns is None:
        uns = adata.uns["cellular"] = {}
    return uns


def model_record(model: CELLULAR) -> dict:
    """What identifies the model that produced a result."""
    return {
        "package_version": version("cellular-sc"),
        "n_latent": model.n_latent,
        "n_genes": len(model.genes),
        "cell_types": list(model.cell_types),
        "labels_key": model.setup_args["labels_key"],
        "batch_key": model.setup_args["batch_key"],
    }


def write_annotation(
    adata: AnnData,
    key_added: str,
    probabilities: np.ndarray,
    unknown: np.ndarray,
    classes: list[str],
    unknown_label: str,
    params: dict,
    predicted: np.ndarray | None = None,
) -> None:
    """Write an annotation's slots: label (``unknown_label`` where ``unknown``), confidence, probabilities, ``uns``.

    ``predicted`` gives each cell's class code; the most probable class when ``None``. ``counts`` in ``uns`` holds,
    per label, the cells labelled so (``n_cells``), the cells whose likeliest type it is (``n_likeliest``) and how
    many of those were labelled ``unknown_label`` (``n_unknown``); a warning names the types that lost most of
    their cells to ``unknown_label``.
    """
    predicted = probabilities.argmax(axis=1) if predicted is None else predicted
    confidence = probabilities[np.arange(probabilities.shape[0]), predicted]
    codes = np.where(unknown, len(classes), predicted)
    adata.obs[key_added] = pd.Categorical.from_codes(codes, categories=[*classes, unknown_label])
    adata.obs[f"{key_added}_confidence"] = confidence.astype(np.float32)
    adata.obsm[f"{key_added}_probabilities"] = probabilities.astype(np.float32)
    n_likeliest = np.bincount(predicted, minlength=len(classes) + 1)
    n_unknown = np.bincount(predicted[unknown], minlength=len(classes) + 1)
    counts = pd.DataFrame(
        {"n_cells": np.bincount(codes, minlength=len(classes) + 1), "n_likeliest": n_likeliest, "n_unknown": n_unknown},
        index=pd.Index([*classes, unknown_label]),
    )
    package_uns(adata)[key_added] = {"params": params, "classes": classes, "counts": counts}
    warn_mostly_unknown(counts, key_added, unknown_label)


# A type loses "most" of its cells to the unknown label at this share, counted from this many cells.
MOSTLY_UNKNOWN_SHARE, MOSTLY_UNKNOWN_MIN_CELLS = 0.5, 5


def warn_mostly_unknown(counts: pd.DataFrame, key_added: str, unknown_label: str) -> None:
    """Log a warning naming the types most of whose likeliest cells were labelled ``unknown_label``."""
    lost = counts[
        (counts["n_likeliest"] >= MOSTLY_UNKNOWN_MIN_CELLS)
        & (counts["n_unknown"] >= MOSTLY_UNKNOWN_SHARE * counts["n_likeliest"])
    ]
    if lost.empty:
        return
    named = ", ".join(f"{name!r} ({row.n_unknown} of {row.n_likeliest})" for name, row in lost.iterrows())
    logger.warning(
        "Most cells whose likeliest type is %s are labelled %r (flagged as novel, or below min_confidence). A type "
        "with few reference cells is flagged this way even when the cells are of that type: check "
        "adata.obsm['%s_probabilities'] and adata.uns['cellular']['%s']['counts'], or pass novel_as_unknown=False "
        "(--no-novel-as-unknown on the command line) to keep every cell's likeliest type.",
        named,
        unknown_label,
        key_added,
        key_added,
    )


def write_hierarchy_levels(
    adata: AnnData,
    prefix: str,
    hierarchy: LabelHierarchy,
    prediction: HierarchicalPrediction,
    unknown: np.ndarray,
    unknown_label: str,
) -> dict:
    """Write one label column per hierarchy level and the deepest confident label; return their ``uns`` record.

    ``adata.obs[prefix + '_' + level]`` for each level (the top-down path), ``adata.obs[prefix + '_hierarchical']``
    (the deepest label with enough probability: the cell's type, or its class or lineage where the type is
    uncertain) and ``adata.obs[prefix + '_hierarchical_confidence']``. Cells in ``unknown`` get ``unknown_label``
    everywhere.
    """
    if unknown_label in hierarchy.nodes:
        raise ValueError(f"unknown_label={unknown_label!r} is a label of the hierarchy; pass another unknown_label.")
    nodes = np.asarray(hierarchy.nodes, dtype=object)
    for depth, level in enumerate(hierarchy.level_names):
        labels = np.where(unknown, unknown_label, nodes[prediction.path[:, depth]])
        adata.obs[f"{prefix}_{level}"] = _categorical(labels, nodes, unknown_label)
    deepest = np.where(unknown | (prediction.deepest < 0), unknown_label, nodes[np.maximum(prediction.deepest, 0)])
    adata.obs[f"{prefix}_hierarchical"] = _categorical(deepest, nodes, unknown_label)
    adata.obs[f"{prefix}_hierarchical_confidence"] = prediction.confidence.astype(np.float32)
    return {"levels": list(hierarchy.level_names), "parents": dict(hierarchy.parents)}


def _categorical(labels: np.ndarray, nodes: np.ndarray, unknown_label: str) -> pd.Categorical:
    used = set(labels.tolist())
    return pd.Categorical(labels, categories=[n for n in [*nodes, unknown_label] if n in used])
