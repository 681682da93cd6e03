"""The user-facing CELLULAR model."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from tqdm.auto import tqdm

from cellular.data import LabelHierarchy, ancestors, hierarchy_from_columns, read_expression, sequential_minibatches
from cellular.data._expression import GeneAlignment, get_matrix
from cellular.data._layout import GENE_LAYOUTS, LAYOUT_SAMPLE_CELLS, gene_grid_layout
from cellular.data._moments import BatchMoments
from cellular.dataloaders import CellularDataModule
from cellular.index import ReferenceIndex
from cellular.module import CellularModule
from cellular.nn import ENCODERS, centroid_target_distances, check_encoder_hidden_sizes, inverse_frequency_weights
from cellular.pp import highly_variable_genes
from cellular.train import CellularTrainingPlan, EpochProgressBar, RestoreBestWeights, quiet_lightning

from ._annotation import AnnotationMixin
from ._common import SAME_AS_TRAINING, NotTrainedError
from ._device import resolve_device
from ._gene_classifier import GeneClassifierMixin
from ._io import SaveLoadMixin
from ._moments import REGISTERED_BATCHES, batch_names_of
from ._panels import PanelMixin
from ._targets import pca_centroids

logger = logging.getLogger(__name__)

# Query cells with a novelty p-value at most this are left out of their batch's moments and composition.
MOMENT_NOVELTY_ALPHA = 0.05
# Measured against the paper's (genes/2, genes/4): as good or better on every map pair, about twice as fast.
DEFAULT_MLP_WIDTHS = (256, 128)
# Smallest validation-loss decrease early stopping counts for a model that matches batch moments (0 for one that
# does not): measured on the field benchmark's small references, same quality in about 60 % of the time.
DEFAULT_MIN_DELTA = 0.005
# Default length of encoder training: about this many optimiser steps, within the epoch bounds below.
DEFAULT_TRAINING_STEPS = 2000
MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS = 30, 400


def default_max_epochs(n_train_cells: int, batch_size: int, steps: int = DEFAULT_TRAINING_STEPS) -> int:
    """Epochs that give about ``steps`` optimiser steps over ``n_train_cells`` cells, within the default bounds."""
    steps_per_epoch = max(1, math.ceil(n_train_cells / batch_size))
    return int(np.clip(math.ceil(steps / steps_per_epoch), MIN_DEFAULT_EPOCHS, MAX_DEFAULT_EPOCHS))


# Highly variable genes a model reads when n_top_genes is None: half of the reference's genes, within these bounds.
MIN_DEFAULT_GENES, MAX_DEFAULT_GENES = 200, 2000


def default_n_top_genes(n_genes: int) -> int:
    """Highly variable genes chosen from ``n_genes`` by default: half of them, at least 200 and at most 2,000.

    Most references have tens of thousands of genes and get 2,000. One already cut to fewer than 4,000 keeps its
    more variable half, since the genes that barely vary add noise (benchmarks page, "Gene count").
    """
    return int(np.clip(n_genes // 2, MIN_DEFAULT_GENES, MAX_DEFAULT_GENES))


@dataclass
class QueryEmbedding:
    """What :meth:`CELLULAR.embed_query` returns."""

    z: np.ndarray
    hidden: np.ndarray | None
    alignment: GeneAlignment
    gene_logits: np.ndarray | None = None


class CELLULAR(AnnotationMixin, GeneClassifierMixin, PanelMixin, SaveLoadMixin, BaseModelClass):
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
        Weight the supervised term by inverse type frequency and the batch term by inverse batch frequency.
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
            self.gene_count_fractions = _mean_count_shares(expression)
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

    # --------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        train_size: float = 0.9,
        early_stopping: bool = True,
        early_stopping_patience: int = 20,
        early_stopping_min_delta: float | None = None,
        warmup_epochs: int = 4,
        balanced_sampling: bool = True,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
        classifier: bool = True,
        classifier_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the encoder with the CELLULAR loss, then the classifier head.

        Runs on scvi-tools' training machinery (:class:`scvi.train.TrainRunner`, a Lightning ``Trainer``) with
        :class:`cellular.train.CellularTrainingPlan` and :class:`cellular.dataloaders.CellularDataModule`: Adam
        with a linear warm-up and cosine decay of the learning rate, a stratified validation split, early stopping
        on the validation loss with the weights of the best epoch restored, scvi-tools' ``history`` and progress
        bar. ``devices=N`` with ``strategy="ddp"`` trains on ``N`` devices; the contrastive terms then see the
        global minibatch gathered from every device (see the training page of the documentation).

        Parameters
        ----------
        max_epochs
            Number of passes over the training cells; by default enough for about 2,000 optimiser steps, between
            30 and 400 epochs.
        batch_size
            Cells per minibatch.
        lr
            Peak learning rate.
        weight_decay
            Adam weight decay (the paper used 5e-5; 1e-3 generalised better to held-out technologies in our
            leave-one-batch-out runs, see the benchmarks page).
        train_size
            Fraction of cells used for training; the rest (stratified by label) gives the validation loss.
        early_stopping
            Stop when the validation loss has not improved for ``early_stopping_patience`` epochs.
        early_stopping_patience
            Epochs without improvement before stopping.
        early_stopping_min_delta
            Smallest decrease of the validation loss that counts as an improvement. By default 0.005 for a model
            that matches batch moments: on small references the loss keeps creeping down long after the labels
            have stopped changing, and ignoring such decreases stops those runs sooner at the same quality
            (benchmarks page, "Time to a trained model"). 0 for a model that does not (``match_batch_moments=False``):
            it needs that long tail of training to read a new batch's known cells as known.
        warmup_epochs
            Epochs of linear learning-rate warm-up.
        balanced_sampling
            Draw minibatch cells (with replacement) with probability inversely proportional to their type's
            frequency, so rare types appear in every minibatch; ``False`` gives plain shuffled epochs as in the
            paper.
        accelerator, devices
            Where to train (scvi-tools convention): ``accelerator="auto"`` uses a GPU when one is available;
            ``devices`` may name several devices for distributed training (with ``strategy``).
        seed
            Seed of the split, minibatch order and dropout; the model's ``seed`` when ``None``. The same seed gives
            the same model on CPU.
        progress_bar
            Show a progress bar over epochs.
        classifier
            Also train and calibrate the cell-type classifier head and the gene classifier (:meth:`train_classifier`),
            needed by :meth:`predict`, :func:`cellular.tl.cellular_annotate` and :func:`cellular.tl.novel_types`;
            :func:`cellular.tl.cellular_map` averages the gene classifier with its kNN vote.
        classifier_kwargs
            Arguments of :meth:`train_classifier`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (and on to Lightning's ``Trainer``): e.g. ``strategy="ddp"``,
            ``callbacks=[...]``, ``logger=...``, ``precision=...``. Under a distributed strategy scvi-tools turns
            early stopping off; the best epoch's weights are still restored when a validation split exists.
        """
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 for contrastive training, got {batch_size}.")
        if early_stopping_min_delta is None:
            early_stopping_min_delta = 0.0 if self.batch_moments_ is None else DEFAULT_MIN_DELTA
        elif not (math.isfinite(early_stopping_min_delta) and early_stopping_min_delta >= 0):
            raise ValueError(
                f"early_stopping_min_delta must be a finite number of at least 0, got {early_stopping_min_delta}; "
                "leave it unset for the default."
            )
        train_params = {
            key: value
            for key, value in locals().items()
            if key not in ("self", "progress_bar", "classifier", "classifier_kwargs", "trainer_kwargs")
        }
        if self.adata is None:
            raise ValueError("This model has no training data attached; load it with CELLULAR.load(path, adata=...).")
        seed = self.seed if seed is None else seed

        setup = self.setup_args
        expression, _ = read_expression(
            self.adata,
            self.genes,
            layer=setup["layer"],
            log_normalized=setup["log_normalized"],
            target_sum=self.target_sum,
            gene_count_fractions=self.gene_count_fractions,
        )
        self._standardize(expression, self.adata, None, REGISTERED_BATCHES)
        data_module = CellularDataModule(
            expression,
            self.registered_labels(),
            self.registered_batches(),
            train_size=train_size,
            batch_size=batch_size,
            seed=seed,
            balanced_sampling=balanced_sampling,
            thinning_probability=self.depth_thinning["probability"],
            thinning_min_fraction=self.depth_thinning["min_fraction"],
        )
        if not data_module.has_validation and early_stopping:
            logger.warning("No validation cells (train_size=%s): early stopping is off.", train_size)
            early_stopping = False

        steps_per_epoch = max(1, math.ceil(data_module.n_train / batch_size))
        if max_epochs is None:
            max_epochs = default_max_epochs(data_module.n_train, batch_size)
        total_steps = max_epochs * steps_per_epoch
        training_plan = CellularTrainingPlan(
            self.module,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=min(warmup_epochs * steps_per_epoch, total_steps // 2),
            total_steps=total_steps,
        )
        best_weights = RestoreBestWeights("validation_loss", early_stopping_min_delta)
        trainer_kwargs = {
            "early_stopping": early_stopping,
            "early_stopping_monitor": "validation_loss",
            "early_stopping_patience": early_stopping_patience,
            "early_stopping_min_delta": early_stopping_min_delta,
            "check_val_every_n_epoch": 1 if data_module.has_validation else None,
            "limit_val_batches": None if data_module.has_validation else 0,
            "enable_progress_bar": progress_bar,
            "simple_progress_bar": False,
            "use_distributed_sampler": False,
            "callbacks": [
                *trainer_kwargs.pop("callbacks", []),
                *([best_weights] if early_stopping else []),
                *([EpochProgressBar("Training CELLULAR")] if progress_bar else []),
            ],
            **trainer_kwargs,
        }
        trainer_kwargs = {key: value for key, value in trainer_kwargs.items() if value is not None}
        # A new training run starts a new history (scvi-tools would append to it) and makes refitted models stale.
        self.history_, self.is_trained_ = None, False
        self._restricted_models = {}
        with quiet_lightning(quiet_stdout=not progress_bar), torch.random.fork_rng(devices=[]):
            runner = TrainRunner(
                self,
                training_plan=training_plan,
                data_splitter=data_module,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                **trainer_kwargs,
            )
            torch.manual_seed(seed)
            runner()
        self.module.eval()
        self.history_ = _history_frames({**(self.history_ or {}), **_epoch_frames(training_plan.epoch_history)})
        broken = self.non_finite_weights()
        losses = [self.history_[key].to_numpy() for key in ("train_loss", "validation_loss") if key in self.history_]
        # Diverged: the weights are not finite, or no epoch ended with a finite loss (early stopping restores the
        # best epoch's weights, so NaN in later epochs alone leaves a usable model).
        if broken or any(values.size and not np.isfinite(values).any() for values in losses):
            raise ValueError(
                f"Training diverged: the loss became NaN or infinite (weights not finite: {broken or 'none'}). "
                "Train again with a lower learning rate (lr=...) or stronger weight decay; check the input for extreme "
                "values."
            )

        self.train_indices_, self.validation_indices_ = data_module.train_idx, data_module.val_idx
        self.test_indices_ = data_module.test_idx
        history = self.history_
        epochs_run = len(history["train_loss"]) if "train_loss" in history else 0
        validation = history["validation_loss"]["validation_loss"] if "validation_loss" in history else None
        has_validation = validation is not None and len(validation) > 0
        if best_weights.best_epoch >= 0:
            best_epoch = best_weights.best_epoch
        elif has_validation:
            best_epoch = int(validation.idxmin())
        else:
            best_epoch = epochs_run - 1
        best_loss = float(validation.min()) if has_validation else None
        self.training_summary_ = {
            "epochs_run": epochs_run,
            "max_epochs": max_epochs,
            "best_epoch": int(best_epoch),
            "best_validation_loss": best_loss,
            "batch_size": batch_size,
            "device": str(runner.device),
            "devices": runner.lightning_devices
            if isinstance(runner.lightning_devices, int | str)
            else list(runner.lightning_devices),
            "strategy": str(trainer_kwargs.get("strategy", "auto")),
            "seed": seed,
        }
        self.is_trained_ = True
        self.train_params_ = train_params
        if self.reference_index_ is not None:
            logger.info("Retraining invalidates the model's reference index; build it again.")
        self.reference_index_ = None
        self.classifier_ = None
        self.calibration_cells_ = None
        self.gene_classifier_ = None
        if classifier:
            self.train_classifier(
                **{"accelerator": accelerator, "devices": devices, "seed": seed, **(classifier_kwargs or {})}
            )
        self._model_summary_string = self._summary()

    # -------------------------------------------------------------- inference
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        *,
        batch_size: int = 4096,
        layer: str | None = SAME_AS_TRAINING,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.5,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
        progress_bar: bool = False,
    ) -> np.ndarray:
        """Embed cells with the trained encoder.

        ``adata`` needs no labels or batches and is not modified. Genes are matched by name in any order; extra
        genes are ignored; missing model genes are masked as not measured by a panel-robust model (trained with
        ``panel_masking > 0``), set to zero after normalisation otherwise, with a warning.

        Parameters
        ----------
        adata
            Cells to embed; the training data when ``None``.
        batch_size
            Cells per inference minibatch.
        layer
            Layer holding the expression; by default the layer used in training (``None`` reads ``adata.X``).
        log_normalized
            Whether the matrix holds log1p-normalised values; as in training when ``None``. Log-normalised data
            must have been scaled to the model's ``target_sum`` (see :func:`cellular.pp.normalize_log1p`).
        gene_id_key
            Match genes on this column of ``adata.var`` instead of ``var_names``: against the model's gene ids when
            it recorded them (``setup_anndata(..., gene_id_key=...)``), else against its gene names.
        min_gene_overlap
            Smallest fraction of the model's genes that must be present.
        accelerator, devices
            Where to run the encoder.
        progress_bar
            Show a progress bar over the cells embedded (on stderr).

        Returns
        -------
        ``(n_cells, n_latent)`` float32 array.
        """
        expression, alignment = self._read(adata, layer, log_normalized, gene_id_key, min_gene_overlap)
        if alignment.missing:
            logger.warning(
                "%d of %d model genes are missing from the data (first missing: %s); they are %s.",
                len(alignment.missing),
                alignment.n_genes,
                alignment.missing[:5],
                "masked as not measured" if self.module.mask_aware else "set to zero after normalisation",
            )
        device = resolve_device(accelerator, devices)
        return self._encode(expression, batch_size, device, progress_bar=progress_bar, gene_mask=alignment.present)

    def embed_query(
        self,
        adata: AnnData | None = None,
        *,
        batch_size: int = 4096,
        layer: str | None = SAME_AS_TRAINING,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.0,
        progress_bar: bool = False,
        with_hidden: bool = True,
        with_gene_logits: bool = False,
    ) -> QueryEmbedding:
        """Embed cells and keep what annotation, novelty and panel handling need besides the embedding.

        Parameters
        ----------
        adata, batch_size, layer, log_normalized, gene_id_key, min_gene_overlap, progress_bar
            As in :meth:`get_latent_representation` (``min_gene_overlap`` defaults to 0 here).
        with_hidden
            Also project the cells into the novelty score's hidden-layer and gene spaces (when the model has them).
        with_gene_logits
            Also compute the gene classifier's logits (when the model has one), from the same minibatches.

        Returns
        -------
        The embedding ``z``, the cells' projections into the novelty score's spaces (``hidden``; ``None``
        for a model without a classifier head or saved before that space existed), the gene ``alignment`` and the
        gene classifier's uncalibrated ``gene_logits`` (or ``None``).
        """
        expression, alignment = self._read(adata, layer, log_normalized, gene_id_key, min_gene_overlap)
        space = self.novelty_reference_.spaces if self.has_classifier and with_hidden else None
        device = torch.device(self.device)
        gene_logits, on_inputs = None, None
        if with_gene_logits and self.has_gene_classifier:
            gene_classifier = self.gene_classifier_.to(device)
            present = alignment.present
            mask = None if present.all() else torch.as_tensor(present, device=device)
            gene_logits = np.empty((expression.n_cells, len(self.cell_types)), dtype=np.float32)

            def on_inputs(rows, x):
                gene_logits[rows] = gene_classifier(x, mask).cpu().numpy()

        encoded = self._encode(
            expression,
            batch_size,
            device,
            progress_bar=progress_bar,
            gene_mask=alignment.present,
            hidden=space,
            on_inputs=on_inputs,
        )
        z, hidden = encoded if space is not None else (encoded, None)
        return QueryEmbedding(z, hidden, alignment, gene_logits)

    def _read(self, adata, layer, log_normalized, gene_id_key, min_gene_overlap, batch_names=None):
        self.require_trained()
        setup = self.setup_args
        if adata is None:
            if self.adata is None:
                raise ValueError("The model has no attached AnnData; pass the cells to embed as `adata`.")
            adata = self.adata
        if layer == SAME_AS_TRAINING:
            layer = setup["layer"]
        if log_normalized is None:
            log_normalized = setup["log_normalized"]
        if not log_normalized and self.target_sum is None:
            raise ValueError(
                "The model was trained on log-normalised values, so raw counts cannot be normalised the same way. "
                "Normalise the counts as the training data was and pass log_normalized=True."
            )
        expression, alignment = read_expression(
            adata,
            self.gene_names_for(gene_id_key),
            layer=layer,
            log_normalized=log_normalized,
            target_sum=self.target_sum,
            gene_id_key=gene_id_key,
            min_gene_overlap=min_gene_overlap,
            gene_count_fractions=self.gene_count_fractions,
        )
        self._standardize(expression, adata, alignment.present, batch_names)
        return expression, alignment

    def _standardize(self, expression, adata, present, batch_names=None) -> None:
        """Attach the per-batch moment matching (``match_batch_moments``) of ``adata``'s cells to their expression.

        Nothing for a model trained without it.
        """
        moments = self.batch_moments_
        if moments is None:
            return
        classify = None
        if self.has_classifier:
            device = torch.device(self.device)
            mask = None if present is None or present.all() else present

            novelty = getattr(self, "novelty_reference_", None)
            space = None if novelty is None else novelty.spaces

            def classify(cells):
                encoded = self._encode(cells, 4096, device, gene_mask=mask, hidden=space)
                z, hidden = encoded if space is not None else (encoded, None)
                probabilities = self.probabilities_from_embedding(z)
                if novelty is None:
                    return probabilities, np.ones(len(z), dtype=bool)
                known = novelty.matching_pvalues(novelty.scores(z, probabilities, hidden)) > MOMENT_NOVELTY_ALPHA
                return probabilities, known

        names = batch_names_of(self, adata, batch_names)
        expression.standardization = moments.standardization_for(expression, names, present, classify)

    def gene_names_for(self, gene_id_key: str | None) -> list[str]:
        """The names a query's genes are matched against: the model's gene ids with ``gene_id_key``, else its genes."""
        return self.gene_ids if gene_id_key is not None and self.gene_ids is not None else self.genes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model's genes, normalisation and encoder weights: equal fingerprints embed identically."""
        digest = hashlib.sha256()
        fractions = None if self.gene_count_fractions is None else self.gene_count_fractions.tolist()
        normalisation = {"genes": self.genes, "target_sum": self.target_sum, "fractions": fractions}
        digest.update(json.dumps(normalisation).encode())
        moments = self.batch_moments_
        if moments is not None:
            digest.update(json.dumps(moments.batches).encode())
            for name, values in sorted(moments.to_tensors().items()):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
        for name, tensor in sorted(self.module.encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def build_reference_index(
        self, adata_ref: AnnData, label_keys: list[str] | str | None = None, **kwargs
    ) -> ReferenceIndex:
        """Embed and index a reference atlas with this model.

        The index is kept as ``reference_index_`` and saved with the model.

        Parameters
        ----------
        adata_ref
            Reference cells (not modified), e.g. the training data.
        label_keys
            Columns of ``adata_ref.obs`` to transfer; the model's ``labels_key`` when ``None``.
        **kwargs
            Options of :meth:`cellular.ReferenceIndex.build` (``backend``, ``metric``, ``device``, ``use_rep``, ...).

        Returns
        -------
        The index (also stored as ``model.reference_index_``).
        """
        self.reference_index_ = ReferenceIndex.build(self, adata_ref, label_keys, **kwargs)
        return self.reference_index_

    def require_trained(self) -> None:
        """Raise :class:`~cellular.NotTrainedError` (saying how to fix it) unless the model is trained."""
        if not self.is_trained_:
            raise NotTrainedError("This CELLULAR model has not been trained yet; call model.train() first.")

    def _encode(
        self,
        expression,
        batch_size: int,
        device: torch.device,
        progress_bar: bool = False,
        gene_mask: np.ndarray | None = None,
        hidden=None,
        on_inputs=None,
    ):
        """Embedding of normalised expression; with ``hidden`` also the first hidden layer of each cell.

        ``hidden="raw"`` returns ``(z, activations)``; :class:`~cellular.model._novelty.NoveltySpaces` return
        ``(z, projections)`` into them (genes absent from the query, ``gene_mask``, read at the training mean),
        computed minibatch by minibatch. ``on_inputs(rows, x)`` is called with every minibatch's inputs on the device.
        """
        module = self.module.to(device)
        module.eval()
        use_mask = module.mask_aware and gene_mask is not None and not gene_mask.all()
        mask = torch.as_tensor(gene_mask, device=device) if use_mask else None
        out = np.empty((expression.n_cells, module.n_latent), dtype=np.float32)
        hidden_out = None
        with (
            torch.no_grad(),
            tqdm(
                total=expression.n_cells, desc="Embedding cells", unit="cell", unit_scale=True, disable=not progress_bar
            ) as progress,
        ):
            for index in sequential_minibatches(expression.n_cells, batch_size):
                x = torch.from_numpy(expression.rows(index)).to(device)
                if on_inputs is not None:
                    on_inputs(index, x)
                activations = module.encoder.hidden(x, mask)
                out[index] = module.encoder.from_hidden(activations).cpu().numpy()
                if hidden is not None:
                    activations = activations.cpu().numpy()
                    if isinstance(hidden, str):
                        values = activations
                    else:  # the inputs leave the device only when a gene space needs them
                        inputs = x.cpu().numpy() if hidden.genes is not None else None
                        values = hidden.project(inputs, activations, gene_mask)
                    if hidden_out is None:
                        hidden_out = np.empty((expression.n_cells, values.shape[1]), dtype=np.float32)
                    hidden_out[index] = values
                progress.update(index.size)
        if not np.isfinite(out).all():
            self._raise_not_finite(out)
        if hidden is None:
            return out
        if hidden_out is None:
            hidden_out = np.empty((0, 0), dtype=np.float32)
        return out, hidden_out

    def non_finite_weights(self) -> list[str]:
        """Names of the module's parameters and buffers that hold NaN or infinite values (empty when all finite)."""
        tensors = {f"module.{name}": tensor for name, tensor in self.module.state_dict().items()}
        if getattr(self, "classifier_", None) is not None:
            tensors.update({f"classifier.{name}": tensor for name, tensor in self.classifier_.state_dict().items()})
        if getattr(self, "gene_classifier_", None) is not None:
            tensors.update(
                {f"gene_classifier.{name}": tensor for name, tensor in self.gene_classifier_.state_dict().items()}
            )
        return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]

    def _raise_not_finite(self, z: np.ndarray) -> None:
        n_bad = int((~np.isfinite(z).all(axis=1)).sum())
        raise ValueError(
            f"The encoder's embedding of {n_bad} of {z.shape[0]} cells holds NaN or infinite values (weights that "
            f"are not finite: {self.non_finite_weights() or 'none'}). Damaged or diverged weights: retrain the model "
            "(a lower learning rate, lr=..., helps a diverging run) or load an intact copy; with finite weights, "
            "check that the input is raw counts, or log1p-normalised values with log_normalized=True."
        )


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


_COLUMN_CONTENT = {"labels_key": "cell-type labels", "batch_key": "batches"}


def _check_obs_column(adata: AnnData, key: str, argument: str) -> None:
    if key not in adata.obs:
        raise KeyError(
            f"{argument}={key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}). "
            f"Pass the name of the column holding the {_COLUMN_CONTENT.get(argument, 'values')}."
        )
    column = adata.obs[key]
    if column.isna().any():
        raise ValueError(
            f"adata.obs[{key!r}] has {int(column.isna().sum())} missing values. Fill them, e.g. with the "
            "unlabeled_category ('Unknown') for labels, before setting up the data."
        )


def _label_levels(adata: AnnData, labels_key, label_hierarchy, label_levels, unlabeled_category: str):
    """The finest labels column, the parent map and the level names of ``setup_anndata``'s label arguments."""
    if isinstance(labels_key, list | tuple):
        keys = [str(key) for key in labels_key]
        if len(keys) < 2 or len(set(keys)) < len(keys):
            raise ValueError(
                f"labels_key={keys} must name one column, or at least two distinct columns (coarse to fine) for "
                "labels at several levels."
            )
        for key in keys:
            _check_obs_column(adata, key, "labels_key")
        derived = hierarchy_from_columns(adata.obs, keys, unlabeled_category)
        for child, parent in (label_hierarchy or {}).items():
            if derived.get(str(child), str(parent)) != str(parent):
                raise ValueError(
                    f"label_hierarchy puts {child!r} under {parent!r}, but the labels_key columns put it under "
                    f"{derived[str(child)]!r}; a hierarchy gives each label one parent."
                )
        label_hierarchy = {**{str(c): str(p) for c, p in (label_hierarchy or {}).items()}, **derived}
        label_levels = keys if label_levels is None else label_levels
        labels_key = keys[-1]
    else:
        _check_obs_column(adata, labels_key, "labels_key")
    if label_hierarchy is not None:
        if not isinstance(label_hierarchy, dict):
            raise TypeError(
                f"label_hierarchy must be a parent map {{child: parent}}, got {type(label_hierarchy).__name__}."
            )
        label_hierarchy = {str(child): str(parent) for child, parent in label_hierarchy.items()}
        for child in label_hierarchy:
            ancestors(child, label_hierarchy)
    elif label_levels is not None:
        raise ValueError("label_levels names the levels of a hierarchy; pass label_hierarchy or a list of labels_key.")
    label_levels = None if label_levels is None else [str(level) for level in label_levels]
    return labels_key, label_hierarchy, label_levels


def _as_string_categories(adata: AnnData, key: str) -> None:
    """Make ``adata.obs[key]`` categorical with string categories, all of them used (values unchanged)."""
    column = adata.obs[key]
    if isinstance(column.dtype, pd.CategoricalDtype) and all(isinstance(c, str) for c in column.cat.categories):
        used = set(column.cat.codes.unique())
        unused = [c for code, c in enumerate(column.cat.categories) if code not in used]
        if not unused:
            return
        logger.info("Removing categories without cells from adata.obs[%r]: %s.", key, unused)
        adata.obs[key] = column.cat.remove_unused_categories()
        return
    logger.info("Converting adata.obs[%r] (%s) to categorical labels with string categories.", key, column.dtype)
    values = column.cat.remove_unused_categories() if isinstance(column.dtype, pd.CategoricalDtype) else column
    distinct = list(values.cat.categories) if isinstance(values.dtype, pd.CategoricalDtype) else list(pd.unique(values))
    if all(isinstance(v, int | np.integer | float | np.floating) and not isinstance(v, bool) for v in distinct):
        distinct = sorted(distinct)  # numbers in numeric order: 2 before 10
    text = [str(value) for value in distinct]
    if len(set(text)) < len(text):
        raise ValueError(
            f"adata.obs[{key!r}] holds different values that read the same as text (e.g. 1 and '1'): "
            f"{sorted(t for t in set(text) if text.count(t) > 1)[:5]}. Make the column one type first, e.g. "
            f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)."
        )
    adata.obs[key] = pd.Categorical(values.astype(str), categories=list(dict.fromkeys(text)))


def _check_label_counts(labels: np.ndarray, cell_types: list[str], labels_key: str) -> None:
    counts = np.bincount(labels[labels >= 0], minlength=len(cell_types))
    if int((counts > 0).sum()) < 2:
        raise ValueError(
            f"adata.obs[{labels_key!r}] has {int((counts > 0).sum())} labelled cell type(s); CELLULAR's contrastive "
            "loss needs at least two cell types with labelled cells."
        )
    single = [cell_types[i] for i in np.flatnonzero(counts == 1)]
    if single:
        raise ValueError(
            f"Cell type(s) {single} in adata.obs[{labels_key!r}] have a single labelled cell; a type needs at least "
            "two cells to form positive pairs. Remove those cells, merge the type into a broader one, or set their "
            "label to the unlabeled_category."
        )


def _layout(expression, genes: list[str], method: str, seed: int) -> np.ndarray:
    """The gene-grid layout, the co-expression one computed on a fixed sample of the training cells."""
    if method == "alphabetical":
        return gene_grid_layout(genes, "alphabetical")
    rng = np.random.default_rng(seed)
    n_sample = min(expression.n_cells, LAYOUT_SAMPLE_CELLS)
    sample = np.sort(rng.choice(expression.n_cells, n_sample, replace=False))
    return gene_grid_layout(genes, "coexpression", expression.rows(sample), seed=seed)


def _mean_count_shares(expression) -> np.ndarray:
    """Mean over cells of each gene's share of the cell's counts (``expression`` read with ``target_sum=1``)."""
    totals = np.zeros(expression.matrix.shape[1])
    for start, stop, block in expression.stored_chunks():
        totals += np.asarray((sp.diags(expression.size_factors[start:stop]) @ block).sum(axis=0)).reshape(-1)
    return totals / max(expression.n_cells, 1)


def _epoch_frames(history: dict[str, list[float]]) -> dict[str, pd.DataFrame]:
    """Per-epoch values as one-column frames indexed by epoch, like scvi-tools' ``history``."""
    return {name: pd.DataFrame({name: values}, index=pd.RangeIndex(len(values))) for name, values in history.items()}


def _history_frames(history: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """scvi-tools' logger history as float frames indexed by integer epoch."""
    frames = {}
    for key, frame in history.items():
        frame = frame.astype(float)
        frame.index = frame.index.astype(int)
        frame.index.name = "epoch"
        frames[key] = frame
    return frames
