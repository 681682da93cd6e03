"""Annotation and novelty of cells with a trained classifier head: probabilities, labels and novelty scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellular.data import check_finite_embedding

from ._classifier_training import classifier_logits
from ._common import SAME_AS_TRAINING, NotTrainedError
from ._device import resolve_device


class PredictionMixin:
    """Calibrated predictions and novelty scores of the classifier head.

    Mixed into :class:`~cellular.CELLULAR`; relies on its encoder, registry and classifier stage (``AnnotationMixin``).
    """

    def require_classifier(self) -> None:
        """Raise :class:`~cellular.NotTrainedError` (saying how to fix it) unless the classifier head is trained."""
        self.require_trained()
        if not self.has_classifier:
            raise NotTrainedError(
                "This CELLULAR model has no trained classifier; call model.train_classifier() (or train the model "
                "with model.train(classifier=True), the default)."
            )

    def probabilities_from_embedding(
        self, z: np.ndarray, *, calibrated: bool = True, temperature: float | None = None
    ) -> np.ndarray:
        """Classifier-head probabilities of already embedded cells.

        Parameters
        ----------
        z
            ``(n_cells, n_latent)`` embedding from this model.
        calibrated
            Divide the logits by the calibrated temperature (``False``: raw softmax).
        temperature
            Use this temperature instead (e.g. a panel calibration's).

        Returns
        -------
        ``(n_cells, n_types)`` array, columns in :attr:`cell_types` order.
        """
        self.require_classifier()
        z = check_finite_embedding(z, "The embedding", "Embed the cells with this model (get_latent_representation).")
        logits = classifier_logits(self.classifier_, z)
        if temperature is None:
            temperature = self.calibration_temperature_ if calibrated else 1.0
        probabilities = torch.softmax(logits / temperature, dim=1).numpy()
        if not np.isfinite(probabilities).all():
            raise ValueError(
                f"The classifier head gives NaN probabilities (temperature {temperature}, non-finite weights: "
                f"{self.non_finite_weights() or 'none'}): its weights or calibration were damaged. Retrain it with "
                "model.train_classifier() or load an intact copy of the model."
            )
        return probabilities

    def novelty_scores_from_embedding(
        self, z: np.ndarray, probabilities: np.ndarray, index, reference=None, hidden: np.ndarray | None = None
    ) -> pd.DataFrame:
        """The table of :meth:`get_novelty_scores` for already embedded cells.

        Parameters
        ----------
        z
            ``(n_cells, n_latent)`` embedding from this model.
        probabilities
            The cells' classifier probabilities (:meth:`probabilities_from_embedding`).
        index
            Row index of the table (the cells' names).
        reference
            Novelty reference to score against (e.g. a panel-recalibrated one); the model's when ``None``.
        hidden
            The cells' projections into the novelty score's hidden-layer and gene spaces (:meth:`embed_query`), or
            ``None``.
        """
        reference = self.novelty_reference_ if reference is None else reference
        distance, nearest = reference.nearest_type(z)
        uncertainty = 1.0 - probabilities.max(axis=1)
        hidden_distance, gene_distance, gene_uncertainty = reference.space_distances(hidden)
        scores = reference.combine(distance, uncertainty, hidden_distance, gene_distance, gene_uncertainty)
        frame = pd.DataFrame(
            {
                "score": scores,
                "pvalue": reference.pvalues(scores),
                "nearest_type": pd.Categorical.from_codes(nearest, categories=self.cell_types),
                "distance": distance,
                "uncertainty": uncertainty,
            },
            index=index,
        )
        if hidden_distance is not None:
            frame["hidden_distance"] = hidden_distance
        if gene_distance is not None:
            frame["gene_distance"] = gene_distance
        if gene_uncertainty is not None:
            frame["gene_uncertainty"] = gene_uncertainty
        return frame

    def predict(
        self,
        adata: AnnData | None = None,
        soft: bool = False,
        *,
        calibrated: bool = True,
        batch_size: int = 4096,
        layer: str | None = SAME_AS_TRAINING,
        log_normalized: bool | None = None,
        gene_id_key: str | None = None,
        min_gene_overlap: float = 0.5,
        accelerator: str = "auto",
        devices: int | str | list[int] = "auto",
    ) -> np.ndarray | pd.DataFrame:
        """Predict cell types with the classifier head.

        Parameters
        ----------
        adata
            Cells to annotate (genes matched by name, see :meth:`get_latent_representation`); the training data
            when ``None``.
        soft
            Return the ``cells x types`` probability table instead of labels.
        calibrated
            Use the temperature-scaled probabilities (``False`` gives the raw softmax).
        batch_size, layer, log_normalized, gene_id_key, min_gene_overlap, accelerator, devices
            As in :meth:`get_latent_representation`.

        Returns
        -------
        Array of predicted type names, or a :class:`~pandas.DataFrame` indexed by ``obs_names`` with one column
        per type in :attr:`cell_types` order.
        """
        self.require_classifier()
        z = self.get_latent_representation(
            adata,
            batch_size=batch_size,
            layer=layer,
            log_normalized=log_normalized,
            gene_id_key=gene_id_key,
            min_gene_overlap=min_gene_overlap,
            accelerator=accelerator,
            devices=devices,
        )
        probabilities = self.probabilities_from_embedding(z, calibrated=calibrated)
        if soft:
            names = (self.adata if adata is None else adata).obs_names
            return pd.DataFrame(probabilities, index=names, columns=pd.Index(self.cell_types))
        return np.asarray(self.cell_types, dtype=object)[probabilities.argmax(axis=1)]

    def get_novelty_scores(
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
    ) -> pd.DataFrame:
        """Per-cell novelty scores and their split-conformal p-values.

        The score adds up to five parts, each divided by its 90 % quantile on the calibration cells: the cosine distance
        of a cell to the nearest reference type prototype divided by that type's spread (the median distance of
        the type's training cells to it), the classifier's uncertainty ``1 - max probability`` weighted by
        ``novelty_uncertainty_weight`` (0.1 by default, see :meth:`train_classifier`), the mean distance to the
        15 nearest training cells in the encoder's first hidden layer (PCA to 50 dimensions, up to 20,000 training
        cells; divided by those cells' own mean distance to their 15 nearest training cells, so a sparse region of
        the reference is not read as novel), weighted by ``novelty_hidden_weight`` (1.0), and the mean distance to
        the 15 nearest training cells in the encoder's input genes (log-normalised and batch-matched, then
        standardised and clipped at 10; genes a query lacks are read at the training mean; for a cell nearest to a
        type of fewer than 15 training cells, divided by how much farther apart that type's cells lie than the
        typical type's), weighted by
        ``novelty_gene_weight`` (3.0 when the model matches batch moments), and, where the reference's
        self-assessment passes, the entropy of the gene classifier's probabilities (temperature 1), weighted by
        ``novelty_gene_uncertainty_weight`` (1.0; see :meth:`train_classifier`). The p-value of a
        score is the fraction of calibration cells (held-out reference cells of known types) scoring at least as
        high, so flagging cells with ``pvalue <= alpha`` flags about ``alpha`` of cells of known types when the query
        resembles the reference; use :func:`cellular.tl.novel_types` for flags and FDR control.

        Parameters
        ----------
        adata, batch_size, layer, log_normalized, gene_id_key, min_gene_overlap, accelerator, devices
            As in :meth:`predict`.

        Returns
        -------
        DataFrame indexed by ``obs_names`` with columns ``score``, ``pvalue``, ``nearest_type``, ``distance``
        (spread-scaled distance to the nearest prototype), ``uncertainty``, ``hidden_distance``, ``gene_distance``
        and ``gene_uncertainty`` (the last three absent for models without those parts).
        """
        self.require_classifier()
        # embed_query runs where the model is: put it where the caller asked.
        device = resolve_device(accelerator, devices)
        self.module.to(device)
        self.classifier_.to(device)
        embedded = self.embed_query(
            adata,
            batch_size=batch_size,
            layer=layer,
            log_normalized=log_normalized,
            gene_id_key=gene_id_key,
            min_gene_overlap=min_gene_overlap,
        )
        names = (self.adata if adata is None else adata).obs_names
        return self.novelty_scores_from_embedding(
            embedded.z, self.probabilities_from_embedding(embedded.z), names, hidden=embedded.hidden
        )
