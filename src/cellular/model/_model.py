"""The user-facing CELLULAR model."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField
from scvi.model.base import BaseModelClass

from cellular.data import LabelHierarchy, read_expression
from cellular.data._expression import get_matrix, mean_count_shares
from cellular.data._layout import GENE_LAYOUTS, LAYOUT_SAMPLE_CELLS, gene_grid_layout
from cellular.data._moments import BatchMoments
from cellular.index import ReferenceIndex
from cellular.module import CellularModule
from cellular.nn import ENCODERS, centroid_target_distances, check_encoder_hidden_sizes, inverse_frequency_weights
from cellular.pp import highly_variable_genes

from ._annotation import AnnotationMixin
from ._gene_classifier import GeneClassifierMixin
from ._inference import InferenceMixin
from ._io import SaveLoadMixin
from ._panels import PanelMixin
from ._prediction import PredictionMixin
from ._representations import RepresentationMixin
from ._setup import _as_string_categories, _check_label_counts, _check_obs_column, _label_levels
from ._targets import pca_centroids
from ._training import TrainingMixin

logger = logging.getLogger(__name__)

# Measured against the paper's (genes/2, genes/4): as good or better on every map pair, about twice as fast.
DEFAULT_MLP_WIDTHS = (256, 128)
# Highly variable genes a model reads when n_top_genes is None: half of the reference's genes, within these bounds.
MIN_DEFAULT_GENES, MAX_DEFAULT_GENES = 200, 2000


def default_n_top_genes(n_genes: int) -> int:
    """Highly variable genes chosen from ``n_genes`` by default: half of them, at least 200 and at most 2,000.

    Most references have tens of thousands of genes and get 2,000. One already cut to fewer than 4,000 keeps its
    more variable half, since the genes that barely vary add noise (benchmarks page, "Gene count").
    """
    return int(np.clip(n_genes // 2, MIN_DEFAULT_GENES, MAX_DEFAULT_GENES))


class CELLULAR(
    TrainingMixin,
    InferenceMixin,
    AnnotationMixin,
    PredictionMixin,
    RepresentationMixin,
    GeneClassifierMixin,
    PanelMixin,
    SaveLoadMixin,
    BaseModelClass,
):
    """CELLULAR: contrastive learning of a batch-corrected cell embedding from labelled scRNA-seq.

    An MLP encoder on log-normalised highly variable genes, trained with a class-weighted soft-nearest-neighbour
    loss on cell-type labels (learnable temperature), a batch term pulling cells of one type from different
    batches together, and a centroid term keeping the cell-type geometry of PCA space (Andrekson & Mercado 2024).

    The model owns its preprocessing: it records the genes it reads (``genes``) and the normalisation (each cell's
    counts over those genes scaled to ``target_sum``, then ``log1p``; none for log-normalised input), so any AnnData
    holding those genes, in any order and with any other genes beside them, is embedded identically. When a query
    lacks some of the genes, the library size is rescaled by the share of reference counts the present genes carry
    (``gene_count_fractions``) and the missing genes are zero.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Embedding dimension; 100 for the ``"mlp"`` encoder and 64 for ``"gene_grid"`` (Spoticell's fingerprint
        size) when ``None``.
    n_top_genes
        Number of highly variable genes chosen on ``adata`` (all expressed genes when fewer). When ``None``, half of
        ``adata``'s genes, at least 200 and at most 2,000: a reference already cut to fewer than 4,000 genes keeps
        its more variable half (benchmarks page, "Gene count").
    genes
        Use exactly these genes instead of choosing highly variable ones.
    dropout_rate
        Encoder dropout.
    target_sum
        Total count over the model's genes every cell is scaled to before ``log1p`` (counts input only); the median
        of that total over ``adata`` when ``None``.
    snn_weight, batch_weight, centroid_weight
        Weights of the supervised, batch and centroid loss terms.
    temperature_init, temperature_min, temperature_max
        Initial value and clamp range of the learnable temperature.
    batch_temperature
        Temperature of the batch term.
    use_class_weights
        Weight the supervised term by inverse type frequency and the batch term by inverse batch frequency; with
        ``False`` every type (batch) weighs alike, the weights again summing to one so the terms keep their scale.
    panel_masking
        Share of training cells shown only a random gene panel (a random subset or block of the genes, keeping
        between ``min_panel_fraction`` and all of them), with the encoder told which genes are absent. A model trained
        so (e.g. ``0.5``) serves queries that lack many of its genes directly, without its training data: absent
        genes are read as not measured instead of as zero expression. Off (``0``) by default: it costs 0.02-0.04
        leave-one-batch-out macro-F1 (benchmarks page, "Ablation"), and queries that lack genes are served better
        by a refit on the shared genes (:meth:`restrict_to_genes`).
    min_panel_fraction
        Smallest share of the genes a simulated panel keeps.
    depth_thinning
        Share of training cells whose counts are binomially thinned, simulating shallower sequencing (counts
        input only; off by default, as it did not improve leave-one-batch-out quality).
    min_depth_fraction
        Smallest expected share of counts a thinned cell keeps.
    match_batch_moments
        Match every batch's per-gene mean and standard deviation of log-normalised expression to those of the pooled
        training cells before the encoder reads them: each training batch in training, and each query batch when
        cells are embedded (by the ``batch_key`` column when the query has it, else all its cells as one batch;
        see :class:`cellular.data.BatchMoments`). This removes shifts of whole genes across technologies, labs and
        stimulations (reference mapping of interferon-stimulated PBMCs: +0.08 macro-F1; benchmarks page, "Batch
        moment matching"). A query batch is then embedded relative to its own cells: embed batches whole (at
        least 30 cells each). It costs novelty detection where an unseen type is a large share of a query batch:
        turn it off when finding unseen types is the aim.
    encoder
        ``"mlp"``: the paper's MLP encoder (:class:`cellular.nn.CellularEncoder`); ``"gene_grid"``: Spoticell's
        fingerprint encoder (:class:`cellular.nn.GeneGridEncoder`), which reads each cell as an image of its genes
        with a CNN and a transformer. Both train with the same loss and serve the index, novelty and annotation the
        same way; the gene-grid encoder is several times slower to train (benchmarks page, "Encoders").
    hidden_sizes
        Widths of the MLP encoder's two hidden layers: ``(256, 128)`` when ``None``, or ``"paper"`` for the paper's
        ``(genes/2, genes/4)``. The first layer is most of the training work; ``(256, 128)`` about halves the
        encoder's training time against the paper's widths and maps queries at least as well on the field benchmark
        (benchmarks page, "Time to a trained model" and "Ablation").
    gene_layout
        Where the gene-grid encoder places each gene (stored with the model): ``"coexpression"`` (co-expressed genes
        side by side, computed on up to 5,000 training cells) or ``"alphabetical"`` (Spoticell's). See
        :func:`cellular.data.gene_grid_layout`. Ignored by the MLP encoder.
    seed
        Seed of the weight initialisation (and default seed of :meth:`train`).

    Examples
    --------
    >>> cellular.CELLULAR.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    >>> model = cellular.CELLULAR(adata)
    >>> model.train()
    >>> adata.obsm["X_cellular"] = model.get_latent_representation()
    """

    def __init__(
        self,
        adata: AnnData,
        n_latent: int | None = None,
        n_top_genes: int | None = None,
        genes: list[str] | None = None,
        dropout_rate: float = 0.2,
        target_sum: float | None = None,
        snn_weight: float = 0.9,
        batch_weight: float = 0.1,
        centroid_weight: float = 1.0,
        temperature_init: float = 0.25,
        temperature_min: float = 0.1,
        temperature_max: float = 2.0,
        batch_temperature: float = 0.5,
        use_class_weights: bool = True,
        panel_masking: float = 0.0,
        min_panel_fraction: float = 0.1,
        depth_thinning: float = 0.0,
        min_depth_fraction: float = 0.25,
        encoder: str = "mlp",
        hidden_sizes: tuple[int, int] | str | None = None,
        gene_layout: str = "coexpression",
        match_batch_moments: bool = True,
        seed: int = 0,
    ):
        super().__init__(adata)
        self.init_params_ = self._get_init_params(locals())
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {encoder!r}.")
        hidden_sizes = _encoder_widths(encoder, hidden_sizes)
        if gene_layout not in GENE_LAYOUTS:
            raise ValueError(f"gene_layout must be one of {list(GENE_LAYOUTS)}, got {gene_layout!r}.")
        if n_latent is None:
            n_latent = 64 if encoder == "gene_grid" else 100
        if n_top_genes is None:
            n_top_genes = default_n_top_genes(adata.n_vars)
        if n_latent < 1 or n_top_genes < 1:
            raise ValueError(f"n_latent and n_top_genes must be positive, got {n_latent} and {n_top_genes}.")
        _check_augmentation(panel_masking, min_panel_fraction, "panel_masking", "min_panel_fraction")
        _check_augmentation(depth_thinning, min_depth_fraction, "depth_thinning", "min_depth_fraction")
        layer = self.adata_manager.registry["setup_args"]["layer"]
        log_normalized = self.adata_manager.registry["setup_args"]["log_normalized"]
        labels = self.registered_labels()
        batches = self.registered_batches()
        cell_types = self.cell_types
        _check_label_counts(labels, cell_types, self.adata_manager.registry["setup_args"]["labels_key"])

        all_genes = [str(g) for g in adata.var_names]
        values_checked = genes is None
        if genes is None:
            # Genes are chosen on every gene, each cell scaled to the median total count.
            everything, _ = read_expression(
                adata, all_genes, layer=layer, log_normalized=log_normalized, target_sum=None if log_normalized else 1.0
            )
            if not log_normalized:
                everything.size_factors *= float(np.median(1.0 / everything.size_factors))
            genes = highly_variable_genes(everything, all_genes, n_top_genes)
            del everything
        genes = [str(g) for g in genes]
        if len(genes) < 2:
            raise ValueError(f"Only {len(genes)} expressed genes in the data; CELLULAR needs at least two.")
        gene_index = pd.Index(all_genes).get_indexer(genes)
        if (gene_index < 0).any():
            unknown = [gene for gene, i in zip(genes, gene_index, strict=True) if i < 0]
            raise ValueError(f"genes not found in adata.var_names: {unknown[:10]}; pass genes present in the data.")
        self.genes: list[str] = genes
        gene_id_key = self.adata_manager.registry["setup_args"].get("gene_id_key")
        self.gene_ids: list[str] | None = (
            None if gene_id_key is None else [str(g) for g in adata.var[gene_id_key].to_numpy()[gene_index]]
        )
        # One read of the model's genes: with target_sum=1 the size factors are 1 / (total over the model's genes).
        expression, _ = read_expression(
            adata,
            genes,
            layer=layer,
            log_normalized=log_normalized,
            target_sum=None if log_normalized else 1.0,
            check_values=not values_checked,
        )
        self.gene_count_fractions: np.ndarray | None = None
        if log_normalized:
            target_sum = None
        else:
            inverse_library = expression.size_factors
            if target_sum is None:
                target_sum = float(np.median(1.0 / inverse_library))
            self.gene_count_fractions = mean_count_shares(expression)
            expression.size_factors = inverse_library * target_sum
        self.target_sum: float | None = target_sum
        self.reference_index_: ReferenceIndex | None = None
        grid_positions = None
        if encoder == "gene_grid":  # the layout reads co-expression in the log-normalised values themselves
            grid_positions = torch.from_numpy(_layout(expression, genes, gene_layout, seed))
        self.batch_moments_: BatchMoments | None = None
        if match_batch_moments:  # the PCA centroid targets, like the encoder, see the matched values
            self.batch_moments_ = BatchMoments.fit(expression, batches, labels, self.batches, len(cell_types))
            expression.standardization = self.batch_moments_.standardization_for(
                expression, np.asarray(self.batches, dtype=object)[batches]
            )

        centroids, present = pca_centroids(expression, labels, batches, len(cell_types), self.n_batches, n_latent, seed)
        del expression
        centroid_targets = centroid_target_distances(torch.from_numpy(centroids), torch.from_numpy(present))

        class_weights = batch_weights = None
        if use_class_weights:
            class_weights = inverse_frequency_weights(torch.from_numpy(labels), len(cell_types))
            batch_weights = inverse_frequency_weights(torch.from_numpy(batches), self.n_batches)

        self._module_kwargs = {
            "n_input": len(genes),
            "n_labels": len(cell_types),
            "n_batch": self.n_batches,
            "n_latent": n_latent,
            "dropout_rate": dropout_rate,
            "snn_weight": snn_weight,
            "batch_weight": batch_weight,
            "centroid_weight": centroid_weight,
            "temperature_init": temperature_init,
            "temperature_min": temperature_min,
            "temperature_max": temperature_max,
            "batch_temperature": batch_temperature,
            "panel_masking": panel_masking,
            "min_panel_fraction": min_panel_fraction,
            "encoder": encoder,
        }
        if hidden_sizes is not None:  # the paper's widths are recorded as absent, as in models saved before them
            self._module_kwargs["hidden_sizes"] = list(hidden_sizes)
        if encoder == "mlp":  # absent in models saved before it became an option: theirs had the affine parameters
            self._module_kwargs["input_norm_affine"] = False
        self.depth_thinning = {
            "probability": 0.0 if log_normalized else depth_thinning,
            "min_fraction": min_depth_fraction,
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = CellularModule(
                **self._module_kwargs,
                class_weights=class_weights,
                batch_weights=batch_weights,
                centroid_targets=centroid_targets,
                grid_positions=grid_positions,
            )
        self.seed = seed
        self._model_summary_string = self._summary()

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str | list[str],
        batch_key: str | None = None,
        layer: str | None = None,
        unlabeled_category: str = "Unknown",
        log_normalized: bool = False,
        gene_id_key: str | None = None,
        label_hierarchy: dict[str, str] | None = None,
        label_levels: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData for training.

        Parameters
        ----------
        adata
            Annotated data; ``X`` (or ``layer``) holds raw counts, or log1p-normalised values when
            ``log_normalized=True``. Cells are rows, genes columns.
        labels_key
            Column of ``adata.obs`` with cell-type labels; or a list of columns giving the labels at several levels,
            coarse to fine (e.g. ``["lineage", "cell_type"]``): the encoder trains on the last, the hierarchy is read
            from the columns (each label must sit under one label of the coarser column) and the classifier head
            predicts every level.
        batch_key
            Column of ``adata.obs`` with batches (technology, donor, ...); one batch when ``None``.
        layer
            Layer holding the expression; ``adata.X`` when ``None``.
        unlabeled_category
            Label value marking unlabelled cells; the supervised terms ignore them.
        log_normalized
            Whether the matrix already holds ``log1p`` of library-size normalised values; the model then applies
            no normalisation of its own.
        gene_id_key
            Column of ``adata.var`` with stable gene ids (e.g. Ensembl) to record for the model's genes, so queries
            can be matched on ids with ``gene_id_key=...`` when their gene symbols differ.
        label_hierarchy
            Parent map ``{child: parent}`` placing every cell type of ``labels_key`` in a hierarchy (e.g.
            :func:`cellular.data.lineage_map`); merged with the one read from a list of ``labels_key`` columns. The
            classifier head then trains with a hierarchical cross-entropy and predicts consistent labels at every
            level, backing off to the parent where the type is uncertain (:func:`cellular.tl.cellular_annotate`).
        label_levels
            Names of the hierarchy's levels, root first; the ``labels_key`` columns when a list is given, else
            ``level_0``, ``level_1``, ...
        **kwargs
            Passed on to :meth:`scvi.data.AnnDataManager.register_fields`.

        Notes
        -----
        As every scvi-tools model, this adds the columns ``_scvi_labels`` and ``_scvi_batch`` to ``adata.obs`` and
        the keys ``_scvi_uuid`` and ``_scvi_manager_uuid`` to ``adata.uns``. The ``labels_key`` and ``batch_key``
        columns are made categorical with string categories when they are not (integer labels become ``"0"``,
        ``"1"``, ...), and categories without cells (left by subsetting or relabelling) are removed, so no type
        without cells enters the model; both changes are logged and leave every cell's value as it was.
        """
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(
                f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); CELLULAR needs labelled cells "
                "with expressed genes. Check the filtering or subsetting that produced it."
            )
        if not adata.obs_names.is_unique:
            duplicated = adata.obs_names[adata.obs_names.duplicated()].unique()
            raise ValueError(
                f"adata.obs_names holds {len(duplicated)} duplicated cell names (e.g. {list(duplicated[:3])}); the "
                "model names the cells it indexes and calibrates on. Make them unique first: "
                "adata.obs_names_make_unique()."
            )
        labels_key, label_hierarchy, label_levels = _label_levels(
            adata, labels_key, label_hierarchy, label_levels, str(unlabeled_category)
        )
        if batch_key is not None:
            _check_obs_column(adata, batch_key, "batch_key")
            if batch_key == labels_key:
                raise ValueError(
                    f"labels_key and batch_key are both {labels_key!r}. The batch term pulls together cells of the "
                    "same type from different batches; with batches equal to types it has no such pairs and would be "
                    "silently disabled. Pass the column of batches (technology, donor, sample), or batch_key=None "
                    "for data from one batch."
                )
            _as_string_categories(adata, batch_key)
        _as_string_categories(adata, labels_key)
        unlabeled_category = str(unlabeled_category)  # the labels are strings now: -1 must match "-1"
        if gene_id_key is not None and gene_id_key not in adata.var:
            raise KeyError(
                f"gene_id_key={gene_id_key!r} is not a column of adata.var (columns: {list(adata.var.columns)})."
            )
        get_matrix(adata, layer)
        if label_hierarchy is not None:  # no new local variables here: scvi-tools records every local as a setting
            LabelHierarchy(
                label_hierarchy,
                [str(c) for c in adata.obs[labels_key].cat.categories if str(c) != unlabeled_category],
                label_levels,
            )
        setup_method_args = cls._get_setup_method_args(**locals())
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------- properties
    @property
    def cell_types(self) -> list[str]:
        """Known cell types, in code order (the unlabelled category excluded)."""
        state = self.registry_["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"]
        return [str(c) for c in state["categorical_mapping"][:-1]]

    @property
    def batches(self) -> list[str]:
        """Batch categories, in code order."""
        state = self.registry_["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
        return [str(c) for c in state["categorical_mapping"]]

    @property
    def n_batches(self) -> int:
        """Number of batches."""
        return len(self.batches)

    @property
    def n_latent(self) -> int:
        """Embedding dimension."""
        return self.module.n_latent

    @property
    def setup_args(self) -> dict:
        """Arguments given to :meth:`setup_anndata`."""
        return dict(self.registry_["setup_args"])

    @property
    def label_hierarchy(self) -> LabelHierarchy | None:
        """The hierarchy over :attr:`cell_types` registered with :meth:`setup_anndata`, or ``None``."""
        setup = self.setup_args
        if setup.get("label_hierarchy") is None:
            return None
        return LabelHierarchy(setup["label_hierarchy"], self.cell_types, setup.get("label_levels"))

    def registered_labels(self) -> np.ndarray:
        """Label codes of the registered cells, ``-1`` for unlabelled."""
        codes = np.asarray(self.get_from_registry(self.adata, REGISTRY_KEYS.LABELS_KEY)).reshape(-1).astype(np.int64)
        return np.where(codes < len(self.cell_types), codes, -1)

    def registered_batches(self) -> np.ndarray:
        """Batch codes of the registered cells."""
        return np.asarray(self.get_from_registry(self.adata, REGISTRY_KEYS.BATCH_KEY)).reshape(-1).astype(np.int64)

    def _summary(self) -> str:
        mode = (
            "log-normalised input"
            if self.setup_args["log_normalized"]
            else f"counts -> log1p(x / lib * {self.target_sum:.4g})"
        )
        state = "trained" if self.is_trained_ else "untrained"
        if self.has_classifier:
            state += ", with calibrated classifier"
        if self.has_gene_classifier:
            state += " and gene classifier"
        return (
            f"CELLULAR model ({state}): {self.module.encoder_name} encoder, {len(self.genes)} genes, "
            f"{self.module.n_latent} latent dims, "
            f"{len(self.cell_types)} cell types, {self.n_batches} batches; {mode}."
        )

    def __repr__(self) -> str:
        return self._summary()


def _encoder_widths(encoder: str, hidden_sizes) -> tuple[int, int] | None:
    """The MLP's hidden widths to build (``None``: the paper's), checked; ``None`` for encoders without them."""
    if isinstance(hidden_sizes, str):
        if hidden_sizes != "paper":
            raise ValueError(
                f'hidden_sizes must be two positive integers, "paper" or None, got {hidden_sizes!r}; pass e.g. '
                '(256, 128), "paper" for the paper\'s (genes/2, genes/4), or None for the default (256, 128).'
            )
        if encoder != "mlp":
            check_encoder_hidden_sizes(encoder, hidden_sizes)  # raises: only the mlp encoder has these widths
        return None
    if hidden_sizes is None and encoder == "mlp":
        hidden_sizes = DEFAULT_MLP_WIDTHS
    return check_encoder_hidden_sizes(encoder, hidden_sizes)


def _check_augmentation(probability: float, min_fraction: float, name: str, fraction_name: str) -> None:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"{name} is the share of training cells augmented and must lie in [0, 1], got {probability}.")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"{fraction_name} must lie in (0, 1], got {min_fraction}.")


def _layout(expression, genes: list[str], method: str, seed: int) -> np.ndarray:
    """The gene-grid layout, the co-expression one computed on a fixed sample of the training cells."""
    if method == "alphabetical":
        return gene_grid_layout(genes, "alphabetical")
    rng = np.random.default_rng(seed)
    n_sample = min(expression.n_cells, LAYOUT_SAMPLE_CELLS)
    sample = np.sort(rng.choice(expression.n_cells, n_sample, replace=False))
    return gene_grid_layout(genes, "coexpression", expression.rows(sample), seed=seed)
